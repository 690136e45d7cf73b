r"""The state machine shared by the iterative solvers of :func:`hvp.solve` (CG, MINRES, Neumann).

Every solver works on a block of ``m`` right-hand sides at once (``m = 1`` for a single system):
each state vector is a block with a leading axis of ``m`` rows, each scalar of the recurrence an
``(m,)`` array, and each step is one :meth:`hvp.LinearOperator.matmat` of ``m`` vectors. Three
phases, each one block product:

* phase 0, the start: ``r = b - (A + damping I) x0`` (only with a user ``x0``; without it
  ``r = b`` and the recurrence is initialised when the state is built);
* phase 1, one iteration of the method (:meth:`Solver.step_prepare`, :meth:`Solver.step_update`);
* phase 2, the check: the **true** residual ``b - (A + damping I) x`` of the current iterate,
  from one more product. Rows whose true residual meets the tolerance are converged; rows whose
  recursive estimate claimed convergence but whose true residual does not (round-off drift) are
  restarted from the true residual (at most :data:`MAX_RESTARTS` times, within the budget); the
  run ends when no row restarts.

The run enters the check when every row has stopped iterating or when only one product of the
budget ``max_matvecs`` (per right-hand side) is left, so the reported residual is always the true
residual of the returned ``x`` and ``finalize`` does no product.

**Best-iterate safeguard.** Every row keeps the iterate with the smallest **true** residual seen
so far (``best_x``, ``best_rn``, ``best_iter``): the start (``x = 0``, residual ``||b||``, known
without a product; or the user's ``x0`` when its start product shows it better than zero) and
every checked iterate. The run returns that one, so a returned ``x`` never has a true residual
above ``||b||`` and never above an earlier checked iterate's. Which iterate is checked is the
method's :meth:`Solver.candidate`: the last iterate, except for CG, whose residual is not
monotone, which checks the iterate with the smallest recursive residual since its last (re)start
(as MATLAB's ``pcg``). Cost: one more vector per system (two for CG), no product.

**Stagnation.** A restart is iterative refinement from the true residual; in exact arithmetic it
would cut that residual by about the tolerance again. When it cuts it by less than
:data:`MIN_PROGRESS` (or a method stops on its own precision test), the true residual has reached
the round-off floor of the dtype on this system (the residual gap of Greenbaum 1997,
"Estimating the attainable accuracy of recursively computed residual methods"): the row stops
and is flagged ``stagnated`` rather than restarted again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from hvp import tree as tu
from hvp.linalg._blocks import rowwise, to_like
from hvp.linalg._checks import acc_dtype
from hvp.linalg._driver import Progress, StateMachine

__all__ = [
    "MAX_RESTARTS",
    "MIN_PROGRESS",
    "RTOL64",
    "default_rtol",
    "Solver",
    "initial_state",
    "row_axpy",
    "row_norms",
    "row_scale",
    "where_rows",
    "with_worst",
]

#: restarts from the true residual per right-hand side (after a recursive estimate drifted).
MAX_RESTARTS = 3

#: a restart must cut the row's true residual below this fraction of the previous check's, else
#: the row has stagnated at the round-off floor and stops (flagged ``stagnated``).
MIN_PROGRESS = 0.5

#: the default relative tolerance in float64 (and the least default in any dtype).
RTOL64 = 1e-6


def default_rtol(like) -> float:
    r"""The default ``rtol`` of :func:`hvp.solve` for vectors shaped like ``like``.

    :math:`\max(10^{-6}, \sqrt{\varepsilon})` with :math:`\varepsilon` the largest machine
    epsilon among the dtypes of ``like``'s leaves (the products' dtypes): ``1e-6`` for float64,
    ``3.45e-4`` for float32, ``0.031`` for float16 and ``0.088`` for bfloat16 parameters.

    Why: the true residual :math:`\|b - (A + \delta I) x\|`, computed with products in a dtype
    of machine epsilon :math:`\varepsilon`, stagnates at about :math:`\varepsilon\,\|A\|\,
    \|x\| / \|b\|` relative to :math:`\|b\|` for CG and about :math:`\varepsilon\,
    \kappa(A)` for MINRES (Greenbaum 1997; Sleijpen, van der Vorst & Fokkema 2000), so a fixed
    ``1e-6`` is out of float32's reach on the ill-conditioned damped GGNs of trained networks
    (e.g. a tanh MLP on digits, :math:`\kappa \approx 2 \cdot 10^3`: CG stagnates at
    ``5e-6``, MINRES at ``1.3e-4``). :math:`\sqrt{\varepsilon}` is the default relative
    tolerance of Julia's ``Krylov.jl`` and ``IterativeSolvers.jl``; float64 keeps ``1e-6``
    (MATLAB's ``pcg``; SciPy and JAX use ``1e-5`` whatever the dtype).

    Args:
      like: a dtype, or a pytree of arrays (the operator's ``like``, or ``b``).

    Returns:
      The tolerance, a Python float.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> hvp.linalg.default_rtol(jnp.float64), round(hvp.linalg.default_rtol(jnp.zeros(3, jnp.float32)), 6)
      (1e-06, 0.000345)
    """
    if isinstance(like, (str, type, jnp.dtype)):
        leaves = [like]
    else:
        leaves = [
            getattr(x, "dtype", None) or jnp.result_type(x) for x in jax.tree_util.tree_leaves(like)
        ]
    eps = max(
        (float(jnp.finfo(jnp.dtype(d)).eps) for d in leaves),
        default=float(jnp.finfo(jnp.float32).eps),
    )
    return max(RTOL64, math.sqrt(eps))


def _rows_shape(c, leaf):
    return jnp.reshape(c, (-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def row_scale(c, V):
    """Row ``i`` of the block ``V`` times ``c[i]``."""
    return jax.tree_util.tree_map(lambda x: _rows_shape(c, x) * x, V)


def row_axpy(c, X, Y):
    """``Y + c[i] X`` row by row."""
    return jax.tree_util.tree_map(lambda x, y: y + _rows_shape(c, x) * x, X, Y)


def where_rows(mask, A, B):
    """Row ``i`` of ``A`` where ``mask[i]``, else of ``B``."""
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(jnp.reshape(mask, (-1,) + (1,) * (a.ndim - 1)), a, b), A, B
    )


def row_norms(V):
    """The 2-norm of every row of the block ``V`` (``(m,)``, accumulation dtype)."""
    return jnp.sqrt(jnp.maximum(rowwise(V, V), 0))


@dataclasses.dataclass(frozen=True)
class Solver(StateMachine):
    """Base of the solvers: the start, check and restart phases; subclasses give the iteration.

    Fields: ``m`` the number of right-hand sides, ``preconditioned`` whether the state holds a
    preconditioner (``state["pre"]``, applied with its ``apply(block, damping)``).

    Subclasses implement :meth:`init_rows` (the recurrence's state from a residual block, for
    the rows of a mask), :meth:`step_prepare` and :meth:`step_update` (one iteration: update
    ``x``, set ``stop``/``final``/``est``/``negcurv``/``mincurv``/``iters`` per row).
    """

    m: int = 1
    preconditioned: bool = False

    progress_keys: ClassVar[tuple[str, ...]] = ("matvecs", "steps", "max_steps", "worst")

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return (self.m, self.m, self.m)

    # --- to implement ------------------------------------------------------------------------
    def init_rows(self, op, state: dict, r, mask) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def step_prepare(self, op, state: dict):  # pragma: no cover - abstract
        raise NotImplementedError

    def step_update(self, op, state: dict, vs, avs) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def candidate(self, state: dict):
        """``(x, iters)``: the iterate the next check verifies and the iteration it comes from."""
        return state["x"], state["iters"]

    # --- helpers ---------------------------------------------------------------------------------
    def precond(self, state: dict, R):
        """``P^{-1} R`` for a block ``R`` (the identity without a preconditioner)."""
        if not self.preconditioned:
            return R
        return state["pre"].apply(R, state["damping"])

    def damped(self, op, state, vs, avs):
        """``(A + damping I) v`` for every row of ``vs``, in the accumulation dtype."""
        acc = acc_dtype(op.like)
        return tu.add(tu.cast(avs, acc), tu.scale(state["damping"], tu.cast(vs, acc)))

    # --- the state machine --------------------------------------------------------------------
    def _residual(self, op, state, vs, avs):
        return tu.sub(state["b"], self.damped(op, state, vs, avs))

    def _after_init(self, state):
        """Phase after a (re)start: iterate, or check at once (all rows stopped / no budget)."""
        no_budget = state["steps"] + 1 >= state["max_steps"]
        to_check = jnp.all(state["stop"]) | no_budget
        return jnp.where(to_check, 2, 1).astype(jnp.int32)

    def prepare(self, op, state, phase):
        if phase == 1:
            return self.step_prepare(op, state)
        if phase == 0:
            return to_like(state["x"], op.like)  # x0 in the parameters' dtype
        return to_like(self.candidate(state)[0], op.like)  # the x to return, if it is the best

    def update(self, op, state, phase, vs, avs):
        steps = state["steps"] + 1
        state = dict(state, steps=steps, matvecs=state["matvecs"] + self.m)
        if phase == 0:
            r = self._residual(op, state, vs, avs)
            rn = row_norms(r).astype(state["best_rn"].dtype)
            better = rn < state["best_rn"]  # x0 beats x = 0 (||b||)
            state = dict(
                state,
                best_x=where_rows(better, state["x"], state["best_x"]),
                best_rn=jnp.where(better, rn, state["best_rn"]),
            )
            state = self.init_rows(op, state, r, jnp.ones((self.m,), bool))
            return dict(state, phase=self._after_init(state))
        if phase == 1:
            state = self.step_update(op, state, vs, avs)
            no_budget = steps + 1 >= state["max_steps"]
            to_check = jnp.all(state["stop"]) | no_budget
            return dict(state, phase=jnp.where(to_check, 2, 1).astype(jnp.int32))
        # phase 2: the true residual of the candidate x (cast to the parameters' dtype)
        acc = acc_dtype(op.like)
        x = tu.cast(vs, acc)
        r = self._residual(op, state, vs, avs)
        rn = row_norms(r)
        # the safeguard: keep the checked x when it is no worse than the best so far (a NaN never)
        better = rn.astype(acc) <= state["best_rn"]
        state = dict(
            state,
            best_x=where_rows(better, x, state["best_x"]),
            best_rn=jnp.where(better, rn.astype(acc), state["best_rn"]),
            best_iter=jnp.where(better, self.candidate(state)[1], state["best_iter"]),
        )
        ok = rn <= state["thresh"]
        bn = state["bnorm"]
        rel = jnp.where(bn > 0, rn / jnp.where(bn > 0, bn, 1), jnp.where(rn == 0, 0.0, jnp.inf))
        budget = steps + 2 <= state["max_steps"]
        progress = rn < MIN_PROGRESS * state["prev_true"]  # the first check: prev_true = inf
        exhausted = state["restarts"] >= MAX_RESTARTS
        can = ~ok & state["stop"] & ~state["final"] & jnp.isfinite(rn)
        restart = can & ~exhausted & budget & progress
        # the method claimed convergence (or hit its precision limit), the true residual says
        # no and refinement no longer helps: the round-off floor of the dtype on this system
        claimed = state["stop"] & (~state["final"] | state["limited"])
        stuck = (can & (~progress | exhausted)) | (state["limited"] & ~ok & jnp.isfinite(rn))
        state = dict(
            state,
            x=x,
            relres=rel.astype(acc),
            checked_ok=ok,
            prev_true=rn.astype(acc),
            stagnated=claimed & stuck,
        )
        rs = self.init_rows(op, state, r, restart)
        rs = dict(rs, restarts=state["restarts"] + restart.astype(jnp.int32))
        any_restart = jnp.any(restart)
        phase = jnp.where(any_restart, self._after_init(rs), 2).astype(jnp.int32)
        # rows that do not restart stay stopped
        rs = dict(rs, stop=rs["stop"] | ~restart, phase=phase, done=~any_restart)
        return rs

    def finalize(self, op, state):
        # the last checked x decides finiteness (NonFiniteError outside jit, NaN inside)
        finite = tu.all_finite(state["x"]) & ~jnp.any(jnp.isnan(state["relres"]))
        x = to_like(jax.tree_util.tree_map(
            lambda a, b: jnp.where(finite, a, b), state["best_x"], state["x"]
        ), op.like)  # fmt: skip
        bn, rn = state["bnorm"], state["best_rn"]
        rel = jnp.where(bn > 0, rn / jnp.where(bn > 0, bn, 1), jnp.where(rn == 0, 0.0, jnp.inf))
        rel = jnp.where(finite, rel, state["relres"]).astype(state["relres"].dtype)
        conv = finite & (rn <= state["thresh"]) & jnp.isfinite(rel)
        return (
            x,
            rel,
            conv,
            state["iters"],
            state["negcurv"],
            state["mincurv"],
            state["matvecs"],
            finite,
            state["stagnated"] & ~conv,
            state["best_iter"],
            finite & (rn < state["prev_true"]),  # the last checked x was worse: a fallback
        )

    def progress(self, state) -> Progress:
        worst = float(state["worst"])
        return Progress(
            matvecs=int(state["matvecs"]),
            total=int(state["max_steps"]) * self.m,
            text=f"worst relative residual estimate {worst:.2e}",
        )


def with_worst(state: dict) -> dict:
    """``state`` with ``worst``: the largest recursive relative residual estimate (progress)."""
    bn = state["bnorm"]
    rel = jnp.where(bn > 0, state["est"] / jnp.where(bn > 0, bn, 1), 0)
    return dict(state, worst=jnp.max(rel).astype(state["worst"].dtype))


def initial_state(*, b, x, bnorm, thresh, damping, max_steps, pre, like, extra: dict) -> dict:
    """The entries every solver state holds (``extra``: the method's own)."""
    acc = acc_dtype(like)
    m = bnorm.shape[0]
    state = dict(
        b=b,
        x=x,
        bnorm=bnorm,
        thresh=thresh,
        damping=jnp.asarray(damping, acc),
        steps=jnp.zeros((), jnp.int32),
        max_steps=jnp.asarray(max_steps, jnp.int32),
        iters=jnp.zeros((m,), jnp.int32),
        stop=jnp.zeros((m,), bool),
        final=jnp.zeros((m,), bool),
        negcurv=jnp.zeros((m,), bool),
        mincurv=jnp.full((m,), jnp.inf, acc),
        restarts=jnp.zeros((m,), jnp.int32),
        relres=jnp.full((m,), jnp.inf, acc),
        prev_true=jnp.full((m,), jnp.inf, acc),
        limited=jnp.zeros((m,), bool),
        stagnated=jnp.zeros((m,), bool),
        checked_ok=jnp.zeros((m,), bool),
        best_x=jax.tree_util.tree_map(jnp.zeros_like, x),
        best_rn=jnp.asarray(bnorm, acc),
        best_iter=jnp.zeros((m,), jnp.int32),
        worst=jnp.ones((), acc),
        est=jnp.zeros((m,), acc),
        matvecs=jnp.zeros((), jnp.int32),
        phase=jnp.zeros((), jnp.int32),
        done=jnp.array(False),
    )
    if pre is not None:
        state["pre"] = pre
    state.update(extra)
    return state
