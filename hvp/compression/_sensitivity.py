r"""Which layers and weights can be quantised or pruned: Hessian-based compression sensitivity.

**Quantisation (HAWQ).** Dong et al. (2019, "HAWQ: Hessian AWare Quantization of neural
networks with mixed-precision", ICCV) and (2020, "HAWQ-V2: Hessian aware trace-weighted
quantization", NeurIPS) measure how much quantising layer :math:`l` to :math:`b` bits costs by
the second-order term of the loss with the layer's Hessian block replaced by its average
eigenvalue:

.. math:: \Omega_l(b) = \frac{\operatorname{tr}(H_{ll})}{n_l}\,
          \lVert Q_b(W_l) - W_l \rVert_2^2,

with :math:`n_l` the number of quantised weights of the layer and :math:`Q_b` a quantiser
(:func:`~hvp.compression.uniform_quantize` by default). The traces come from the Hutchinson
diagonal (:func:`hvp.linalg.diagonal`, Bekas et al. 2007) summed per layer, with standard errors
from the per-probe layer sums (so that sums of layers get honest errors); HAWQ (v1) ranks by the
top eigenvalue of :math:`H_{ll}`, which is also given (:func:`hvp.linalg.eigsh` on the block).
The second-order model assumes the point is a minimum (gradient 0) and a positive
semi-definite block: with an indefinite Hessian a layer's trace can be negative; use the GGN
(:func:`hvp.ggn`), positive semi-definite by construction, as HAWQ-V3 does.

**Bit allocation.** Given per-layer bit widths :math:`b_l \in B` the model size is
:math:`\sum_l n_l b_l` bits (quantised weights; the weights that are not quantised are kept
and do not count). :meth:`QuantizationSensitivity.allocate` minimises
:math:`\sum_l \Omega_l(b_l)` subject to :math:`\sum_l n_l b_l \le` budget: greedily (start at
the widest bits, repeatedly lower the layer whose next step down costs the least
:math:`\Delta\Omega` per bit saved until the budget is met; not optimal in general) or
exhaustively over all :math:`|B|^L` choices for a few layers.

**Pruning (OBD).** LeCun, Denker & Solla (1990, "Optimal Brain Damage") estimate the loss
increase of removing weight :math:`i` at a minimum by :math:`s_i = \tfrac12 H_{ii} w_i^2`
(diagonal Hessian, no cross terms); :func:`obd_saliency` takes :math:`H_{ii}` from the
Hutchinson diagonal (with per-entry standard errors), :func:`pruning_mask` keeps the weights of
largest score at a requested sparsity, over the whole model or per layer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp.compression._quantize import is_kernel, uniform_quantize
from hvp.linalg import DiagonalResult, diagonal, eigsh
from hvp.linalg._checks import check_finite_float, check_int, check_key
from hvp.operators import as_operator, from_matvec
from hvp.tree import layer_of
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = [
    "QuantizationSensitivity",
    "BitAllocation",
    "ObdSaliency",
    "quantization_sensitivity",
    "obd_saliency",
    "pruning_mask",
]

_KEPT = "\x00kept"  # the group of leaves that are not quantised (never a layer name)


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@tu.result(static=("layers", "bits", "method"))
class BitAllocation:
    r"""Bit width per layer chosen by :meth:`QuantizationSensitivity.allocate`.

    Attributes:
      layers: layer names (tuple of str), as in the sensitivity.
      bits: the chosen bit width per layer (tuple of int).
      size_bits: :math:`\sum_l n_l b_l`, the size of the quantised weights in bits.
      budget_bits: the budget it had to meet.
      objective: :math:`\sum_l \Omega_l(b_l)`, the predicted loss increase that was minimised.
      objective_std_error: its standard error (from the per-probe traces, correlations kept).
      method: ``"greedy"`` or ``"exhaustive"``.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.compression import quantization_sensitivity
      >>> params = {"a": {"kernel": jnp.array([[1.0], [0.3]])}, "b": {"kernel": jnp.array([[0.7], [-0.25]])}}
      >>> op = hvp.from_dense(jnp.diag(jnp.array([1.0, 1.0, 100.0, 100.0])), like=params)
      >>> s = quantization_sensitivity(op, key=jax.random.key(0), params=params, top_eigenvalue=False)
      >>> s.allocate(average_bits=5).bits  # the sharper layer keeps more bits
      (2, 8)
    """

    layers: tuple
    bits: tuple
    size_bits: int
    budget_bits: float
    objective: float
    objective_std_error: float
    method: str = "greedy"


@tu.result(static=("layers", "bits", "method", "ranking"))
class QuantizationSensitivity:
    r"""Per-layer quantisation sensitivity :math:`\Omega_l(b)` (HAWQ), from :func:`quantization_sensitivity`.

    Arrays are NumPy float64; row ``l`` is ``layers[l]``, column ``j`` is ``bits[j]``.

    Attributes:
      layers: layers with quantised weights, in parameter order.
      bits: the bit widths (ascending tuple of int).
      num_params: :math:`n_l`, quantised weights per layer, shape ``(L,)``.
      trace: :math:`\operatorname{tr}(H_{ll})` over the quantised weights, ``(L,)``.
      trace_std_error: its standard error, ``(L,)`` (0 for ``method="exact"``).
      perturbation: :math:`\lVert Q_b(W_l)-W_l\rVert^2`, ``(L, B)`` (exact).
      omega: :math:`\Omega_l(b) = \operatorname{tr}(H_{ll})/n_l \cdot \lVert Q_b(W_l)-W_l\rVert^2`,
        ``(L, B)``.
      omega_std_error: ``trace_std_error / n_l * perturbation``, ``(L, B)``.
      top_eigenvalue: the largest eigenvalue of each block :math:`H_{ll}` (Lanczos), ``(L,)``,
        or ``None``.
      top_eigenvalue_residual: its residual bound, ``(L,)`` or ``None``.
      top_eigenvalue_converged: whether each block's top pair met eigsh's tolerance (bool,
        ``(L,)``) or ``None``; an unconverged value is within its residual of *an* eigenvalue
        of the block, not necessarily the largest.
      ranking: layer names, most sensitive first (by :math:`\Omega_l` at the fewest bits).
      samples: per-probe layer traces, ``(m, L)`` (for honest errors of sums of layers).
      num_matvecs: operator products used (diagonal probes + Lanczos).
      method: ``"hutchinson"`` or ``"exact"`` (the diagonal's method).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.compression import quantization_sensitivity
      >>> params = {"a": {"kernel": jnp.array([[1.0], [0.3]])}, "b": {"kernel": jnp.array([[0.7], [-0.25]])}}
      >>> op = hvp.from_dense(jnp.diag(jnp.array([1.0, 1.0, 100.0, 100.0])), like=params)
      >>> s = quantization_sensitivity(op, key=jax.random.key(0), params=params, bits=(2, 4))
      >>> s.ranking, s.trace.tolist(), s.top_eigenvalue.round(4).tolist()
      (('b', 'a'), [2.0, 200.0], [1.0, 100.0])
    """

    layers: tuple
    bits: tuple
    num_params: Any
    trace: Any
    trace_std_error: Any
    perturbation: Any
    omega: Any
    omega_std_error: Any
    top_eigenvalue: Any
    top_eigenvalue_residual: Any
    ranking: tuple
    samples: Any
    num_matvecs: int
    method: str = "hutchinson"
    top_eigenvalue_converged: Any = None

    def size_bits(self, bits: Sequence[int]) -> int:
        """:math:`\\sum_l n_l b_l` for one bit width per layer."""
        return int(sum(int(n) * int(b) for n, b in zip(self.num_params, bits)))

    def allocate(
        self,
        budget_bits: float | None = None,
        *,
        average_bits: float | None = None,
        method: str = "greedy",
    ) -> BitAllocation:
        r"""Bit widths minimising :math:`\sum_l \Omega_l(b_l)` subject to :math:`\sum_l n_l b_l \le` budget.

        Args:
          budget_bits: the size budget of the quantised weights, in bits.
          average_bits: or the budget as bits per quantised weight (``budget_bits =
            average_bits * sum(num_params)``); give exactly one of the two.
          method: ``"greedy"``: start every layer at the widest bit width and repeatedly lower
            the layer whose next narrower width costs the least :math:`\Delta\Omega` per bit
            saved, until the budget is met, then raise layers back while the budget allows,
            best :math:`\Omega` decrease per bit first (:math:`O(L^2 |B|)`; not optimal in
            general: the problem is a knapsack); ``"exhaustive"``: the exact optimum over all :math:`|B|^L` choices
            (at most :math:`10^6` of them).

        Returns:
          A :class:`BitAllocation`.

        Raises:
          ValueError: both or neither budget given; a budget below the size at the fewest bits;
            an unknown ``method``; too many choices for ``"exhaustive"``.

        Examples:
          >>> import jax, jax.numpy as jnp, hvp
          >>> from hvp.compression import quantization_sensitivity
          >>> params = {"a": {"kernel": jnp.array([[1.0], [0.3]])}, "b": {"kernel": jnp.array([[0.7], [-0.25]])}}
          >>> op = hvp.from_dense(jnp.diag(jnp.array([1.0, 1.0, 100.0, 100.0])), like=params)
          >>> s = quantization_sensitivity(op, key=jax.random.key(0), params=params, top_eigenvalue=False)
          >>> a = s.allocate(24, method="exhaustive")
          >>> a.bits, a.size_bits
          ((4, 8), 24)
        """
        if (budget_bits is None) == (average_bits is None):
            raise ValueError("Give exactly one of `budget_bits` and `average_bits`.")
        if budget_bits is None:
            average_bits = check_finite_float("average_bits", average_bits)
            budget = average_bits * float(np.sum(self.num_params))
        else:
            budget = check_finite_float("budget_bits", budget_bits)
        bits = list(self.bits)
        n = np.asarray(self.num_params, np.int64)
        smallest = int(np.sum(n) * bits[0])
        if budget < smallest:
            raise ValueError(
                f"The budget of {budget:g} bits is below the size at {bits[0]} bits for every "
                f"layer ({smallest} bits); raise it or pass smaller `bits` to "
                "quantization_sensitivity."
            )
        omega = np.asarray(self.omega, np.float64)
        L = len(self.layers)
        if method == "greedy":
            choice = [len(bits) - 1] * L
            size = int(np.sum(n) * bits[-1])
            while size > budget:
                best: int | None = None
                best_cost = math.inf
                for i in range(L):
                    j = choice[i]
                    if j == 0:
                        continue
                    saved = n[i] * (bits[j] - bits[j - 1])
                    cost = (omega[i, j - 1] - omega[i, j]) / saved
                    if cost < best_cost:
                        best, best_cost = i, cost
                assert best is not None  # a layer above the fewest bits exists: budget >= smallest
                j = choice[best]
                size -= int(n[best] * (bits[j] - bits[j - 1]))
                choice[best] = j - 1
            while True:  # then spend what is left of the budget: best Omega decrease per bit
                best, best_gain = None, 0.0
                for i in range(L):
                    j = choice[i]
                    if j == len(bits) - 1 or size + n[i] * (bits[j + 1] - bits[j]) > budget:
                        continue
                    gain = (omega[i, j] - omega[i, j + 1]) / (n[i] * (bits[j + 1] - bits[j]))
                    if gain > best_gain:
                        best, best_gain = i, gain
                if best is None:
                    break
                j = choice[best]
                size += int(n[best] * (bits[j + 1] - bits[j]))
                choice[best] = j + 1
        elif method == "exhaustive":
            count = len(bits) ** L
            if count > 10**6:
                raise ValueError(
                    f"`method='exhaustive'` would try {count} choices ({len(bits)}**{L}); use "
                    "method='greedy'."
                )
            best_obj, found = math.inf, None
            for combo in itertools.product(range(len(bits)), repeat=L):
                if sum(int(n[i]) * bits[j] for i, j in enumerate(combo)) > budget:
                    continue
                obj = float(sum(omega[i, j] for i, j in enumerate(combo)))
                if obj < best_obj:
                    best_obj, found = obj, list(combo)
            assert found is not None  # the fewest bits everywhere fit: budget >= smallest
            choice = found
        else:
            raise ValueError(f"Unknown method {method!r}; use 'greedy' or 'exhaustive'.")
        chosen = tuple(bits[j] for j in choice)
        pert = np.asarray(self.perturbation, np.float64)
        coef = np.array([pert[i, j] / n[i] for i, j in enumerate(choice)])
        per_probe = np.asarray(self.samples, np.float64) @ coef  # objective per probe
        obj = float(sum(omega[i, j] for i, j in enumerate(choice)))
        if self.method == "exact" or per_probe.shape[0] < 2:
            se = 0.0
        else:
            se = float(np.std(per_probe, ddof=1) / np.sqrt(per_probe.shape[0]))
        return BitAllocation(
            layers=self.layers,
            bits=chosen,
            size_bits=self.size_bits(chosen),
            budget_bits=float(budget),
            objective=obj,
            objective_std_error=se,
            method=method,
        )

    def quantize(self, params: PyTree, bits: Sequence[int] | BitAllocation, *, quantizer=None):
        """``params`` with each layer's quantised leaves replaced by :math:`Q_{b_l}` (others kept).

        Examples:
          >>> import jax, jax.numpy as jnp, hvp
          >>> from hvp.compression import quantization_sensitivity
          >>> params = {"a": {"kernel": jnp.array([[1.0], [0.3]])}, "b": {"bias": jnp.array([0.25])}}
          >>> op = hvp.from_dense(jnp.eye(3), like=params)
          >>> s = quantization_sensitivity(op, key=jax.random.key(0), params=params, top_eigenvalue=False)
          >>> s.quantize(params, [2])["a"]["kernel"].tolist(), s.layers  # biases are kept
          ([[1.0], [0.0]], ('a',))
        """
        widths = list(bits.bits if isinstance(bits, BitAllocation) else bits)
        if len(widths) != len(self.layers):
            raise ValueError(
                f"Give one bit width per layer ({len(self.layers)}), got {len(widths)}."
            )
        q = uniform_quantize if quantizer is None else quantizer
        width = dict(zip(self.layers, widths))
        paths = tu.leaf_paths(params)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        out = [
            q(x, int(width[layer_of(p)])) if layer_of(p) in width and is_kernel(p, x) else x
            for p, x in zip(paths, leaves)
        ]
        return jax.tree_util.tree_unflatten(treedef, out)


@tu.result(static=("method",))
class ObdSaliency:
    r"""Optimal Brain Damage saliencies :math:`s_i = \tfrac12 H_{ii} w_i^2` (:func:`obd_saliency`).

    Attributes:
      saliency: a pytree like the parameters.
      std_error: per-entry standard errors, :math:`\tfrac12 w_i^2\,\mathrm{se}(H_{ii})`.
      diagonal: the estimate of :math:`\operatorname{diag}(H)` used (a pytree like the parameters).
      num_matvecs: operator products used.
      method: ``"hutchinson"`` or ``"exact"``.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.compression import obd_saliency
      >>> w = jnp.array([1.0, 2.0, 3.0])
      >>> s = obd_saliency(hvp.from_dense(jnp.diag(jnp.array([4.0, 1.0, 0.0]))), key=jax.random.key(0), params=w)
      >>> s.saliency.tolist(), s.method  # 0.5 * H_ii * w_i**2
      ([2.0, 2.0, 0.0], 'exact')
    """

    saliency: PyTree
    std_error: PyTree
    diagonal: PyTree
    num_matvecs: int
    method: str = "hutchinson"

    def mask(self, sparsity: float, *, scope: str = "global", prune=is_kernel) -> PyTree:
        """:func:`pruning_mask` of these saliencies (``True``: keep the weight)."""
        return pruning_mask(self.saliency, sparsity, scope=scope, prune=prune)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _weights(op, params):
    if params is None:
        return op.like
    tu.assert_same_structure(params, op.like, name="params", like_name="the operator's vectors")
    return params


def _diagonal(op, key, num_matvecs, chunk_size, diag, driver, progress) -> DiagonalResult:
    if diag is not None:
        if not isinstance(diag, DiagonalResult):
            raise TypeError(f"`diag` must be an hvp.DiagonalResult, got {type(diag).__name__}.")
        tu.assert_same_structure(diag.estimate, op.like, name="diag.estimate", check_dtype=False)
        return diag
    check_key(key)
    return diagonal(
        op,
        key=key,
        num_matvecs=check_int("num_matvecs", num_matvecs, minimum=2),
        chunk_size=chunk_size,
        driver=driver,
        progress=progress,
    )


def _block_operator(op, paths: list[str], where: Sequence[int]):
    """The diagonal block :math:`A_{ll}` of ``op`` on the leaves ``where`` (a list of arrays)."""
    leaves, treedef = jax.tree_util.tree_flatten(op.like)
    where = list(where)

    def matvec(sub):
        full = [jnp.zeros_like(x) for x in leaves]
        for j, i in enumerate(where):
            full[i] = sub[j]
        out = jax.tree_util.tree_leaves(op.mv(jax.tree_util.tree_unflatten(treedef, full)))
        return [out[i] for i in where]

    like = [leaves[i] for i in where]
    return from_matvec(matvec, like, name=f"block of {', '.join(paths[i] for i in where)}")


# ------------------------------------------------------------------------------------------------
# public functions
# ------------------------------------------------------------------------------------------------
def quantization_sensitivity(
    op: OperatorLike,
    *,
    key: PRNGKey,
    bits: Sequence[int] = (2, 4, 8),
    quantizer: Callable | None = None,
    params: PyTree | None = None,
    num_matvecs: int = 100,
    chunk_size: int | None = None,
    top_eigenvalue: bool = True,
    eig_tol: float = 1e-3,
    quantize: Callable[[str, Any], bool] = is_kernel,
    layer_fn: Callable[[str], str] = layer_of,
    diag: DiagonalResult | None = None,
    like: PyTree | None = None,
    driver: str = "auto",
    progress: bool | None = None,
) -> QuantizationSensitivity:
    r"""Per-layer quantisation sensitivity :math:`\Omega_l(b)` (HAWQ) with standard errors.

    See the module docstring for the formula and references. Per layer (leaves grouped by
    ``layer_fn``, only the leaves ``quantize`` selects): the trace of the Hessian block over
    those weights (Hutchinson diagonal summed per layer), the quantisation error
    :math:`\lVert Q_b(W_l)-W_l\rVert^2` at each bit width, their product over :math:`n_l`,
    and optionally the block's top eigenvalue (thick-restart Lanczos on :math:`A_{ll}`, each
    product one product with ``op``).

    Args:
      op: the curvature at the weights, e.g. ``hvp.ggn(...)`` (positive semi-definite, as
        HAWQ assumes) or ``hvp.hessian(...)``; or a matvec callable with ``like=``.
      key: PRNG key (required): the Hutchinson probes and the Lanczos start vectors.
      bits: bit widths (ints >= 2), default ``(2, 4, 8)``.
      quantizer: ``quantizer(w, bits) -> Q_b(w)`` (default
        :func:`~hvp.compression.uniform_quantize`: symmetric, per output channel).
      params: the weights to quantise (default ``op.like``: a curvature operator's point).
      num_matvecs: Hutchinson probes (>= 2); ``>= n`` computes the diagonal exactly (``n``
        products).
      chunk_size: probes per compiled call (see :func:`hvp.linalg.diagonal`).
      top_eigenvalue: also compute each block's largest eigenvalue (Lanczos, ``eig_tol``).
      eig_tol: eigsh's relative tolerance for the top eigenvalues.
      quantize: ``(path, leaf) -> bool``: which leaves are quantised (default
        :func:`~hvp.compression.is_kernel`: leaves with at least two axes).
      layer_fn: leaf path -> layer name (default :func:`hvp.tree.layer_of`).
      diag: a :class:`~hvp.DiagonalResult` of ``op`` to reuse (e.g. shared with
        :func:`obd_saliency`); ``key``/``num_matvecs`` then only drive the Lanczos part.
      like: the parameter pytree when ``op`` is a matvec callable.
      driver: ``"auto"``, ``"compiled"`` or ``"host"`` (see :func:`hvp.linalg.diagonal`).
      progress: show the products done (host driver).

    Returns:
      A :class:`QuantizationSensitivity`; :meth:`~QuantizationSensitivity.allocate` gives a
      bit allocation under a size budget.

    Raises:
      TypeError: bad ``key``; ``bits`` not ints.
      ValueError: ``bits`` empty, repeated or below 2; no leaf selected by ``quantize``;
        ``params`` not shaped like the operator's vectors; ``top_eigenvalue=True`` with a
        streamed operator (``op.streaming``).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.compression import quantization_sensitivity
      >>> params = {"a": {"kernel": jnp.array([[1.0], [0.3]])}, "b": {"kernel": jnp.array([[0.7], [-0.25]])}}
      >>> op = hvp.from_dense(jnp.diag(jnp.array([1.0, 1.0, 100.0, 100.0])), like=params)
      >>> s = quantization_sensitivity(op, key=jax.random.key(0), params=params, bits=(2, 4))
      >>> s.omega.round(4).tolist()  # tr/n * ||Q_b(W) - W||^2, rows a, b; columns 2, 4 bits
      [[0.09, 0.0002], [6.25, 0.25]]
    """
    op = as_operator(op, like)
    if top_eigenvalue and getattr(op, "streaming", False):
        raise ValueError(
            "top_eigenvalue=True runs eigsh on each layer's diagonal block through a compiled "
            "product, which a streamed operator (its data set read from the host on every "
            "product) cannot run. Pass top_eigenvalue=False (the trace sensitivities need only "
            "the diagonal: one data pass per probe block), or build the operator with "
            "stream=False if the data fit on the device."
        )
    weights = _weights(op, params)
    bits = tuple(sorted(int(check_int("bits", b, minimum=2)) for b in bits))
    if not bits or len(set(bits)) != len(bits):
        raise ValueError(f"`bits` must be distinct bit widths (ints >= 2), got {bits}.")
    q = uniform_quantize if quantizer is None else quantizer
    paths = tu.leaf_paths(weights)
    leaves = jax.tree_util.tree_leaves(weights)
    group = {p: layer_of_q for p, layer_of_q in ((p, layer_fn(p)) for p in paths)}
    selected = {p for p, x in zip(paths, leaves) if quantize(p, x)}
    if not selected:
        raise ValueError(
            "No leaf is selected for quantisation by `quantize` (default: leaves with at least "
            "two axes); pass e.g. quantize=lambda path, leaf: True."
        )
    layers = list(dict.fromkeys(group[p] for p in paths if p in selected))
    d = _diagonal(op, key, num_matvecs, chunk_size, diag, driver, progress)
    by_layer = d.sum_by(lambda p: group[p] if p in selected else _KEPT)
    trace = np.array([float(by_layer.estimate[name]) for name in layers])
    trace_se = np.array([float(by_layer.std_error[name]) for name in layers])
    where = {name: i for i, name in enumerate(layers)}
    sample_leaves = jax.tree_util.tree_leaves(d.leaf_samples)
    samples = np.zeros((np.shape(sample_leaves[0])[0], len(layers)))
    for p, s in zip(tu.leaf_paths(d.leaf_samples), sample_leaves):
        if p in selected:
            samples[:, where[group[p]]] += np.asarray(s, np.float64)
    num = np.zeros(len(layers), np.int64)
    pert = np.zeros((len(layers), len(bits)))
    for p, x in zip(paths, leaves):
        if p in selected:
            i = where[group[p]]
            num[i] += int(np.size(x))
            xs = np.asarray(x, np.float64)
            for j, b in enumerate(bits):
                pert[i, j] += float(np.sum((np.asarray(q(x, b), np.float64) - xs) ** 2))
    omega = trace[:, None] / num[:, None] * pert
    omega_se = trace_se[:, None] / num[:, None] * pert
    matvecs = 0 if diag is not None else int(d.num_matvecs)
    top = top_res = top_conv = None
    if top_eigenvalue:
        check_key(key)
        top, top_res = np.zeros(len(layers)), np.zeros(len(layers))
        top_conv = np.zeros(len(layers), bool)
        for i, name in enumerate(layers):
            idx = [k for k, p in enumerate(paths) if p in selected and group[p] == name]
            res = eigsh(
                _block_operator(op, paths, idx),
                1,
                key=jax.random.fold_in(key, 1_000_003 + i),
                tol=check_finite_float("eig_tol", eig_tol),
                driver=driver,
                progress=progress,
            )
            top[i] = float(np.asarray(res.eigenvalues)[-1])
            top_res[i] = float(np.asarray(res.residuals)[-1])
            top_conv[i] = bool(np.asarray(res.converged)[-1])
            matvecs += int(res.num_matvecs)
    ranking = tuple(layers[i] for i in np.argsort(-omega[:, 0], kind="stable"))
    return QuantizationSensitivity(
        layers=tuple(layers),
        bits=bits,
        num_params=num,
        trace=trace,
        trace_std_error=trace_se,
        perturbation=pert,
        omega=omega,
        omega_std_error=omega_se,
        top_eigenvalue=top,
        top_eigenvalue_residual=top_res,
        top_eigenvalue_converged=top_conv,
        ranking=ranking,
        samples=samples,
        num_matvecs=matvecs,
        method=d.method,
    )


def obd_saliency(
    op: OperatorLike,
    *,
    key: PRNGKey,
    params: PyTree | None = None,
    num_matvecs: int = 100,
    chunk_size: int | None = None,
    diag: DiagonalResult | None = None,
    like: PyTree | None = None,
    driver: str = "auto",
    progress: bool | None = None,
) -> ObdSaliency:
    r"""Optimal Brain Damage saliency :math:`s_i = \tfrac12 H_{ii} w_i^2` of every weight.

    LeCun, Denker & Solla (1990): at a minimum, with the Hessian taken as diagonal, removing
    weight :math:`i` (setting it to 0) raises the loss by about :math:`s_i`. :math:`H_{ii}` is
    the Hutchinson diagonal (:func:`hvp.linalg.diagonal`, Bekas et al. 2007), so
    :math:`\mathrm{se}(s_i) = \tfrac12 w_i^2\,\mathrm{se}(H_{ii})`. An estimate can be
    negative (a noisy or indefinite diagonal): such a weight ranks as the least salient.

    Args:
      op: the curvature at the weights (``hvp.hessian(...)`` as in the paper, or
        ``hvp.ggn(...)``), or a matvec callable with ``like=``.
      key: PRNG key (required) of the probes.
      params: the weights (default ``op.like``).
      num_matvecs: probes (>= 2; ``>= n``: the exact diagonal from ``n`` products).
      chunk_size: probes per compiled call.
      diag: a :class:`~hvp.DiagonalResult` of ``op`` to reuse instead of estimating one.
      like: the parameter pytree when ``op`` is a matvec callable.
      driver: ``"auto"``, ``"compiled"`` or ``"host"`` (see :func:`hvp.linalg.diagonal`).
      progress: show the products done (host driver).

    Returns:
      An :class:`ObdSaliency` (pytrees like the parameters); ``.mask(sparsity)`` prunes.

    Raises:
      TypeError: bad ``key``, or ``diag`` not a DiagonalResult.
      ValueError: ``params`` not shaped like the operator's vectors; ``num_matvecs < 2``.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.compression import obd_saliency
      >>> w = {"kernel": jnp.array([[1.0, -2.0]])}
      >>> s = obd_saliency(hvp.from_dense(jnp.diag(jnp.array([4.0, 1.0])), like=w), key=jax.random.key(0), params=w)
      >>> s.saliency["kernel"].tolist(), s.mask(0.5)["kernel"].tolist()  # tie: the first pruned
      ([[2.0, 2.0]], [[False, True]])
    """
    op = as_operator(op, like)
    weights = _weights(op, params)
    d = _diagonal(op, key, num_matvecs, chunk_size, diag, driver, progress)
    half_w2 = tu.map(lambda w, h: 0.5 * jnp.square(w.astype(h.dtype)), weights, d.estimate)
    return ObdSaliency(
        saliency=tu.map(lambda c, h: c * h, half_w2, d.estimate),
        std_error=tu.map(lambda c, s: c * s, half_w2, d.std_error),
        diagonal=d.estimate,
        num_matvecs=0 if diag is not None else int(d.num_matvecs),
        method=d.method,
    )


def pruning_mask(
    scores: PyTree,
    sparsity: float,
    *,
    scope: str = "global",
    prune: Callable[[str, Any], bool] = is_kernel,
    layer_fn: Callable[[str], str] = layer_of,
) -> PyTree:
    r"""Keep-mask at a requested sparsity: prune the prunable weights of smallest score.

    Exactly :math:`\lfloor s\,N \rceil` (rounded to nearest) of the :math:`N` prunable weights
    are pruned, those of smallest score (among equal scores the earlier weight, in
    ``tree_leaves`` and row-major order, is pruned first); with ``scope="layer"`` each layer's prunable
    weights are pruned at the same rate separately. Leaves that ``prune`` does not select are
    kept whole. Scores are e.g. :class:`ObdSaliency` ``.saliency`` or ``|w|`` (magnitude
    pruning).

    Args:
      scores: a pytree of scores like the parameters (larger: more important).
      sparsity: the fraction of prunable weights to remove, in ``[0, 1]``.
      scope: ``"global"`` (one threshold for the model) or ``"layer"`` (per layer).
      prune: ``(path, leaf) -> bool``: which leaves may be pruned (default
        :func:`~hvp.compression.is_kernel`).
      layer_fn: leaf path -> layer (``scope="layer"``).

    Returns:
      A pytree of bool arrays like ``scores``: ``True`` where the weight is kept (multiply the
      parameters by it).

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1]``, an unknown ``scope``, no prunable leaf,
        NaN scores.

    Examples:
      >>> import jax.numpy as jnp
      >>> from hvp.compression import pruning_mask
      >>> w = {"a": {"kernel": jnp.array([[0.1, -3.0], [2.0, 0.5]])}, "a_bias": jnp.array([0.01])}
      >>> m = pruning_mask(jax.tree.map(jnp.abs, w), 0.5)  # magnitude pruning, biases kept
      >>> m["a"]["kernel"].tolist(), m["a_bias"].tolist()
      ([[False, True], [True, False]], [True])
    """
    s = check_finite_float("sparsity", sparsity)
    if s > 1:
        raise ValueError(f"`sparsity` must be in [0, 1], got {sparsity}.")
    if scope not in ("global", "layer"):
        raise ValueError(f"Unknown scope {scope!r}; use 'global' or 'layer'.")
    paths = tu.leaf_paths(scores)
    leaves, treedef = jax.tree_util.tree_flatten(scores)
    chosen = [i for i, (p, x) in enumerate(zip(paths, leaves)) if prune(p, x)]
    if not chosen:
        raise ValueError(
            "No leaf may be pruned (`prune` selects none; default: leaves with at least two axes)."
        )
    groups: dict[str, list[int]] = {}
    for i in chosen:
        groups.setdefault("" if scope == "global" else layer_fn(paths[i]), []).append(i)
    keep = [np.ones(np.shape(x), bool) for x in leaves]
    for idx in groups.values():
        flat = np.concatenate([np.asarray(leaves[i], np.float64).ravel() for i in idx])
        if np.isnan(flat).any():
            raise ValueError("`scores` contains NaN; the ranking is undefined.")
        k = int(round(s * flat.size))
        order = np.argsort(flat, kind="stable")  # ascending; ties keep their order
        mask = np.ones(flat.size, bool)
        mask[order[:k]] = False
        start = 0
        for i in idx:
            size = int(np.size(leaves[i]))
            keep[i] = mask[start : start + size].reshape(np.shape(leaves[i]))
            start += size
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(m) for m in keep])
