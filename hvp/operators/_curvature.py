r"""Curvature operators of a loss over a data set: Hessian, GGN, empirical Fisher.

For a data set split into batches :math:`B_1, \dots, B_m` with
:math:`n_b = |B_b|` and :math:`N = \sum_b n_b`, and a loss that is the **mean**
over the examples of a batch (``reduction="mean"``, the default), the
operators are the curvature of the data-set mean loss

.. math::

   L(\theta) = \frac1N \sum_{i=1}^N \ell_i(\theta)
             = \sum_b \frac{n_b}{N} \, L_{B_b}(\theta),

so each batch's operator enters with weight :math:`n_b / N`, which is exact
for a last batch of a different size. With ``reduction="sum"`` the loss is a
sum over examples and batches are added with weight 1.

* Hessian: :math:`H v = \partial_\theta (\nabla L \cdot v)` by
  forward-over-reverse (``jax.jvp`` of ``jax.grad``), Pearlmutter (1994).
* Generalised Gauss-Newton: :math:`G v = J^\top H_\ell J v` with ``J`` the
  Jacobian of the model outputs and :math:`H_\ell` the Hessian of the loss in
  output space (Schraudolph, 2002; Martens, 2010). One forward pass is
  linearised (``jax.linearize``), giving ``Jv``; the output-space product
  uses the loss's closed form when it has one (``output_hvp``), and the
  transpose (``jax.linear_transpose``) gives :math:`J^\top u`. It is positive
  semi-definite whenever the loss is convex in the outputs.
* Empirical Fisher: :math:`F v = \frac1N \sum_i g_i (g_i^\top v)` with
  per-example gradients :math:`g_i`, computed as :math:`J^\top J v` for the
  Jacobian ``J`` of the vector of per-example losses, never forming the
  :math:`g_i` (Kunstner et al., 2019, discuss when it differs from the Fisher).

Batches of equal shape are stacked and reduced inside one compiled
``lax.scan``; the matvec is compiled once per operator (the operator is a
pytree whose arrays are jit arguments, not constants).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from hvp import tree as tu
from hvp.operators import _blocks
from hvp.operators._base import LinearOperator
from hvp.operators._data import Dataset, as_dataset
from hvp.typing import PyTree

__all__ = ["CurvatureOperator", "hessian", "ggn", "empirical_fisher", "hvp", "default_unpack"]

_REDUCTIONS = ("mean", "sum")


def _check_params(params, *, name="params") -> None:
    tu.assert_floating(params, name=name)
    if not tu.is_traced(params):
        bad = tu.nonfinite_leaves(params)
        if bad:
            raise ValueError(
                f"`{name}` contain NaN or Inf in leaf(s) {', '.join(repr(b) for b in bad)}; curvature at "
                "such a point is meaningless. Check the checkpoint or the training run that produced them."
            )


def _check_scalar(out, what: str) -> None:
    shape = getattr(out, "shape", None)
    if shape != ():
        hint = ""
        if shape:
            hint = " Reduce it over the batch, e.g. `jnp.mean(per_example_losses)`."
        raise ValueError(f"{what} must return a scalar, but it returned shape {shape}.{hint}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{what} must return a floating-point scalar, got dtype {out.dtype}.")


def hvp(fun: Callable, params: PyTree, v: PyTree, *args, **kwargs):
    """Hessian-vector product of a scalar function, by forward-over-reverse.

    Returns :math:`\\nabla^2_\\theta f(\\theta) \\, v` for
    ``f = fun(params, *args, **kwargs)`` as ``jax.jvp(jax.grad(f), (params,), (v,))[1]``
    (Pearlmutter, 1994): one forward and one reverse pass with forward-mode
    tangents, about 2-3 gradients. Works under ``jit`` and ``vmap``.

    Args:
      fun: scalar function of ``params`` (first argument).
      params: pytree of floating arrays.
      v: pytree with the same structure, shapes and dtypes as ``params``.
      *args: passed to ``fun`` unchanged (not differentiated).
      **kwargs: passed to ``fun`` unchanged (not differentiated).

    Raises:
      TypeError: non-floating parameters.
      ValueError: ``v`` not shaped like ``params``; ``fun`` not scalar.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> f = lambda p: jnp.sum(p ** 3)  # Hessian diag(6 p)
        >>> hvp.hvp(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
        Array([ 6., 12.], dtype=float64)
    """
    tu.assert_floating(params)
    tu.assert_same_structure(v, params)
    _check_scalar(jax.eval_shape(lambda p: fun(p, *args, **kwargs), params), "`fun`")
    return jax.jvp(jax.grad(lambda p: fun(p, *args, **kwargs)), (params,), (v,))[1]


def default_unpack(batch):
    """Split a batch into ``(inputs, targets)`` for :func:`ggn`.

    Accepts a 2-tuple/list ``(inputs, targets)`` or a dict with keys
    ``inputs``/``targets``, ``x``/``y`` or ``image``/``label``.

    Examples:
        >>> from hvp.operators import default_unpack
        >>> default_unpack({"x": "inputs", "y": "targets"})
        ('inputs', 'targets')
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for a, b in (("inputs", "targets"), ("x", "y"), ("image", "label"), ("images", "labels")):
            if a in batch and b in batch:
                return batch[a], batch[b]
    keys = f" (keys {sorted(batch)})" if isinstance(batch, dict) else ""
    raise TypeError(
        f"Cannot split a batch of type {type(batch).__name__}{keys} into (inputs, targets). Pass "
        "`unpack=lambda batch: (inputs, targets)` to hvp.ggn."
    )


class CurvatureOperator(LinearOperator):
    """Curvature (Hessian, GGN or empirical Fisher) of a loss over a data set.

    Build with :func:`hessian`, :func:`ggn` or :func:`empirical_fisher`.

    Attributes:
      params: the point (or the parameter block, see ``wrt``) the curvature is
        taken at; vectors are pytrees like it.
      kind: ``"hessian"``, ``"ggn"`` or ``"empirical_fisher"``.
      reduction: ``"mean"`` or ``"sum"``.
      num_examples, num_batches: size of the data set.
      size, shape, dtype: see :class:`~hvp.operators.LinearOperator`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> def loss_fn(params, batch):  # least squares: the Hessian is 2 X^T X / n
        ...     x, y = batch
        ...     return jnp.mean((x @ params["w"] - y) ** 2)
        >>> params = {"w": jnp.zeros(2)}
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
        >>> H = hvp.hessian(loss_fn, params, [batch, batch])
        >>> H.kind, H.reduction, H.num_examples, H.num_batches, H.shape
        ('hessian', 'mean', 4, 2, (2, 2))
    """

    def __init__(
        self,
        *,
        kind,
        fns,
        params,
        full,
        mask,
        dataset: Dataset,
        reduction,
        lins,
        check_finite,
        name,
        shardings=None,
    ):
        self.kind = kind
        # Per-leaf shardings of the parameters (None for single-device leaves), applied to every
        # product so that matvecs keep each leaf's sharding, also inside compiled algorithms.
        self._shardings = _leaf_shardings(params) if shardings is None else shardings
        self._fns = fns
        self.params = params
        self._full = full
        self._mask = mask
        self.dataset = dataset
        self.reduction = reduction
        self._lins = lins
        self.check_finite = check_finite
        self.name = name

    # pytree protocol -------------------------------------------------------
    def _children(self):
        return (self.params, self._full, self.dataset.groups, self._lins)

    def _static(self):
        return (
            self.kind,
            self._fns,
            self._mask,
            self.dataset.meta,
            self.dataset.num_examples,
            self.reduction,
            self.check_finite,
            self.name,
            self._shardings,
        )

    @classmethod
    def _rebuild(cls, static, children):
        kind, fns, mask, meta, n, reduction, check, name, shardings = static
        params, full, groups, lins = children
        return cls(
            kind=kind,
            fns=fns,
            params=params,
            full=full,
            mask=mask,
            dataset=Dataset(groups=groups, meta=meta, num_examples=n),
            reduction=reduction,
            lins=lins,
            check_finite=check,
            name=name,
            shardings=shardings,
        )

    # public attributes -------------------------------------------------------
    @property
    def like(self):
        return self.params

    @property
    def num_examples(self) -> int:
        return self.dataset.num_examples

    @property
    def num_batches(self) -> int:
        return self.dataset.num_batches

    @property
    def linearized(self) -> bool:
        return self._lins is not None

    def full_params(self, block=None):
        """The model's full parameter pytree with ``block`` (default: :attr:`params`) put in place."""
        block = self.params if block is None else block
        return block if self._mask is None else _blocks.merge(block, self._full, self._mask)

    # products ----------------------------------------------------------------
    def _batch_mv(self, batch, v):
        p = self.params
        if self.kind == "hessian":
            loss_fn = self._fns[0]
            return jax.jvp(jax.grad(lambda q: loss_fn(self.full_params(q), batch)), (p,), (v,))[1]
        if self.kind == "ggn":
            model_fn, loss_fn, unpack = self._fns
            x, y = unpack(batch)
            out, f_jvp = jax.linearize(lambda q: model_fn(self.full_params(q), x), p)
            jv = f_jvp(v)
            if hasattr(loss_fn, "output_hvp"):
                hjv = loss_fn.output_hvp(out, y, jv)
            else:
                hjv = jax.jvp(jax.grad(lambda o: loss_fn(o, y)), (out,), (jv,))[1]
            return jax.linear_transpose(f_jvp, p)(hjv)[0]
        if self.kind == "empirical_fisher":
            loss_fn = self._fns[0]

            def per_example(q):
                full = self.full_params(q)
                return jax.vmap(lambda ex: loss_fn(full, tu.map(lambda a: a[None], ex)))(batch)

            losses, f_jvp = jax.linearize(per_example, p)
            jtjv = jax.linear_transpose(f_jvp, p)(f_jvp(v))[0]
            if self.reduction == "mean":
                return tu.scale(1.0 / losses.shape[0], jtjv)
            return jtjv
        raise AssertionError(self.kind)  # pragma: no cover

    def _apply(self, v):
        total = tu.zeros_like(v)
        weights = self.dataset.weights(self.reduction)
        sources = self._lins if self._lins is not None else self.dataset.groups
        for src, meta, w in zip(sources, self.dataset.meta, weights):
            mv = (lambda s: s(v)) if self._lins is not None else (lambda s: self._batch_mv(s, v))
            if meta.stacked:

                def body(acc, s, mv=mv, w=w):
                    return tu.axpy(w, mv(s), acc), None

                total, _ = lax.scan(body, total, src)
            else:
                total = tu.axpy(w, mv(src), total)
        return _constrain(total, self._shardings)


def _leaf_shardings(params) -> tuple:
    """Shardings of the concrete, multi-device leaves of ``params`` (``None`` elsewhere)."""
    out = []
    for x in jax.tree_util.tree_leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(x, jax.core.Tracer) or s is None or len(s.device_set) <= 1:
            out.append(None)
        else:
            out.append(s)
    return tuple(out)


def _constrain(tree, shardings: tuple):
    if not any(s is not None for s in shardings):
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [
        x if s is None else jax.lax.with_sharding_constraint(x, s)
        for x, s in zip(leaves, shardings)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _prepare(params, data, *, wrt, reduction):
    _check_params(params)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
    dataset = as_dataset(data)
    if wrt is None:
        block, full, mask = params, None, None
    else:
        block, mask = _blocks.select(params, wrt)
        full = params
    return dataset, block, full, mask


def hessian(
    loss_fn: Callable,
    params: PyTree,
    data,
    *,
    wrt=None,
    reduction: str = "mean",
    linearize: bool = False,
    check_finite: bool = True,
) -> CurvatureOperator:
    """The Hessian of ``loss_fn(params, batch) -> scalar`` over a data set, as an operator.

    Args:
      loss_fn: scalar loss of one batch (a mean over its examples when
        ``reduction="mean"``).
      params: pytree of floating arrays (the point the Hessian is taken at).
      data: one batch (pytree of arrays with a leading example axis) or a list
        / iterable of batches; see :mod:`hvp.operators._data`.
      wrt: optional parameter filter (regex string, list of them, or
        ``(path, leaf) -> bool``) giving the Hessian block of those leaves.
      reduction: ``"mean"`` (batches weighted by size: the Hessian of the
        data-set mean loss) or ``"sum"``.
      linearize: linearise the gradient once per batch with ``jax.linearize``
        (in one compiled call) and reuse it for every product. This keeps the
        forward and backward residuals of every batch in memory (about one
        backward pass's activations per batch) and pays when many products are
        taken on data that fits: on CPU it measured 1.2-1.6x faster per product
        than the default on an MLP, a CNN and a small transformer
        (``benchmarks/results/cpu/hvp_modes.md``). Keep it off for large data
        sets or tight memory.
      check_finite: raise :class:`~hvp.operators.NonFiniteError` when a product
        computed outside ``jit`` contains NaN/Inf.

    Returns:
      A :class:`CurvatureOperator`: ``op @ v``, ``op.matmat(vs)``, ``op.dense()``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> def loss_fn(params, batch):  # least squares: the Hessian is 2 X^T X / n
        ...     x, y = batch
        ...     return jnp.mean((x @ params["w"] - y) ** 2)
        >>> params = {"w": jnp.zeros(2)}
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
        >>> H = hvp.hessian(loss_fn, params, batch)  # diag(1, 4)
        >>> H @ {"w": jnp.array([1.0, 1.0])}
        {'w': Array([1., 4.], dtype=float64)}
    """
    dataset, block, full, mask = _prepare(params, data, wrt=wrt, reduction=reduction)
    _check_scalar(
        jax.eval_shape(loss_fn, params, dataset.first_batch()), "`loss_fn(params, batch)`"
    )
    op = CurvatureOperator(
        kind="hessian",
        fns=(loss_fn,),
        params=block,
        full=full,
        mask=mask,
        dataset=dataset,
        reduction=reduction,
        lins=None,
        check_finite=check_finite,
        name="hessian" if wrt is None else f"hessian[{wrt}]",
    )
    if linearize:
        op._lins = _linearize_all(op)
    return op


@jax.jit
def _linearize_all(op: CurvatureOperator):
    """Linearise the gradient of every batch once, in one compiled call (returns ``Partial``s)."""
    loss_fn = op._fns[0]

    def lin(batch):
        grad = jax.grad(lambda q: loss_fn(op.full_params(q), batch))
        return jax.linearize(grad, op.params)[1]

    lins = []
    for group, meta in zip(op.dataset.groups, op.dataset.meta):
        lins.append(jax.vmap(lin)(group) if meta.stacked else lin(group))
    return tuple(lins)


def ggn(
    model_fn: Callable,
    loss_fn: Callable,
    params: PyTree,
    data,
    *,
    unpack: Callable | None = None,
    wrt=None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> CurvatureOperator:
    """The generalised Gauss-Newton matrix ``J^T H_L J`` over a data set, matrix-free.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs`` (any pytree of outputs).
      loss_fn: ``loss_fn(outputs, targets) -> scalar``; if it has an
        ``output_hvp(outputs, targets, u)`` method (as :data:`hvp.losses.softmax_cross_entropy`
        and :data:`hvp.losses.mean_squared_error` do) the output-space Hessian is
        applied in closed form.
      params: as in :func:`hessian`.
      data: as in :func:`hessian`.
      wrt: as in :func:`hessian`.
      reduction: as in :func:`hessian`.
      check_finite: as in :func:`hessian`.
      unpack: ``batch -> (inputs, targets)``; the default accepts
        ``(inputs, targets)`` tuples and common dict keys (:func:`default_unpack`).

    The GGN is positive semi-definite when ``loss_fn`` is convex in the
    outputs (cross-entropy, squared error).

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> model_fn = lambda params, x: x @ params["w"]
        >>> params = {"w": jnp.zeros(2)}
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
        >>> G = hvp.ggn(model_fn, hvp.losses.mean_squared_error, params, batch)  # 2 X^T X / n
        >>> G @ {"w": jnp.array([1.0, 1.0])}
        {'w': Array([1., 4.], dtype=float64)}
    """
    unpack = default_unpack if unpack is None else unpack
    dataset, block, full, mask = _prepare(params, data, wrt=wrt, reduction=reduction)
    x, y = unpack(dataset.first_batch())
    out = jax.eval_shape(model_fn, params, x)
    _check_scalar(jax.eval_shape(loss_fn, out, y), "`loss_fn(model_fn(params, inputs), targets)`")
    return CurvatureOperator(
        kind="ggn",
        fns=(model_fn, loss_fn, unpack),
        params=block,
        full=full,
        mask=mask,
        dataset=dataset,
        reduction=reduction,
        lins=None,
        check_finite=check_finite,
        name="ggn" if wrt is None else f"ggn[{wrt}]",
    )


def empirical_fisher(
    loss_fn: Callable,
    params: PyTree,
    data,
    *,
    wrt=None,
    reduction: str = "mean",
    check_finite: bool = True,
) -> CurvatureOperator:
    """The empirical Fisher ``(1/N) sum_i g_i g_i^T`` (``sum_i`` with ``reduction="sum"``).

    ``g_i`` is the gradient of ``loss_fn(params, example_batch)`` on a batch
    holding example ``i`` alone (``loss_fn`` is evaluated under ``vmap`` on
    single-example batches). Positive semi-definite by construction. Arguments
    as in :func:`hessian`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> def loss_fn(params, batch):  # least squares: the Hessian is 2 X^T X / n
        ...     x, y = batch
        ...     return jnp.mean((x @ params["w"] - y) ** 2)
        >>> params = {"w": jnp.zeros(2)}
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
        >>> F = hvp.empirical_fisher(loss_fn, params, batch)  # mean of g g^T over the examples
        >>> F @ {"w": jnp.array([1.0, 1.0])}
        {'w': Array([2., 8.], dtype=float64)}
    """
    dataset, block, full, mask = _prepare(params, data, wrt=wrt, reduction=reduction)
    one = tu.map(lambda a: a[:1], dataset.first_batch())
    _check_scalar(jax.eval_shape(loss_fn, params, one), "`loss_fn(params, batch)`")
    return CurvatureOperator(
        kind="empirical_fisher",
        fns=(loss_fn,),
        params=block,
        full=full,
        mask=mask,
        dataset=dataset,
        reduction=reduction,
        lins=None,
        check_finite=check_finite,
        name="empirical_fisher" if wrt is None else f"empirical_fisher[{wrt}]",
    )
