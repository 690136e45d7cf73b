r"""Stochastic estimation of the Frobenius norm of a symmetric operator.

Hutchinson's estimator applied to :math:`A^2 = A^\top A` (Hutchinson 1989; see
also Meyer et al. 2021, Section 1): for Rademacher probes :math:`z_k`,

.. math:: \|A\|_F^2 = \operatorname{tr}(A^\top A) = \mathbb E\,\|A z\|^2, \qquad
          \widehat{F^2} = \frac1m \sum_{k=1}^m \|A z_k\|^2,

one product per probe, with the sample standard error
:math:`s_{F^2} = \operatorname{std}(\|Az_k\|^2)/\sqrt m`. The norm itself is
:math:`\sqrt{\widehat{F^2}}` with the delta-method standard error
:math:`s_F = s_{F^2} / (2\sqrt{\widehat{F^2}})` (first order; the square root
makes :math:`\hat F` slightly biased low, by about :math:`s_F^2/(2F)`).

With ``num_matvecs >= n`` the norm is computed exactly as
:math:`\sum_i \|A e_i\|^2` (``method="exact"``).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from hvp import tree as tu
from hvp.linalg._checks import (
    DtypePolicy,
    check_int,
    check_key,
    coerce_operator,
    dtype_policy,
    raise_if_nonfinite,
    resolve_chunk,
)
from hvp.linalg._stats import mean_std_error as _mean_se
from hvp.linalg._stats import normal_quantile as _normal_quantile
from hvp.linalg._trace import (
    exact_map,
    probe_map,
)
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["FrobeniusResult", "frobenius_norm"]


@tu.result(static=("num_matvecs", "method", "dtype_policy"))
class FrobeniusResult:
    """Estimate of :math:`\\|A\\|_F` and :math:`\\|A\\|_F^2`.

    Attributes:
      estimate: :math:`\\|A\\|_F` (square root of ``squared_estimate``).
      std_error: its delta-method standard error ``squared_std_error / (2 estimate)``.
      squared_estimate: :math:`\\|A\\|_F^2`, the mean of ``samples`` (unbiased).
      squared_std_error: standard error of ``squared_estimate``.
      num_matvecs: operator products spent.
      method: ``"hutchinson"`` or ``"exact"``.
      samples: :math:`\\|A z_k\\|^2` per probe (``"exact"``: :math:`\\|A e_i\\|^2`, whose sum is the estimate).
      dtype_policy: the :class:`~hvp.linalg.DtypePolicy` used (products in the parameters'
        dtype, ``||A z||^2`` and the sums in at least float32).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> res = hvp.frobenius_norm(hvp.from_dense(jnp.diag(jnp.array([3.0, 4.0]))), key=jax.random.key(0), num_matvecs=2)
      >>> res.method, round(float(res.estimate), 4), round(float(res.squared_estimate), 4)  # sqrt(9 + 16)
      ('exact', 5.0, 25.0)
    """

    estimate: jax.Array
    std_error: jax.Array
    squared_estimate: jax.Array
    squared_std_error: jax.Array
    num_matvecs: int
    method: str
    samples: jax.Array
    dtype_policy: DtypePolicy | None = None

    def confidence_interval(self, level: float = 0.95, *, squared: bool = False):
        """Normal interval for :math:`\\|A\\|_F` (or, with ``squared=True``, for :math:`\\|A\\|_F^2`)."""
        z = _normal_quantile(level)
        if squared:
            return (
                self.squared_estimate - z * self.squared_std_error,
                self.squared_estimate + z * self.squared_std_error,
            )
        return self.estimate - z * self.std_error, self.estimate + z * self.std_error


def _sq_norm(z, az):
    del z
    return tu.dot(az, az)


def _finish(f2, se2):
    f = jnp.sqrt(jnp.maximum(f2, 0.0))
    se = jnp.where(f > 0, se2 / (2.0 * jnp.where(f > 0, f, 1.0)), jnp.sqrt(se2))
    return f, se


@partial(jax.jit, static_argnames=("num_matvecs", "chunk"))
def _frobenius(op, key, *, num_matvecs: int, chunk: int | None):
    samples = probe_map(op, key, num_matvecs, "rademacher", _sq_norm, chunk)
    f2, se2 = _mean_se(samples)
    f, se = _finish(f2, se2)
    return f, se, f2, se2, samples


@partial(jax.jit, static_argnames=("chunk",))
def _exact_frobenius(op, *, chunk: int | None):
    samples = exact_map(op, _sq_norm, chunk)
    f2 = jnp.sum(samples)
    zero = jnp.zeros((), samples.dtype)
    return jnp.sqrt(f2), zero, f2, zero, samples


def frobenius_norm(
    op: OperatorLike,
    *,
    key: PRNGKey,
    num_matvecs: int = 100,
    chunk_size: int | None = None,
    like: PyTree | None = None,
) -> FrobeniusResult:
    r"""Estimate :math:`\|A\|_F` from :math:`\|A\|_F^2 = \mathbb E\|Az\|^2` (Rademacher ``z``).

    Args:
      op: a :class:`~hvp.LinearOperator`, a ``matvec`` callable (with ``like=``)
        or a dense square matrix.
      key: a JAX PRNG key; the same key gives the same result.
      num_matvecs: number of probes (one product each), >= 1; with
        ``num_matvecs >= n`` the norm is computed exactly from ``n`` products.
      chunk_size: at most this many products at once; ``None`` (default): the memory
        rule of :func:`hvp.linalg.trace`, at most 8 at once.
      like: example pytree of the vectors when ``op`` is a plain callable.

    Returns:
      :class:`FrobeniusResult` with ``estimate`` / ``std_error`` for
      :math:`\|A\|_F` (delta method) and ``squared_estimate`` /
      ``squared_std_error`` for :math:`\|A\|_F^2`. The variance of one sample is
      :math:`2\sum_{i\ne j} (A^2)_{ij}^2`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> A = jnp.array([[2.0, 1.0], [1.0, 2.0]])
        >>> res = hvp.frobenius_norm(hvp.from_dense(A), key=jax.random.PRNGKey(0), num_matvecs=200)
        >>> abs(float(res.estimate) - float(jnp.linalg.norm(A))) < 4 * float(res.std_error) + 1e-12
        True
    """
    op = coerce_operator(op, like)
    check_key(key)
    num_matvecs = check_int("num_matvecs", num_matvecs, minimum=1)
    if num_matvecs >= op.size:
        vals = _exact_frobenius(op, chunk=resolve_chunk(chunk_size, op.size))
        method, cost = "exact", op.size
    else:
        vals = _frobenius(
            op, key, num_matvecs=num_matvecs, chunk=resolve_chunk(chunk_size, num_matvecs)
        )
        method, cost = "hutchinson", num_matvecs
    f, se, f2, se2, samples = vals
    raise_if_nonfinite(op, "Frobenius norm estimate", f2)
    return FrobeniusResult(
        estimate=f,
        std_error=se,
        squared_estimate=f2,
        squared_std_error=se2,
        num_matvecs=cost,
        method=method,
        samples=samples,
        dtype_policy=dtype_policy(op.like),
    )
