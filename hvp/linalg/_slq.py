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

Lockstep: the probes run in groups of at most ``chunk_size``; the Lanczos sequences of a
group advance together, so each Lanczos step of a group is one block product of its ``c``
current vectors (one pass over the data for a data-set operator) followed by each probe's own
recurrence, and ``P`` probes of ``m`` steps cost ``ceil(P / c) * m`` block products. The
algorithm is a :class:`~hvp.linalg._driver.StateMachine` run by the compiled or the host
driver (progress display, checkpoint and resume).

Reorthogonalisation: by default each probe's Lanczos run is fully
reorthogonalised against its own basis, which needs ``(num_iters + 1) * n``
numbers per probe of the group running (``c * (num_iters + 1) * n`` in all; ``c`` is at
most 8 by default, fewer when that exceeds 1 GiB). ``reorthogonalize=False`` keeps only
three vectors per probe; in
floating point it then produces spurious repeated ("ghost") copies of
converged extreme Ritz values, which carry (small) quadrature weight of their
own: the density estimate stays usable but the extreme peaks are distorted
(Meurant & Strakos, 2006).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hvp import tree as tu
from hvp.linalg._blocks import combine, rows_dot, rowwise
from hvp.linalg._checks import (
    DtypePolicy,
    acc_dtype,
    check_finite_float,
    check_int,
    check_key,
    coerce_operator,
    dtype_policy,
    raise_if_nonfinite,
    resolve_chunk,
)
from hvp.linalg._driver import Checkpoint, Progress, StateMachine, run
from hvp.linalg._probes import probes
from hvp.linalg._stats import mean_std_error
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = [
    "spectral_density",
    "SpectralDensity",
    "SpectralMassEstimate",
    "TraceFnEstimate",
    "wasserstein1",
]


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
        warnings.warn(
            "`TraceFnEstimate.stderr` is deprecated: use `std_error` (the name every hvp "
            "result uses).",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.std_error


@tu.result
class SpectralMassEstimate:
    r"""An SLQ estimate of the fraction of eigenvalues in an interval, with how sure it is.

    Two kinds of error, reported apart. *Sampling*: the SLQ estimand
    :math:`\mathbb E_q[\mu_q(I)]`, with :math:`\mu_q = \sum_i (v_i^\top q)^2
    \delta_{\lambda_i}` the spectral measure of the unit probe :math:`q`, is exactly the
    fraction of eigenvalues in :math:`I`; the probe average has the standard error
    ``std_error``. *Quadrature*: a ``num_iters``-point Gauss rule (nodes
    :math:`\theta_1 < \dots < \theta_m`, weights :math:`w_i`) does not determine
    :math:`\mu_q(I)` for an indicator function, but the Chebyshev-Markov-Stieltjes
    inequalities (Karlin & Shapley, 1953; Golub & Meurant, *Matrices, Moments and
    Quadrature with Applications*, 2010, ch. 6),
    :math:`\sum_{i<j} w_i \le F_q(\theta_j - 0) \le F_q(\theta_j) \le \sum_{i\le j} w_i`,
    bracket it between partial weight sums: every probe's exact mass lies in
    ``[lower_samples[p], upper_samples[p]]`` (exact arithmetic; a deterministic bound). The
    bracket is wide when a heavy node (e.g. one standing for a cluster of eigenvalues near 0)
    sits next to an end of the interval; more Lanczos steps (``num_iters``) tighten it, more
    probes do not. The fraction of eigenvalues in :math:`I` lies in
    ``[lower - z * bracket_std_error, upper + z * bracket_std_error]`` with the confidence of
    a normal ``z``-interval.

    Attributes:
      estimate: mean over probes of the Gauss estimate :math:`\sum_{\theta_j \in I} w_j`
        (a float).
      std_error: its standard error (sample std / sqrt(probes); ``inf`` with one probe).
      lower, upper: means over probes of the per-probe quadrature brackets (floats).
      bracket_std_error: the larger standard error of ``lower`` and ``upper``.
      samples, lower_samples, upper_samples: the per-probe values, shape ``(num_probes,)``.

    ``float(m)`` is ``m.estimate`` (what ``negative_mass`` and ``positive_mass`` returned
    before they returned this result) and formats like it (``f"{m:.3f}"``).

    Examples:
        >>> import jax, jax.numpy as jnp, hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(-2.0, 6.0)))  # 2 of 8 eigenvalues < 0
        >>> sd = hvp.spectral_density(op, key=jax.random.key(0), num_probes=8, num_iters=3)
        >>> m = sd.negative_mass()
        >>> m.lower <= m.estimate <= m.upper, sorted(m.to_dict())[:3]
        (True, ['bracket_std_error', 'estimate', 'lower'])
    """

    estimate: float
    std_error: float
    lower: float
    upper: float
    bracket_std_error: float
    samples: np.ndarray
    lower_samples: np.ndarray
    upper_samples: np.ndarray

    def __float__(self) -> float:
        return float(self.estimate)

    def __format__(self, spec: str) -> str:
        return format(float(self.estimate), spec)


@tu.result(static=("size", "dtype_policy"))
class SpectralDensity:
    """SLQ estimate of a spectral density (result of :func:`spectral_density`).

    Attributes:
      nodes: Ritz values, shape ``(num_probes, num_iters)``, in the accumulation dtype.
      weights: Gauss quadrature weights, same shape; each row sums to 1.
      num_matvecs: operator products used: ``num_probes * num_iters``, plus those of the
        extra probes completing the last group when the groups do not divide ``num_probes``
        (see :func:`spectral_density`). A Python ``int`` outside ``jax.jit``, a traced int32
        scalar under it.
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
        """Estimated fraction of eigenvalues ``<= x`` (the SLQ measure's distribution function).

        The probe-pooled Gauss staircase; for its standard error and quadrature bracket use
        ``interval_mass(-inf, x)`` (the fraction ``< x``; see :class:`SpectralMassEstimate`).
        """
        nodes, weights = self._pooled()
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(nodes)
        cum = np.concatenate([[0.0], np.cumsum(weights[order])])
        return cum[np.searchsorted(nodes[order], x, side="right")]

    def interval_mass(self, lo: float = -np.inf, hi: float = np.inf) -> SpectralMassEstimate:
        r"""Estimated fraction of eigenvalues in the open interval ``(lo, hi)``, with its uncertainty.

        Per probe ``p``, the Gauss rule gives the estimate :math:`\sum_{lo < \theta_{pj} < hi}
        w_{pj}` and, by the Chebyshev-Markov-Stieltjes inequalities, a bracket
        :math:`[L_p, U_p]` that certainly holds the probe's exact mass (see
        :class:`SpectralMassEstimate`); the result averages both over the probes.

        Args:
          lo: the interval's lower end (``-inf`` allowed; not NaN).
          hi: its upper end, ``hi > lo`` (``inf`` allowed).

        Returns:
          :class:`SpectralMassEstimate` (``float()`` of it is the estimate).

        Raises:
          ValueError: ``lo`` or ``hi`` is NaN, or ``lo >= hi``.

        Examples:
          >>> import jax, jax.numpy as jnp, hvp
          >>> sd = hvp.spectral_density(hvp.from_dense(jnp.diag(jnp.array([-2.0, -1.0, 1.0, 2.0]))),
          ...                           key=jax.random.key(0), num_probes=4, num_iters=4)
          >>> m = sd.interval_mass(-1.5, 1.5)  # 4 iterations on n = 4: the quadrature is exact
          >>> round(m.lower, 6) <= 0.5 <= round(m.upper, 6), round(float(m), 6)
          (True, 0.5)
        """
        lo, hi = float(lo), float(hi)
        if np.isnan(lo) or np.isnan(hi) or not lo < hi:
            raise ValueError(
                f"interval_mass needs lo < hi (not NaN), got lo={lo!r}, hi={hi!r}: pass the "
                "interval's lower end first."
            )
        nodes = np.asarray(self.nodes, dtype=np.float64)
        weights = np.asarray(self.weights, dtype=np.float64)
        order = np.argsort(nodes, axis=1, kind="stable")
        theta = np.take_along_axis(nodes, order, axis=1)
        w = np.take_along_axis(weights, order, axis=1)
        w = w / w.sum(axis=1, keepdims=True)  # 1 in exact arithmetic
        samples = np.sum(np.where((theta > lo) & (theta < hi), w, 0.0), axis=1)
        low_hi, up_hi = _cms_bracket(theta, w, hi)  # bounds of F(hi - 0)
        low_lo, up_lo = _cms_bracket(theta, w, lo)  # bounds of F(lo)
        lower = np.clip(low_hi - up_lo, 0.0, 1.0)
        upper = np.clip(up_hi - low_lo, 0.0, 1.0)
        if theta.shape[1] >= self.size > 0:  # n Lanczos steps: the Gauss rule is the measure
            lower = upper = samples
        _, se = mean_std_error(jnp.asarray(samples))
        _, se_lo = mean_std_error(jnp.asarray(lower))
        _, se_up = mean_std_error(jnp.asarray(upper))
        return SpectralMassEstimate(
            estimate=float(np.mean(samples)),
            std_error=float(se),
            lower=float(np.mean(lower)),
            upper=float(np.mean(upper)),
            bracket_std_error=float(max(float(se_lo), float(se_up))),
            samples=samples,
            lower_samples=lower,
            upper_samples=upper,
        )

    def negative_mass(self, threshold: float = 0.0) -> SpectralMassEstimate:
        """Estimated fraction of eigenvalues below ``-|threshold|``, with its uncertainty.

        :meth:`interval_mass` of ``(-inf, -|threshold|)``. Returns a
        :class:`SpectralMassEstimate` (``float()`` of it is the estimate, the number this
        method returned in hvp 0.1.0; see its ``lower``/``upper`` for how sure it is).

        Raises:
          ValueError: ``threshold`` is not finite.

        Examples:
          >>> import jax, jax.numpy as jnp, hvp
          >>> sd = hvp.spectral_density(hvp.from_dense(jnp.diag(jnp.array([-1.0, 1.0, 2.0, 3.0]))),
          ...                           key=jax.random.key(0), num_probes=4, num_iters=4)
          >>> round(float(sd.negative_mass()), 6)  # exact quadrature (num_iters = n): 1 of 4
          0.25
        """
        threshold = check_finite_float("threshold", abs(float(threshold)))
        return self.interval_mass(-np.inf, -threshold)

    def positive_mass(self, threshold: float = 0.0) -> SpectralMassEstimate:
        """Estimated fraction of eigenvalues above ``|threshold|``, with its uncertainty.

        :meth:`interval_mass` of ``(|threshold|, inf)``; see :meth:`negative_mass`.

        Raises:
          ValueError: ``threshold`` is not finite.

        Examples:
          >>> import jax, jax.numpy as jnp, hvp
          >>> sd = hvp.spectral_density(hvp.from_dense(jnp.diag(jnp.array([-1.0, 1.0, 2.0, 3.0]))),
          ...                           key=jax.random.key(0), num_probes=4, num_iters=4)
          >>> round(float(sd.positive_mass(1.5)), 6)  # 2 and 3 of -1, 1, 2, 3
          0.5
        """
        threshold = check_finite_float("threshold", abs(float(threshold)))
        return self.interval_mass(threshold, np.inf)

    def trace_fn(self, f) -> TraceFnEstimate:
        r"""Estimate :math:`\operatorname{tr} f(A) = n\,\mathbb E_q[\sum_j w_j f(\theta_j)]` with its standard error.

        ``f`` is a vectorised function of the eigenvalue (e.g. ``jnp.exp``,
        ``lambda t: t**2`` for :math:`\|A\|_F^2`, ``lambda t: jnp.log(t + eps)``).
        """
        vals = jnp.asarray(f(jnp.asarray(self.nodes)))
        samples = self.size * jnp.sum(self.weights * vals, axis=1)
        est, se = mean_std_error(samples)
        return TraceFnEstimate(estimate=est, std_error=se, samples=samples)

    def wasserstein1(self, eigenvalues, weights=None) -> float:
        """Wasserstein-1 distance between this estimate and a reference spectrum (see :func:`wasserstein1`)."""
        nodes, w = self._pooled()
        return wasserstein1(nodes, w, eigenvalues, weights)


def _cms_bracket(theta: np.ndarray, w: np.ndarray, t: float):
    r"""Per-row bounds ``(L, U)`` of :math:`F(t - 0)` and :math:`F(t)` from Gauss rules.

    ``theta`` (ascending) and ``w`` (each row summing to 1) are ``(P, m)`` Gauss rules of
    measures with distribution functions ``F``. The Chebyshev-Markov-Stieltjes inequalities
    :math:`\sum_{i<j} w_i \le F(\theta_j - 0) \le F(\theta_j) \le \sum_{i\le j} w_i` and
    monotonicity give ``L = sum_{i<j} w_i`` with ``j`` the last node ``<= t`` and
    ``U = sum_{i<=k} w_i`` with ``k`` the first node ``>= t`` (``L = 0`` with no node
    ``<= t``, ``U = 1`` with no node ``>= t``).
    """
    cum = np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w, axis=1)], axis=1)
    rows = np.arange(w.shape[0])
    j = np.sum(theta <= t, axis=1)  # nodes <= t: the last one is node j (1-based)
    k = np.sum(theta < t, axis=1) + 1  # the first node >= t (m + 1: none)
    lower = cum[rows, np.maximum(j - 1, 0)]
    upper = np.where(k <= w.shape[1], cum[rows, np.minimum(k, w.shape[1])], 1.0)
    return lower, np.minimum(upper, 1.0)


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


# ------------------------------------------------------------------------------------------------
# the state machine: the probes of a group advance in lockstep, one block product per step
# ------------------------------------------------------------------------------------------------
def _row_scale(a: jax.Array, X):
    """``a[p] * X_p`` for every row ``p`` of the block ``X``."""
    return tu.map(lambda x: a.reshape(a.shape + (1,) * (x.ndim - 1)).astype(x.dtype) * x, X)


def _row_norms(X) -> jax.Array:
    """``||X_p||`` for every row of the block ``X`` (in the accumulation dtype)."""
    return jnp.sqrt(rowwise(X, X))


def _orthogonalize(V, W, mask):
    """Two passes of classical Gram-Schmidt of each row ``W_p`` against probe ``p``'s basis.

    ``V`` holds one basis per probe (leaves ``(c, r) + shape``), ``W`` one vector per probe
    (``(c,) + shape``), ``mask`` (``(r,)``) selects the basis rows in use. Returns the summed
    coefficients ``(c, r)`` and the orthogonalised block. (The two passes are a loop, not
    unrolled: on CPU the compile time of the row products dominates a one-off run.)
    """

    def one_pass(_, carry):
        h, W = carry
        coef = jax.vmap(rows_dot)(V, W).astype(mask.dtype) * mask
        return h + coef, tu.sub(W, jax.vmap(combine)(coef, V, W))

    h = jnp.zeros((tu.leading_dim(W), mask.shape[0]), mask.dtype)
    return lax.fori_loop(0, 2, one_pass, (h, W))


def _stack_rows(*blocks):
    """Blocks ``(c,) + shape`` stacked into one small basis per probe, ``(c, len(blocks)) + shape``."""
    return tu.map(lambda *xs: jnp.stack(xs, axis=1), *blocks)


def _write(V, j, X):
    """Basis ``V`` (``(c, r) + shape``) with row ``j`` of every probe set to ``X`` (``(c,) + shape``)."""
    return tu.map(
        lambda Vl, x: lax.dynamic_update_slice_in_dim(Vl, x[:, None].astype(Vl.dtype), j, axis=1),
        V,
        X,
    )


def _rows_where(mask: jax.Array, X, Y):
    """Row ``p`` of ``X`` where ``mask[p]``, else row ``p`` of ``Y``."""
    return tu.map(
        lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), X, Y
    )


#: ``fold_in`` index of the key of the fresh vectors drawn at a breakdown (probe ``i`` uses
#: ``fold_in(key, i)``, so probe indices stay below it).
_FRESH = 0x7FFFFFFF

LANCZOS, REPAIR = 0, 1


@dataclasses.dataclass(frozen=True)
class LanczosQuadrature(StateMachine):
    """Stochastic Lanczos quadrature as a state machine.

    The probes run in ``num_groups`` consecutive groups of ``group`` probes; within a group
    their Lanczos sequences advance together. Phase ``LANCZOS`` (block size ``group``): one
    block product of the group's current Lanczos vectors ``q_j``, then each probe's
    three-term recurrence (or full reorthogonalisation against its own basis); ``j = 0``
    starts the group from its normalised Rademacher probes (probe ``i`` from
    ``fold_in(key, i)``). Phase ``REPAIR`` (no product) runs only after a breakdown (a
    probe's Krylov space became invariant): it replaces the broken probes' next vectors by
    random unit vectors orthogonal to their bases. Keeping it a phase of its own means the
    host driver compiles it only when a breakdown happens. When ``num_groups * group >
    num_probes`` the last group carries extra probes whose products are counted but whose
    quadrature is dropped.

    State: ``key``/``key_fresh``; ``g``/``j`` the group and the step; ``V`` the group's bases
    (``(group, num_iters + 1) + shape`` in ``basis_dtype``) with reorthogonalisation, else
    ``v``/``vp``/``vpp``/``beta_prev`` (the next, current and previous vectors, and the last
    beta); ``anorm`` the largest ``||A q_j||`` seen per probe (the breakdown scale);
    ``broke`` which probes broke down at the last step; ``alphas``/``betas``
    ``(num_groups * group, num_iters)``; ``ok`` (every product finite so far).
    """

    name: ClassVar[str] = "spectral_density"

    num_probes: int
    num_iters: int
    group: int
    reorthogonalize: bool = True
    basis_dtype: str | None = None
    eps: float = 1e-7

    @property
    def num_groups(self) -> int:
        return -(-self.num_probes // self.group)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return (self.group, 0)

    # -- phase LANCZOS ---------------------------------------------------------------------------
    def _start(self, op, state):
        """The group's first Lanczos vectors: its probes ``z_i / sqrt(n)`` (accumulation dtype)."""
        acc = acc_dtype(op.like)
        z = probes(state["key"], op.like, self.group, "rademacher", start=state["g"] * self.group)
        return tu.map(lambda x: x.astype(acc) * jnp.asarray(1.0 / np.sqrt(op.size), acc), z)

    def prepare(self, op, state, phase):
        if phase == REPAIR:
            return None
        acc = acc_dtype(op.like)
        if self.reorthogonalize:

            def current(s):
                return tu.map(lambda Vl: Vl[:, s["j"]].astype(acc), s["V"])

        else:

            def current(s):
                return s["v"]

        return lax.cond(state["j"] == 0, partial(self._start, op), current, state)

    def update(self, op, state, phase, vs, avs):
        if phase == REPAIR:
            return self._repair(op, state)
        acc = acc_dtype(op.like)
        c, m = self.group, self.num_iters
        j, g = state["j"], state["g"]
        first = j == 0
        q = vs  # the group's current Lanczos vectors (accumulation dtype)
        W = tu.cast(avs, acc)
        ok = state["ok"] & tu.all_finite(W)
        anorm = jnp.maximum(jnp.where(first, 0.0, state["anorm"]), _row_norms(W))
        out = {}
        if self.reorthogonalize:
            V = _write(state["V"], j, q)
            h, W = _orthogonalize(V, W, (jnp.arange(m + 1) <= j).astype(acc))
            alpha = h[:, j]
        else:
            qp = tu.map(lambda x: jnp.where(first, jnp.zeros_like(x), x), state["vp"])
            beta_prev = jnp.where(first, 0.0, state["beta_prev"])
            alpha = rowwise(q, W)
            W = tu.sub(W, tu.add(_row_scale(alpha, q), _row_scale(beta_prev, qp)))
        beta = _row_norms(W)
        broke = beta <= 10.0 * self.eps * anorm
        beta = jnp.where(broke, 0.0, beta)
        nxt = _row_scale(1.0 / jnp.where(beta > 0, beta, 1.0), W)
        if self.reorthogonalize:
            out["V"] = _write(V, j + 1, nxt)
        else:
            out.update(v=nxt, vp=q, vpp=qp, beta_prev=beta)
        row = g * c
        alphas = lax.dynamic_update_slice(state["alphas"], alpha[:, None].astype(acc), (row, j))
        betas = lax.dynamic_update_slice(state["betas"], beta[:, None].astype(acc), (row, j))
        last = j + 1 >= m
        g_next = jnp.where(last, g + 1, g)
        # a broken probe needs a fresh next vector, unless its group has just ended
        repair = ok & ~last & jnp.any(broke)
        return dict(
            state,
            **out,
            anorm=anorm,
            broke=broke,
            alphas=alphas,
            betas=betas,
            ok=ok,
            g=g_next.astype(jnp.int32),
            j=jnp.where(last, 0, j + 1).astype(jnp.int32),
            phase=jnp.where(repair, REPAIR, LANCZOS).astype(jnp.int32),
            matvecs=state["matvecs"] + c,
            done=~ok | (g_next >= self.num_groups),
        )

    # -- phase REPAIR ----------------------------------------------------------------------------
    def _repair(self, op, state):
        """Broken probes continue from a random unit vector orthogonal to their basis.

        (Zero when the basis already spans the whole space: then every later product is 0
        and the recurrence only appends zero rows and columns to ``T``.)
        """
        acc = acc_dtype(op.like)
        c, m = self.group, self.num_iters
        j, g, broke = state["j"], state["g"], state["broke"]  # j: the row to replace
        idx = g * c + jnp.arange(c)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(state["key_fresh"], i), j))(
            idx
        )
        R = tu.cast(jax.vmap(lambda k: tu.normal_like(k, op.like))(keys), acc)
        if self.reorthogonalize:
            basis, mask = state["V"], (jnp.arange(m + 1) < j).astype(acc)
        else:
            basis, mask = _stack_rows(state["vpp"], state["vp"]), jnp.ones((2,), acc)
        _, R = _orthogonalize(basis, R, mask)
        nr = _row_norms(R)
        R = _row_scale(jnp.where(nr > 1e-3, 1.0 / jnp.where(nr > 0, nr, 1.0), 0.0), R)
        out = {}
        if self.reorthogonalize:
            current = tu.map(lambda Vl: Vl[:, j].astype(acc), state["V"])
            out["V"] = _write(state["V"], j, _rows_where(broke, R, current))
        else:
            out["v"] = _rows_where(broke, R, state["v"])
        return dict(state, **out, phase=jnp.asarray(LANCZOS, jnp.int32))

    def finalize(self, op, state):  # noqa: ARG002
        p, m = self.num_probes, self.num_iters
        alphas, betas = state["alphas"][:p], state["betas"][:p, : m - 1]
        T = jax.vmap(lambda a, b: jnp.diag(a) + jnp.diag(b, 1) + jnp.diag(b, -1))(alphas, betas)
        theta, S = jnp.linalg.eigh(T)
        weights = S[:, 0, :] ** 2
        bad = ~state["ok"]
        nan = jnp.asarray(jnp.nan, theta.dtype)
        return jnp.where(bad, nan, theta), jnp.where(bad, nan, weights), state["matvecs"]

    def progress(self, state) -> Progress:
        g, j = int(state["g"]), int(state["j"])
        groups = self.num_groups
        text = f"probe group {min(g + 1, groups)}/{groups}, Lanczos step {j}/{self.num_iters}"
        return Progress(
            matvecs=int(state["matvecs"]),
            total=groups * self.group * self.num_iters,
            text=text,
        )


def _initial_state(key, like, alg: LanczosQuadrature) -> dict:
    acc = acc_dtype(like)
    c, m = alg.group, alg.num_iters
    rows = alg.num_groups * c
    state = dict(
        key=key,
        key_fresh=jax.random.fold_in(key, _FRESH),
        g=jnp.zeros((), jnp.int32),
        j=jnp.zeros((), jnp.int32),
        anorm=jnp.zeros((c,), acc),
        broke=jnp.zeros((c,), bool),
        alphas=jnp.zeros((rows, m), acc),
        betas=jnp.zeros((rows, m), acc),
        ok=jnp.array(True),
        matvecs=jnp.zeros((), jnp.int32),
        phase=jnp.zeros((), jnp.int32),
        done=jnp.array(False),
    )
    if alg.reorthogonalize:
        # each row sharded like its parameter leaf (explicit meshes)
        state["V"] = tu.stacked_like(
            tu.map(
                lambda x: jnp.zeros((c, m + 1) + jnp.shape(x), alg.basis_dtype or x.dtype), like
            ),
            like,
            leading=2,
        )
    else:
        zeros = tu.stacked_like(tu.map(lambda x: jnp.zeros((c,) + jnp.shape(x), acc), like), like)
        state.update(v=zeros, vp=zeros, vpp=zeros, beta_prev=jnp.zeros((c,), acc))
    return state


_initial_state_jit = jax.jit(_initial_state, static_argnums=2)


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
    driver: str = "auto",
    progress: bool | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
) -> SpectralDensity:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Runs ``num_probes`` Lanczos processes of ``num_iters`` steps from normalised Rademacher
    probes and returns their Ritz values and Gauss quadrature weights (Ubaru, Chen & Saad,
    2017; Ghorbani, Krishnan & Xiao, 2019); see the module docstring for the maths.

    The probes run in groups of at most ``chunk_size``, whose Lanczos sequences advance in
    lockstep: each step of a group is **one block product** of the group's current Lanczos
    vectors (:meth:`hvp.LinearOperator.matmat`), so ``P`` probes of ``m`` steps cost
    ``ceil(P / chunk_size) * m`` block products (one data pass each), not ``P * m`` single
    ones. The groups are balanced: ``G = ceil(P / chunk_size)`` groups of
    ``ceil(P / G)`` probes each (e.g. 10 probes with ``chunk_size=8`` run as 2 groups of 5);
    when ``G`` does not divide ``P`` the last group is completed with extra probes, whose
    products (at most ``G - 1`` probes' worth) count in ``num_matvecs`` and whose quadrature
    is dropped.

    Args:
      op: a :class:`hvp.LinearOperator`, or a matvec callable with ``like=``.
      key: PRNG key, ``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``; probe ``i`` is
        drawn from ``jax.random.fold_in(key, i)``, so the same key gives the same probes and
        the same density whatever ``chunk_size`` and ``driver``.
      num_probes: number of random probes ``P`` (>= 1); statistical error ~ ``1/sqrt(P)``.
      num_iters: Lanczos steps ``m`` per probe, i.e. operator products per probe (capped at
        ``n``): the number of quadrature nodes per probe, the resolution of the density and
        the degree ``2m - 1`` of exact quadrature.
      chunk_size: at most this many probes (products) at once. ``None`` (default): the
        memory rule of :func:`hvp.linalg.trace` (at most 8), further limited so that the
        group's Lanczos bases, ``chunk_size * (num_iters + 1) * n`` numbers of
        ``basis_dtype`` with full reorthogonalisation, fit in 1 GiB.
      reorthogonalize: ``True`` (default) for full reorthogonalisation against
        each probe's own basis; ``False`` stores only 3 vectors per probe at
        the price of ghost eigenvalues (module docstring).
      basis_dtype: storage dtype for the basis (default: the parameters' dtype;
        a smaller one saves memory, accuracy limited to that precision).
      like: example pytree when ``op`` is a plain matvec callable.
      driver: ``"auto"`` (compiled inside ``jax.jit``/``vmap``, host otherwise), ``"compiled"``
        or ``"host"``; see :mod:`hvp.linalg` ("Drivers"). Both give the same numbers.
      progress: host driver: show products, the probe group and the Lanczos step on stderr
        (``None``: when stderr is a terminal).
      checkpoint: host driver: a path or :class:`hvp.linalg.Checkpoint` to save the state to
        and resume from (same arguments, same result, bit for bit).

    Returns:
      :class:`SpectralDensity` with ``nodes``, ``weights`` (``(P, m)``), ``num_matvecs``
      (a Python ``int`` outside ``jax.jit``, a traced int32 scalar under it),
      ``dtype_policy`` and helpers ``density``, ``grid``, ``cdf``, ``negative_mass``,
      ``positive_mass``, ``interval_mass`` (:class:`SpectralMassEstimate`: estimate,
      ``std_error`` and quadrature bracket), ``trace_fn``, ``wasserstein1``.

    Precision: products run in the parameters' dtype (bfloat16/float16 included); the
    Lanczos iterates are orthogonalised, and ``alpha``, ``beta``, the tridiagonal matrix
    and its ``eigh`` computed, in at least float32.

    Breakdown: when a probe's Krylov space becomes invariant (``beta`` below ``10 eps`` times
    the largest ``||A q_j||`` seen), its sequence continues from a random unit vector
    orthogonal to its basis with ``beta = 0`` (the tridiagonal matrix splits and the
    quadrature stays exact).

    Transformations: works inside ``jax.jit`` (pass the operator and the key as
    arguments) and under ``jax.vmap`` over keys (the compiled driver); there a non-finite
    result is returned as NaN instead of raising :class:`~hvp.NonFiniteError`.

    Raises:
      TypeError: ``key`` is not a PRNG key (pass ``key=jax.random.key(seed)``), or a count
        is not an int.
      ValueError: non-positive ``num_probes``/``num_iters``/``chunk_size``; ``driver="host"``,
        ``progress`` or ``checkpoint`` inside ``jax.jit``.
      NonFiniteError: the operator produced NaN or Inf (the run stops at that product).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> sd = hvp.spectral_density(hvp.from_dense(jnp.diag(jnp.arange(1.0, 5.0))),
      ...                           key=jax.random.key(0), num_probes=2, num_iters=4)
      >>> sd.nodes.shape, round(float(sd.trace_fn(lambda t: t).estimate), 4), sd.num_matvecs
      ((2, 4), 10.0, 8)
    """
    op = coerce_operator(op, like, what="spectrum")
    n = op.size
    num_probes = check_int("num_probes", num_probes, minimum=1)
    num_iters = check_int("num_iters", num_iters, minimum=1)
    check_key(key)
    if not isinstance(reorthogonalize, (bool, np.bool_)):
        raise TypeError(
            f"`reorthogonalize` must be True or False, got {type(reorthogonalize).__name__}."
        )
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
    groups = -(-num_probes // chunk)
    alg = LanczosQuadrature(
        num_probes=num_probes,
        num_iters=m,
        group=-(-num_probes // groups),
        reorthogonalize=bool(reorthogonalize),
        basis_dtype=None if basis_dtype is None else basis_dtype.name,
        eps=_slq_eps(op.like, basis_dtype),
    )
    state = _initial_state_jit(key, op.like, alg)  # one program (eagerly: one per leaf shape)
    (nodes, weights, nmv), chosen = run(
        alg,
        op,
        state,
        driver=driver,
        progress=progress,
        checkpoint=checkpoint,
        traced=(key,),
        consume=True,
    )
    if chosen == "host":
        nmv = int(nmv)
    raise_if_nonfinite(op, "spectral density (SLQ nodes and weights)", nodes, weights)
    return SpectralDensity(
        nodes=nodes,
        weights=weights,
        num_matvecs=nmv,
        size=n,
        dtype_policy=dtype_policy(op.like),
    )
