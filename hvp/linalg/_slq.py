r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

The spectral density (eigenvalue distribution) of :math:`A \in \mathbb R^{n\times n}`
is :math:`\phi(t) = \frac1n \sum_{i=1}^n \delta(t - \lambda_i)`. For a unit
probe :math:`q = z/\sqrt n` with Rademacher :math:`z`,
:math:`\mathbb E\,[\,n\, q^\top f(A)\, q\,] = \operatorname{tr} f(A) = n \int f\,d\phi`.
``m`` Lanczos steps from :math:`q` give a tridiagonal :math:`T_m = S\Theta S^\top`,
and Gauss quadrature :math:`q^\top f(A) q \approx \sum_j w_j f(\theta_j)` with
nodes :math:`\theta_j` (Ritz values) and weights :math:`w_j = S_{0j}^2`
(:math:`\sum_j w_j = 1`) is exact for polynomials of degree up to ``2m - 1``
(Golub & Meurant, 2010). Averaging the discrete measures
:math:`\sum_j w_j \delta_{\theta_j}` over probes gives the SLQ estimate of
:math:`\phi` (Ubaru, Chen & Saad, 2017; used for neural-network Hessians by
Ghorbani, Krishnan & Xiao, 2019, and Papyan, 2019); a smooth density follows by
Gaussian broadening (Lin, Saad & Yang, 2016):
:math:`\phi_\sigma(t) = \frac1P \sum_p \sum_j w_{pj}\, \mathcal N(t; \theta_{pj}, \sigma^2)`.

Error: for ``f`` analytic on the spectrum the quadrature error decays
geometrically in ``m``; the probe average has variance
:math:`O(\|f(A)\|_F^2 / P)` (Ubaru et al., 2017), so the standard errors
reported by :meth:`SpectralDensity.trace_fn` shrink like :math:`1/\sqrt P`.

Reorthogonalisation: by default each probe's Lanczos run is fully
reorthogonalised against its own basis, which needs ``(num_iters + 1) * n``
numbers per probe running at once (``chunk_size`` probes, all probes by
default). ``reorthogonalize=False`` keeps only three vectors per probe; in
floating point it then produces spurious repeated ("ghost") copies of
converged extreme Ritz values, which carry (small) quadrature weight of their
own: the density estimate stays usable but the extreme peaks are distorted
(Meurant & Strakos, 2006).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
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
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["spectral_density", "SpectralDensity", "TraceFnEstimate", "wasserstein1"]


@tu.result
class TraceFnEstimate:
    """An SLQ estimate of :math:`\\operatorname{tr} f(A)`.

    Attributes:
      estimate: mean over probes of ``n * sum_j w_j f(theta_j)``.
      std_error: standard error of that mean (sample std / sqrt(probes); ``inf`` with one probe).
      samples: the per-probe estimates, shape ``(num_probes,)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))  # eigenvalues 1, ..., 6
        >>> sd = hvp.spectral_density(op, key=jax.random.PRNGKey(0), num_probes=4, num_iters=6)
        >>> est = sd.trace_fn(jnp.log)  # log det = log 720
        >>> round(float(est.estimate), 4), round(float(jnp.log(720.0)), 4)
        (6.5793, 6.5793)
    """

    estimate: jax.Array
    std_error: jax.Array
    samples: jax.Array

    @property
    def stderr(self) -> jax.Array:
        """Deprecated alias of ``std_error`` (the field name shared by every result)."""
        return self.std_error


@tu.result(static=("size", "dtype_policy"))
class SpectralDensity:
    """SLQ estimate of a spectral density (result of :func:`spectral_density`).

    Attributes:
      nodes: Ritz values, shape ``(num_probes, num_iters)``, in the accumulation dtype.
      weights: Gauss quadrature weights, same shape; each row sums to 1.
      num_matvecs: operator products used (``num_probes * num_iters``).
      size: ``n``, the operator size.
      dtype_policy: the :class:`~hvp.linalg.DtypePolicy` used: products in the parameters'
        dtype, the Lanczos coefficients, the tridiagonal matrix and its ``eigh`` in
        ``accumulate`` (at least float32).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> sd = hvp.spectral_density(hvp.from_dense(jnp.diag(jnp.arange(1.0, 5.0))), key=jax.random.key(0), num_probes=2, num_iters=4)
      >>> sd.nodes.shape, sd.weights.sum(axis=1).round(4).tolist(), int(sd.num_matvecs), sd.size
      ((2, 4), [1.0, 1.0], 8, 4)
    """

    nodes: jax.Array
    weights: jax.Array
    num_matvecs: jax.Array
    size: int = 0
    dtype_policy: DtypePolicy | None = None

    @property
    def num_probes(self) -> int:
        return int(np.shape(self.nodes)[0])

    def _pooled(self):
        nodes = np.asarray(self.nodes, dtype=np.float64).ravel()
        weights = np.asarray(self.weights, dtype=np.float64).ravel() / self.num_probes
        return nodes, weights

    def default_sigma(self) -> float:
        """Default broadening: 1% of the estimated spectral range (or 1e-3 for a point spectrum)."""
        nodes, _ = self._pooled()
        width = float(nodes.max() - nodes.min())
        return 0.01 * width if width > 0 else 1e-3 * max(1.0, float(np.abs(nodes).max()))

    def grid(self, num: int = 1000, *, pad: float = 0.05, sigma: float | None = None) -> np.ndarray:
        """``num`` evenly spaced points covering the estimated spectrum.

        The range of the Ritz values is widened by ``pad`` times its width and by
        ``4 sigma`` on each side, so :meth:`density` integrates to about 1 over it.
        """
        nodes, _ = self._pooled()
        sigma = (
            self.default_sigma()
            if sigma is None
            else check_finite_float("sigma", sigma, positive=True)
        )
        pad = check_finite_float("pad", pad)
        lo, hi = float(nodes.min()), float(nodes.max())
        width = hi - lo
        return np.linspace(lo - pad * width - 4 * sigma, hi + pad * width + 4 * sigma, int(num))

    def density(self, grid, sigma: float | None = None) -> np.ndarray:
        r"""Gaussian-broadened density :math:`\phi_\sigma` on ``grid`` (integrates to 1 over the real line).

        ``sigma`` defaults to :meth:`default_sigma`. Plot it on a log scale to
        see the bulk and the outliers (Ghorbani et al., 2019).
        """
        grid = np.asarray(grid, dtype=np.float64)
        sigma = (
            self.default_sigma()
            if sigma is None
            else check_finite_float("sigma", sigma, positive=True)
        )
        nodes, weights = self._pooled()
        out = np.zeros(grid.shape)
        flat = grid.reshape(-1)
        res = out.reshape(-1)
        for start in range(0, flat.size, 512):
            g = flat[start : start + 512, None]
            res[start : start + 512] = np.exp(-0.5 * ((g - nodes[None]) / sigma) ** 2) @ weights
        return out / (sigma * np.sqrt(2 * np.pi))

    def cdf(self, x) -> np.ndarray:
        """Estimated fraction of eigenvalues ``<= x`` (the SLQ measure's distribution function)."""
        nodes, weights = self._pooled()
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(nodes)
        cum = np.concatenate([[0.0], np.cumsum(weights[order])])
        return cum[np.searchsorted(nodes[order], x, side="right")]

    def negative_mass(self, threshold: float = 0.0) -> float:
        """Estimated fraction of eigenvalues below ``-threshold`` (``threshold >= 0``, finite)."""
        threshold = check_finite_float("threshold", abs(float(threshold)))
        nodes, weights = self._pooled()
        return float(np.sum(weights[nodes < -abs(threshold)]))

    def positive_mass(self, threshold: float = 0.0) -> float:
        """Estimated fraction of eigenvalues above ``threshold`` (finite; its sign is ignored)."""
        threshold = check_finite_float("threshold", abs(float(threshold)))
        nodes, weights = self._pooled()
        return float(np.sum(weights[nodes > abs(threshold)]))

    def trace_fn(self, f) -> TraceFnEstimate:
        r"""Estimate :math:`\operatorname{tr} f(A) = n\,\mathbb E_q[\sum_j w_j f(\theta_j)]` with its standard error.

        ``f`` is a vectorised function of the eigenvalue (e.g. ``jnp.exp``,
        ``lambda t: t**2`` for :math:`\|A\|_F^2`, ``lambda t: jnp.log(t + eps)``).
        """
        vals = jnp.asarray(f(jnp.asarray(self.nodes)))
        samples = self.size * jnp.sum(self.weights * vals, axis=1)
        p = samples.shape[0]
        est = jnp.mean(samples)
        if p > 1:
            se = jnp.std(samples, ddof=1) / np.sqrt(p)
        else:
            se = jnp.asarray(np.inf, est.dtype)
        return TraceFnEstimate(estimate=est, std_error=se, samples=samples)

    def wasserstein1(self, eigenvalues, weights=None) -> float:
        """Wasserstein-1 distance between this estimate and a reference spectrum (see :func:`wasserstein1`)."""
        nodes, w = self._pooled()
        return wasserstein1(nodes, w, eigenvalues, weights)


def wasserstein1(x, x_weights=None, y=None, y_weights=None) -> float:
    r"""Wasserstein-1 distance :math:`W_1 = \int |F_x(t) - F_y(t)|\,dt` between two discrete 1-D measures.

    ``x``/``y`` are support points, ``*_weights`` their masses (uniform when
    ``None``; normalised to sum 1). E.g. ``wasserstein1(nodes, weights,
    numpy.linalg.eigvalsh(H))`` compares an SLQ estimate to the exact spectrum.
    It has the units of the eigenvalues; divide by the spectral range for a
    relative figure.

    Examples:
        >>> from hvp.linalg import wasserstein1
        >>> wasserstein1([0.0, 1.0], None, [0.0, 2.0])  # half the mass moves by 1
        0.5
    """
    if y is None:
        raise TypeError(
            "wasserstein1 needs two measures: wasserstein1(x, x_weights, y, y_weights=None)."
        )
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    wx = (
        np.full(x.shape, 1.0 / x.size)
        if x_weights is None
        else np.asarray(x_weights, np.float64).ravel()
    )
    wy = (
        np.full(y.shape, 1.0 / y.size)
        if y_weights is None
        else np.asarray(y_weights, np.float64).ravel()
    )
    if wx.shape != x.shape or wy.shape != y.shape:
        raise ValueError("Each weight array must have one entry per support point.")
    wx, wy = wx / wx.sum(), wy / wy.sum()
    pts = np.concatenate([x, y])
    order = np.argsort(pts, kind="stable")
    pts = pts[order]
    signed = np.concatenate([wx, -wy])[order]
    diff = np.cumsum(signed)[:-1]
    return float(np.sum(np.abs(diff) * np.diff(pts)))


def _rows_coeffs(V, w, acc):
    """``V^T w`` (one coefficient per row of the block ``V``), accumulated in ``acc``."""
    parts = [
        tu.contract_rows(Vl.astype(acc), wl.astype(acc), precision=lax.Precision.HIGHEST)
        for Vl, wl in zip(jax.tree_util.tree_leaves(V), jax.tree_util.tree_leaves(w))
    ]
    return sum(parts[1:], parts[0])


def _rows_combine(c, V, acc):
    """``sum_i c_i V_i`` in ``acc``."""
    return tu.map(
        lambda Vl: jnp.tensordot(c, Vl.astype(acc), axes=1, precision=lax.Precision.HIGHEST), V
    )


def _orthogonalize(V, w, mask, acc):
    """Two passes of classical Gram-Schmidt of ``w`` against the rows of ``V`` in ``mask``."""
    h = jnp.zeros(mask.shape, acc)
    for _ in range(2):
        c = _rows_coeffs(V, w, acc) * mask
        w = tu.sub(w, _rows_combine(c, V, acc))
        h = h + c
    return h, w


def _unit_or_fresh(w, beta, broke, key, V, mask, like, acc):
    """``w / beta``, or (breakdown) a random unit vector orthogonal to the rows in ``mask``."""

    def normal(_):
        return tu.scale(1.0 / jnp.where(beta > 0, beta, 1.0), w)

    def fresh(_):
        r = tu.cast(tu.normal_like(key, like), acc)
        _, r = _orthogonalize(V, r, mask, acc)
        nr = tu.norm(r)
        ok = nr > 1e-3
        return tu.scale(jnp.where(ok, 1.0 / jnp.where(ok, nr, 1.0), 0.0), r)

    return lax.cond(broke, fresh, normal, None)


@partial(jax.jit, static_argnames=("m", "reorth", "chunk_size", "basis_dtype", "eps"))
def _slq_run(op, keys, *, m, reorth, chunk_size, basis_dtype, eps):
    """Nodes and weights of ``m``-step Lanczos quadrature from each key's Rademacher probe.

    Precision: products in the parameters' dtype; the iterates and their orthogonalisation,
    alpha/beta, ``T`` and its ``eigh`` in the accumulation dtype; the basis is stored in
    ``basis_dtype`` (default: the parameters' dtype).
    """
    like = op.like
    n = tu.size(like)
    acc = acc_dtype(like)

    def apply(v):
        return tu.cast(apply_in_dtype(op, v), acc)

    def one(key):
        kz, kr = jax.random.split(key)
        v0 = tu.scale(1.0 / np.sqrt(n), tu.cast(tu.rademacher_like(kz, like), acc))
        alphas = jnp.zeros((m,), acc)
        betas = jnp.zeros((m,), acc)
        anorm = jnp.zeros((), acc)
        if reorth:
            V = tu.stacked_like(  # each row sharded like its parameter leaf (explicit meshes)
                tu.map(lambda x: jnp.zeros((m + 1,) + jnp.shape(x), basis_dtype or x.dtype), like),
                like,
            )
            V = tu.map(lambda Vl, x: Vl.at[0].set(x.astype(Vl.dtype)), V, v0)

            def body(j, c):
                V, alphas, betas, anorm = c
                v = tu.map(lambda Vl: Vl[j].astype(acc), V)
                w = apply(v)
                anorm = jnp.maximum(anorm, tu.norm(w))
                mask = (jnp.arange(m + 1) <= j).astype(acc)
                h, w = _orthogonalize(V, w, mask, acc)
                beta = tu.norm(w)
                broke = beta <= 10.0 * eps * anorm
                v_next = _unit_or_fresh(
                    w, beta, broke, jax.random.fold_in(kr, j), V, mask, like, acc
                )
                beta = jnp.where(broke, 0.0, beta)
                V = tu.map(lambda Vl, x: Vl.at[j + 1].set(x.astype(Vl.dtype)), V, v_next)
                return V, alphas.at[j].set(h[j]), betas.at[j].set(beta), anorm

            _, alphas, betas, _ = lax.fori_loop(0, m, body, (V, alphas, betas, anorm))
        else:

            def body(j, c):
                v_prev, v, beta_prev, alphas, betas, anorm = c
                w = apply(v)
                anorm = jnp.maximum(anorm, tu.norm(w))
                alpha = tu.dot(v, w)
                w = tu.sub(tu.axpy(-alpha, v, w), tu.scale(beta_prev, v_prev))
                beta = tu.norm(w)
                broke = beta <= 10.0 * eps * anorm
                two = tu.stack([v_prev, v])
                v_next = _unit_or_fresh(
                    w, beta, broke, jax.random.fold_in(kr, j), two, jnp.ones((2,), acc), like, acc
                )
                beta = jnp.where(broke, 0.0, beta)
                return v, v_next, beta, alphas.at[j].set(alpha), betas.at[j].set(beta), anorm

            c0 = (tu.zeros_like(v0), v0, jnp.zeros((), acc), alphas, betas, anorm)
            _, _, _, alphas, betas, _ = lax.fori_loop(0, m, body, c0)
        off = betas[: m - 1]
        T = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
        theta, S = jnp.linalg.eigh(T)
        return theta, S[0] ** 2

    if any(tu.explicit_sharding(x) is not None for x in jax.tree_util.tree_leaves(like)):
        # Explicit mesh: JAX's vmap of ``lax.cond`` broadcasts the predicate without the
        # operands' sharding type and fails, so the probes run one after the other.
        return lax.map(one, keys)
    if chunk_size is None:
        return jax.vmap(one)(keys)
    return lax.map(one, keys, batch_size=chunk_size)


def _slq_eps(like, basis_dtype) -> float:
    """Breakdown threshold unit: the roundoff of the coarsest dtype the vectors pass through."""
    dts = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(like)]
    if basis_dtype is not None:
        dts.append(jnp.dtype(basis_dtype))
    return max(float(jnp.finfo(d).eps) for d in dts)


def spectral_density(
    op: OperatorLike,
    *,
    key: PRNGKey,
    num_probes: int = 16,
    num_iters: int = 64,
    chunk_size: int | None = None,
    reorthogonalize: bool = True,
    basis_dtype=None,
    like: PyTree | None = None,
) -> SpectralDensity:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Runs ``num_probes`` independent ``num_iters``-step Lanczos processes from
    normalised Rademacher probes (batched with ``vmap`` in one compiled call, or
    ``chunk_size`` probes at a time via ``lax.map``) and returns their Ritz
    values and Gauss quadrature weights (Ubaru, Chen & Saad, 2017; Ghorbani,
    Krishnan & Xiao, 2019). See the module docstring for the maths.

    Args:
      op: a :class:`hvp.LinearOperator`, or a matvec callable with ``like=``.
      key: PRNG key, ``jax.random.key(seed)`` (same key, same result).
      num_probes: number of random probes ``P`` (>= 1); statistical error ~ ``1/sqrt(P)``.
      num_iters: Lanczos steps ``m`` per probe (capped at ``n``); resolution of
        the density and degree ``2m - 1`` of exact quadrature.
      chunk_size: probes run at once. ``None`` (default): the memory rule of
        :func:`hvp.linalg.trace` (at most 8 probes at once), further limited so
        that the probes' Lanczos bases, ``chunk_size * (num_iters + 1) * n``
        numbers of ``basis_dtype`` with full reorthogonalisation, fit in 1 GiB.
      reorthogonalize: ``True`` (default) for full reorthogonalisation against
        each probe's own basis; ``False`` stores only 3 vectors per probe at
        the price of ghost eigenvalues (module docstring).
      basis_dtype: storage dtype for the basis (default: the parameters' dtype;
        a smaller one saves memory, accuracy limited to that precision).
      like: example pytree when ``op`` is a plain matvec callable.

    Returns:
      :class:`SpectralDensity` with ``nodes``, ``weights`` (``(P, m)``), ``dtype_policy``
      and helpers ``density``, ``grid``, ``negative_mass``, ``trace_fn``,
      ``wasserstein1``.

    Precision: products run in the parameters' dtype (bfloat16/float16 included); the
    Lanczos iterates are orthogonalised, and ``alpha``, ``beta``, the tridiagonal matrix
    and its ``eigh`` computed, in at least float32.

    Transformations: works inside ``jax.jit`` (pass the operator and the key as
    arguments) and under ``jax.vmap`` over keys; there a non-finite result is returned
    as NaN instead of raising :class:`~hvp.NonFiniteError`.

    Raises:
      TypeError: ``key`` is not a PRNG key (pass ``key=jax.random.key(seed)``), or a count
        is not an int.
      ValueError: non-positive ``num_probes``/``num_iters``/``chunk_size``.
      NonFiniteError: the operator produced NaN or Inf.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> sd = hvp.spectral_density(hvp.from_dense(jnp.diag(jnp.arange(1.0, 5.0))),
      ...                           key=jax.random.key(0), num_probes=2, num_iters=4)
      >>> sd.nodes.shape, round(float(sd.trace_fn(lambda t: t).estimate), 4)
      ((2, 4), 10.0)
    """
    op = coerce_operator(op, like, what="spectrum")
    n = op.size
    num_probes = check_int("num_probes", num_probes, minimum=1)
    num_iters = check_int("num_iters", num_iters, minimum=1)
    check_key(key)
    m = min(num_iters, n)
    if basis_dtype is not None:
        basis_dtype = jnp.dtype(basis_dtype)
    if reorthogonalize:
        item = max(
            (basis_dtype or jnp.result_type(x)).itemsize for x in jax.tree_util.tree_leaves(op.like)
        )
        per_probe = (m + 1) * n * item
    else:
        per_probe = 4 * n * acc_dtype(op.like).itemsize
    chunk = resolve_chunk(chunk_size, num_probes, per_probe)
    keys = jax.random.split(key, num_probes)
    nodes, weights = _slq_run(
        op,
        keys,
        m=m,
        reorth=bool(reorthogonalize),
        chunk_size=None if chunk >= num_probes else chunk,
        basis_dtype=basis_dtype,
        eps=_slq_eps(op.like, basis_dtype),
    )
    raise_if_nonfinite(op, "spectral density (SLQ nodes and weights)", nodes, weights)
    return SpectralDensity(
        nodes=nodes,
        weights=weights,
        num_matvecs=jnp.asarray(num_probes * m),
        size=n,
        dtype_policy=dtype_policy(op.like),
    )
