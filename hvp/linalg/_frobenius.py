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

The estimator is a :class:`~hvp.linalg._driver.StateMachine` (:class:`Frobenius`): each step
is one block product of ``chunk_size`` probes (or unit vectors) whose squared norms are stored
(``m`` scalars); the mean and standard error are taken from them at the end, so the result
does not depend on the driver nor, beyond rounding, on ``chunk_size``, and a checkpointed host
run resumes bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hvp import tree as tu
from hvp.linalg._blocks import rowwise
from hvp.linalg._checks import (
    DtypePolicy,
    acc_dtype,
    check_int,
    check_key,
    coerce_operator,
    dtype_policy,
    raise_if_nonfinite,
    resolve_chunk,
)
from hvp.linalg._driver import Checkpoint, Progress, run
from hvp.linalg._probes import ProbeBudget, initial_counters
from hvp.linalg._stats import mean_std_error as _mean_se
from hvp.linalg._stats import normal_quantile as _normal_quantile
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
      num_matvecs: operator products spent (a Python int, also under ``jax.jit``).
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


def _finish(f2, se2):
    f = jnp.sqrt(jnp.maximum(f2, 0.0))
    se = jnp.where(f > 0, se2 / (2.0 * jnp.where(f > 0, f, 1.0)), jnp.sqrt(se2))
    return f, se


@dataclasses.dataclass(frozen=True)
class Frobenius(ProbeBudget):
    r"""The Frobenius-norm estimator as a state machine: one block product per step.

    Settings (static, they fix the shapes): ``total`` products (``num_matvecs``, or ``n`` for
    the exact path), ``chunk`` products per step, ``exact``. State: ``key`` (Hutchinson) and
    ``samples``, a ``(total,)`` buffer of :math:`\|A z_k\|^2` (or :math:`\|A e_i\|^2`)
    in the accumulation dtype, filled block by block.
    """

    name: ClassVar[str] = "frobenius_norm"

    def update(self, op, state, phase, vs, avs):  # noqa: ARG002
        sq = rowwise(avs, avs)  # ||A z||^2 per row, accumulated in >= float32
        samples = lax.dynamic_update_slice(
            state["samples"], sq.astype(state["samples"].dtype), (state["matvecs"],)
        )
        return dict(state, samples=samples, **self.advance(state, phase))

    def finalize(self, op, state):  # noqa: ARG002
        samples = state["samples"]
        if self.exact:
            f2 = jnp.sum(samples)
            zero = jnp.zeros((), samples.dtype)
            return jnp.sqrt(f2), zero, f2, zero, samples
        f2, se2 = _mean_se(samples)
        f, se = _finish(f2, se2)
        return f, se, f2, se2, samples

    def progress(self, state) -> Progress:
        k = int(state["matvecs"])
        s = np.asarray(state["samples"][:k], np.float64)
        if self.exact or k < 2:
            text = "exact (unit vectors)" if self.exact else ""
            return Progress(matvecs=k, total=self.total, text=text)
        f2, se2 = float(np.mean(s)), float(np.std(s, ddof=1) / math.sqrt(k))
        rel = se2 / (2.0 * f2) if f2 > 0 else float("inf")
        text = f"||A||_F ~ {math.sqrt(max(f2, 0.0)):.6g}, relative std_error {rel:.2e}"
        return Progress(matvecs=k, total=self.total, text=text)


def frobenius_norm(
    op: OperatorLike,
    *,
    key: PRNGKey,
    num_matvecs: int = 100,
    chunk_size: int | None = None,
    like: PyTree | None = None,
    driver: str = "auto",
    progress: bool | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
) -> FrobeniusResult:
    r"""Estimate :math:`\|A\|_F` from :math:`\|A\|_F^2 = \mathbb E\|Az\|^2` (Rademacher ``z``).

    Args:
      op: a :class:`~hvp.LinearOperator`, a ``matvec`` callable (with ``like=``)
        or a dense square matrix.
      key: a JAX PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``); the
        same key gives the same result (probe ``k`` is drawn from ``fold_in(key, k)``).
      num_matvecs: number of probes (one product each), >= 1; with
        ``num_matvecs >= n`` the norm is computed exactly from ``n`` products.
      chunk_size: products per step (one block product each); ``None`` (default): the memory
        rule of :func:`hvp.linalg.trace`, at most 8 at once. The estimate does not depend on
        it beyond rounding.
      like: example pytree of the vectors when ``op`` is a plain callable.
      driver: ``"auto"`` (compiled inside ``jax.jit``/``vmap``, host otherwise), ``"compiled"``
        or ``"host"``; see :mod:`hvp.linalg` ("Drivers"). Both give the same numbers.
      progress: host driver: show products, the running estimate, its relative standard
        error and the time left on stderr (``None``: when stderr is a terminal).
      checkpoint: host driver: a path or :class:`hvp.linalg.Checkpoint` to save the state to
        and resume from (same arguments, same result, bit for bit).

    Returns:
      :class:`FrobeniusResult` with ``estimate`` / ``std_error`` for
      :math:`\|A\|_F` (delta method) and ``squared_estimate`` /
      ``squared_std_error`` for :math:`\|A\|_F^2`. The variance of one sample is
      :math:`2\sum_{i\ne j} (A^2)_{ij}^2`. ``num_matvecs`` is a Python int, also under
      ``jax.jit`` (it is fixed by the arguments).

    Works under ``jax.jit`` and ``jax.vmap`` (e.g. over keys; the compiled driver runs
    there): a non-finite result is then returned as NaN instead of raising.

    Raises:
      TypeError: ``key`` is not a PRNG key, ``num_matvecs``/``chunk_size`` not ints, a plain
        callable without ``like=``.
      ValueError: ``num_matvecs < 1``, ``chunk_size < 1``, an unknown ``driver``, or
        ``progress``/``checkpoint`` with the compiled driver.
      NonFiniteError: the operator produced NaN or Inf.

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
    exact = num_matvecs >= op.size
    total = op.size if exact else num_matvecs
    alg = Frobenius(total=total, chunk=resolve_chunk(chunk_size, total), exact=exact)
    acc = acc_dtype(op.like)
    state = dict(samples=jnp.zeros((total,), acc), **initial_counters())
    if not exact:
        state["key"] = key
    (f, se, f2, se2, samples), _ = run(
        alg,
        op,
        state,
        driver=driver,
        progress=progress,
        checkpoint=checkpoint,
        traced=(key,),
        consume=True,
    )
    method, cost = ("exact" if exact else "hutchinson"), total
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
