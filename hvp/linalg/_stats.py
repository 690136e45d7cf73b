"""Sample statistics of the estimators: means, standard errors, running (mergeable) moments.

Every estimator reports ``std_error``, the standard error of its mean,
:math:`s / \\sqrt{m}` with :math:`s` the sample standard deviation (``ddof=1``) of ``m``
independent samples (``inf`` for a single sample: one sample says nothing about its spread).
Running statistics merge blocks with Chan, Golub & LeVeque (1979), so that an estimate does
not depend on how its samples were grouped into blocks.
"""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp

from hvp import tree as tu

__all__ = ["chan_update", "mean_std_error", "normal_quantile"]


def normal_quantile(level: float) -> float:
    """The two-sided standard normal quantile for a confidence ``level`` (0.95 -> 1.96)."""
    if (
        not isinstance(level, (int, float))
        or isinstance(level, bool)
        or not 0.0 < float(level) < 1.0
    ):
        raise ValueError(
            f"`level` must be a probability strictly between 0 and 1 (e.g. 0.95), got {level!r}."
        )
    return statistics.NormalDist().inv_cdf(0.5 + float(level) / 2.0)


def mean_std_error(samples: jax.Array):
    """``(mean, std_error)`` of the samples along axis 0 (``std_error = inf`` for one sample)."""
    m = samples.shape[0]
    est = jnp.mean(samples, axis=0)
    if m < 2:
        return est, jnp.full(jnp.shape(est), jnp.inf, samples.dtype)
    return est, jnp.std(samples, axis=0, ddof=1) / math.sqrt(m)


def chan_update(acc, block_n, block_mean, block_m2):
    """Merge running ``(count, mean, M2)`` (pytrees) with a block's statistics.

    Chan, Golub & LeVeque (1979), "Updating formulae and a pairwise algorithm for computing
    sample variances". ``M2`` is the sum of squared deviations from the mean.
    """
    n_a, mean_a, m2_a = acc
    n = n_a + block_n
    frac = block_n / n

    def mean_fn(ma, mb):
        return ma + (mb - ma) * jnp.asarray(frac).astype(ma.dtype)

    def m2_fn(qa, qb, ma, mb):
        d = mb - ma
        return qa + qb + (d * d) * jnp.asarray(n_a * frac).astype(d.dtype)

    return (
        n,
        tu.map(mean_fn, mean_a, block_mean),
        tu.map(m2_fn, m2_a, block_m2, mean_a, block_mean),
    )
