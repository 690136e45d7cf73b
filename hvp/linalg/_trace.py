r"""Stochastic trace estimation: Hutchinson, Hutch++ and XTrace.

All three estimate :math:`\operatorname{tr}(A)` of a symmetric operator from
matrix-vector products only, with random probes drawn like the parameters
(Rademacher or Gaussian pytrees) and applied in one compiled call, ``chunk_size``
products at a time (default: at most 8, :func:`hvp.linalg._checks.default_chunk_size`).
Products run in the parameters' dtype; dot products, Gram matrices, the orthonormal bases
and their ``eigh`` in at least float32 (:func:`hvp.tree.accumulation_dtype`).

* **Hutchinson** (Girard 1989; Hutchinson 1989): for i.i.d. Rademacher probes
  :math:`z_i` (:math:`\mathbb E[z z^\top] = I`),

  .. math:: \hat t = \frac1m \sum_{i=1}^m z_i^\top A z_i,\qquad
            \operatorname{Var}(z^\top A z) = 2 \sum_{i \ne j} A_{ij}^2 .

  The standard error is the sample standard deviation over :math:`\sqrt m`.

* **Hutch++** (Meyer, Musco, Musco, Woodruff, *Hutch++: Optimal Stochastic
  Trace Estimation*, SOSA 2021): with ``m`` products, ``k = m // 3`` go to a
  range sketch :math:`Q = \operatorname{orth}(A S)`, ``k`` to :math:`AQ`, and
  the remaining ``r = m - 2k`` to Hutchinson on the deflated operator
  :math:`(I - QQ^\top) A (I - QQ^\top)`:

  .. math:: \hat t = \operatorname{tr}(Q^\top A Q)
            + \frac1r \sum_{j=1}^r g_j^\top (I-QQ^\top) A (I-QQ^\top) g_j .

  Given :math:`Q` the first term is exact, so the standard error is the one of
  the Hutchinson part on the residual (sample standard deviation over
  :math:`\sqrt r`); ``samples`` holds :math:`\operatorname{tr}(Q^\top A Q) +
  g_j^\top P A P g_j`, whose mean is the estimate. The error falls like
  :math:`1/m` instead of :math:`1/\sqrt m` when the spectrum decays.

* **XTrace** (Epperly, Tropp, Webber, *XTrace: Making the Most of Every Sample
  in Stochastic Trace Estimation*, SIAM J. Matrix Anal. Appl. 45, 2024): ``m/2``
  Gaussian probes :math:`\omega_i` are used both for the range sketch and for
  the residual, exchangeably: with :math:`P_i` the orthogonal projector onto
  :math:`\operatorname{range}(A\Omega_{-i})`,

  .. math:: t_i = \operatorname{tr}(A P_i) + c_i\,\omega_i^\top (I-P_i) A (I-P_i)\omega_i,
            \qquad c_i = \frac{n - \operatorname{rank} P_i}{\|(I-P_i)\omega_i\|^2},

  and :math:`\hat t = \frac{1}{m/2}\sum_i t_i` with standard error
  :math:`\operatorname{std}(t_i)/\sqrt{m/2}` (the paper's error estimate,
  ``error_estimate="sample"``). That estimate ignores the positive correlation
  of the :math:`t_i` and is measured to be 1.2-1.4x too small on fast-decaying
  spectra, so the default standard error is the jackknife over probes,
  computed from ``m/2 x m/2`` matrices without extra products; it is
  conservative in expectation (Efron & Stein 1981). The
  ``c_i`` normalisation is the paper's "improved" variant: it makes the
  residual probe uniform on the sphere of the complement. All the :math:`P_i`
  come from one QR of :math:`A\Omega` by rank-one downdates, so XTrace costs
  exactly ``m`` products. The range sketch is taken of :math:`(A + \delta
  I)\Omega` with a tiny :math:`\delta` (``10 sqrt(eps)`` relative) so that it
  is well conditioned even when :math:`A` is (numerically) low rank; every
  :math:`t_i` remains unbiased because :math:`P_i` still only depends on
  :math:`\Omega_{-i}` (up to the data-dependent size of :math:`\delta`).

Orthonormalisation of a block of pytree vectors never ravels them: it works in
the ``k x k`` Gram space (SVQB, Stathopoulos & Wu, SIAM J. Sci. Comput. 2002,
applied twice), dropping directions whose Gram eigenvalue is below ``10 k eps``
of the largest.

**Budget at least n.** When ``num_matvecs >= n`` (the operator's size) the
trace is computed exactly with the ``n`` products :math:`e_i^\top A e_i`
(``method="exact"``, ``std_error = 0``, ``samples`` = the diagonal), because
no randomised method can beat that for the same cost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from hvp import tree as tu
from hvp.linalg._checks import (
    DtypePolicy,
    acc_dtype,
    apply_in_dtype,
    check_finite_float,
    check_int,
    check_key,
    coerce_operator,
    dtype_policy,
    raise_if_nonfinite,
    resolve_chunk,
)
from hvp.linalg._probes import probe, probes
from hvp.linalg._stats import mean_std_error as _mean_se
from hvp.linalg._stats import normal_quantile as _normal_quantile
from hvp.operators import LinearOperator
from hvp.typing import OperatorLike, PRNGKey

__all__ = ["TraceResult", "trace"]

PyTree = Any
_HIGHEST = lax.Precision.HIGHEST

METHODS = ("hutchinson", "hutch++", "xtrace")
_MIN_MATVECS = {"hutchinson": 1, "hutch++": 3, "xtrace": 2}
_ALIASES = {"hutchpp": "hutch++", "hutch_plus_plus": "hutch++", "girard": "hutchinson"}


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@tu.result(static=("num_matvecs", "method", "converged", "dtype_policy"))
class TraceResult:
    """Estimate of :math:`\\operatorname{tr}(A)`.

    Attributes:
      estimate: the trace estimate (scalar array).
      std_error: its standard error (scalar array; ``inf`` when it cannot be
        estimated from a single sample, ``0`` for ``method="exact"``).
      num_matvecs: operator products spent (all rounds of adaptive mode included).
      method: ``"hutchinson"``, ``"hutch++"``, ``"xtrace"`` or ``"exact"``.
      samples: per-sample values whose mean is ``estimate``: the i.i.d. values
        :math:`z_i^\\top A z_i` (Hutchinson), :math:`\\operatorname{tr}(Q^\\top A Q) +
        g_j^\\top P A P g_j` (Hutch++), the leave-one-out estimates :math:`t_i`
        (XTrace), or the diagonal entries (exact; their *sum* is the estimate).
      converged: adaptive mode only: whether ``std_error <= max(rtol*|estimate|, atol)``
        was reached within ``max_matvecs`` (``True`` for an exact result); ``None`` for a
        fixed budget.
      dtype_policy: the :class:`~hvp.linalg.DtypePolicy` used (products in ``compute``,
        sums, Gram matrices and factorisations in ``accumulate``).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> res = hvp.trace(hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0, 3.0]))), key=jax.random.key(0), num_matvecs=3)
      >>> res.method, round(float(res.estimate), 4), float(res.std_error)
      ('exact', 6.0, 0.0)
    """

    estimate: jax.Array
    std_error: jax.Array
    num_matvecs: int
    method: str
    samples: jax.Array
    converged: bool | None = None
    dtype_policy: DtypePolicy | None = None

    def confidence_interval(self, level: float = 0.95) -> tuple[jax.Array, jax.Array]:
        """Normal-approximation interval ``estimate -+ z_{(1+level)/2} * std_error``."""
        z = _normal_quantile(level)
        return self.estimate - z * self.std_error, self.estimate + z * self.std_error

    @property
    def relative_std_error(self) -> jax.Array:
        """``std_error / |estimate|`` (``inf`` for a zero estimate)."""
        return jnp.where(self.estimate != 0, self.std_error / jnp.abs(self.estimate), jnp.inf)


def _eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


def _work_dtype(like):
    """The dtype of the scalars, small matrices and derived blocks: >= float32 (precision policy)."""
    return acc_dtype(like)


def _acc(x):
    return x.astype(tu.accumulation_dtype(x.dtype))


# ------------------------------------------------------------------------------------------------
# probes and batched products (all of these run inside jit)
# ------------------------------------------------------------------------------------------------
def map_chunked(fn: Callable, xs, chunk: int | None):
    """``vmap(fn)(xs)``, or ``lax.map`` over chunks of ``chunk`` rows to bound memory."""
    count = tu.leading_dim(xs)
    if chunk is None or chunk >= count:
        return jax.vmap(fn)(xs)
    return lax.map(fn, xs, batch_size=chunk)


def matmat(op: LinearOperator, vs, chunk: int | None):
    """``A`` applied to each row of the block ``vs`` (chunked)."""
    return map_chunked(lambda v: apply_in_dtype(op, v), vs, chunk)


def probe_map(
    op: LinearOperator,
    key,
    count: int,
    kind: str,
    fn: Callable,
    chunk: int | None,
    start=0,
    transform: Callable | None = None,
):
    """``fn(z_i, A z_i)`` for probes ``i = start..start+count-1``, drawn inside the map.

    Generating the probe inside the mapped function keeps at most ``chunk``
    probes in memory. ``transform`` (optional) maps a probe before the product
    (e.g. a projection).
    """
    like = op.like

    def one(i):
        z = probe(jax.random.fold_in(key, i), like, kind)
        if transform is not None:
            z = transform(z)
        return fn(z, apply_in_dtype(op, z))

    return map_chunked(one, start + jnp.arange(count), chunk)


def exact_map(op: LinearOperator, fn: Callable, chunk: int | None):
    """``fn(e_i, A e_i)`` for every coordinate vector ``e_i`` (ravel order), ``n`` products."""
    like = op.like
    n = tu.size(like)
    unravel = tu.unravel_fn(like)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(like))

    def one(i):
        e = unravel(jax.nn.one_hot(i, n, dtype=dtype))
        return fn(e, op._apply(e))

    return map_chunked(one, jnp.arange(n), chunk)


# ------------------------------------------------------------------------------------------------
# blocks of pytree vectors: Gram matrices and orthonormalisation in the k x k space
# ------------------------------------------------------------------------------------------------
def block_gram(xs, ys) -> jax.Array:
    """``G[a, b] = <x_a, y_b>`` for two stacked blocks (summed over leaves)."""
    parts = [
        tu.contract_rows(_acc(x), _acc(y), kind="gram", precision=_HIGHEST)
        for x, y in zip(jax.tree_util.tree_leaves(xs), jax.tree_util.tree_leaves(ys))
    ]
    dtype = jnp.result_type(*parts)
    return sum((p.astype(dtype) for p in parts[1:]), parts[0].astype(dtype))


def block_rowdots(xs, ys) -> jax.Array:
    """``d[a] = <x_a, y_a>`` for two stacked blocks of the same length."""
    parts = [
        tu.contract_rows(_acc(x), _acc(y), kind="rowwise", precision=_HIGHEST)
        for x, y in zip(jax.tree_util.tree_leaves(xs), jax.tree_util.tree_leaves(ys))
    ]
    dtype = jnp.result_type(*parts)
    return sum((p.astype(dtype) for p in parts[1:]), parts[0].astype(dtype))


def block_combine(xs, coeffs: jax.Array):
    """The block ``y_b = sum_a coeffs[a, b] x_a`` (``coeffs`` is ``k x k'``)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.tensordot(
            coeffs.astype(_acc(x).dtype), _acc(x), axes=([0], [0]), precision=_HIGHEST
        ),
        xs,
    )


def block_coeffs(xs, v) -> jax.Array:
    """``c[a] = <x_a, v>`` for a block and one vector."""
    parts = [
        tu.contract_rows(_acc(x), _acc(y), precision=_HIGHEST)
        for x, y in zip(jax.tree_util.tree_leaves(xs), jax.tree_util.tree_leaves(v))
    ]
    dtype = jnp.result_type(*parts)
    return sum((p.astype(dtype) for p in parts[1:]), parts[0].astype(dtype))


def block_apply(xs, c: jax.Array):
    """The vector ``sum_a c[a] x_a``."""
    return jax.tree_util.tree_map(
        lambda x: jnp.tensordot(c.astype(_acc(x).dtype), _acc(x), axes=1, precision=_HIGHEST), xs
    )


def _svqb(gram: jax.Array, tol: float):
    """Coefficients ``C`` with ``(X C)^T (X C) = I`` on the kept directions (SVQB).

    ``gram = X^T X``. The columns are first scaled to unit norm, then
    ``C = D V diag(lambda^{-1/2})`` from the eigendecomposition of ``D G D``;
    directions with ``lambda <= tol * lambda_max`` get a zero column.
    """
    gram = 0.5 * (gram + gram.T)
    diag = jnp.diagonal(gram)
    d = jnp.where(diag > 0, 1.0 / jnp.sqrt(jnp.where(diag > 0, diag, 1.0)), 0.0)
    lam, vecs = jnp.linalg.eigh(d[:, None] * gram * d[None, :])
    lam_max = jnp.max(lam)
    keep = (lam > tol * lam_max) & (lam_max > 0)
    inv = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
    return d[:, None] * vecs * inv[None, :], keep


def orthonormalize(ys):
    """An orthonormal basis of the span of the block ``ys`` (``k`` rows), without raveling.

    Returns ``(Q, C, rank)`` with ``Q = ys @ C`` (``Q`` has ``k`` rows, the
    dropped, numerically dependent directions being zero rows) and ``rank`` the
    number of non-zero rows. Two passes of SVQB in the ``k x k`` Gram space.
    """
    k = tu.leading_dim(ys)
    dtype = _work_dtype(ys)
    tol = 10.0 * k * _eps(dtype)
    c1, _ = _svqb(block_gram(ys, ys), tol)
    q1 = block_combine(ys, c1)
    c2, keep = _svqb(block_gram(q1, q1), tol)
    q = block_combine(q1, c2)
    return q, jnp.matmul(c1, c2, precision=_HIGHEST), jnp.sum(keep)


# ------------------------------------------------------------------------------------------------
# the compiled estimators
# ------------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("count", "chunk"))
def _hutchinson_samples(op, key, start, *, count: int, chunk: int | None):
    return probe_map(op, key, count, "rademacher", tu.dot, chunk, start=start)


@partial(jax.jit, static_argnames=("num_matvecs", "chunk"))
def _hutchinson(op, key, *, num_matvecs: int, chunk: int | None):
    samples = probe_map(op, key, num_matvecs, "rademacher", tu.dot, chunk)
    est, se = _mean_se(samples)
    return est, se, samples


def _deflate(q, g):
    """``(I - Q Q^T) g`` in the accumulation dtype."""
    return tu.sub(tu.map(_acc, g), block_apply(q, block_coeffs(q, g)))


def _extend_basis(q_old, ys):
    """Orthonormal ``Q_add`` spanning ``(I - Q_old Q_old^T) ys`` (block Gram-Schmidt, twice).

    Returns ``(Q_add, B, C_add, rank_add)`` with ``Q_add = (ys - Q_old B) C_add``.
    ``q_old=None`` orthonormalises ``ys`` itself (``B = None``).
    """
    if q_old is None:
        q, c, rank = orthonormalize(ys)
        return q, None, c, rank
    b1 = block_gram(q_old, ys)
    r1 = tu.sub(tu.map(_acc, ys), block_combine(q_old, b1))
    b2 = block_gram(q_old, r1)
    r2 = tu.sub(r1, block_combine(q_old, b2))
    q, c, rank = orthonormalize(r2)
    return q, b1 + b2, c, rank


def _concat(a, b):
    def cat(x, y):
        dt = jnp.result_type(x, y)
        return jnp.concatenate([x.astype(dt), y.astype(dt)])

    return tu.map(cat, a, b)


def hutchpp_from_probes(op, sketch, chunk: int | None, resid_key, num_resid: int):
    """Hutch++ with a given range sketch block ``sketch`` (``k`` rows) and Rademacher residual probes.

    The residual probes are drawn, deflated and applied chunk by chunk (at most ``chunk``
    of them in memory); the adaptive mode keeps them instead (:func:`_hutchpp_extend`).
    """
    q, _, _, _ = _extend_basis(None, matmat(op, sketch, chunk))
    low = jnp.sum(block_rowdots(q, matmat(op, q, chunk)))
    resid = probe_map(
        op, resid_key, num_resid, "rademacher", tu.dot, chunk, transform=lambda g: _deflate(q, g)
    )
    _, se = _mean_se(resid)
    samples = low + resid
    return jnp.mean(samples), se, samples


def _hutchpp_extend(op, state, sketch, resid_key, resid_start: int, num_resid: int, chunk):
    """Add sketch probes and residual probes to a Hutch++ state, reusing every earlier product.

    ``state`` holds ``Q`` (orthonormal range basis), ``Z = A Q``, and the deflated residual
    probes ``P g_j`` with their products ``A P g_j``. New sketch directions ``Q_add`` are
    orthogonal to ``Q``, so ``P' g = P g - Q_add Q_add^T g`` and
    ``A P' g = A P g - Z_add Q_add^T g``: old residual samples are updated without products.
    Cost: ``2 * rows(sketch) + num_resid`` products.
    """
    q_old = None if state is None else state["q"]
    if tu.leading_dim(sketch) == 0:  # no new sketch directions this round
        q, z, pg, apg = state["q"], state["z"], state["pg"], state["apg"]
        q_add = None
    else:
        q_add, _, _, _ = _extend_basis(q_old, matmat(op, sketch, chunk))
        z_add = matmat(op, q_add, chunk)
    if q_add is None:
        pass
    elif state is None:
        q, z, pg, apg = q_add, z_add, None, None
    else:
        q, z = _concat(state["q"], q_add), _concat(state["z"], z_add)
        coeffs = block_gram(q_add, state["pg"])  # (k_add, r): Q_add^T P g_j
        pg = tu.sub(state["pg"], block_combine(q_add, coeffs))
        apg = tu.sub(tu.map(_acc, state["apg"]), block_combine(z_add, coeffs))
    if num_resid:
        g = probes(resid_key, op.like, num_resid, "rademacher", start=resid_start)
        g = jax.vmap(lambda v: _deflate(q, v))(g)
        ag = tu.map(_acc, matmat(op, g, chunk))
        pg = g if pg is None else _concat(pg, g)
        apg = ag if apg is None else _concat(apg, ag)
    return {"q": q, "z": z, "pg": pg, "apg": apg}


def _hutchpp_finish(state):
    low = jnp.sum(block_rowdots(state["q"], state["z"]))  # tr(Q^T A Q)
    resid = block_rowdots(state["pg"], state["apg"])  # g_j^T P A P g_j
    _, se = _mean_se(resid)
    samples = low + resid
    return jnp.mean(samples), se, samples


@partial(jax.jit, static_argnames=("num_matvecs", "chunk"))
def _hutchpp(op, key, *, num_matvecs: int, chunk: int | None):
    k = num_matvecs // 3
    key_s, key_g = jax.random.split(key)
    sketch = probes(key_s, op.like, k, "rademacher")
    return hutchpp_from_probes(op, sketch, chunk, key_g, num_matvecs - 2 * k)


def _xtrace_delta(omega, y, shift):
    """``delta = shift * ||Y||_2 / sigma_min(Omega)`` for the shifted sketch ``Y + delta Omega``."""
    g_y = block_gram(y, y)
    g_o = block_gram(omega, omega)
    s_max_y = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(0.5 * (g_y + g_y.T))[-1], 0.0))
    s_min_o = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(0.5 * (g_o + g_o.T))[0], 0.0))
    return shift * s_max_y / jnp.where(s_min_o > 0, s_min_o, 1.0)


def _xtrace_extend(op, state, omega, chunk, shift):
    """Add Gaussian probes ``omega`` to an XTrace state (2 products per new probe, none redone).

    The state holds ``Omega``, ``Y = A Omega``, the orthonormal ``Q = (Y + delta Omega) C``
    with its coefficient matrix ``C`` (block upper triangular across rounds), ``rank`` and
    ``Z = A Q``. New probes extend ``Q`` by block Gram-Schmidt, so ``A Q`` of the old
    columns is reused; ``delta`` is fixed by the first block.
    """
    y = matmat(op, omega, chunk)  # A Omega_new        (new products)
    if state is None:
        shift = 10.0 * math.sqrt(_eps(_work_dtype(op.like))) if shift is None else shift
        delta = _xtrace_delta(omega, y, shift)
    else:
        delta = state["delta"]
    ys = tu.map(lambda o, a: delta.astype(_acc(o).dtype) * _acc(o) + _acc(a), omega, y)
    q_add, b, c_add, rank_add = _extend_basis(None if state is None else state["q"], ys)
    z_add = matmat(op, q_add, chunk)  # A Q_add            (new products)
    if state is None:
        return {
            "omega": omega,
            "y": y,
            "q": q_add,
            "c": c_add,
            "rank": rank_add,
            "z": z_add,
            "delta": delta,
        }
    c_old = state["c"]
    k_old, k_add = c_old.shape[0], c_add.shape[0]
    top = jnp.concatenate([c_old, -(c_old @ b) @ c_add], axis=1)
    bottom = jnp.concatenate([jnp.zeros((k_add, k_old), c_add.dtype), c_add], axis=1)
    return {
        "omega": _concat(state["omega"], omega),
        "y": _concat(state["y"], y),
        "q": _concat(state["q"], q_add),
        "c": jnp.concatenate([top, bottom], axis=0),
        "rank": state["rank"] + rank_add,
        "z": _concat(state["z"], z_add),
        "delta": delta,
    }


def xtrace_from_probes(
    op, omega, chunk: int | None, shift: float | None = None, jackknife: bool = False
):
    """XTrace samples ``t_i`` for a given block of (Gaussian) probes ``omega`` (``m`` rows).

    ``shift`` is the relative size of ``delta`` (default ``10 sqrt(eps)``; ``0`` sketches ``A Omega``).
    """
    state = _xtrace_extend(op, None, omega, chunk, shift)
    return _xtrace_finish(state, tu.size(op.like), jackknife)


def _xtrace_finish(state, n: int, jackknife: bool):
    omega, y, q, c, rank, z = (state[k] for k in ("omega", "y", "q", "c", "rank", "z"))
    dtype = c.dtype
    h = block_gram(q, z)
    h = 0.5 * (h + h.T)  # Q^T A Q
    w = block_gram(q, omega)  # W[:, i] = Q^T omega_i
    r = block_gram(q, y)  # R[:, i] = Q^T A omega_i
    oy = block_rowdots(omega, y)  # omega_i^T A omega_i
    oo = block_rowdots(omega, omega)  # ||omega_i||^2
    # s_i: the unit vector (in Q coordinates) that range(Q) loses when omega_i is left out:
    # orthogonal to Q^T y'_j for all j != i, i.e. the i-th row of C = R'^{-1}.
    s = c.T
    s_norm = jnp.linalg.norm(s, axis=0)
    s = jnp.where(s_norm > 0, s / jnp.where(s_norm > 0, s_norm, 1.0), 0.0)
    ss = jnp.sum(s * s, axis=0)  # 1, or 0 where nothing is lost
    hs, hw = h @ s, h @ w
    sw, sr = jnp.sum(s * w, axis=0), jnp.sum(s * r, axis=0)
    shs, shw = jnp.sum(s * hs, axis=0), jnp.sum(s * hw, axis=0)
    whw, wr, ww = jnp.sum(w * hw, axis=0), jnp.sum(w * r, axis=0), jnp.sum(w * w, axis=0)
    # u_i = (I - P_i) omega_i = omega_i + Q v_i with v_i = -(w_i - s_i (s_i^T w_i)):
    # u^T A u = omega^T A omega + 2 v^T Q^T A omega + v^T H v.
    quad = oy - 2.0 * wr + 2.0 * sw * sr + whw - 2.0 * sw * shw + sw**2 * shs
    norm_u2 = oo - ww + sw**2  # ||(I - P_i) omega_i||^2
    dim = n - (rank.astype(dtype) - ss)  # n - rank(P_i)
    scale = dim / jnp.where(norm_u2 > 0, norm_u2, 1.0)
    scale = jnp.where(norm_u2 > 0, scale, 0.0)
    samples = jnp.trace(h) - shs + scale * quad
    est = jnp.mean(samples)
    if jackknife:
        se = _xtrace_jackknife_se(h, s, w, r, oy, oo, whw, wr, ww, rank.astype(dtype), n)
    else:
        _, se = _mean_se(samples)
    return est, se, samples


def _xtrace_jackknife_se(h, s, w, r, oy, oo, whw, wr, ww, rank, n: int):
    """Jackknife standard error of XTrace from its leave-one-probe-out estimates.

    ``theta_{-j}`` is XTrace on the probes without ``omega_j``: its terms need the
    projectors onto ``range(A Omega_{-i,-j})``, i.e. ``P_i`` further downdated by
    ``s_j`` (the lost subspace is ``span(s_i, s_j)``), all from ``m x m``
    matrices (``O(m^3)``, no products). The jackknife variance
    ``(m-1)/m sum_j (theta_{-j} - mean)^2`` is conservative in expectation
    (Efron & Stein 1981), unlike ``std(t_i)/sqrt(m)``, which ignores the
    positive correlation of the ``t_i``.
    """
    m = s.shape[1]
    if m < 2:
        return jnp.full((), jnp.inf, h.dtype)
    sig = s.T @ s  # [a, b] = s_a . s_b
    shs = s.T @ (h @ s)  # s_a^T H s_b
    sw = s.T @ w  # s_a . w_b
    sr = s.T @ r  # s_a . r_b
    shw = s.T @ (h @ w)  # s_a^T H w_b
    col = lambda v: v[:, None]  # noqa: E731  (index i: the probe whose residual is used)
    row = lambda v: v[None, :]  # noqa: E731  (index j: the probe left out)
    g11, g22, g12 = col(jnp.diagonal(sig)), row(jnp.diagonal(sig)), sig
    det = g11 * g22 - g12**2
    ok = det > 1e-12
    inv_det = jnp.where(ok, 1.0 / jnp.where(ok, det, 1.0), 0.0)
    bw1, bw2 = col(jnp.diagonal(sw)), sw.T  # s_i . w_i, s_j . w_i
    br1, br2 = col(jnp.diagonal(sr)), sr.T
    bh1, bh2 = col(jnp.diagonal(shw)), shw.T
    m11, m22, m12 = col(jnp.diagonal(shs)), row(jnp.diagonal(shs)), shs
    a1 = (g22 * bw1 - g12 * bw2) * inv_det  # alpha = (B^T B)^{-1} B^T w_i, B = [s_i, s_j]
    a2 = (g11 * bw2 - g12 * bw1) * inv_det
    tr_bhb = (g22 * m11 - 2.0 * g12 * m12 + g11 * m22) * inv_det
    vr = -col(wr) + a1 * br1 + a2 * br2  # v = -w_i + B alpha
    vhv = col(whw) - 2.0 * (a1 * bh1 + a2 * bh2) + a1**2 * m11 + 2.0 * a1 * a2 * m12 + a2**2 * m22
    quad = col(oy) + 2.0 * vr + vhv
    norm_u2 = col(oo) - col(ww) + (a1 * bw1 + a2 * bw2)
    dim = n - (rank - jnp.where(ok, 2.0, 0.0))
    scale = jnp.where(norm_u2 > 0, dim / jnp.where(norm_u2 > 0, norm_u2, 1.0), 0.0)
    t = jnp.trace(h) - tr_bhb + scale * quad  # t[i, j]: term i of XTrace without probe j
    off = 1.0 - jnp.eye(m, dtype=t.dtype)
    theta = jnp.sum(t * off, axis=0) / (m - 1)  # theta_{-j}
    return jnp.sqrt((m - 1) / m * jnp.sum((theta - jnp.mean(theta)) ** 2))


@partial(jax.jit, static_argnames=("num_matvecs", "chunk", "jackknife"))
def _xtrace(op, key, *, num_matvecs: int, chunk: int | None, jackknife: bool = False):
    omega = probes(key, op.like, num_matvecs // 2, "normal")
    return xtrace_from_probes(op, omega, chunk, jackknife=jackknife)


@partial(jax.jit, static_argnames=("chunk",))
def _exact_trace(op, *, chunk: int | None):
    diag = exact_map(op, tu.dot, chunk)
    return jnp.sum(diag), jnp.zeros((), diag.dtype), diag


def _cost(method: str, num_matvecs: int) -> int:
    if method == "xtrace":
        return 2 * (num_matvecs // 2)
    return num_matvecs


def _run_fixed(
    op, key, method: str, num_matvecs: int, chunk: int, jackknife: bool = False
) -> TraceResult:
    n = op.size
    policy = dtype_policy(op.like)
    if num_matvecs >= n:
        return _exact_result(op, chunk)
    if method == "xtrace":
        est, se, samples = _xtrace(
            op, key, num_matvecs=num_matvecs, chunk=chunk, jackknife=jackknife
        )
    else:
        fn = {"hutchinson": _hutchinson, "hutch++": _hutchpp}[method]
        est, se, samples = fn(op, key, num_matvecs=num_matvecs, chunk=chunk)
    return TraceResult(
        estimate=est,
        std_error=se,
        num_matvecs=_cost(method, num_matvecs),
        method=method,
        samples=samples,
        dtype_policy=policy,
    )


def _exact_result(op, chunk: int, *, spent: int = 0, converged: bool | None = None):
    est, se, samples = _exact_trace(op, chunk=chunk)
    return TraceResult(
        estimate=est,
        std_error=se,
        num_matvecs=spent + op.size,
        method="exact",
        samples=samples,
        converged=converged,
        dtype_policy=dtype_policy(op.like),
    )


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def trace(
    op: OperatorLike,
    *,
    key: PRNGKey,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    rtol: float | None = None,
    atol: float | None = None,
    max_matvecs: int | None = None,
    chunk_size: int | None = None,
    error_estimate: str = "jackknife",
    like: PyTree | None = None,
    progress: bool = False,
) -> TraceResult:
    r"""Estimate :math:`\operatorname{tr}(A)` from matrix-vector products.

    Args:
      op: a :class:`~hvp.LinearOperator` (e.g. :func:`hvp.hessian`), a
        ``matvec`` callable (then pass ``like=``), or a dense square matrix.
      key: a JAX PRNG key (``jax.random.key(0)``); the same key gives the same result.
      num_matvecs: number of operator products (the budget). Methods:
        ``"hutchinson"`` needs >= 1, ``"hutch++"`` >= 3 (``k = m // 3`` for the
        sketch, ``k`` for :math:`AQ`, ``m - 2k`` for the residual),
        ``"xtrace"`` >= 2 (``m // 2`` Gaussian probes, two products each). With
        ``num_matvecs >= n`` the exact trace is computed from ``n`` products
        (``method="exact"``). In adaptive mode this is the round size.
      method: ``"hutchinson"`` (Hutchinson 1989, Rademacher probes), ``"hutch++"``
        (Meyer et al. 2021) or ``"xtrace"`` (Epperly, Tropp & Webber 2024); see
        the module docstring for the formulas and their standard errors.
      rtol: adaptive mode (``rtol`` or ``atol`` turns it on): stop as soon as
        ``std_error <= max(rtol * |estimate|, atol)``. Hutchinson runs rounds
        of ``num_matvecs`` new probes and pools all samples; Hutch++ and XTrace
        double their total budget each round and extend their sketch, reusing
        every earlier product (``num_matvecs`` in the result is the total
        spent). A round that would bring the total to ``n`` products or more,
        or an error that predicts ``n`` or more are needed, switches to the
        exact trace (``n`` products, ``method="exact"``, ``std_error=0``): the
        random rounds never spend ``n`` products without returning the exact value.
        Must be finite and ``>= 0``.
      atol: absolute tolerance of adaptive mode (finite, ``>= 0``), see ``rtol``.
      max_matvecs: adaptive mode only: the cap on the total number of products
        (default ``50 * num_matvecs``). ``converged`` reports whether the
        tolerance was met.
      chunk_size: at most this many products run at once (``lax.map`` over
        chunks of a ``vmap``). ``None`` (default) chooses it by the memory rule
        of :func:`hvp.linalg._checks.default_chunk_size`: at most 8 products at
        once (one product of a curvature operator over a data set holds that
        data set's activations). Results do not depend on it (probe ``i`` always
        comes from ``fold_in(key, i)``).
      error_estimate: how XTrace's standard error is computed (for Hutchinson
        and Hutch++ both choices give the same number, the sample standard
        deviation of ``samples`` over the square root of their number, since
        those estimates are linear in i.i.d. samples). ``"jackknife"``
        (default): the jackknife over probes, conservative (measured 1.1-3x
        larger than the true spread, the larger factors on fast-decaying
        spectra). ``"sample"``: the paper's ``std(t_i)/sqrt(m/2)``, which ignores
        the positive correlation of the leave-one-out :math:`t_i` (measured
        1.2-1.4x too small on decaying spectra, with occasional misses of 5+
        standard errors).
      like: example pytree of the vectors when ``op`` is a plain callable.
      progress: show a progress bar (``rich``) over the rounds of adaptive mode.

    Returns:
      :class:`TraceResult` with ``estimate``, ``std_error``, ``num_matvecs``,
      ``method``, ``samples``, ``converged``, ``dtype_policy`` and
      ``confidence_interval(level)``. Precision: products run in the parameters'
      dtype (bfloat16/float16 included); probe dot products, Gram matrices and
      the small ``eigh`` factorisations run in at least float32.

    Raises:
      ValueError / TypeError: bad budget, method, tolerance or key, with the fix.
      hvp.NonFiniteError: the products produced NaN or Inf.

    A fixed budget works inside ``jax.jit`` (pass the operator as an argument);
    adaptive mode is a Python loop over compiled rounds.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> A = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
        >>> res = hvp.trace(hvp.from_dense(A), key=jax.random.PRNGKey(0), num_matvecs=6, method="hutch++")
        >>> round(float(res.estimate), 4)  # a budget of at least n products is exact: 2 + 3 + 4
        9.0
    """
    op = coerce_operator(op, like)
    check_key(key)
    if not isinstance(method, str):
        raise TypeError(
            f"`method` must be a string, one of {METHODS}; got {type(method).__name__}."
        )
    method = _ALIASES.get(method.lower(), method.lower())
    if method not in METHODS:
        raise ValueError(
            f"Unknown trace method {method!r}; choose one of {', '.join(repr(m) for m in METHODS)}."
        )
    num_matvecs = check_int(
        "num_matvecs",
        num_matvecs,
        minimum=_MIN_MATVECS[method],
        hint=f"Method {method!r} needs at least {_MIN_MATVECS[method]} products.",
    )
    chunk = resolve_chunk(chunk_size, max(num_matvecs, 1))
    if error_estimate not in ("sample", "jackknife"):
        raise ValueError(
            f"`error_estimate` must be 'sample' or 'jackknife', got {error_estimate!r}."
        )
    jackknife = error_estimate == "jackknife"
    adaptive = rtol is not None or atol is not None
    if not adaptive:
        if max_matvecs is not None:
            raise ValueError(
                "`max_matvecs` only applies in adaptive mode: pass `rtol=` (and/or `atol=`) too, "
                "or set the budget with `num_matvecs=`."
            )
        res = _run_fixed(op, key, method, num_matvecs, chunk, jackknife)
        raise_if_nonfinite(op, "trace estimate", res.estimate)
        return res

    rtol = check_finite_float("rtol", rtol, allow_none=True)
    atol = check_finite_float("atol", atol, allow_none=True)
    rtol = 0.0 if rtol is None else rtol
    atol = 0.0 if atol is None else atol
    if rtol == 0.0 and atol == 0.0:
        raise ValueError(
            "Adaptive mode needs a positive `rtol` or `atol` (a zero tolerance never stops)."
        )
    max_matvecs = (
        50 * num_matvecs
        if max_matvecs is None
        else check_int(
            "max_matvecs", max_matvecs, minimum=num_matvecs, hint="It caps the total budget."
        )
    )
    if tu.is_traced(key, op):
        raise ValueError(
            "Adaptive mode (`rtol=`/`atol=`) decides on concrete values and cannot run inside "
            "`jax.jit`; call it outside, or use a fixed `num_matvecs`."
        )
    return _adaptive(
        op, key, method, num_matvecs, max_matvecs, rtol, atol, chunk, progress, jackknife
    )


def _met(est, se, rtol, atol) -> bool:
    return float(se) <= max(rtol * abs(float(est)), atol)


def _predicted_total(total: int, est, se, rtol, atol, power: float) -> float:
    """Products needed to reach the tolerance if the error falls like ``total^-power``."""
    target = max(rtol * abs(float(est)), atol)
    if not target > 0 or not math.isfinite(float(se)):
        return math.inf
    return total * (float(se) / target) ** (1.0 / power)


def _progress(enabled: bool, total: int, what: str):
    if not enabled:
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    return bar, bar.add_task(what, total=total)


def _adaptive(op, key, method, batch, max_matvecs, rtol, atol, chunk, progress, jackknife):
    """Adaptive rounds; every product is used once and the total never passes ``n`` unless exact.

    Hutchinson pools rounds of ``batch`` new probes; Hutch++ and XTrace double their total
    budget each round and *extend* their sketch (:func:`_hutchpp_extend`,
    :func:`_xtrace_extend`), reusing every earlier product. Before a round, if it would
    bring the total to ``n`` or more, or if the error so far predicts that ``n`` or more
    products are needed (``1/sqrt(m)`` decay for Hutchinson, ``1/m`` for Hutch++ and
    XTrace), the exact trace is computed instead when ``max_matvecs`` allows it (``n``
    more products); when it does not, rounds continue while their total stays below ``n``.
    """
    n = op.size
    policy = dtype_policy(op.like)
    power = 0.5 if method == "hutchinson" else 1.0
    bar = _progress(progress, max_matvecs, f"trace ({method})")
    total, state, parts = 0, None, []
    k_old = r_old = p_old = 0  # sketch / residual / XTrace probes used so far
    key_s, key_g = jax.random.split(key)
    res = None
    try:
        while True:
            if total == 0:
                target = batch
            elif method == "hutchinson":
                target = total + min(batch, max_matvecs - total)
            else:
                target = min(2 * total, max_matvecs)
            if total > 0:
                predicted = _predicted_total(total, res.estimate, res.std_error, rtol, atol, power)
            else:
                predicted = 0.0
            exact_affordable = total + n <= max_matvecs
            if (target >= n or predicted >= n) and exact_affordable:
                return _exact_result(op, chunk, spent=total, converged=True)
            if target >= n:  # random rounds never reach n products: stop, unconverged
                break
            if target <= total or _cost(method, target) <= total:
                break
            if method == "hutchinson":
                count = target - total
                parts.append(
                    _hutchinson_samples(op, key, jnp.asarray(total), count=count, chunk=chunk)
                )
                samples = jnp.concatenate(parts)
                est, se = _mean_se(samples)
                total = target
            elif method == "hutch++":
                k = max(k_old, target // 3)
                r = target - 2 * k
                if r < r_old:
                    k, r = k_old, target - 2 * k_old
                state = _hutchpp_round(
                    op, state, key_s, key_g, k_old=k_old, k=k, r_old=r_old, r=r, chunk=chunk
                )
                est, se, samples = _hutchpp_finish_jit(state)
                k_old, r_old, total = k, r, 2 * k + r
            else:
                p = target // 2
                state = _xtrace_round(op, state, key, p_old=p_old, p=p, chunk=chunk)
                est, se, samples = _xtrace_finish_jit(state, n=n, jackknife=jackknife)
                p_old, total = p, 2 * p
            res = TraceResult(
                estimate=est,
                std_error=se,
                num_matvecs=total,
                method=method,
                samples=samples,
                converged=False,
                dtype_policy=policy,
            )
            raise_if_nonfinite(op, "trace estimate", est)
            if bar is not None:
                bar[0].update(bar[1], completed=min(total, max_matvecs))
            if total >= 2 and _met(est, se, rtol, atol):
                return dataclasses.replace(res, converged=True)
    finally:
        if bar is not None:
            bar[0].stop()
    return res


@partial(jax.jit, static_argnames=("k_old", "k", "r_old", "r", "chunk"))
def _hutchpp_round(op, state, key_s, key_g, *, k_old, k, r_old, r, chunk):
    sketch = probes(key_s, op.like, k - k_old, "rademacher", start=k_old)
    return _hutchpp_extend(op, state, sketch, key_g, r_old, r - r_old, chunk)


@jax.jit
def _hutchpp_finish_jit(state):
    return _hutchpp_finish(state)


@partial(jax.jit, static_argnames=("p_old", "p", "chunk"))
def _xtrace_round(op, state, key, *, p_old, p, chunk):
    omega = probes(key, op.like, p - p_old, "normal", start=p_old)
    return _xtrace_extend(op, state, omega, chunk, None)


@partial(jax.jit, static_argnames=("n", "jackknife"))
def _xtrace_finish_jit(state, *, n, jackknife):
    return _xtrace_finish(state, n, jackknife)
