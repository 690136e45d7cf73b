r"""Standard losses on model outputs, with closed-form output-space Hessians.

Each loss is a callable ``loss(outputs, targets, weights=None) -> scalar`` (a
**mean** over the examples, matching ``reduction="mean"`` of the operators)
that also has an ``output_hvp(outputs, targets, u, weights=None)`` method
returning ``H_L u``, the Hessian of the loss with respect to ``outputs``
applied to ``u``. :func:`hvp.ggn` uses ``output_hvp`` when present instead of
differentiating the loss twice.

Weights (a padding mask or per-example / per-token weights) have the
leading shape of the targets' positions (the full positions shape, or a
prefix of it: per example for per-token losses) and the loss is normalised by
their sum, as the Flax lm1b example does (``weights = targets > 0``):

.. math::

   L = \frac{\sum_i w_i \ell_i}{\sum_i w_i},

with ``w_i`` broadcast to every position ``i`` it covers. Without weights
``w_i = 1`` (the plain mean). A batch whose weights are all 0 gives 0.

* Softmax cross-entropy, with ``p = softmax(z)`` for one position:
  ``H_L = w_i m_i (diag(p) - p p^T) / sum(w)`` where ``m_i`` is the mass of
  the targets (1 for labels and probability vectors). It is positive
  semi-definite, so the GGN is too. With ``label_smoothing=a`` (integer
  labels only) the targets are lm1b's soft targets: ``1 - a`` on the label and
  ``a / (C - 1)`` elsewhere, and the loss subtracts lm1b's normalising
  constant (the entropy of the soft targets), so it is 0 at the optimum;
  the Hessian is unchanged by the constant.
* Mean squared error ``sum(w (o - t)^2) / sum(w)`` over all entries (``w``
  broadcast to the outputs' shape; ``mean((o - t)^2)`` without weights):
  ``H_L = 2 diag(w) / sum(w)``.

**The Fisher** (:func:`hvp.fisher`). Each built-in loss is the negative
log-likelihood of a predictive distribution :math:`p(y \mid z)` up to scale,
chosen so that :math:`\mathbb E_{y \sim p}[g g^\top] = \nabla^2_z \ell` for
the per-position gradient :math:`g = \nabla_z \ell(z, y)`:

* softmax cross-entropy: :math:`y \sim \mathrm{Categorical}(\mathrm{softmax}(z))`,
  :math:`g = p - e_y`, :math:`\mathbb E[g g^\top] = \mathrm{diag}(p) - p p^\top`.
* squared error, per entry :math:`\ell = (o - t)^2` with Hessian 2:
  :math:`t \sim \mathcal N(o, \sigma^2)`, :math:`g = 2 (o - t)`,
  :math:`\mathbb E[g^2] = 4 \sigma^2 = 2` for :math:`\sigma^2 = 1/2`.

``sample(outputs, key, num_samples)`` draws the targets and
``fisher_output_hvp(outputs, samples, u, weights=None)`` applies the Monte-Carlo
output-space Fisher :math:`\sum_i c_i \frac1S \sum_s g_{is} (g_{is}^\top u_i)`
with the same position weights :math:`c_i = w_i / \sum w` as ``output_hvp``,
whose expectation is exactly ``output_hvp`` (for targets of unit mass).
``sqrt_hessian(outputs, targets, weights=None)`` is a square root of the
output Hessian per position (:math:`S S^\top = H`).

On concrete targets (not inside ``jit``; the operators check every batch when
they are built) the losses check the targets against the outputs: integer
labels must lie in ``[0, C)`` (at the positions with nonzero weight),
probability targets must have width ``C`` and be ``>= 0``; squared error needs
targets of the outputs' shape (never silently broadcast).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["softmax_cross_entropy", "mean_squared_error", "SoftmaxCrossEntropy", "MeanSquaredError"]


def _concrete(*xs) -> bool:
    """Whether every array is a value this process can read (not a tracer, not multi-host).

    A global array spanning several processes (``jax.make_array_from_process_local_data``) cannot
    be read back on one host, so the eager value checks are skipped for it, as under ``jit``.
    """
    return not any(
        isinstance(x, jax.core.Tracer) or not getattr(x, "is_fully_addressable", True)
        for x in xs
        if x is not None
    )


def _expand_weights(weights, shape: tuple, who: str):
    """Weights broadcast to ``shape`` (they must match a prefix of it)."""
    if weights is None:
        return None
    w = jnp.asarray(weights)
    if w.shape != tuple(shape[: w.ndim]) or w.ndim == 0:
        raise ValueError(
            f"{who}: `weights` of shape {w.shape} do not match the positions {tuple(shape)}; give one "
            "weight per example (leading axis) or per position (e.g. per token), with the same "
            "leading axes."
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        w = w.astype(jnp.float32)
    return jnp.broadcast_to(w.reshape(w.shape + (1,) * (len(shape) - w.ndim)), shape)


def _normaliser(w, count: int, dtype):
    """``sum(w)`` (1 where it is 0, so that a fully masked batch gives 0, not NaN), or ``count``."""
    if w is None:
        return jnp.asarray(count, dtype)
    s = jnp.sum(w).astype(dtype)
    return jnp.where(s > 0, s, jnp.ones_like(s))


def _examples(idx, values, limit: int = 5) -> str:
    return ", ".join(
        f"{v} at {tuple(int(j) for j in i)}" for i, v in zip(idx[:limit], values[:limit])
    )


class SoftmaxCrossEntropy:
    """Mean softmax cross-entropy of logits against labels or probability targets, optionally weighted.

    Logits ``(..., C)``; integer labels ``(...)`` or probability/one-hot
    targets ``(..., C)``.

    Args:
      label_smoothing: ``a`` in ``[0, 1)``: integer labels become soft targets
        with ``1 - a`` on the label and ``a / (C - 1)`` on every other class,
        and the loss subtracts the soft targets' entropy (the Flax lm1b
        example's ``compute_weighted_cross_entropy``).

    Call as ``loss(logits, targets, weights=None)``; ``output_hvp(logits,
    targets, u, weights=None)`` is the closed-form output-space Hessian
    product (see the module docstring for the formulas).

    Raises:
      ValueError: targets whose shape does not fit the logits, integer labels
        outside ``[0, C)`` or negative probabilities (concrete data; the
        message names the offending values), weights of the wrong shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.zeros((2, 3, 4))                  # (batch, tokens, classes)
      >>> tokens = jnp.array([[1, 2, 0], [3, 0, 0]])
      >>> mask = tokens > 0                              # padding excluded, lm1b-style
      >>> round(float(softmax_cross_entropy(logits, tokens, mask)), 4)  # log(4)
      1.3863
      >>> smoothed = SoftmaxCrossEntropy(label_smoothing=0.1)
      >>> round(float(smoothed(jnp.zeros((1, 4)), jnp.array([2]))), 4)
      0.9514
    """

    name = "softmax_cross_entropy"
    #: Convex in the logits: the GGN built with this loss is positive semi-definite.
    convex = True

    def __init__(self, label_smoothing: float = 0.0):
        ls = float(label_smoothing)
        if not (math.isfinite(ls) and 0.0 <= ls < 1.0):
            raise ValueError(f"`label_smoothing` must be in [0, 1), got {label_smoothing!r}.")
        self.label_smoothing = ls

    def _check_labels(self, targets, num_classes: int, w) -> None:
        y = np.asarray(targets)
        bad = (y < 0) | (y >= num_classes)
        used = np.ones(y.shape, bool)
        if w is not None and _concrete(w):
            # weights of a prefix of the positions' shape (e.g. per example for per-token
            # labels) cover every position under them, as in the loss
            wn = np.asarray(w) != 0
            used = np.broadcast_to(wn.reshape(wn.shape + (1,) * (y.ndim - wn.ndim)), y.shape)
            bad &= used
        if bad.any():
            idx = np.argwhere(bad)
            vals = y[bad]
            hint = ""
            labels = y[used]
            if labels.min() == 1 and labels.max() == num_classes:
                hint = " The labels look 1-based: subtract 1."
            raise ValueError(
                f"{self.name}: integer labels must lie in [0, {num_classes}) for logits with "
                f"{num_classes} classes; found {int(bad.sum())} outside it: {_examples(idx, vals)}.{hint} "
                "An out-of-range label would silently give an all-zero target and drop the example "
                "from the loss and the curvature; to exclude positions (padding), give them weight 0."
            )

    def _targets(self, logits, targets, w):
        """Soft targets ``(..., C)`` and the constant subtracted from each position's loss."""
        targets = jnp.asarray(targets) if not hasattr(targets, "shape") else targets
        c = logits.shape[-1]
        pos = logits.shape[:-1]
        if jnp.issubdtype(targets.dtype, jnp.floating) and targets.ndim == logits.ndim:
            if targets.shape != logits.shape:
                raise ValueError(
                    f"{self.name}: probability/one-hot targets have shape {targets.shape} but the logits "
                    f"have {logits.shape}; the targets need width {c} (the number of classes) and the "
                    "same leading axes."
                )
            if self.label_smoothing:
                raise ValueError(
                    f"{self.name}: label_smoothing applies to integer labels; smooth probability "
                    "targets yourself, or pass integer labels."
                )
            if _concrete(targets) and np.any(np.asarray(targets) < 0):
                idx = np.argwhere(np.asarray(targets) < 0)
                raise ValueError(
                    f"{self.name}: probability targets must be >= 0; found "
                    f"{_examples(idx, np.asarray(targets)[np.asarray(targets) < 0])}."
                )
            return targets, None
        if jnp.issubdtype(targets.dtype, jnp.floating):
            raise TypeError(
                f"{self.name}: targets of shape {targets.shape} with dtype {targets.dtype} look like "
                f"labels (logits {logits.shape}); labels must be integers (cast with "
                f"`.astype(jnp.int32)`), probability/one-hot targets need shape {logits.shape}."
            )
        if targets.shape != pos:
            raise ValueError(
                f"{self.name}: integer labels must have shape {pos} (the logits {logits.shape} without "
                f"the class axis), got {targets.shape}."
            )
        if _concrete(targets):
            self._check_labels(targets, c, w)
        a = self.label_smoothing
        if not a:
            return jax.nn.one_hot(targets, c, dtype=logits.dtype), None
        if c < 2:
            raise ValueError(f"{self.name}: label smoothing needs at least 2 classes, got {c}.")
        on, off = 1.0 - a, a / (c - 1)
        soft = jax.nn.one_hot(targets, c, dtype=logits.dtype) * (on - off) + off
        const = -(on * math.log(on) + (c - 1) * off * math.log(off + 1e-20))
        return soft, const

    def __call__(self, logits, targets, weights=None):
        w = _expand_weights(weights, logits.shape[:-1], self.name)
        t, const = self._targets(logits, targets, weights)
        logp = jax.nn.log_softmax(logits, axis=-1)
        per_pos = -jnp.sum(t * logp, axis=-1)
        if const is not None:
            per_pos = per_pos - const
        denom = _normaliser(w, math.prod(logits.shape[:-1]), per_pos.dtype)
        if w is not None:
            per_pos = per_pos * w.astype(per_pos.dtype)
        return jnp.sum(per_pos) / denom

    def output_hvp(self, logits, targets, u, weights=None):
        w = _expand_weights(weights, logits.shape[:-1], self.name)
        t, _ = self._targets(logits, targets, weights)
        p = jax.nn.softmax(logits, axis=-1)
        mass = jnp.sum(t, axis=-1, keepdims=True)
        denom = _normaliser(w, math.prod(logits.shape[:-1]), p.dtype)
        if w is not None:
            mass = mass * w[..., None].astype(p.dtype)
        pu = p * u
        return mass * (pu - p * jnp.sum(pu, axis=-1, keepdims=True)) / denom

    def _position_weights(self, logits, weights):
        """``c_i = w_i / sum(w)`` per position (``1 / #positions`` without weights), shape ``(..., 1)``."""
        w = _expand_weights(weights, logits.shape[:-1], self.name)
        denom = _normaliser(w, math.prod(logits.shape[:-1]), logits.dtype)
        c = jnp.ones(logits.shape[:-1], logits.dtype) if w is None else w.astype(logits.dtype)
        return (c / denom)[..., None]

    def sample(self, logits, key, num_samples: int = 1):
        """Labels drawn from the model: ``y ~ Categorical(softmax(logits))`` per position.

        Returns int32 labels of shape ``(num_samples, *logits.shape[:-1])``.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> y = softmax_cross_entropy.sample(jnp.array([[0.0, 30.0]]), jax.random.key(0), 3)
          >>> y.shape, y.tolist()
          ((3, 1), [[1], [1], [1]])
        """
        return jax.random.categorical(
            key, logits, axis=-1, shape=(int(num_samples),) + tuple(logits.shape[:-1])
        ).astype(jnp.int32)

    def fisher_output_hvp(self, logits, samples, u, weights=None):
        r"""The Monte-Carlo output-space Fisher applied to ``u``.

        :math:`\sum_i c_i \frac1S \sum_s g_{is} (g_{is}^\top u_i)` with
        :math:`g_{is} = p_i - e_{y_{is}}` (the gradient of the position's
        cross-entropy at the sampled label ``samples[s]``) and :math:`c_i` the
        position's weight in the loss. Its expectation over the samples is
        ``output_hvp`` (``diag(p) - p p^T`` per position).

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> z, u = jnp.zeros((1, 2)), jnp.array([[1.0, 0.0]])
          >>> softmax_cross_entropy.fisher_output_hvp(z, jnp.array([[0], [1]]), u).tolist()
          [[0.25, -0.25]]
        """
        p = jax.nn.softmax(logits, axis=-1)
        g = p[None] - jax.nn.one_hot(samples, logits.shape[-1], dtype=p.dtype)
        gu = jnp.sum(g * u[None], axis=-1, keepdims=True)
        return self._position_weights(logits, weights) * jnp.mean(g * gu, axis=0)

    def sqrt_hessian(self, logits, targets=None, weights=None):
        r"""A square root of the output Hessian per position: ``S`` of shape ``(..., C, C)``.

        :math:`S_i = \sqrt{c_i m_i} (\mathrm{diag}(\sqrt{p_i}) - p_i \sqrt{p_i}^\top)`
        with :math:`S_i S_i^\top = c_i m_i (\mathrm{diag}(p_i) - p_i p_i^\top)`, the
        block of position ``i`` of ``output_hvp`` (``m_i`` the mass of the targets,
        1 for labels and one-hot targets; ``targets=None`` takes ``m_i = 1``).
        Expanding: :math:`D D + p s^\top s p^\top - D s p^\top - p s^\top D` with
        :math:`D = \mathrm{diag}(s)`, :math:`s = \sqrt p`, :math:`D s = p`,
        :math:`s^\top s = 1`, gives :math:`\mathrm{diag}(p) - p p^\top`.

        Examples:
          >>> import jax.numpy as jnp
          >>> S = softmax_cross_entropy.sqrt_hessian(jnp.zeros((1, 2)))
          >>> (S @ jnp.swapaxes(S, -1, -2)).tolist()  # (diag(p) - p p^T) / 1 position
          [[[0.25, -0.25], [-0.25, 0.25]]]
        """
        p = jax.nn.softmax(logits, axis=-1)
        s = jnp.sqrt(p)
        scale = self._position_weights(logits, weights)
        if targets is not None:
            t, _ = self._targets(logits, targets, weights)
            scale = scale * jnp.sum(t, axis=-1, keepdims=True)
        root = jnp.sqrt(scale)[..., None]
        eye = jnp.eye(logits.shape[-1], dtype=p.dtype)
        return root * (s[..., None] * eye - p[..., :, None] * s[..., None, :])

    def __repr__(self):
        if self.label_smoothing:
            return f"hvp.losses.SoftmaxCrossEntropy(label_smoothing={self.label_smoothing})"
        return "hvp.losses.softmax_cross_entropy"


class MeanSquaredError:
    """``mean((outputs - targets) ** 2)`` over all entries (PyTorch's ``MSELoss()``), optionally weighted.

    Call as ``loss(outputs, targets, weights=None)``: with weights (per example
    or per entry, broadcast over the trailing axes) the loss is
    ``sum(w * (o - t)^2) / sum(w)``.

    Raises:
      ValueError: targets of a different shape than the outputs (they are
        never broadcast: ``(N, 1)`` outputs against ``(N,)`` targets would
        silently compare every pair), weights of the wrong shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> out, t = jnp.array([[1.0], [3.0]]), jnp.array([[0.0], [0.0]])
      >>> float(mean_squared_error(out, t)), float(mean_squared_error(out, t, jnp.array([1.0, 0.0])))
      (5.0, 1.0)
    """

    name = "mean_squared_error"
    #: Convex in the outputs: the GGN built with this loss is positive semi-definite.
    convex = True

    def _check(self, outputs, targets):
        if getattr(targets, "shape", None) != outputs.shape:
            raise ValueError(
                f"{self.name}: targets have shape {getattr(targets, 'shape', None)} but the outputs have "
                f"{outputs.shape}; they must match exactly (reshape the targets, e.g. "
                "`y.reshape(outputs.shape)`)."
            )

    def __call__(self, outputs, targets, weights=None):
        self._check(outputs, targets)
        sq = (outputs - targets) ** 2
        if weights is None:
            return jnp.mean(sq)
        w = _expand_weights(weights, outputs.shape, self.name).astype(sq.dtype)
        return jnp.sum(w * sq) / _normaliser(w, outputs.size, sq.dtype)

    def output_hvp(self, outputs, targets, u, weights=None):
        self._check(outputs, targets)
        if weights is None:
            return (2.0 / outputs.size) * u
        w = _expand_weights(weights, outputs.shape, self.name).astype(u.dtype)
        return 2.0 * w * u / _normaliser(w, outputs.size, u.dtype)

    def _position_weights(self, outputs, weights):
        """``c = w / sum(w)`` per entry (``1 / size`` without weights), shaped like the outputs."""
        if weights is None:
            return jnp.full(outputs.shape, 1.0 / outputs.size, outputs.dtype)
        w = _expand_weights(weights, outputs.shape, self.name).astype(outputs.dtype)
        return w / _normaliser(w, outputs.size, outputs.dtype)

    def sample(self, outputs, key, num_samples: int = 1):
        r"""Targets drawn from the model: ``t = outputs + eps / sqrt(2)``, ``eps ~ N(0, 1)`` per entry.

        The variance :math:`\sigma^2 = 1/2` makes the gradient
        :math:`g = 2 (o - t)` of the entry's squared error have
        :math:`\mathbb E[g^2] = 4 \sigma^2 = 2`, the entry's second derivative.
        Returns shape ``(num_samples, *outputs.shape)``.

        Examples:
          >>> import jax, jax.numpy as jnp
          >>> t = mean_squared_error.sample(jnp.zeros((2, 3)), jax.random.key(0), 4)
          >>> t.shape
          (4, 2, 3)
        """
        eps = jax.random.normal(key, (int(num_samples),) + tuple(outputs.shape), outputs.dtype)
        return outputs[None] + jnp.sqrt(jnp.asarray(0.5, outputs.dtype)) * eps

    def fisher_output_hvp(self, outputs, samples, u, weights=None):
        r"""The Monte-Carlo output-space Fisher applied to ``u``: ``c * mean_s(g_s^2) * u``.

        :math:`g_s = 2 (o - t_s)` per entry and ``c`` the entry's weight in the
        loss; its expectation over the samples is ``output_hvp`` (``2 c u``).

        Examples:
          >>> import jax.numpy as jnp
          >>> o = jnp.zeros((1, 1))
          >>> mean_squared_error.fisher_output_hvp(o, jnp.array([[[0.5]], [[-0.5]]]), jnp.ones((1, 1)))
          Array([[1.]], dtype=float64)
        """
        g = 2.0 * (outputs[None] - samples)
        return self._position_weights(outputs, weights) * jnp.mean(g * g, axis=0) * u

    def sqrt_hessian(self, outputs, targets=None, weights=None):
        """A square root of the (diagonal) output Hessian: ``sqrt(2 c)``, shaped like the outputs.

        The output Hessian is ``diag(2 c)`` (``c = w / sum(w)`` per entry), so its
        square root is diagonal too; the diagonal is returned.

        Examples:
          >>> import jax.numpy as jnp
          >>> mean_squared_error.sqrt_hessian(jnp.zeros((1, 2))).tolist()  # sqrt(2 / 2)
          [[1.0, 1.0]]
        """
        if targets is not None:
            self._check(outputs, targets)
        return jnp.sqrt(2.0 * self._position_weights(outputs, weights))

    def __repr__(self):
        return "hvp.losses.mean_squared_error"


softmax_cross_entropy = SoftmaxCrossEntropy()
mean_squared_error = MeanSquaredError()
