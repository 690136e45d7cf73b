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
from hvp.linalg._checks import check_finite_float, check_int, check_key
from hvp.linalg._lanczos import eigsh, zero_floor
from hvp.linalg._slq import spectral_density
from hvp.operators import as_operator
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["spectrum_summary", "SpectrumSummary", "definiteness", "DEFINITENESS"]

#: the labels of :func:`definiteness`.
DEFINITENESS = (
    "positive definite",
    "positive semi-definite, singular",
    "negative definite",
    "negative semi-definite, singular",
    "indefinite",
    "zero",
)


@tu.result
class SpectrumSummary:
    r"""Result of :func:`spectrum_summary`.

    Attributes:
      lambda_max: largest (algebraic) eigenvalue, by Lanczos.
      lambda_min: smallest (algebraic) eigenvalue, by Lanczos.
      condition_number: :math:`\max|\lambda| / \min|\lambda|` (see
        :func:`spectrum_summary`); ``inf`` for a singular semi-definite operator (an
        extreme eigenvalue within ``zero_threshold`` of 0: no finite condition number).
      negative_mass: estimated fraction of eigenvalues below ``-zero_threshold`` (SLQ).
      positive_mass: estimated fraction above ``+zero_threshold`` (SLQ).
      negative_positive_ratio: ``negative_mass / positive_mass`` (0 when both are 0, inf when
        only the positive mass is 0).
      negative_positive_abs_ratio: :math:`\sum_{\lambda<0}|\lambda| / \sum_{\lambda>0}\lambda`
        (SLQ estimate of the magnitude-weighted ratio, same conventions).
      converged: whether both extreme eigenpairs reached ``tol``.
      num_matvecs: operator products used in total.
      zero_threshold: eigenvalues with magnitude at most this count as zero, in the labels,
        the condition number and the masses alike.
      definiteness: one of :data:`DEFINITENESS` (see :func:`definiteness`).
      positive_definite: ``definiteness == "positive definite"``.
      singular: an extreme eigenvalue is zero (``True``), none is and the operator is
        definite (``False``), or unknown (``None``: indefinite, 0 is inside the spectrum).
      negative_mass_std_error: the probe standard error of ``negative_mass``.
      negative_mass_lower, negative_mass_upper: its quadrature bracket (the probe means of
        the Chebyshev-Markov-Stieltjes bounds, :class:`~hvp.linalg.SpectralMassEstimate`):
        wide when a Ritz value standing for many eigenvalues lies near ``-zero_threshold``;
        more ``num_iters`` narrow it.

    Examples:
      >>> import jax, numpy as np, hvp
      >>> s = hvp.spectrum_summary(hvp.from_dense(np.diag([1.0, 2.0, 4.0])), key=jax.random.key(0))
      >>> round(s.lambda_min, 4), round(s.lambda_max, 4), round(s.condition_number, 4), s.positive_definite
      (1.0, 4.0, 4.0, True)
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
    zero_threshold: float = 0.0
    definiteness: str = "indefinite"
    positive_definite: bool = False
    singular: bool | None = None
    negative_mass_std_error: float = float("nan")
    negative_mass_lower: float = float("nan")
    negative_mass_upper: float = float("nan")


def definiteness(lambda_min: float, lambda_max: float, zero_threshold: float):
    r"""Classify a symmetric spectrum from its extreme eigenvalues and a zero threshold.

    An eigenvalue with :math:`|\lambda| \le` ``zero_threshold`` counts as zero (a relative
    threshold such as ``tol * max|lambda|``, the same one that the negative mass uses; never a
    bare sign test, which round-off decides for a singular operator).

    Args:
      lambda_min: smallest eigenvalue (float).
      lambda_max: largest eigenvalue (float).
      zero_threshold: non-negative float.

    Returns:
      ``(label, singular, condition)``: ``label`` one of :data:`DEFINITENESS`; ``singular``
      ``True``/``False`` for semi-definite/definite spectra, ``None`` when 0 lies inside an
      indefinite spectrum (unknown from the extremes); ``condition`` the 2-norm condition
      number for a definite spectrum, ``inf`` for a singular one, ``None`` if indefinite.

    Examples:
      >>> from hvp.linalg import definiteness
      >>> definiteness(1e-17, 4.0, 1e-6)
      ('positive semi-definite, singular', True, inf)
      >>> definiteness(0.5, 4.0, 1e-6)
      ('positive definite', False, 8.0)
    """
    lo, hi, z = float(lambda_min), float(lambda_max), float(zero_threshold)
    if not z >= 0:
        raise ValueError(f"`zero_threshold` must be non-negative, got {zero_threshold!r}.")
    inf = float("inf")
    if abs(lo) <= z and abs(hi) <= z:
        return "zero", True, inf
    if lo > z:
        return "positive definite", False, hi / lo
    if hi < -z:
        return "negative definite", False, lo / hi
    if lo >= -z:
        return "positive semi-definite, singular", True, inf
    if hi <= z:
        return "negative semi-definite, singular", True, inf
    return "indefinite", None, None


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
    * Zero threshold :math:`\epsilon = \max(\mathrm{zero\_tol},\ f)\cdot\max|\lambda|`
      with :math:`f` the accuracy of :func:`eigsh` near zero (its default ``zero_tol``,
      :func:`hvp.linalg.zero_floor`: :math:`\max(\epsilon^{2/3}, 64\epsilon)` of the
      products' dtype): one threshold for the labels, the condition number and the masses.
    * Labels (:func:`definiteness`): ``"positive definite"`` when
      :math:`\lambda_{\min} > \epsilon`; ``"positive semi-definite, singular"`` when
      :math:`|\lambda_{\min}| \le \epsilon` (a GGN of a network on few examples), with
      ``condition_number = inf`` (no finite condition number); the negative mirror images;
      ``"indefinite"`` otherwise.
    * Condition number :math:`\kappa = \max|\lambda| / \min|\lambda|`. For a definite
      operator the denominator is the Lanczos extreme itself, so :math:`\kappa` is accurate.
      For an indefinite one the smallest non-zero magnitude is interior to the spectrum and
      is estimated from the SLQ Ritz values above :math:`\epsilon`: a rough figure (interior
      Ritz values are not converged eigenvalues and may fall inside spectral gaps), off in
      either direction.

    Args:
      op: a :class:`hvp.LinearOperator`, or a matvec callable with ``like=``.
      key: PRNG key; split between Lanczos and SLQ.
      tol: Lanczos residual tolerance, relative to each eigenvalue
        (:math:`\|r_i\| \le \mathrm{tol}\,|\lambda_i|`, floored at round-off; see
        :func:`hvp.linalg.eigsh`).
      num_probes: SLQ probes (see :func:`hvp.linalg.spectral_density`).
      num_iters: SLQ Lanczos steps per probe.
      zero_tol: eigenvalues with magnitude at most ``zero_tol * max|lambda|`` count as zero.
      like: example pytree when ``op`` is a plain matvec callable.

    Returns:
      :class:`SpectrumSummary` (plain Python numbers).

    Examples:
      >>> import jax, numpy as np, hvp
      >>> s = hvp.spectrum_summary(hvp.from_dense(np.diag([0.0, 0.0, 1.0, 3.0])), key=jax.random.key(0))
      >>> s.definiteness, s.condition_number
      ('positive semi-definite, singular', inf)
    """
    op = as_operator(op, like)
    # every argument is checked before any product runs
    check_key(key)
    tol = check_finite_float(
        "tol", tol, hint="It is the Lanczos residual tolerance per eigenvalue (e.g. 1e-6)."
    )
    num_probes = check_int("num_probes", num_probes, minimum=1)
    num_iters = check_int("num_iters", num_iters, minimum=1)
    zero_tol = check_finite_float("zero_tol", zero_tol, hint="It is relative to max|lambda|.")
    if not zero_tol < 1:
        raise ValueError(
            f"`zero_tol` must be a non-negative float below 1 (relative to max|lambda|), got "
            f"{zero_tol!r}."
        )
    k_eig, k_slq = jax.random.split(key)
    both = (
        eigsh(op, 1, which="both", key=k_eig, tol=tol)
        if op.size >= 2
        else eigsh(op, 1, key=k_eig, tol=tol)
    )
    lam = np.asarray(both.eigenvalues, np.float64)
    lmin, lmax = float(lam.min()), float(lam.max())
    top = max(abs(lmin), abs(lmax))
    # what eigsh cannot tell from 0 (round-off of the products) is zero too
    eps = max(zero_tol, zero_floor(both.dtype_policy.compute, tol)) * top
    label, singular, cond = definiteness(lmin, lmax, eps)
    sd = spectral_density(op, key=k_slq, num_probes=num_probes, num_iters=num_iters)
    neg_est = sd.negative_mass(eps)
    neg = float(neg_est)
    pos = float(sd.positive_mass(eps))
    nodes = np.asarray(sd.nodes, np.float64)
    weights = np.asarray(sd.weights, np.float64)
    neg_abs = float(np.mean(np.sum(weights * np.where(nodes < -eps, -nodes, 0.0), axis=1)))
    pos_abs = float(np.mean(np.sum(weights * np.where(nodes > eps, nodes, 0.0), axis=1)))
    if cond is None:  # indefinite: the smallest |lambda| is interior, estimated from SLQ
        from hvp.linalg._condition import condition_estimate  # (it imports this module)

        cond = condition_estimate(lmin, lmax, eps, nodes=nodes, weights=weights, size=op.size)
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
        zero_threshold=float(eps),
        definiteness=label,
        positive_definite=label == "positive definite",
        singular=singular,
        negative_mass_std_error=neg_est.std_error,
        negative_mass_lower=neg_est.lower,
        negative_mass_upper=neg_est.upper,
    )
