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
from hvp.linalg._lanczos import (
    _check_like,
    _empty_basis,
    _eps,
    _fresh_vector,
    _set_row,
    lanczos_step,
)
from hvp.operators import NonFiniteError, as_operator
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["spectral_density", "SpectralDensity", "TraceFnEstimate", "wasserstein1"]


@tu.result
class TraceFnEstimate:
    """An SLQ estimate of :math:`\\operatorname{tr} f(A)`.

    Attributes:
      estimate: mean over probes of ``n * sum_j w_j f(theta_j)``.
      stderr: standard error of that mean (sample std / sqrt(probes); ``inf`` with one probe).
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
    stderr: jax.Array
    samples: jax.Array


@tu.result(static=("size",))
class SpectralDensity:
    """SLQ estimate of a spectral density (result of :func:`spectral_density`).

    Attributes:
      nodes: Ritz values, shape ``(num_probes, num_iters)``.
      weights: Gauss quadrature weights, same shape; each row sums to 1.
      num_matvecs: operator products used (``num_probes * num_iters``).
      size: ``n``, the operator size.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))  # eigenvalues 1, ..., 6
        >>> sd = hvp.spectral_density(op, key=jax.random.PRNGKey(0), num_probes=4, num_iters=6)
        >>> sd.size, sd.num_probes, int(sd.num_matvecs)
        (6, 4, 24)
        >>> round(sd.negative_mass(), 4), round(float(sd.cdf(3.5)), 2)  # half the eigenvalues are <= 3.5
        (0.0, 0.5)
        >>> sd.density(sd.grid(50)).shape
        (50,)
    """

    nodes: jax.Array
    weights: jax.Array
    num_matvecs: jax.Array
    size: int = 0

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
        sigma = self.default_sigma() if sigma is None else float(sigma)
        lo, hi = float(nodes.min()), float(nodes.max())
        width = hi - lo
        return np.linspace(lo - pad * width - 4 * sigma, hi + pad * width + 4 * sigma, int(num))

    def density(self, grid, sigma: float | None = None) -> np.ndarray:
        r"""Gaussian-broadened density :math:`\phi_\sigma` on ``grid`` (integrates to 1 over the real line).

        ``sigma`` defaults to :meth:`default_sigma`. Plot it on a log scale to
        see the bulk and the outliers (Ghorbani et al., 2019).
        """
        grid = np.asarray(grid, dtype=np.float64)
        sigma = self.default_sigma() if sigma is None else float(sigma)
        if not sigma > 0:
            raise ValueError(f"`sigma` must be positive, got {sigma}.")
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
        """Estimated fraction of eigenvalues below ``-threshold`` (``threshold >= 0``)."""
        nodes, weights = self._pooled()
        return float(np.sum(weights[nodes < -abs(threshold)]))

    def positive_mass(self, threshold: float = 0.0) -> float:
        """Estimated fraction of eigenvalues above ``threshold``."""
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
        return TraceFnEstimate(estimate=est, stderr=se, samples=samples)

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


@partial(jax.jit, static_argnames=("m", "reorth", "chunk_size", "basis_dtype", "eps"))
def _slq_run(op, keys, *, m, reorth, chunk_size, basis_dtype, eps):
    like = op.like
    n = tu.size(like)
    real = jnp.result_type(*jax.tree_util.tree_leaves(like))

    def one(key):
        kz, kr = jax.random.split(key)
        v0 = tu.scale(1.0 / np.sqrt(n), tu.rademacher_like(kz, like))
        alphas = jnp.zeros((m,), real)
        betas = jnp.zeros((m,), real)
        anorm = jnp.zeros((), real)
        if reorth:
            V = _set_row(_empty_basis(like, m + 1, basis_dtype), 0, v0)

            def body(j, c):
                V, alphas, betas, anorm = c
                h, beta, v_next, anorm, _ = lanczos_step(
                    op, V, j, anorm, jax.random.fold_in(kr, j), like, eps=eps
                )
                return (
                    _set_row(V, j + 1, v_next),
                    alphas.at[j].set(h[j]),
                    betas.at[j].set(beta),
                    anorm,
                )

            _, alphas, betas, _ = lax.fori_loop(0, m, body, (V, alphas, betas, anorm))
        else:

            def body(j, c):
                v_prev, v, beta_prev, alphas, betas, anorm = c
                w = op._apply(v)
                anorm = jnp.maximum(anorm, tu.norm(w))
                alpha = tu.dot(v, w)
                w = tu.sub(tu.axpy(-alpha, v, w), tu.scale(beta_prev, v_prev))
                beta = tu.norm(w)
                broke = beta <= 10.0 * eps * anorm
                two = tu.stack([v_prev, v])

                def fresh(_):
                    return jnp.zeros_like(beta), _fresh_vector(
                        jax.random.fold_in(kr, j), two, jnp.ones((2,), real), like
                    )

                def normal(_):
                    return beta, tu.scale(1.0 / jnp.where(beta > 0, beta, 1.0), w)

                beta, v_next = lax.cond(broke, fresh, normal, None)
                return v, v_next, beta, alphas.at[j].set(alpha), betas.at[j].set(beta), anorm

            c0 = (tu.zeros_like(v0), v0, jnp.zeros((), real), alphas, betas, anorm)
            _, _, _, alphas, betas, _ = lax.fori_loop(0, m, body, c0)
        off = betas[: m - 1]
        T = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
        theta, S = jnp.linalg.eigh(T)
        return theta, S[0] ** 2

    if chunk_size is None:
        return jax.vmap(one)(keys)
    return lax.map(one, keys, batch_size=chunk_size)


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
      key: PRNG key (same key, same result).
      num_probes: number of random probes ``P`` (>= 1); statistical error ~ ``1/sqrt(P)``.
      num_iters: Lanczos steps ``m`` per probe (capped at ``n``); resolution of
        the density and degree ``2m - 1`` of exact quadrature.
      chunk_size: probes run at once (``None``: all). Memory with full
        reorthogonalisation: ``chunk_size * (num_iters + 1) * n`` numbers of
        ``basis_dtype``.
      reorthogonalize: ``True`` (default) for full reorthogonalisation against
        each probe's own basis; ``False`` stores only 3 vectors per probe at
        the price of ghost eigenvalues (module docstring).
      basis_dtype: storage dtype for the basis (memory saving; accuracy
        limited to that precision).
      like: example pytree when ``op`` is a plain matvec callable.

    Returns:
      :class:`SpectralDensity` with ``nodes``, ``weights`` (``(P, m)``) and
      helpers ``density``, ``grid``, ``negative_mass``, ``trace_fn``,
      ``wasserstein1``.

    Raises:
      ValueError: non-positive ``num_probes``/``num_iters``/``chunk_size``.
      NonFiniteError: the operator produced NaN or Inf.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))  # eigenvalues 1, ..., 6
        >>> sd = hvp.spectral_density(op, key=jax.random.PRNGKey(0), num_probes=4, num_iters=6)
        >>> round(sd.wasserstein1(jnp.arange(1.0, 7.0)), 6)  # n steps: the Ritz values are exact
        0.0
    """
    op = as_operator(op, like)
    n = _check_like(op)
    for name, val in (("num_probes", num_probes), ("num_iters", num_iters)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"`{name}` must be a positive int, got {val!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    if key is None:
        raise ValueError("Pass a PRNG `key`, e.g. `jax.random.PRNGKey(0)`.")
    m = min(int(num_iters), n)
    if chunk_size is not None and int(chunk_size) >= num_probes:
        chunk_size = None
    if basis_dtype is not None:
        basis_dtype = jnp.dtype(basis_dtype)
    keys = jax.random.split(key, int(num_probes))
    nodes, weights = _slq_run(
        op,
        keys,
        m=m,
        reorth=bool(reorthogonalize),
        chunk_size=None if chunk_size is None else int(chunk_size),
        basis_dtype=basis_dtype,
        eps=_eps(op.like, basis_dtype),
    )
    if not (bool(jnp.all(jnp.isfinite(nodes))) and bool(jnp.all(jnp.isfinite(weights)))):
        raise NonFiniteError(
            f"spectral_density on the {op.name} operator produced NaN or Inf: its matvec returns non-finite "
            "values. Check the parameters and data, or build the operator with `check_finite=True`."
        )
    return SpectralDensity(
        nodes=nodes, weights=weights, num_matvecs=jnp.asarray(int(num_probes) * m), size=n
    )
