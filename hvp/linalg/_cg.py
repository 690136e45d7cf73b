r"""Preconditioned conjugate gradients (Hestenes & Stiefel, 1952) with negative-curvature detection.

Solves :math:`(A + \delta I) x = b` for a symmetric positive (semi-)definite :math:`A` and
damping :math:`\delta \ge 0`, on a block of right-hand sides at once (one block product per
iteration). With a preconditioner :math:`P^{-1}` (symmetric positive definite), the iteration is
the standard preconditioned CG (Saad 2003, Algorithm 9.1):

.. math::

   q = (A + \delta I) p,\quad \alpha = \frac{r^\top z}{p^\top q},\quad x \mathrel{+}= \alpha p,
   \quad r \mathrel{-}= \alpha q,\quad z = P^{-1} r,\quad \beta = \frac{r_+^\top z_+}{r^\top z},
   \quad p = z + \beta p.

**Negative curvature.** CG's step length divides by :math:`p^\top (A + \delta I) p`; when it is
:math:`\le 0` the operator is not positive definite along ``p`` and the CG iterate would be the
critical point of an unbounded quadratic. That row stops with its previous iterate and reports
``negative_curvature=True`` (Steihaug 1983 and Martens 2010 stop there too); it is converged only
if its true residual happens to meet the tolerance.

**Best iterate.** CG minimises the error in the :math:`A`-norm, not the residual, whose norm
can rise from one iteration to the next (by orders of magnitude on an ill-conditioned or
indefinite system). The state keeps the iterate with the smallest recursive residual since the
last (re)start (``xb``), and the true-residual check verifies that one (MATLAB's ``pcg`` returns
its minimal-residual iterate too); the solver's safeguard then returns it only when its true
residual is below ``||b||`` and every other checked iterate's.

Why not :func:`jax.scipy.sparse.linalg.cg` (nor lineax, which is not a dependency of hvp): JAX's
``cg`` returns ``info=None`` (no iteration count, residual nor convergence flag; its docstring
calls it a placeholder), stops on the recursive residual only (round-off drift reports success on
a wrong ``x``), divides by :math:`p^\top A p` whatever its sign (a silent wrong ``x`` on an
indefinite Hessian), and is one ``lax.while_loop`` that cannot run on the host driver (the
operator's shared compiled ``matmat``, progress, checkpoint and resume) nor apply the operator to
several right-hand sides in one block product.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from hvp.linalg._blocks import rowwise
from hvp.linalg._solvers import Solver, row_axpy, row_norms, where_rows, with_worst

__all__ = ["CG", "cg_entries"]


@dataclasses.dataclass(frozen=True)
class CG(Solver):
    """Conjugate gradients as a :class:`~hvp.linalg._solvers.Solver` (state ``r``, ``z``, ``p``, ``rz``)."""

    name: ClassVar[str] = "cg"

    def candidate(self, state):
        return state["xb"], state["xb_iter"]

    def init_rows(self, op, state, r, mask):  # noqa: ARG002
        z = self.precond(state, r)
        rz = rowwise(r, z)
        rn = row_norms(r)
        stop = rn <= state["thresh"]
        new = dict(
            xb=where_rows(mask, state["x"], state["xb"]),
            xb_est=jnp.where(mask, rn.astype(state["xb_est"].dtype), state["xb_est"]),
            xb_iter=jnp.where(mask, state["iters"], state["xb_iter"]),
            r=where_rows(mask, r, state["r"]),
            p=where_rows(mask, z, state["p"]),
            rz=jnp.where(mask, rz, state["rz"]),
            stop=jnp.where(mask, stop, state["stop"]),
            final=jnp.where(mask, False, state["final"]),
            est=jnp.where(mask, rn, state["est"]),
        )
        return with_worst(dict(state, **new))

    def step_prepare(self, op, state):  # noqa: ARG002
        return state["p"]

    def step_update(self, op, state, vs, avs):
        p = state["p"]
        q = self.damped(op, state, vs, avs)
        pq = rowwise(p, q)
        pp = rowwise(p, p)
        active = ~state["stop"]
        neg = active & (pq <= 0) & (pp > 0)
        go = active & ~neg & (pp > 0)
        alpha = jnp.where(go, state["rz"] / jnp.where(go, pq, 1), 0)
        x = row_axpy(alpha, p, state["x"])
        r = row_axpy(-alpha, q, state["r"])
        z = self.precond(state, r)
        rz = rowwise(r, z)
        beta = jnp.where(go, rz / jnp.where(state["rz"] != 0, state["rz"], 1), 0)
        p_new = row_axpy(beta, p, z)
        rn = row_norms(r)
        bad_pre = go & (rz < 0)  # an indefinite preconditioner
        stop = state["stop"] | neg | bad_pre | (go & ((rn <= state["thresh"]) | (rz == 0)))
        curv = jnp.where(active & (pp > 0), pq / jnp.where(pp > 0, pp, 1), jnp.inf)
        iters = state["iters"] + go.astype(jnp.int32)
        best = go & (rn.astype(state["xb_est"].dtype) < state["xb_est"])
        new = dict(
            xb=where_rows(best, x, state["xb"]),
            xb_est=jnp.where(best, rn.astype(state["xb_est"].dtype), state["xb_est"]),
            xb_iter=jnp.where(best, iters, state["xb_iter"]),
            x=where_rows(go, x, state["x"]),
            r=where_rows(go, r, state["r"]),
            p=where_rows(go, p_new, p),
            rz=jnp.where(go, rz, state["rz"]),
            stop=stop,
            final=state["final"] | neg | bad_pre,
            negcurv=state["negcurv"] | neg,
            mincurv=jnp.minimum(state["mincurv"], curv.astype(state["mincurv"].dtype)),
            iters=iters,
            est=jnp.where(go, rn, state["est"]),
        )
        return with_worst(dict(state, **new))


def cg_entries(block, m: int, acc) -> dict:
    """The CG entries of a fresh state (``block``: zeros like ``b``; filled by ``init_rows``)."""
    return dict(
        r=block, p=block, rz=jnp.zeros((m,), acc), xb=block,
        xb_est=jnp.zeros((m,), acc), xb_iter=jnp.zeros((m,), jnp.int32),
    )  # fmt: skip
