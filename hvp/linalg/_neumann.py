r"""The Neumann series (LiSSA-style) for positive definite damped systems.

With a scale :math:`s` above half the largest eigenvalue of :math:`A_\delta = A + \delta I`,

.. math:: A_\delta^{-1} b = \frac1s \sum_{k \ge 0} \Big(I - \frac{A_\delta}{s}\Big)^k b,

which converges when every eigenvalue of :math:`A_\delta` lies in :math:`(0, 2s)`, at the rate
:math:`1 - \lambda_{\min}(A_\delta)/s` per term. The partial sums are Richardson's iteration
:math:`x \leftarrow x + r/s`, :math:`r \leftarrow r - A_\delta r / s` (one product per term),
the stochastic form of which is LiSSA (Agarwal, Bullins & Hazan 2017, used for influence functions
by Koh & Liang 2017). Here the products are exact (over the whole data set of the operator), the
scale comes from :func:`hvp.eigsh` rather than being hand-tuned, and the stopping rule is the
residual.

Under those conditions :math:`\|r\|` never increases; an increase proves that :math:`s` is too
small or that :math:`A_\delta` is not positive definite, and a residual with
:math:`r^\top A_\delta r \le 0` proves the latter (``negative_curvature``): either stops the
system with the previous iterate, not converged. CG reaches the same tolerance in about the square
root of the number of terms; the series is kept for its simplicity, its fixed per-step cost and
its use in the influence-function literature.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from hvp.linalg._blocks import rowwise
from hvp.linalg._solvers import Solver, row_axpy, row_norms, where_rows, with_worst

__all__ = ["Neumann", "SAFETY", "neumann_entries"]

#: the scale is ``SAFETY * (lambda_max + damping)`` (a Ritz value is never above the true
#: ``lambda_max``; the factor keeps ``s`` above ``lambda_max`` when eigsh's estimate is short).
SAFETY = 1.1


@dataclasses.dataclass(frozen=True)
class Neumann(Solver):
    """Neumann series / Richardson iteration as a :class:`~hvp.linalg._solvers.Solver`."""

    name: ClassVar[str] = "neumann"

    def init_rows(self, op, state, r, mask):  # noqa: ARG002
        rn = row_norms(r).astype(state["est"].dtype)
        new = dict(r=r, est=rn, stop=rn <= state["thresh"], final=jnp.zeros_like(state["final"]))
        old = {k: state[k] for k in new}
        return with_worst(dict(state, **where_rows(mask, new, old)))

    def step_prepare(self, op, state):  # noqa: ARG002
        return state["r"]

    def step_update(self, op, state, vs, avs):
        r = state["r"]
        q = self.damped(op, state, vs, avs)
        dt = state["est"].dtype
        rq = rowwise(r, q).astype(dt)
        rr = rowwise(r, r).astype(dt)
        inv_s = 1.0 / state["scale"]
        x = row_axpy(jnp.full_like(rq, inv_s), r, state["x"])
        r_new = row_axpy(jnp.full_like(rq, -inv_s), q, r)
        rn = row_norms(r_new).astype(dt)
        active = ~state["stop"]
        neg = active & (rq <= 0) & (rr > 0)
        grow = active & ~neg & (rn > state["est"])
        go = active & ~neg & ~grow
        curv = jnp.where(active & (rr > 0), rq / jnp.where(rr > 0, rr, 1), jnp.inf)
        out = dict(
            state,
            x=where_rows(go, x, state["x"]),
            r=where_rows(go, r_new, r),
            est=jnp.where(go, rn, state["est"]),
            stop=state["stop"] | neg | grow | (go & (rn <= state["thresh"])),
            final=state["final"] | neg | grow,
            negcurv=state["negcurv"] | neg,
            mincurv=jnp.minimum(state["mincurv"], curv),
            iters=state["iters"] + go.astype(jnp.int32),
        )
        return with_worst(out)


def neumann_entries(block, scale, acc) -> dict:
    """The Neumann entries of a fresh state (``block``: zeros like ``b``)."""
    return dict(r=block, scale=jnp.asarray(scale, acc))
