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

import dataclasses
import os
from typing import ClassVar

import jax
import jax.numpy as jnp

from hvp import tree as tu
from hvp.linalg._blocks import get_row, to_like
from hvp.linalg._checks import (
    DtypePolicy,
    acc_dtype,
    check_finite_float,
    check_int,
    check_key,
    coerce_operator,
    dtype_policy,
    warn_not_converged,
)
from hvp.linalg._driver import Checkpoint, Progress, StateMachine, run
from hvp.operators import NonFiniteError
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["power_iteration", "PowerResult"]


@tu.result(static=("dtype_policy",))
class PowerResult:
    """Result of :func:`power_iteration`.

    Attributes:
      eigenvalue: Rayleigh quotient ``v^T A v`` (signed) of the final iterate, in the
        accumulation dtype (at least float32).
      eigenvector: unit pytree like the parameters (in their dtype).
      residual: ``||A v - eigenvalue * v||``.
      num_matvecs: operator products used.
      converged: ``residual <= tol * |eigenvalue|``.
      dtype_policy: the :class:`~hvp.linalg.DtypePolicy` used (products in the parameters'
        dtype, norms, the Rayleigh quotient, the residual and the normalisation in
        ``accumulate``).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> r = hvp.power_iteration(hvp.from_dense(jnp.diag(jnp.array([2.0, 0.5]))), key=jax.random.key(0), tol=1e-5)
      >>> round(float(r.eigenvalue), 3), jnp.abs(r.eigenvector).round(3).tolist(), bool(r.converged)
      (2.0, [1.0, 0.0], True)
    """

    eigenvalue: jax.Array
    eigenvector: object
    residual: jax.Array
    num_matvecs: jax.Array
    converged: jax.Array
    dtype_policy: DtypePolicy | None = None


@dataclasses.dataclass(frozen=True)
class PowerIteration(StateMachine):
    """Power iteration as a state machine: one product per step (block size 1).

    State: ``v`` the unit vector whose product is next, ``vec``/``lam``/``res`` the last
    measured iterate, its Rayleigh quotient and residual; ``tol`` and ``max_matvecs`` are
    dynamic, so other settings reuse the compiled steps.
    """

    name: ClassVar[str] = "power_iteration"

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return (1,)

    def prepare(self, op, state, phase):  # noqa: ARG002
        return jax.tree_util.tree_map(lambda x: x[None], state["v"])

    def update(self, op, state, phase, vs, avs):  # noqa: ARG002
        acc = acc_dtype(op.like)
        v = tu.cast(get_row(vs, 0), acc)
        av = tu.cast(get_row(avs, 0), acc)
        lam = tu.dot(v, av)
        res = tu.norm(tu.axpy(-lam, v, av))
        ok = tu.all_finite(av)
        nw = tu.norm(av)
        w = tu.scale(1.0 / jnp.where(nw > 0, nw, 1.0), av)
        # A v = 0 (zero operator, or v in the null space): keep v, whose eigenvalue 0 is exact.
        nxt = jax.tree_util.tree_map(lambda a, b: jnp.where(nw > 0, a, b), w, v)
        matvecs = state["matvecs"] + 1
        done = ~ok | (matvecs >= state["max_matvecs"]) | (res <= state["tol"] * jnp.abs(lam))
        return dict(state, v=nxt, vec=v, lam=lam, res=res, ok=ok, matvecs=matvecs, done=done)

    def finalize(self, op, state):
        lam, res, ok = state["lam"], state["res"], state["ok"]
        finite = ok & jnp.isfinite(lam) & jnp.isfinite(res)
        conv = finite & (res <= state["tol"] * jnp.abs(lam))
        return to_like(state["vec"], op.like), lam, res, state["matvecs"], conv, finite

    def progress(self, state) -> Progress:
        lam, res = float(state["lam"]), float(state["res"])
        rel = res / abs(lam) if lam else float("inf")
        text = (
            f"eigenvalue {lam:.6g}, residual/|eigenvalue| {rel:.2e} (tol {float(state['tol']):.0e})"
        )
        return Progress(
            matvecs=int(state["matvecs"]),
            total=int(state["max_matvecs"]),
            text=text if int(state["matvecs"]) else "",
        )


def _initial_state(v, like, tol, num_iters):
    acc = acc_dtype(like)
    v = tu.cast(v, acc)
    nv = tu.norm(v)
    v = tu.scale(1.0 / jnp.where(nv > 0, nv, 1.0), v)
    zero = jnp.zeros((), acc)
    return dict(
        v=v,
        vec=v,
        lam=zero,
        res=jnp.full((), jnp.inf, acc),
        ok=jnp.array(True),
        tol=jnp.asarray(tol, acc),
        max_matvecs=jnp.asarray(num_iters, jnp.int32),
        matvecs=jnp.zeros((), jnp.int32),
        phase=jnp.zeros((), jnp.int32),
        done=jnp.array(False),
    )


def _start(v0, like, key):
    """The start vector: random normal (from ``key``), ``v0``, or the sum of a stacked block ``v0``."""
    if v0 is None:
        return tu.normal_like(key, like)
    try:
        tu.assert_same_structure(v0, like, name="v0", like_name="operator.like", check_dtype=False)
        return tu.like_sharding(v0, like)  # explicit mesh: a user's vector takes each leaf's type
    except ValueError as single_err:
        try:
            tu.assert_same_structure(
                v0, like, name="v0", like_name="operator.like", check_dtype=False, leading=1
            )
        except ValueError:
            raise ValueError(
                "`v0` must be a pytree shaped like the operator's parameters, or a stacked block "
                f"of such vectors (leading axis on every leaf). {single_err}"
            ) from None
        return tu.like_sharding(jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), v0), like)


def power_iteration(
    op: OperatorLike,
    *,
    key: PRNGKey,
    num_iters: int = 100,
    tol: float = 1e-6,
    v0: PyTree | None = None,
    like: PyTree | None = None,
    driver: str = "auto",
    progress: bool | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
) -> PowerResult:
    r"""Top-magnitude eigenpair :math:`(\lambda, v)`, :math:`|\lambda| = \|A\|_2`, by power iteration.

    Args:
      op: a :class:`hvp.LinearOperator`, or a matvec callable with ``like=``.
      key: PRNG key for the random start vector (``jax.random.key(seed)``; ignored when
        ``v0`` is given, and then it may be ``None``).
      num_iters: maximum number of matvecs (>= 1).
      tol: stop when :math:`\|A v - \lambda v\| \le \mathrm{tol} \cdot |\lambda|`
        (finite, ``>= 0``). With bfloat16/float16 parameters the residual cannot fall
        much below ``eps * |lambda|`` of that dtype (``7.8e-3`` / ``9.8e-4``), so a
        smaller ``tol`` ends with ``converged=False`` after ``num_iters`` products.
      v0: optional start vector (pytree like the parameters, or a stacked
        block whose sum is used).
      like: example pytree when ``op`` is a plain matvec callable.
      driver: ``"auto"`` (compiled inside ``jax.jit``/``vmap``, host otherwise), ``"compiled"``
        or ``"host"``; see :mod:`hvp.linalg` ("Drivers"). Both give the same numbers.
      progress: host driver: show products, the residual and the time left on stderr
        (``None``: when stderr is a terminal).
      checkpoint: host driver: a path or :class:`hvp.linalg.Checkpoint` to save the state to
        and resume from (same arguments, same result, bit for bit).

    Returns:
      :class:`PowerResult`. The eigenvalue is signed (for a Hessian with a
      dominant negative eigenvalue it is negative). Convergence is slow when
      the two largest magnitudes are close; when ``-lambda`` and ``lambda``
      are both eigenvalues the iterate oscillates and ``converged`` stays False.

    Precision: products run in the parameters' dtype; the iterate, its normalisation, the
    Rayleigh quotient and the residual in at least float32 (``dtype_policy``), so a
    float16 norm cannot overflow into a zero vector. Works under ``jax.jit`` (then a
    non-finite result is returned as NaN instead of raising).

    Raises:
      TypeError: ``key`` is not a PRNG key (e.g. an int: pass ``key=jax.random.key(seed)``).
      ValueError: ``num_iters < 1``, negative or non-finite ``tol``, ``v0`` of the wrong structure.
      NonFiniteError: the operator produced NaN or Inf (e.g. a float16 overflow).

    Warns:
      ConvergenceWarning: (:class:`hvp.ConvergenceWarning`; outside ``jax.jit`` only, where
        ``converged`` says it) the residual did not reach ``tol * |lambda|`` within
        ``num_iters`` products; the message gives both and what can help.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> r = hvp.power_iteration(hvp.from_dense(jnp.diag(jnp.array([1.0, -3.0]))),
      ...                         key=jax.random.key(0), tol=1e-5)
      >>> round(float(r.eigenvalue), 3), bool(r.converged)
      (-3.0, True)
    """
    op = coerce_operator(op, like, what="eigenvalue")
    num_iters = check_int("num_iters", num_iters, minimum=1)
    tol = check_finite_float("tol", tol)
    if v0 is None:
        check_key(key)
    v = _start(v0, op.like, key)
    if v0 is not None and not tu.is_traced(v) and float(tu.norm(v)) == 0.0:
        raise ValueError("`v0` is the zero vector: pass a non-zero start vector or `v0=None`.")
    state = _initial_state(v, op.like, tol, num_iters)
    out, chosen = run(
        PowerIteration(),
        op,
        state,
        driver=driver,
        progress=progress,
        checkpoint=checkpoint,
        traced=(key,),
        consume=True,
    )
    vec, lam, res, nmv, conv, finite = out
    if chosen == "host":
        nmv = int(nmv)
    if not tu.is_traced(lam, finite) and not bool(finite):
        raise NonFiniteError(
            f"power_iteration on the {op.name} operator produced NaN or Inf (within "
            f"{int(nmv)} matvec(s)): its matvec returned non-finite values (with float16 "
            "parameters, values above 65504 overflow). Find the leaf with "
            "`hvp.tree.nonfinite_leaves(op @ v)`, check the parameters, the data and the loss, "
            "or run in float32."
        )
    if not tu.is_traced(conv, lam, res) and not bool(conv):
        _warn_not_converged(op, float(lam), float(res), tol, int(nmv))
    return PowerResult(
        eigenvalue=lam,
        eigenvector=vec,
        residual=res,
        num_matvecs=nmv,
        converged=conv,
        dtype_policy=dtype_policy(op.like),
    )


def _warn_not_converged(op, lam: float, res: float, tol: float, nmv: int) -> None:
    policy = dtype_policy(op.like)
    low = policy.compute in ("bfloat16", "float16")
    warn_not_converged(
        f"power_iteration on the {op.name} operator did not converge: residual "
        f"||A v - lambda v|| = {res:.3g} > tol * |lambda| = {tol * abs(lam):.3g} (eigenvalue "
        f"{lam:.6g}) after {nmv} products. Power iteration converges at the rate "
        "|lambda_2 / lambda_1| per product: slowly when the two largest magnitudes are close, "
        "never when -lambda and lambda are both eigenvalues. What can help: raise `num_iters`, "
        "loosen `tol`, or use hvp.eigsh (Lanczos, far fewer products for the same accuracy)"
        + (
            f"; with {policy.compute} products the residual cannot fall much below "
            f"{float(jnp.finfo(jnp.dtype(policy.compute)).eps):.1g} * |lambda|: use float32 "
            "parameters"
            if low
            else ""
        )
        + ". `result.converged` says it; inside jax.jit there is no warning.",
        stacklevel=4,
    )
