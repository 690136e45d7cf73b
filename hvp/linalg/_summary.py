r"""A few derived spectral figures in one call: extremes, condition number, negative mass.

Combines :func:`hvp.linalg.eigsh` (both ends of the spectrum, accurate) with
:func:`hvp.linalg.spectral_density` (the bulk, statistical) to give the
numbers usually quoted for a loss landscape: the sharpness
:math:`\lambda_{\max}`, the most negative curvature :math:`\lambda_{\min}`, a
condition-number estimate, and how much of the spectrum is negative
(Ghorbani, Krishnan & Xiao, 2019; Sagun et al., 2017).
"""

from __future__ import annotations

import jax
import numpy as np

from hvp import tree as tu
from hvp.linalg._lanczos import eigsh
from hvp.linalg._slq import spectral_density
from hvp.operators import as_operator
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["spectrum_summary", "SpectrumSummary"]


@tu.result
class SpectrumSummary:
    r"""Result of :func:`spectrum_summary`.

    Attributes:
      lambda_max: largest (algebraic) eigenvalue, by Lanczos.
      lambda_min: smallest (algebraic) eigenvalue, by Lanczos.
      condition_number: :math:`\max|\lambda| / \min_{\lambda \ne 0}|\lambda|` (estimate, see
        :func:`spectrum_summary`); ``inf`` when no eigenvalue is distinguishable from 0.
      negative_mass: estimated fraction of eigenvalues below ``-zero_tol * max|lambda|`` (SLQ).
      positive_mass: estimated fraction above ``+zero_tol * max|lambda|`` (SLQ).
      negative_positive_ratio: ``negative_mass / positive_mass`` (0 when both are 0, inf when
        only the positive mass is 0).
      negative_positive_abs_ratio: :math:`\sum_{\lambda<0}|\lambda| / \sum_{\lambda>0}\lambda`
        (SLQ estimate of the magnitude-weighted ratio, same conventions).
      converged: whether both extreme eigenpairs reached ``tol``.
      num_matvecs: operator products used in total.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.array([-1.0, 1.0, 2.0, 3.0, 4.0, 5.0])))  # indefinite
        >>> s = hvp.spectrum_summary(op, key=jax.random.PRNGKey(0), num_probes=4, num_iters=6)
        >>> round(s.lambda_min, 4), round(s.lambda_max, 4), round(s.negative_mass, 4)
        (-1.0, 5.0, 0.1667)
    """

    lambda_max: float
    lambda_min: float
    condition_number: float
    negative_mass: float
    positive_mass: float
    negative_positive_ratio: float
    negative_positive_abs_ratio: float
    converged: bool
    num_matvecs: int


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return float("inf") if a > 0 else 0.0


def spectrum_summary(
    op: OperatorLike,
    *,
    key: PRNGKey,
    tol: float = 1e-6,
    num_probes: int = 8,
    num_iters: int = 64,
    zero_tol: float = 1e-6,
    like: PyTree | None = None,
) -> SpectrumSummary:
    r"""Extreme eigenvalues, condition number and negative/positive spectral mass of ``op``.

    * :math:`\lambda_{\max}`, :math:`\lambda_{\min}`: ``eigsh(op, 1, which="both", tol=tol)``.
    * Negative / positive mass: fractions of eigenvalues below
      :math:`-\epsilon` / above :math:`+\epsilon` with
      :math:`\epsilon = \mathrm{zero\_tol}\cdot\max|\lambda|`, from an SLQ
      estimate with ``num_probes`` probes of ``num_iters`` steps (statistical
      error about :math:`1/\sqrt{\mathrm{num\_probes}}` relative).
    * Condition number :math:`\kappa = \max|\lambda| / \min_{|\lambda| > \epsilon}|\lambda|`.
      For a definite operator (:math:`\lambda_{\min} > \epsilon` or
      :math:`\lambda_{\max} < -\epsilon`) the denominator is the Lanczos
      extreme itself, so :math:`\kappa` is accurate. Otherwise (indefinite, or
      singular like most GGNs) the smallest non-zero magnitude is interior to
      the spectrum and is estimated from the SLQ Ritz values above
      :math:`\epsilon`: a rough figure (interior Ritz values are not converged
      eigenvalues and may fall inside spectral gaps), off in either direction.

    Args:
      op: a :class:`hvp.LinearOperator`, or a matvec callable with ``like=``.
      key: PRNG key; split between Lanczos and SLQ.
      tol: Lanczos residual tolerance (relative to :math:`\max|\lambda|`).
      num_probes: SLQ probes (see :func:`hvp.linalg.spectral_density`).
      num_iters: Lanczos steps per SLQ probe (see :func:`hvp.linalg.spectral_density`).
      zero_tol: eigenvalues with magnitude at most ``zero_tol * max|lambda|`` count as zero.
      like: example pytree when ``op`` is a plain matvec callable.

    Returns:
      :class:`SpectrumSummary` (plain Python numbers).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))  # eigenvalues 1, ..., 6
        >>> s = hvp.spectrum_summary(op, key=jax.random.PRNGKey(0), num_probes=4, num_iters=6)
        >>> round(s.lambda_max, 4), round(s.lambda_min, 4), round(s.condition_number, 4), s.converged
        (6.0, 1.0, 6.0, True)
    """
    op = as_operator(op, like)
    if not zero_tol >= 0:
        raise ValueError(f"`zero_tol` must be non-negative, got {zero_tol!r}.")
    if key is None:
        raise ValueError("Pass a PRNG `key`, e.g. `jax.random.PRNGKey(0)`.")
    k_eig, k_slq = jax.random.split(key)
    both = (
        eigsh(op, 1, which="both", key=k_eig, tol=tol)
        if op.size >= 2
        else eigsh(op, 1, key=k_eig, tol=tol)
    )
    lam = np.asarray(both.eigenvalues, np.float64)
    lmin, lmax = float(lam.min()), float(lam.max())
    top = max(abs(lmin), abs(lmax))
    eps = zero_tol * top
    sd = spectral_density(op, key=k_slq, num_probes=num_probes, num_iters=num_iters)
    neg = sd.negative_mass(eps)
    pos = sd.positive_mass(eps)
    nodes = np.asarray(sd.nodes, np.float64)
    weights = np.asarray(sd.weights, np.float64)
    neg_abs = float(np.mean(np.sum(weights * np.where(nodes < -eps, -nodes, 0.0), axis=1)))
    pos_abs = float(np.mean(np.sum(weights * np.where(nodes > eps, nodes, 0.0), axis=1)))
    if lmin > eps:
        small = lmin
    elif lmax < -eps:
        small = -lmax
    else:
        mags = np.abs(nodes[(np.abs(nodes) > eps) & (weights > 1e-12)])
        small = float(mags.min()) if mags.size else 0.0
    cond = top / small if small > 0 else float("inf")
    return SpectrumSummary(
        lambda_max=lmax,
        lambda_min=lmin,
        condition_number=float(cond),
        negative_mass=neg,
        positive_mass=pos,
        negative_positive_ratio=_ratio(neg, pos),
        negative_positive_abs_ratio=_ratio(neg_abs, pos_abs),
        converged=bool(np.all(np.asarray(both.converged))),
        num_matvecs=int(both.num_matvecs) + int(sd.num_matvecs),
    )
