r"""The condition estimate of a symmetric spectrum: one definition for every report.

:func:`hvp.linalg.spectrum_summary` and the ``hvp analyze`` report (``derived.condition_estimate``)
quote the same figure, defined here once.
"""

from __future__ import annotations

import numpy as np

from hvp.linalg._summary import definiteness

__all__ = ["condition_estimate"]

#: SLQ quadrature weights at most this small carry no mass (a Ritz value the probe never saw).
MIN_WEIGHT = 1e-12


def condition_estimate(
    lambda_min: float,
    lambda_max: float,
    zero_threshold: float,
    *,
    nodes=None,
    weights=None,
    size: int | None = None,
) -> float:
    r"""Condition estimate :math:`\kappa = \max|\lambda| / \min|\lambda|` of a symmetric operator.

    * Definite spectrum (:func:`definiteness`: both extremes beyond ``zero_threshold`` on the
      same side of 0): :math:`\lambda_{\max}/\lambda_{\min}` (or its mirror image), exact up to
      the accuracy of the extreme eigenvalues.
    * Singular semi-definite or zero spectrum (an extreme within ``zero_threshold`` of 0):
      ``inf`` (no finite condition number).
    * Indefinite spectrum: the smallest non-zero :math:`|\lambda|` lies inside the spectrum;
      it is estimated from the stochastic Lanczos quadrature Ritz values ``nodes`` (those with
      :math:`|\theta| >` ``zero_threshold`` and a weight above ``max(1e-12, 0.1 / size)``:
      a node carrying less than a tenth of one eigenvalue's expected share ``1/n`` of a
      random probe stands for no eigenvalue, e.g. a Ritz value inside a spectral gap): a rough figure,
      off in either direction (interior Ritz values are not converged eigenvalues). ``inf``
      when no such Ritz value exists, ``nan`` when ``nodes`` is not given.

    Args:
      lambda_min: smallest eigenvalue (float).
      lambda_max: largest eigenvalue (float).
      zero_threshold: non-negative float; magnitudes at most this count as zero (use the
        threshold of the negative mass, e.g. ``SpectrumSummary.zero_threshold``).
      nodes: SLQ Ritz values, any shape (e.g. ``SpectralDensity.nodes``,
        ``(num_probes, num_iters)``), needed for an indefinite spectrum only.
      weights: their quadrature weights, same shape as ``nodes``.
      size: ``n``, the operator's size (sets the weight threshold above; ``None``: 1e-12).

    Returns:
      A Python float (``inf`` or ``nan`` as described).

    Raises:
      ValueError: a negative ``zero_threshold``, or ``nodes`` and ``weights`` of different
        shapes.

    Examples:
      >>> from hvp.linalg import condition_estimate
      >>> condition_estimate(0.5, 4.0, 1e-6)  # positive definite
      8.0
      >>> condition_estimate(-2.0, 3.0, 1e-6, nodes=[[-2.0, 0.5, 3.0]], weights=[[0.3, 0.3, 0.4]])
      6.0
    """
    lo, hi = float(lambda_min), float(lambda_max)
    _, _, cond = definiteness(lo, hi, zero_threshold)
    if cond is not None:
        return float(cond)
    if nodes is None:
        return float("nan")
    theta = np.asarray(nodes, np.float64)
    w = np.ones_like(theta) if weights is None else np.asarray(weights, np.float64)
    if w.shape != theta.shape:
        raise ValueError(
            f"`nodes` and `weights` must have the same shape, got {theta.shape} and {w.shape}."
        )
    floor = MIN_WEIGHT if size is None else max(MIN_WEIGHT, 0.1 / float(size))
    mags = np.abs(theta[(np.abs(theta) > float(zero_threshold)) & (w > floor)])
    small = float(mags.min()) if mags.size else 0.0
    top = max(abs(lo), abs(hi))
    return top / small if small > 0 else float("inf")
