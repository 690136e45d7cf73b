r"""Damped linear solves with curvature operators: :func:`solve` and :func:`inverse`.

:func:`solve` returns :math:`x \approx (A + \delta I)^{-1} b` for a symmetric operator :math:`A`
(a Hessian, GGN, Fisher, or any :class:`hvp.LinearOperator`), damping :math:`\delta \ge 0` and a
right-hand side :math:`b` shaped like the parameters (or a block of them), by conjugate gradients
(``"cg"``, PSD operators), MINRES (``"minres"``, symmetric indefinite) or a Neumann series
(``"neumann"``, LiSSA-style, PSD). Every method is a state machine run by
:func:`hvp.linalg._driver.run` (compiled inside ``jax.jit``, on the host with progress and
checkpoints otherwise), and every method ends with one more product to report the **true**
relative residual :math:`\|b - (A + \delta I) x\| / \|b\|` of the returned ``x``: ``converged``
is that residual meeting the tolerance, never a recursive estimate. The returned ``x`` is the
best verified iterate (never worse than ``x = 0``), and an unconverged solve warns outside
``jax.jit`` (:class:`hvp.ConvergenceWarning`). See ``docs/solve.md``.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp.linalg._cg import CG, cg_entries
from hvp.linalg._checks import (
    ConvergenceWarning,
    DtypePolicy,
    acc_dtype,
    check_finite_float,
    check_int,
    coerce_operator,
    dtype_policy,
    warn_not_converged,
)
from hvp.linalg._driver import Checkpoint, run
from hvp.linalg._lanczos import eigsh
from hvp.linalg._minres import MINRES, minres_entries
from hvp.linalg._neumann import SAFETY, Neumann, neumann_entries
from hvp.linalg._precond import as_preconditioner
from hvp.linalg._solvers import (
    RTOL64,
    Solver,
    default_rtol,
    initial_state,
    row_norms,
    where_rows,
)
from hvp.operators import LinearOperator, NonFiniteError
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = [
    "SOLVE_METHODS",
    "ConvergenceError",
    "InverseOperator",
    "SolveResult",
    "inverse",
    "resolve_solve_method",
    "solve",
]

SOLVE_METHODS = ("auto", "cg", "minres", "neumann")


@tu.result(static=("method", "damping", "rtol", "preconditioner", "dtype_policy"))
class SolveResult:
    r"""Result of :func:`solve`.

    For a block of right-hand sides (``block=True``) every per-system field has a leading axis
    of ``m`` (one entry per system); otherwise they are scalars.

    Attributes:
      x: the solution, a pytree like ``b`` in the parameters' dtype: the **best verified
        iterate**, the one with the smallest true residual among the start (``x = 0``, or ``x0``
        when its residual is smaller) and the iterates checked with a true-residual product (the
        last one, or for CG the one with the smallest recursive residual, and those before each
        restart). So its residual is never above :math:`\|b\|`: a failed solve returns
        ``x = 0`` rather than something worse.
      relative_residual: the true :math:`\|b - (A + \delta I) x\| / \|b\|` of the returned ``x``
        (from the product that checked it, one after the last iteration; ``1`` for the fallback
        ``x = 0``, no product; ``0`` for ``b = 0, x = 0``), accumulation dtype.
      converged: ``relative_residual <= max(rtol, atol / ||b||)`` on that true residual.
      x_iter: the iteration the returned ``x`` comes from (``0``: the start, ``x = 0`` or
        ``x0``; below ``num_iters``: the safeguard returned an earlier iterate than the last).
      stagnated: not converged because the true residual stagnated at the round-off floor of the
        dtype on this system: the method's recursive residual met ``rtol`` (or it stopped on its
        own precision test) but the true residual did not, and a restart from the true residual
        no longer cut it by half. ``rtol`` is then below what the dtype reaches here:
        ``relative_residual`` is about the best ``x`` the dtype gives (loosen ``rtol``, or use
        float64 parameters).
      num_matvecs: products of ``A`` used, all systems and the preconditioner's construction
        included (a Python int outside ``jax.jit``).
      num_iters: iterations of the method per system (a Python int for one system outside jit).
      negative_curvature: a direction ``d`` with :math:`d^\top (A + \delta I) d \le 0` was met
        (CG: a search direction, then the system stops; MINRES: a Lanczos vector, MINRES goes on;
        Neumann: a residual).
      min_curvature: the smallest Rayleigh quotient :math:`d^\top (A + \delta I) d / d^\top d`
        over those directions (``inf`` when no iteration ran).
      method: ``"cg"``, ``"minres"`` or ``"neumann"`` (the method used, after ``"auto"``).
      damping: :math:`\delta`.
      rtol: the relative tolerance used (:func:`hvp.linalg.default_rtol` for ``rtol=None``).
      preconditioner: ``None``, ``"diagonal"``, ``"deflation"`` or ``"operator"``.
      dtype_policy: products in the parameters' dtype, the recurrences in ``accumulate``.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> r = hvp.solve(hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0]))), jnp.ones(2), method="cg")
      >>> r.x.tolist(), bool(r.converged), r.num_iters, r.num_matvecs
      ([1.0, 0.5], True, 2, 3)
    """

    x: PyTree
    relative_residual: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array
    num_iters: jax.Array
    negative_curvature: jax.Array
    min_curvature: jax.Array
    stagnated: jax.Array
    x_iter: jax.Array
    method: str = "cg"
    damping: float = 0.0
    rtol: float = 1e-6
    preconditioner: str | None = None
    dtype_policy: DtypePolicy | None = None


def resolve_solve_method(method: str, op) -> str:
    """``method`` with ``"auto"`` resolved: ``"cg"`` for an operator marked PSD, else ``"minres"``.

    An operator is PSD when its ``psd`` attribute is true (GGN, empirical Fisher and their
    damped sums; a Hessian is only symmetric).

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> hvp.linalg.resolve_solve_method("auto", hvp.from_dense(jnp.eye(2)))
      'minres'
    """
    if method not in SOLVE_METHODS:
        raise ValueError(f"`method` must be one of {SOLVE_METHODS}, got {method!r}.")
    if method == "auto":
        return "cg" if bool(getattr(op, "psd", False)) else "minres"
    return method


def _default_budget(n: int) -> int:
    return int(min(10 * n + 2, 2**31 - 1))


def _neumann_scale(op, damping: float, scale, key) -> tuple:
    """The Neumann scale ``s`` and the products spent finding it (checks positive definiteness)."""
    if scale is not None:
        return check_finite_float("scale", scale, positive=True), 0
    if key is None:
        raise TypeError(
            "method='neumann' with scale=None estimates the scale from hvp.eigsh: pass "
            "`key=jax.random.key(seed)` (or `scale=`, above half the largest eigenvalue of A + "
            "damping I)."
        )
    if op.size == 1:
        lam = jnp.ravel(tu.ravel(op.mv(tu.ones_like(op.like))))
        lo = hi = float(lam[0])
        spent = 1
    else:
        res = eigsh(op, 1, key=key, which="both", tol=1e-3)
        lo, hi = (float(v) for v in res.eigenvalues)
        spent = int(res.num_matvecs)
    if lo + damping <= 0:
        raise ValueError(
            f"method='neumann' needs A + damping I positive definite, but hvp.eigsh finds the "
            f"eigenvalue {lo:.4g} + damping {damping:.4g} <= 0 on {op.label}: the series diverges. "
            "Use method='minres' (symmetric indefinite), or a damping above "
            f"{max(-lo, 0.0):.4g}."
        )
    return SAFETY * (hi + damping), spent


def _as_block(b, like, block: bool, name: str):
    if block:
        try:
            tu.assert_same_structure(
                b, like, name=name, like_name="op.like", check_dtype=False, leading=1
            )
        except ValueError as err:
            raise ValueError(
                f"With block=True, `{name}` must be a block of right-hand sides: a pytree like the "
                f"operator's parameters with a leading axis on every leaf. {err}"
            ) from None
        m = tu.leading_dim(b)
        if m < 1:
            raise ValueError(f"`{name}` is an empty block (leading axis 0).")
        return b, m
    try:
        tu.assert_same_structure(b, like, name=name, like_name="op.like", check_dtype=False)
    except ValueError as err:
        hint = ""
        try:
            tu.assert_same_structure(b, like, name=name, check_dtype=False, leading=1)
            hint = (
                " It has a leading axis on every leaf: pass block=True to solve one system per row."
            )
        except ValueError:
            pass
        raise ValueError(
            f"`{name}` must be shaped like the operator's parameters. {err}{hint}"
        ) from None
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], b), 1


def solve(
    op: OperatorLike,
    b: PyTree,
    *,
    method: str = "auto",
    damping: float = 0.0,
    preconditioner=None,
    x0: PyTree | None = None,
    rtol: float | None = None,
    atol: float = 0.0,
    max_matvecs: int | None = None,
    block: bool = False,
    key: PRNGKey | None = None,
    scale: float | None = None,
    driver: str = "auto",
    progress: bool | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
) -> SolveResult:
    r"""Solve :math:`(A + \delta I)\, x = b` with products of :math:`A` only.

    Methods (see ``docs/solve.md`` for when to use which):

    * ``"cg"``: preconditioned conjugate gradients (Hestenes & Stiefel 1952) for a positive
      (semi-)definite :math:`A + \delta I`. A search direction with
      :math:`p^\top (A + \delta I) p \le 0` stops the system with ``negative_curvature=True``
      and ``converged=False`` (no silent wrong ``x`` on an indefinite operator).
    * ``"minres"``: MINRES (Paige & Saunders 1975), step for step as SciPy's
      ``scipy.sparse.linalg.minres``, for symmetric indefinite operators (a raw Hessian away from
      a minimum); minimises :math:`\|b - (A + \delta I) x\|` over the Krylov space, reports
      negative curvature along its Lanczos vectors. Preconditioner: SPD.
    * ``"neumann"``: the Neumann series / LiSSA (Agarwal, Bullins & Hazan 2017)
      :math:`x = \frac1s \sum_k (I - (A + \delta I)/s)^k b`, one product per term, for a positive
      definite :math:`A + \delta I` with eigenvalues below :math:`2s`. ``scale=None`` takes
      :math:`s = 1.1\,(\lambda_{\max} + \delta)` from :func:`hvp.eigsh` (``key`` needed).
    * ``"auto"``: ``"cg"`` when the operator is marked positive semi-definite
      (``op.psd``, e.g. a GGN, also when damped), else ``"minres"``.

    Args:
      op: a symmetric :class:`hvp.LinearOperator` (or a matvec callable; ``b`` then gives the
        vectors' structure).
      b: the right-hand side, a pytree like the parameters; with ``block=True`` a block of ``m``
        right-hand sides (a leading axis on every leaf), all solved together with one block
        product (:meth:`~hvp.LinearOperator.matmat`, one pass over the data) per iteration.
      method: ``"auto"``, ``"cg"``, ``"minres"`` or ``"neumann"``.
      damping: :math:`\delta \ge 0` (Levenberg-Marquardt / Tikhonov damping).
      preconditioner: ``None``; ``"diagonal"`` or ``"deflation"`` (built here from ``key``:
        the Hutchinson diagonal with 100 probes, or the top-10 eigenpairs of :func:`hvp.eigsh`);
        a :class:`hvp.linalg.Preconditioner` (build once, reuse); or your own
        :math:`P^{-1}` as an :class:`hvp.LinearOperator` or callable. CG and MINRES only.
      x0: start vector (pytree like ``b``); costs one product. ``None``: zero. A system with
        ``b = 0`` returns ``x = 0``.
      rtol: relative tolerance: converged when :math:`\|b - (A+\delta I)x\| \le
        \max(\mathrm{rtol}\,\|b\|, \mathrm{atol})` (per system, on the true residual).
        ``None``: :func:`hvp.linalg.default_rtol` of the parameters' dtype,
        :math:`\max(10^{-6}, \sqrt{\varepsilon})` (``1e-6`` float64, ``3.45e-4`` float32). An
        ``rtol`` below what the dtype reaches on the system ends ``stagnated`` (see
        :class:`SolveResult`) with a :class:`hvp.ConvergenceWarning` (outside ``jax.jit``).
      atol: absolute tolerance (see ``rtol``).
      max_matvecs: the most products per right-hand side, the start product (with ``x0``) and the
        final true-residual product included (so at most ``max_matvecs - 1`` iterations, one
        fewer with ``x0``); ``None``: ``10 n + 2``. When the recursive residual meets the
        tolerance but the true one does not (round-off drift), the system restarts from the
        true residual (at most 3 times, within this budget).
      block: ``b`` (and ``x0``) is a block of right-hand sides; the result's per-system fields
        then have a leading axis. Never guessed from the shapes.
      key: PRNG key for a ``"diagonal"``/``"deflation"`` preconditioner built here, or the
        Neumann scale's :func:`hvp.eigsh`.
      scale: Neumann only: the scale :math:`s` (``> 0``); ``None`` estimates it.
      driver: ``"auto"`` (compiled inside ``jax.jit``, host otherwise), ``"compiled"`` or
        ``"host"``; the same numbers.
      progress: host driver: show products and the worst relative residual estimate.
      checkpoint: host driver: a path or :class:`hvp.linalg.Checkpoint` to save the state to and
        resume from, bit for bit.

    Returns:
      :class:`SolveResult` (``x`` in the parameters' dtypes; ``num_matvecs`` and, for one system,
      ``num_iters`` Python ints outside ``jax.jit``).

    Raises:
      ValueError: an unknown method or preconditioner, ``b``/``x0`` not shaped like the
        parameters, negative or non-finite ``damping``/``rtol``/``atol``, ``max_matvecs`` below 1
        (2 with ``x0``), a preconditioner with ``"neumann"``, a Neumann operator that is not
        positive definite (``eigsh`` finds :math:`\lambda_{\min} + \delta \le 0`).
      TypeError: ``key`` missing where a preconditioner or a Neumann scale is estimated.
      NonFiniteError: the operator produced NaN or Inf (outside ``jax.jit``; under jit ``x`` is
        NaN).

    Warns:
      ConvergenceWarning: (:class:`hvp.ConvergenceWarning`, a ``RuntimeWarning``; outside
        ``jax.jit`` only, where ``converged`` says it) a system did not converge: the message
        gives the residual reached against ``rtol``, the products used, why it stopped
        (stagnation at the round-off floor of the dtype, negative curvature, the budget) and
        what can help (more ``max_matvecs``, damping for a singular or indefinite operator,
        float32 parameters instead of bfloat16/float16, a preconditioner), and says when the
        safeguard returned an earlier iterate or ``x = 0``.

    Cost of the safeguard: no product (the start's residual is :math:`\|b\|` or the start
    product of ``x0``; every other candidate is checked by the products counted above); one more
    vector per system (two for CG).

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> A = hvp.from_dense(jnp.array([[2.0, 1.0], [1.0, -1.0]]))  # indefinite
      >>> r = hvp.solve(A, jnp.array([1.0, 0.0]), method="minres")
      >>> r.x.round(6).tolist(), bool(r.converged), bool(r.negative_curvature)
      ([0.333333, 0.333333], True, True)
      >>> r = hvp.solve(A, jnp.array([1.0, 0.0]), method="cg")  # CG meets p^T A p < 0: stops
      >>> bool(r.negative_curvature), bool(r.converged)
      (True, False)
    """
    b_like = b
    if not isinstance(op, LinearOperator) and block:
        b_like = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[0], b)
    op = coerce_operator(
        op, None if isinstance(op, LinearOperator) else tu.zeros_like(b_like), what="solution"
    )
    method = resolve_solve_method(method, op)
    damping = check_finite_float("damping", damping)
    rtol = default_rtol(op.like) if rtol is None else check_finite_float("rtol", rtol)
    atol = check_finite_float("atol", atol)
    if not isinstance(block, bool):
        raise TypeError(f"`block` must be True or False, got {block!r}.")
    B, m = _as_block(b, op.like, block, "b")
    min_budget = 1 if x0 is None else 2
    if max_matvecs is None:
        max_matvecs = _default_budget(op.size)
    max_matvecs = check_int(
        "max_matvecs",
        max_matvecs,
        minimum=min_budget,
        hint="It counts products per right-hand side, the final true-residual product (and the "
        "start product of x0) included.",
    )
    if scale is not None and method != "neumann":
        raise ValueError(f"`scale` is a setting of method='neumann', not of method={method!r}.")
    if method == "neumann" and preconditioner is not None:
        raise ValueError(
            "method='neumann' takes no preconditioner; use method='cg' (positive definite) or "
            "'minres' with it."
        )
    pre = as_preconditioner(preconditioner, op, key=key)
    acc = acc_dtype(op.like)
    B = tu.stacked_like(tu.cast(B, acc), op.like)
    if x0 is None:
        X = tu.stacked_like(jax.tree_util.tree_map(jnp.zeros_like, B), op.like)
    else:
        X, mx = _as_block(x0, op.like, block, "x0")
        if mx != m:
            raise ValueError(f"`x0` has {mx} rows but `b` has {m}: give one start per system.")
        X = tu.stacked_like(tu.cast(X, acc), op.like)
    bnorm = row_norms(B)
    X = where_rows(bnorm > 0, X, jax.tree_util.tree_map(jnp.zeros_like, X))  # b = 0: x = 0
    thresh = jnp.maximum(rtol * bnorm, atol).astype(acc)
    built = 0 if pre is None else int(pre.num_matvecs)
    alg: Solver
    if method == "cg":
        alg = CG(m=m, preconditioned=pre is not None)
        extra = cg_entries(jax.tree_util.tree_map(jnp.zeros_like, B), m, acc)
    elif method == "minres":
        alg = MINRES(m=m, preconditioned=pre is not None)
        # SciPy's least-squares stop ||A r|| <= rtol ||A|| ||r|| holds on every regular system once
        # rtol >= 1/cond(A): at the loose defaults of low precision it would end a regular solve
        # at step 1, so it is capped at the float64 default
        lsq_rtol = min(rtol, RTOL64)
        extra = minres_entries(jax.tree_util.tree_map(jnp.zeros_like, B), m, acc, lsq_rtol)
    else:
        s, spent = _neumann_scale(op, damping, scale, key)
        built += spent
        alg = Neumann(m=m)
        extra = neumann_entries(jax.tree_util.tree_map(jnp.zeros_like, B), s, acc)
    state = initial_state(
        b=B,
        x=X,
        bnorm=bnorm,
        thresh=thresh,
        damping=damping,
        max_steps=max_matvecs,
        pre=pre,
        like=op.like,
        extra=extra,
    )
    if x0 is None:  # r = b: initialise the recurrence now (phase 0 is the product of x0)
        state = alg.init_rows(op, state, B, jnp.ones((m,), bool))
        state["phase"] = alg._after_init(state)
    out, chosen = run(
        alg,
        op,
        state,
        driver=driver,
        progress=progress,
        checkpoint=checkpoint,
        traced=(key,),
        consume=True,
    )
    x, rel, conv, iters, neg, mincurv, nmv, finite, stag, xit, fallback = out
    nmv = nmv + built
    if not tu.is_traced(finite) and not bool(finite):
        raise NonFiniteError(
            f"hvp.solve (method={method!r}) on {op.label} produced NaN or Inf: its products "
            "returned non-finite values (with float16 parameters, values above 65504 overflow). "
            "Find the leaf with `hvp.tree.nonfinite_leaves(op @ v)`, check the parameters, the "
            "data and the loss, or run in float32."
        )
    if chosen == "host" or not tu.is_traced(nmv):
        nmv = int(nmv)
    if not tu.is_traced(conv, rel, stag, iters, xit) and not np.asarray(conv).all():
        _warn_not_converged(
            op, method, rtol, damping, max_matvecs, nmv,
            *(np.asarray(a) for a in (rel, conv, stag, neg, mincurv, iters, xit, fallback)),
        )  # fmt: skip
    if not block:
        x = jax.tree_util.tree_map(lambda v: v[0], x)
        rel, conv, iters, neg, mincurv, stag, xit = (
            a[0] for a in (rel, conv, iters, neg, mincurv, stag, xit)
        )
        if not tu.is_traced(iters, xit):
            iters, xit = int(iters), int(xit)
    return SolveResult(
        x=x,
        relative_residual=rel,
        converged=conv,
        num_matvecs=nmv,
        num_iters=iters,
        negative_curvature=neg,
        min_curvature=mincurv,
        stagnated=stag,
        x_iter=xit,
        method=method,
        damping=damping,
        rtol=rtol,
        preconditioner=None if pre is None else pre.kind,
        dtype_policy=dtype_policy(op.like),
    )


def _warn_not_converged(
    op, method, rtol, damping, max_matvecs, nmv, rel, conv, stag, neg, mincurv, iters, xit, fallback
) -> None:
    """The :class:`hvp.ConvergenceWarning` of an unconverged solve (concrete values only)."""
    policy = dtype_policy(op.like)
    bad = ~conv
    rels = rel[bad]
    m = len(conv)
    which = f"{int(bad.sum())} of {m} systems" if m > 1 else "the system"
    head = (
        f"hvp.solve (method={method!r}, damping={damping:g}) on {op.label}: {which} did not "
        f"converge: true relative residual {float(np.min(rels)):.3g}"
        + (f" (worst {float(np.max(rels)):.3g})" if len(rels) > 1 else "")
        + f" > rtol={rtol:g} after {nmv} products."
    )
    why, helps = [], []
    if stag[bad].any():
        why.append(
            f"stagnated at the round-off floor of {policy.compute} products on this system "
            "(the recursive residual met rtol or reached the precision limit, the true one did "
            "not, and restarting from it no longer helped): the returned x is about as accurate "
            f"as {policy.compute} allows"
        )
        helps.append(
            f"pass rtol >= {float(np.max(rels)):.2g} (or rtol=None: "
            f"{default_rtol(op.like):.3g} for {policy.compute})"
        )
        helps.append("add damping (the floor grows with the condition number)")
    negs = neg[bad] & (method != "minres")
    if negs.any():
        lo = float(np.min(mincurv[bad]))
        why.append(
            f"met negative curvature (a direction d with d^T (A + damping I) d / d^T d = {lo:.3g}"
            f" <= 0): A + damping I is not positive definite, which {method!r} needs"
        )
        helps.append(
            "use method='minres' (symmetric indefinite), or a damping of at least "
            f"{max(-lo, 0.0) + damping:.3g} (this direction's curvature is only an upper bound "
            "on the smallest eigenvalue: `hvp.eigsh(op, 1, which='smallest')` gives the damping "
            "that makes A + damping I positive definite)"
        )
    if not stag[bad].any() and not negs.all():
        why.append(
            f"stopped at the budget (max_matvecs={max_matvecs} products per system)"
            + (" or on a growing residual (`scale` too small)" if method == "neumann" else "")
        )
        helps.append("raise `max_matvecs`")
        helps.append(
            "add damping (a singular or indefinite operator converges slowly, or only to a "
            "least-squares residual)"
        )
        if method != "neumann":
            helps.append("add a preconditioner (`preconditioner=`)")
    if policy.compute in ("bfloat16", "float16"):
        helps.append(
            f"use float32 parameters (products in {policy.compute} carry a relative error near "
            f"{float(jnp.finfo(jnp.dtype(policy.compute)).eps):.1g}, which bounds the residual "
            "reachable)"
        )
    safe = ((xit < iters) | fallback) & bad
    note = ""
    if safe.any():
        zero = bool((xit[safe] == 0).all())
        note = (
            " The last iterate's true residual was worse, so the best-iterate safeguard "
            + (
                "returned the start (x = 0, or x0 where it was better)"
                if zero
                else "returned an earlier iterate (`result.x_iter`)"
            )
            + "."
        )
    warn_not_converged(
        head
        + " It "
        + "; it ".join(why)
        + "."
        + note
        + " What can help: "
        + "; ".join(dict.fromkeys(helps))
        + ". `result.converged` (and `result.stagnated`) mark these systems; inside jax.jit "
        "there is no warning.",
        stacklevel=4,
    )


class ConvergenceError(RuntimeError):
    """A solve inside :func:`inverse`'s product did not meet its tolerance (concrete values).

    Examples:
      >>> from hvp.linalg import ConvergenceError
      >>> issubclass(ConvergenceError, RuntimeError)
      True
    """


class InverseOperator(LinearOperator):
    r"""The operator :math:`v \mapsto (A + \delta I)^{-1} v`, each product a :func:`solve`.

    Built by :func:`inverse`. On concrete vectors :meth:`mv` and :meth:`matmat` run
    :func:`solve` (a block of vectors is one block solve) and raise :class:`ConvergenceError`
    when a solve misses its tolerance; under ``jax.jit`` the solve is inlined (compiled driver)
    and an unconverged product is NaN, never a silently wrong vector.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> inv = hvp.linalg.inverse(hvp.from_dense(jnp.diag(jnp.array([2.0, 4.0]))), damping=0.0, method="cg")
      >>> (inv @ jnp.ones(2)).tolist()
      [0.5, 0.25]
    """

    def __init__(self, op, *, damping, method, rtol, atol, max_matvecs, preconditioner, name):
        self.op = op
        self.like = op.like
        self.damping = damping
        self.method = method
        self.rtol = rtol
        self.atol = atol
        self.max_matvecs = max_matvecs
        self.preconditioner = preconditioner
        self.name = name
        self.check_finite = False
        self.block = "vmap"

    @property
    def psd(self) -> bool:  # type: ignore[override]
        """The inverse of a PSD operator plus a damping ``>= 0`` is PSD (``op.psd``)."""
        return bool(getattr(self.op, "psd", False)) and float(self.damping) >= 0.0

    def _settings(self, **kw):
        return dict(
            method=self.method,
            damping=self.damping,
            rtol=self.rtol,
            atol=self.atol,
            max_matvecs=self.max_matvecs,
            preconditioner=self.preconditioner,
            **kw,
        )

    def _apply(self, v):
        with warnings.catch_warnings():  # an unconverged product is NaN here
            warnings.simplefilter("ignore", ConvergenceWarning)
            r = solve(self.op, v, **self._settings(driver="compiled"))
        return jax.tree_util.tree_map(lambda x: jnp.where(r.converged, x, jnp.nan), r.x)

    def _children(self):
        return (self.op, self.preconditioner)

    def _static(self):
        return (self.damping, self.method, self.rtol, self.atol, self.max_matvecs, self.name)

    @classmethod
    def _rebuild(cls, static, children):
        out = object.__new__(cls)
        out.op, out.preconditioner = children
        out.damping, out.method, out.rtol, out.atol, out.max_matvecs, out.name = static
        out.like = out.op.like
        out.check_finite = False
        out.block = "vmap"
        return out

    def _checked(self, r, what: str):
        ok = np.asarray(r.converged)
        if not ok.all():
            worst = float(np.max(np.asarray(r.relative_residual)))
            raise ConvergenceError(
                f"A solve inside the {what} of {self.label} did not converge: true relative "
                f"residual {worst:.3g} > rtol {self.rtol:g} (method={r.method!r}, damping "
                f"{self.damping:g}, {r.num_matvecs} products"
                + (", negative curvature met" if np.asarray(r.negative_curvature).any() else "")
                + (
                    ", stagnated at the round-off floor of the dtype: rtol is out of its reach"
                    if np.asarray(r.stagnated).any()
                    else ""
                )
                + "). Raise `max_matvecs`, the damping or `rtol`, add a preconditioner, or use "
                "method='minres' for an indefinite operator."
            )
        return r.x

    def mv(self, v):  # noqa: D102 - see the class docstring
        if self._traced(v):
            return super().mv(v)
        self._check_vectors(v, "v", leading=0)
        with warnings.catch_warnings():  # an unconverged product raises ConvergenceError
            warnings.simplefilter("ignore", ConvergenceWarning)
            r = solve(self.op, v, **self._settings())
        return self._checked(r, "product")

    def matmat(self, vs):  # noqa: D102 - see the class docstring
        if self._traced(vs):
            return super().matmat(vs)
        self._check_vectors(vs, "vs", leading=1)
        with warnings.catch_warnings():  # an unconverged product raises ConvergenceError
            warnings.simplefilter("ignore", ConvergenceWarning)
            r = solve(self.op, vs, block=True, **self._settings())
        return self._checked(r, "block product")


def inverse(
    op: OperatorLike,
    *,
    damping: float,
    method: str = "auto",
    rtol: float | None = None,
    atol: float = 0.0,
    max_matvecs: int | None = None,
    preconditioner=None,
) -> InverseOperator:
    r"""The operator :math:`(A + \delta I)^{-1}`, whose every product is a :func:`solve`.

    Use it wherever an operator is accepted: :func:`hvp.eigsh` of the inverse (the smallest
    eigenvalues of :math:`A + \delta I` as the largest of the inverse), :func:`hvp.trace` of the
    inverse, or inverse-curvature products for influence functions
    (:math:`-\nabla L_{\text{test}}^\top (H + \delta I)^{-1} \nabla L_i`, Koh & Liang 2017).
    Each product costs a full solve; a block product is one block solve. The solves use
    ``method``, ``rtol``, ``atol``, ``max_matvecs`` and ``preconditioner`` as in :func:`solve`
    (a built :class:`hvp.linalg.Preconditioner`, an operator or a callable; not a string);
    ``rtol=None`` is :func:`hvp.linalg.default_rtol` of the operator's dtype (``1e-6`` float64,
    ``3.45e-4`` float32), fixed here (``inv.rtol``).

    Raises:
      ValueError: as :func:`solve`; at construction for bad settings.
      ConvergenceError: (when a product is computed on concrete values) a solve missed its
        tolerance. Under ``jax.jit`` such a product is NaN instead.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> A = hvp.from_dense(jnp.diag(jnp.array([1.0, 3.0])))
      >>> inv = hvp.linalg.inverse(A, damping=1.0, method="cg")
      >>> (inv @ jnp.array([2.0, 4.0])).tolist()
      [1.0, 1.0]
    """
    op = coerce_operator(op, what="inverse")
    method = resolve_solve_method(method, op)
    if method == "neumann":
        raise ValueError(
            "hvp.linalg.inverse supports method='cg', 'minres' or 'auto' (the Neumann scale would "
            "be estimated again at every product); call hvp.solve(..., method='neumann', "
            "scale=...) directly."
        )
    damping = check_finite_float("damping", damping)
    rtol = default_rtol(op.like) if rtol is None else check_finite_float("rtol", rtol)
    atol = check_finite_float("atol", atol)
    if max_matvecs is not None:
        max_matvecs = check_int("max_matvecs", max_matvecs, minimum=1)
    if isinstance(preconditioner, str):
        raise TypeError(
            f"hvp.linalg.inverse takes a built preconditioner: pass "
            f"hvp.linalg.Preconditioner.from_{'diagonal' if preconditioner == 'diagonal' else 'eigsh'}"
            "(op, key=...) instead of the string (it is built once and reused by every product)."
        )
    pre = as_preconditioner(preconditioner, op, key=None)
    return InverseOperator(
        op,
        damping=damping,
        method=method,
        rtol=rtol,
        atol=atol,
        max_matvecs=max_matvecs,
        preconditioner=pre,
        name=f"inverse {op.name}",
    )
