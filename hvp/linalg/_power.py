r"""Power iteration for the eigenvalue of largest magnitude.

Repeats :math:`v \leftarrow A v / \|A v\|` (von Mises & Pollaczek-Geiringer,
1929). With :math:`|\lambda_1| > |\lambda_2| \ge \dots` the iterate converges
to the top-magnitude eigenvector at the rate :math:`|\lambda_2 / \lambda_1|`
per step; the Rayleigh quotient :math:`\lambda = v^\top A v` converges at the
square of that rate. It needs only two vectors of memory, but Lanczos
(:func:`hvp.linalg.eigsh`) is much faster for the same accuracy; power
iteration is kept as the simplest baseline (e.g. PyHessian, Yao et al. 2020,
uses it for the top Hessian eigenvalue) and when memory is at a premium.

Stopping rule: the residual :math:`\|A v - \lambda v\| \le \mathrm{tol} \cdot |\lambda|`,
tested every step inside one compiled ``lax.while_loop``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from hvp import tree as tu
from hvp.linalg._lanczos import _check_like, _start_vector
from hvp.operators import NonFiniteError, as_operator
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["power_iteration", "PowerResult"]


@tu.result
class PowerResult:
    """Result of :func:`power_iteration`.

    Attributes:
      eigenvalue: Rayleigh quotient ``v^T A v`` (signed) of the final iterate.
      eigenvector: unit pytree like the parameters.
      residual: ``||A v - eigenvalue * v||``.
      num_matvecs: operator products used.
      converged: ``residual <= tol * |eigenvalue|``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))  # eigenvalues 1, ..., 6
        >>> res = hvp.power_iteration(op, key=jax.random.PRNGKey(0), num_iters=500)
        >>> round(float(res.eigenvalue), 4), bool(res.converged)
        (6.0, True)
    """

    eigenvalue: jax.Array
    eigenvector: object
    residual: jax.Array
    num_matvecs: jax.Array
    converged: jax.Array


@partial(jax.jit, static_argnames=("num_iters",))
def _power_run(op, v, tol, *, num_iters):
    def measure(v):
        av = op._apply(v)
        lam = tu.dot(v, av)
        r = tu.axpy(-lam, v, av)
        return av, lam, tu.norm(r)

    av, lam, res = measure(v)
    state = (v, av, lam, res, jnp.ones((), jnp.int32))

    def cond(s):
        _, _, lam, res, i = s
        return (i < num_iters) & (res > tol * jnp.abs(lam))

    def body(s):
        _, av, _, _, i = s
        na = tu.norm(av)
        v = tu.scale(1.0 / jnp.where(na > 0, na, 1.0), av)
        av, lam, res = measure(v)
        return v, av, lam, res, i + 1

    v, _, lam, res, i = lax.while_loop(cond, body, state)
    return v, lam, res, i, res <= tol * jnp.abs(lam)


def power_iteration(
    op: OperatorLike,
    *,
    key: PRNGKey,
    num_iters: int = 100,
    tol: float = 1e-6,
    v0: PyTree | None = None,
    like: PyTree | None = None,
) -> PowerResult:
    r"""Top-magnitude eigenpair :math:`(\lambda, v)`, :math:`|\lambda| = \|A\|_2`, by power iteration.

    Args:
      op: a :class:`hvp.LinearOperator`, or a matvec callable with ``like=``.
      key: PRNG key for the random start vector (ignored when ``v0`` is given).
      num_iters: maximum number of matvecs (>= 1).
      tol: stop when :math:`\|A v - \lambda v\| \le \mathrm{tol} \cdot |\lambda|`.
      v0: optional start vector (pytree like the parameters, or a stacked
        block whose sum is used).
      like: example pytree when ``op`` is a plain matvec callable.

    Returns:
      :class:`PowerResult`. The eigenvalue is signed (for a Hessian with a
      dominant negative eigenvalue it is negative). Convergence is slow when
      the two largest magnitudes are close; when ``-lambda`` and ``lambda``
      are both eigenvalues the iterate oscillates and ``converged`` stays False.

    Raises:
      ValueError: ``num_iters < 1``, negative ``tol``, ``v0`` of the wrong structure.
      NonFiniteError: the operator produced NaN or Inf.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))  # eigenvalues 1, ..., 6
        >>> res = hvp.power_iteration(op, key=jax.random.PRNGKey(0), num_iters=500, tol=1e-8)
        >>> round(float(res.eigenvalue), 6), int(res.num_matvecs) <= 500
        (6.0, True)
    """
    op = as_operator(op, like)
    _check_like(op)
    if int(num_iters) < 1:
        raise ValueError(f"`num_iters` must be at least 1, got {num_iters}.")
    if not tol >= 0:
        raise ValueError(f"`tol` must be a non-negative float, got {tol!r}.")
    if key is None and v0 is None:
        raise ValueError("Pass a PRNG `key` (e.g. `jax.random.PRNGKey(0)`) or a start vector `v0`.")
    v = _start_vector(v0, op.like, key if key is not None else jax.random.PRNGKey(0))
    vec, lam, res, nmv, conv = _power_run(
        op, v, jnp.asarray(tol, op.dtype), num_iters=int(num_iters)
    )
    if not (bool(jnp.isfinite(lam)) and bool(jnp.isfinite(res))):
        raise NonFiniteError(
            f"power_iteration on the {op.name} operator produced NaN or Inf: its matvec returns non-finite "
            "values. Check the parameters and data, or build the operator with `check_finite=True`."
        )
    return PowerResult(
        eigenvalue=lam, eigenvector=vec, residual=res, num_matvecs=nmv, converged=conv
    )
