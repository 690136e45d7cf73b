r"""MINRES (Paige & Saunders, 1975) for symmetric, possibly indefinite, damped systems.

MINRES builds the Lanczos basis of :math:`(A + \delta I)` started at :math:`b` (with a symmetric
positive definite preconditioner :math:`P^{-1}`, the Lanczos process in the :math:`P`-inner
product) and at step :math:`k` returns the iterate of the Krylov space
:math:`\mathcal K_k` that minimises :math:`\|b - (A + \delta I) x\|` (the :math:`P`-norm with a
preconditioner), through a QR factorisation of the tridiagonal Lanczos matrix updated by Givens
rotations. Unlike CG it needs no definiteness: it is the Krylov method for a raw Hessian away from
a minimum. It can still stall on a singular inconsistent system (then it returns a least-squares
solution, flagged not converged).

The recurrences follow SciPy's ``scipy/sparse/linalg/_isolve/minres.py`` (itself a translation of
Paige & Saunders' Fortran MINRES) step for step, with ``shift = -damping``, so that the iterates
match SciPy's to round-off (tested); every scalar is an ``(m,)`` array (one per right-hand side)
and every vector a block of ``m`` rows. SciPy's stopping tests are kept as reasons to stop
iterating (``1 + ||r||/(||A|| ||x||) <= 1``, the least-squares test ``||A r|| / (||A|| ||r||) <=
rtol``, ``cond(A) >= 0.1/eps``, ``||A|| ||x|| eps >= beta1``, the exhausted Krylov space at step
one); the recursive residual :math:`\bar\phi_k` meeting the tolerance is the usual one. Whatever the
reason, the answer is judged on the true residual afterwards.

**Products in lower precision than the recurrence** (bfloat16/float16 parameters: products in
that dtype, the recurrence in float32). SciPy's precision tests use the machine epsilon of its one
working dtype; here the products' epsilon :math:`\varepsilon_p` is far larger (``7.8e-3`` for
bfloat16 against ``1.2e-7``), and the true residual drifts from :math:`\bar\phi_k` by about
:math:`\varepsilon_p \|A\| \|x_k\|` (Greenbaum 1997; Sleijpen, van der Vorst & Fokkema 2000).
On a singular or nearly singular system :math:`\|x_k\|` keeps growing along the near-null
directions while :math:`\bar\phi_k` keeps falling, so the true residual turns and grows,
above :math:`\|b\|` in the end (measured on the tanh MLP's undamped bfloat16 Hessian: the true
residual is smallest, ``0.56 ||b||``, near step 340, and ``1.8 ||b||`` after the default budget of
3,341 steps, while :math:`\bar\phi` reads ``0.20 ||b||``). So the run also stops, flagged
``limited`` (and ``stagnated`` when not converged), once
:math:`\varepsilon_p\, \gamma_{\max}\, \|x_k\| \ge \beta_1` (SciPy's
``anorm * ynorm * eps >= beta1`` with the products' epsilon and :math:`\gamma_{\max} \le
\|A + \delta I\|`, the largest diagonal entry of the QR factor, for ``anorm``, which SciPy's
``tnorm2`` overestimates by :math:`\beta_1`): the products' round-off alone then reaches
:math:`\|b\|`. The test runs only when the products' dtype is less precise than the recurrence's.

**Negative curvature** is reported along the Lanczos vectors :math:`v_k`: the diagonal entry
:math:`\alpha_k = v_k^\top (A + \delta I) v_k \le 0` proves that the operator is not positive
definite (MINRES does not stop for it: it solves indefinite systems), and ``min_curvature`` is the
smallest :math:`\alpha_k / v_k^\top v_k`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from hvp.linalg._blocks import rowwise
from hvp.linalg._solvers import Solver, row_axpy, row_norms, row_scale, where_rows, with_worst

__all__ = ["MINRES", "minres_entries"]

_SCALARS = (
    "beta",
    "oldb",
    "beta1",
    "dbar",
    "epsln",
    "phibar",
    "tnorm2",
    "gmax",
    "gmin",
    "cs",
    "sn",
    "pscale",
)


@dataclasses.dataclass(frozen=True)
class MINRES(Solver):
    """MINRES as a :class:`~hvp.linalg._solvers.Solver` (SciPy's recurrence, per row)."""

    name: ClassVar[str] = "minres"

    def init_rows(self, op, state, r, mask):  # noqa: ARG002
        dt = state["beta"].dtype
        y = self.precond(state, r)
        b1sq = rowwise(r, y).astype(dt)
        bad = b1sq < 0  # an indefinite preconditioner
        beta1 = jnp.sqrt(jnp.maximum(b1sq, 0))
        rn = row_norms(r).astype(dt)
        zeros = jnp.zeros_like(beta1)
        new = dict(
            r1=r,
            r2=r,
            y=y,
            w=jax.tree_util.tree_map(jnp.zeros_like, r),
            w2=jax.tree_util.tree_map(jnp.zeros_like, r),
            beta=beta1,
            oldb=zeros,
            beta1=beta1,
            dbar=zeros,
            epsln=zeros,
            phibar=beta1,
            tnorm2=zeros,
            gmax=zeros,
            gmin=jnp.full_like(beta1, jnp.finfo(dt).max),
            cs=-jnp.ones_like(beta1),
            sn=zeros,
            pscale=jnp.where(beta1 > 0, rn / jnp.where(beta1 > 0, beta1, 1), 1),
            itn=jnp.zeros_like(state["itn"]),
            stop=(rn <= state["thresh"]) | bad | (beta1 == 0),
            final=bad,
            est=rn,
        )
        old = {k: state[k] for k in new}
        return with_worst(dict(state, **where_rows(mask, new, old)))

    def step_prepare(self, op, state):  # noqa: ARG002
        beta = state["beta"]
        s = jnp.where(beta > 0, 1.0 / jnp.where(beta > 0, beta, 1), 0)
        return row_scale(s, state["y"])

    def step_update(self, op, state, vs, avs):
        dt = state["beta"].dtype
        eps = jnp.finfo(dt).eps
        eps_p = max(
            float(jnp.finfo(jnp.result_type(a)).eps) for a in jax.tree_util.tree_leaves(op.like)
        )
        v = vs
        itn = state["itn"] + 1
        beta, oldb, beta1 = state["beta"], state["oldb"], state["beta1"]
        y = self.damped(op, state, vs, avs)  # y = A v - shift v, shift = -damping
        c1 = jnp.where((itn >= 2) & (oldb > 0), beta / jnp.where(oldb > 0, oldb, 1), 0)
        y = row_axpy(-c1, state["r1"], y)
        alfa = rowwise(v, y).astype(dt)
        y = row_axpy(-jnp.where(beta > 0, alfa / jnp.where(beta > 0, beta, 1), 0), state["r2"], y)
        r1 = state["r2"]
        r2 = y
        y = self.precond(state, r2)
        oldb = beta
        bsq = rowwise(r2, y).astype(dt)
        bad = bsq < 0
        beta = jnp.sqrt(jnp.maximum(bsq, 0))
        tnorm2 = state["tnorm2"] + alfa**2 + oldb**2 + beta**2
        exhausted = (itn == 1) & (beta <= 10 * eps * beta1)  # SciPy's istop = -1
        cs, sn, dbar, phibar = state["cs"], state["sn"], state["dbar"], state["phibar"]
        oldeps = state["epsln"]
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        root = jnp.hypot(gbar, dbar)
        gamma = jnp.maximum(jnp.hypot(gbar, beta), eps)
        cs = gbar / gamma
        sn = beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1 = state["w2"]
        w2 = state["w"]
        w = row_scale(1.0 / gamma, row_axpy(-delta, w2, row_axpy(-oldeps, w1, v)))
        x = row_axpy(phi, w, state["x"])
        gmax = jnp.maximum(state["gmax"], gamma)
        gmin = jnp.minimum(state["gmin"], gamma)
        anorm = jnp.sqrt(tnorm2)
        ynorm = row_norms(x).astype(dt)
        test1 = jnp.where(
            (ynorm == 0) | (anorm == 0),
            jnp.inf,
            phibar / jnp.where(anorm * ynorm > 0, anorm * ynorm, 1),
        )
        test2 = jnp.where(anorm == 0, jnp.inf, root / jnp.where(anorm > 0, anorm, 1))
        acond = gmax / gmin
        est = phibar * state["pscale"]
        small = (est <= state["thresh"]) | (1 + test1 <= 1) | exhausted
        # SciPy's precision tests: x is as good as the dtype allows (``limited``)
        limit = (1 + test2 <= 1) | (acond >= 0.1 / eps) | (anorm * ynorm * eps >= beta1)
        if eps_p > float(eps):  # products less precise than the recurrence: their round-off
            limit = limit | (gmax * ynorm * eps_p >= beta1)
        final = bad | limit | (test2 <= state["rtol"])
        active = ~state["stop"]
        vv = rowwise(v, v).astype(dt)
        curv = jnp.where(active & (vv > 0), alfa / jnp.where(vv > 0, vv, 1), jnp.inf)
        new = dict(
            x=x, r1=r1, r2=r2, y=y, w=w, w2=w2, beta=beta, oldb=oldb, dbar=dbar, epsln=epsln,
            phibar=phibar, tnorm2=tnorm2, gmax=gmax, gmin=gmin, cs=cs, sn=sn, itn=itn, est=est,
        )  # fmt: skip
        old = {k: state[k] for k in new}
        out = dict(state, **where_rows(active, new, old))
        out.update(
            stop=state["stop"] | (active & (small | final)),
            final=state["final"] | (active & final),
            limited=state["limited"] | (active & limit & ~bad),
            negcurv=state["negcurv"] | (active & (alfa <= 0)),
            mincurv=jnp.minimum(state["mincurv"], curv),
            iters=state["iters"] + active.astype(jnp.int32),
        )
        return with_worst(out)


def minres_entries(block, m: int, acc, rtol: float) -> dict:
    """The MINRES entries of a fresh state (``block``: zeros like ``b``; filled by ``init_rows``)."""
    out = {k: jnp.zeros((m,), acc) for k in _SCALARS}
    out.update(
        r1=block, r2=block, y=block, w=block, w2=block,
        itn=jnp.zeros((m,), jnp.int32), rtol=jnp.asarray(rtol, acc),
    )  # fmt: skip
    return out
