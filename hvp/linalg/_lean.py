r"""Memory-lean Lanczos for extreme eigenpairs: O(1) parameter-sized vectors (``basis="none"``).

:func:`hvp.eigsh` with its default ``basis="device"`` keeps the whole Lanczos basis,
``(num_iters + 1) * n`` numbers; for a billion-parameter model that is tens of GB. With
``basis="none"`` it runs the Lanczos three-term recurrence **without reorthogonalisation**
(Lanczos, 1950; Paige, 1971),

.. math::

    w = A v_j - \beta_{j-1} v_{j-1}, \quad \alpha_j = v_j^\top w, \quad
    w \leftarrow w - \alpha_j v_j, \quad \beta_j = \|w\|, \quad v_{j+1} = w / \beta_j,

(with one local reorthogonalisation of ``w`` against ``v_j``, whose coefficient is added to
:math:`\alpha_j`), keeping only ``v_{j-1}``, ``v_j``, the start vector and the tridiagonal
:math:`T_j` (two arrays of ``num_iters`` numbers).

Without reorthogonalisation the basis loses orthogonality as soon as a Ritz value converges
(Paige, 1971), and :math:`T_j` then has extra copies of converged eigenvalues and *spurious*
Ritz values. They are sorted out by the test of Cullum & Willoughby (*Lanczos Algorithms for
Large Symmetric Eigenvalue Computations*, vol. 1, 1985, ch. 4): numerically multiple
eigenvalues of :math:`T_j` are genuine (one copy is kept); a simple eigenvalue of :math:`T_j`
that is also an eigenvalue of :math:`\hat T_j` (:math:`T_j` without its first row and column) is
spurious and discarded. The rest are the "good" Ritz values. The iteration stops when the wanted
good Ritz values have Lanczos residual bounds :math:`|\beta_j s_{j,i}|` below their thresholds
(tested every 4 steps: two ``num_iters``-sized ``eigh``),
on breakdown (an invariant Krylov space: every Ritz value is exact) or after ``num_iters``
steps.

A **second pass** then re-runs the same recurrence from the same start vector with the stored
:math:`\alpha, \beta` (no inner products) and assembles the Ritz vectors
:math:`y_i = \sum_j s_{j,i} v_j` of the wanted values on the fly (Cullum & Willoughby, 1985,
ch. 5; Golub & Van Loan, *Matrix Computations*, 4th ed., sec. 10.3). It costs the same number
of products again. Finally one block product of the ``k`` normalised Ritz vectors gives their
Rayleigh quotients (the returned eigenvalues) and true residuals; ``converged`` is the true
residual test.

Limits, stated honestly:

* **Multiplicities are not seen.** One Krylov sequence holds one direction per distinct
  eigenvalue, and the Cullum-Willoughby test merges copies: a repeated eigenvalue is returned
  once, the next entries are the next *distinct* eigenvalues (``result.multiplicities`` is
  ``"distinct"``). Use ``basis="device"`` when multiplicities matter.
* Fewer distinct eigenvalues than wanted in the Krylov space (a low-rank operator, ``k`` close to
  the number of distinct eigenvalues): the missing entries repeat the last one found and are not
  marked converged.
* No restarts: a pair that has not converged after ``num_iters`` steps is returned with
  ``converged=False`` and a warning.

Memory: ``(4 + 2k) n`` numbers of the accumulation dtype: ``v_{j-1}``, ``v_j``, the block
sent to the operator and its product, and the ``k`` Ritz vectors (whose first row keeps the
start vector during the first pass) with their ``k`` products in the final check; independent
of ``num_iters``. The operator's product needs its own working memory on top (for a network's
Hessian about 1.5-3.5 ``n`` measured, see ``benchmarks/results/cpu/lm_scale.md``). The
``num_iters x k`` eigenvector coefficients of :math:`T_j` and its eigen-decomposition
(``num_iters^2`` numbers) are small.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import eigh_tridiagonal

from hvp import tree as tu
from hvp.linalg._blocks import get_row, rowwise, to_like
from hvp.linalg._checks import acc_dtype, dtype_policy, warn_not_converged
from hvp.linalg._driver import Checkpoint, Progress, StateMachine, run
from hvp.linalg._lanczos import EigshResult, zero_floor
from hvp.operators import NonFiniteError

__all__ = ["LeanEigshResult", "lean_eigsh"]

#: Cullum-Willoughby tolerances (times ``eps_acc * ||T||``): eigenvalues of ``T_j`` closer than
#: ``_MULT`` are one (multiple) eigenvalue; a simple one closer than ``_SPUR`` to an eigenvalue of
#: ``T_j`` without its first row and column is spurious.
_MULT = 1e3
_SPUR = 16.0
#: ... and whose eigenvector's first component is below ``_FIRST * eps_acc``.
_FIRST = 100.0
#: the Ritz values are tested every ``_EVERY`` steps (two ``num_iters``-sized ``eigh``), and at
#: the last step and on breakdown.
_EVERY = 4
#: breakdown (invariant Krylov space) when ``beta <= _BREAK * eps_acc * ||A||``.
_BREAK = 32.0
#: residual floor ``max(_FLOOR * eps_acc, 4 eps) * ||A||`` (``eps``: the products' dtype).
_FLOOR = 64.0


@tu.result(static=("which", "dtype_policy", "basis", "multiplicities"))
class LeanEigshResult(EigshResult):
    """Result of :func:`hvp.eigsh` with ``basis="none"`` (the fields of :class:`EigshResult`).

    Attributes:
      basis: ``"none"``: no basis was kept.
      multiplicities: ``"distinct"``: each distinct eigenvalue is returned once (a single Krylov
        sequence without reorthogonalisation cannot see multiplicities).
      num_restarts: always 0 (the lean mode does not restart).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> A = hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0, 2.0, 5.0])))
      >>> r = hvp.eigsh(A, 2, basis="none", key=jax.random.key(0))
      >>> [round(float(x), 4) for x in r.eigenvalues], r.multiplicities
      ([2.0, 5.0], 'distinct')
    """

    basis: str = "none"
    multiplicities: str = "distinct"


def _tridiag_eigh(alpha, beta, j, m, first: int = 0, vectors: bool = True):
    """Eigenpairs of the leading active block of the tridiagonal ``T`` in a static ``m x m`` frame.

    Rows ``first..j-1`` are active (``first=1`` drops the first row and column: Cullum and
    Willoughby's :math:`\\hat T_j`). Inactive rows get a sentinel diagonal strictly above the
    spectrum, so the active eigenvalues are the lowest ones (ascending) and their vectors vanish
    on inactive rows.
    """
    idx = jnp.arange(m)
    active = (idx >= first) & (idx < j)
    a = jnp.where(active, alpha, 0.0)
    off = jnp.where(active[:-1] & active[1:], beta[:-1], 0.0)
    sentinel = 2.0 * (jnp.max(jnp.abs(a)) + 2.0 * jnp.max(jnp.abs(off), initial=0.0)) + 1.0
    d = a + jnp.where(active, 0.0, sentinel)
    if not vectors:  # eigenvalues only: bisection on the tridiagonal (cheaper than eigh)
        return eigh_tridiagonal(d, off, eigvals_only=True), None, jnp.sum(active)
    theta, S = jnp.linalg.eigh(jnp.diag(d) + jnp.diag(off, 1) + jnp.diag(off, -1))
    return theta, S, jnp.sum(active)


def _good_ritz(alpha, beta, j, m, tol_mult, tol_spur, tol_first):
    """Ritz values of ``T_j`` (ascending), their vectors, and the Cullum-Willoughby "good" mask.

    Numerically multiple eigenvalues of ``T_j`` are genuine (the first copy is kept); a simple
    one that is also an eigenvalue of ``T_j`` without its first row and column is spurious.
    """
    theta, S, c = _tridiag_eigh(alpha, beta, j, m)
    mu, _, c_hat = _tridiag_eigh(alpha, beta, j, m, first=1, vectors=False)
    idx = jnp.arange(m)
    active = idx < c
    gap_prev = jnp.concatenate([jnp.full((1,), jnp.inf, theta.dtype), jnp.diff(theta)])
    gap_next = jnp.concatenate([jnp.diff(theta), jnp.full((1,), jnp.inf, theta.dtype)])
    dup_prev = active & (gap_prev <= tol_mult)
    dup_next = (idx + 1 < c) & (gap_next <= tol_mult)
    simple = ~dup_prev & ~dup_next
    mu_active = idx < c_hat
    dist = jnp.min(
        jnp.where(mu_active[None, :], jnp.abs(theta[:, None] - mu[None, :]), jnp.inf), axis=1
    )
    # Spurious: an eigenvalue of both T_j and T_j-hat, i.e. its eigenvector's first component
    # vanishes (Cullum & Willoughby, 1985, lemma 4.2.1). In float32 the eigenvalue distance alone
    # cannot separate a spurious value from a genuine one whose start-vector component is small
    # (|s_1| ~ 1/sqrt(n): distance ~ s_1^2 ||T||, below float32 round-off for n >= 1e5), so both
    # the distance and the first component must vanish to working accuracy.
    spurious = simple & (dist <= tol_spur) & (jnp.abs(S[0]) <= tol_first)
    good = active & ~spurious & ~dup_prev
    return theta, S, good


def _wanted(theta, good, which: str, k: int):
    """Indices (static length ``k_total``) of the wanted good Ritz values, and whether each exists.

    Ascending order of eigenvalue. Missing entries (fewer good values than wanted) repeat the
    last index found and are flagged ``False``.
    """
    m = theta.shape[0]
    count = jnp.sum(good)
    # positions of the good values in ascending order: good ones first, by rank
    order = jnp.argsort(jnp.where(good, jnp.arange(m), m + jnp.arange(m)))
    ranks = jnp.arange(k)
    if which == "smallest":
        sel = [ranks]
    elif which == "largest":
        sel = [count - k + ranks]
    else:
        sel = [ranks, count - k + ranks]
    pos = jnp.concatenate(sel)
    found = (pos >= 0) & (pos < count)
    if which == "both":  # the two ends must not share a value
        found = found & ((jnp.arange(2 * k) < k) | (pos >= k))
    pos = jnp.clip(pos, 0, jnp.maximum(count - 1, 0))
    return order[pos], found


@dataclasses.dataclass(frozen=True)
class LeanLanczos(StateMachine):
    """Lanczos without reorthogonalisation, Cullum-Willoughby test, second pass (3 phases).

    Phase 0: one Lanczos step (one product) and the test of the wanted good Ritz values;
    phase 1: one step of the second pass (one product), accumulating the Ritz vectors;
    phase 2: the true residuals of the ``k_total`` Ritz vectors (one block product).
    """

    name: ClassVar[str] = "eigsh(basis='none')"
    m: int
    k: int
    which: str
    eps: float
    eps_acc: float

    @property
    def k_total(self) -> int:
        return 2 * self.k if self.which == "both" else self.k

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return (1, 1, self.k_total)

    def prepare(self, op, state, phase):  # noqa: ARG002
        if phase == 2:
            y = state["y"]
            ny = jnp.sqrt(jnp.maximum(rowwise(y, y), 0.0))
            scale = 1.0 / jnp.where(ny > 0, ny, 1.0)
            return jax.tree_util.tree_map(
                lambda x: x * scale.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), y
            )
        return jax.tree_util.tree_map(lambda x: x[None], state["v"])

    def _thresholds(self, theta, anorm, tol, zero):
        """``max(tol |theta|, zero_tol ||A||)``, as in the full mode.

        ``zero`` is ``zero_tol`` (:func:`hvp.linalg.zero_floor` by default), already at least the
        round-off floor.
        """
        return jnp.maximum(tol * jnp.abs(theta), zero * anorm)

    def _recur(self, v, av, v_prev, beta_prev, a1, a2):
        """``(A v - beta_prev v_prev - a1 v) - a2 v``: the same operations in both passes."""
        w = tu.axpy(-beta_prev, v_prev, av)
        w = tu.axpy(-a1, v, w)
        return tu.axpy(-a2, v, w)

    def update(self, op, state, phase, vs, avs):
        acc = acc_dtype(op.like)
        if phase == 2:
            return self._check(state, vs, avs, acc)
        v = state["v"]
        av = tu.cast(get_row(avs, 0), acc)
        ok = state["ok"] & tu.all_finite(av)
        matvecs = state["matvecs"] + 1
        if phase == 0:
            return self._lanczos_step(state, v, av, ok, matvecs)
        return self._second_pass_step(state, v, av, ok, matvecs)

    def _lanczos_step(self, state, v, av, ok, matvecs):
        j = state["j"]
        anorm = jnp.maximum(state["anorm"], tu.norm(av))
        beta_prev = jnp.where(j > 0, state["beta"][jnp.maximum(j - 1, 0)], 0.0)
        w1 = tu.axpy(-beta_prev, state["v_prev"], av)
        a1 = tu.dot(v, w1)
        w2 = tu.axpy(-a1, v, w1)
        a2 = tu.dot(v, w2)  # local reorthogonalisation against v_j
        w = tu.axpy(-a2, v, w2)
        beta = tu.norm(w)
        alpha1 = state["alpha1"].at[j].set(a1)
        alpha2 = state["alpha2"].at[j].set(a2)
        betas = state["beta"].at[j].set(beta)
        j1 = j + 1
        broke = beta <= _BREAK * self.eps_acc * anorm
        v_next = tu.scale(1.0 / jnp.where(broke, 1.0, beta), w)
        at_end = broke | (j1 >= state["max_steps"]) | ~ok

        def analyse(_):
            unit = self.eps_acc * anorm
            theta, S, good = _good_ritz(
                alpha1 + alpha2,
                betas,
                j1,
                self.m,
                _MULT * unit,
                _SPUR * unit,
                _FIRST * self.eps_acc,
            )
            pick, found = _wanted(theta, good, self.which, self.k)
            th = theta[pick]
            bounds = jnp.abs(jnp.where(broke, 0.0, beta) * S[j, pick])
            return th, S[:, pick], found, bounds

        def skip(_):
            return state["ritz"], state["S"], state["found"], state["bounds"]

        test = at_end | ((j1 % _EVERY == 0) & (j1 >= self.k_total))
        th, S_pick, found, bounds = jax.lax.cond(test, analyse, skip, None)
        thr = self._thresholds(th, anorm, state["tol"], state["zero"])
        conv = found & (bounds <= thr)
        stop = at_end | (test & jnp.all(conv))
        # Second pass: start again from v0 (kept in row 0 of y during the first pass, which does
        # not use y); y = s_0 v0 now, s_i v_i after each further step.
        v0 = get_row(state["y"], 0)
        y0 = jax.tree_util.tree_map(
            lambda x: S_pick[0].reshape((-1,) + (1,) * x.ndim).astype(x.dtype) * x[None], v0
        )

        def pick_tree(a, b):
            return jax.tree_util.tree_map(lambda x, z: jnp.where(stop, x, z), a, b)

        nxt_phase = jnp.where(stop, jnp.where(j1 > 1, 1, 2), 0).astype(jnp.int32)
        return dict(
            state,
            alpha1=alpha1,
            alpha2=alpha2,
            beta=betas,
            j=j1,
            anorm=anorm,
            ok=ok,
            matvecs=matvecs,
            v=pick_tree(v0, v_next),
            v_prev=pick_tree(tu.zeros_like(v), v),
            y=pick_tree(y0, state["y"]),
            S=S_pick,
            found=found,
            bounds=bounds,
            ritz=th,
            i=jnp.zeros((), jnp.int32),
            phase=jnp.where(ok, nxt_phase, 2).astype(jnp.int32),
            done=jnp.array(False),
        )

    def _second_pass_step(self, state, v, av, ok, matvecs):
        i = state["i"]
        beta_prev = jnp.where(i > 0, state["beta"][jnp.maximum(i - 1, 0)], 0.0)
        w = self._recur(v, av, state["v_prev"], beta_prev, state["alpha1"][i], state["alpha2"][i])
        beta = state["beta"][i]
        v_next = tu.scale(1.0 / jnp.where(beta > 0, beta, 1.0), w)
        i1 = i + 1
        s = state["S"][i1]
        y = jax.tree_util.tree_map(
            lambda Y, x: Y + s.reshape((-1,) + (1,) * x.ndim).astype(Y.dtype) * x[None],
            state["y"],
            v_next,
        )
        last = i1 + 1 >= state["j"]
        return dict(
            state,
            v=v_next,
            v_prev=v,
            y=y,
            i=i1,
            ok=ok,
            matvecs=matvecs,
            phase=jnp.where(last | ~ok, 2, 1).astype(jnp.int32),
        )

    def _check(self, state, vs, avs, acc):
        vs = tu.cast(vs, acc)
        avs = tu.cast(avs, acc)
        lam = rowwise(vs, avs)
        r = jax.tree_util.tree_map(
            lambda ax, x: ax - lam.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype) * x,
            avs,
            vs,
        )
        res = jnp.sqrt(jnp.maximum(rowwise(r, r), 0.0))
        ok = state["ok"] & tu.all_finite(avs)
        nrm = jnp.sqrt(jnp.maximum(rowwise(avs, avs), 0.0))
        anorm = jnp.maximum(state["anorm"], jnp.max(nrm))
        thr = self._thresholds(lam, anorm, state["tol"], state["zero"])
        conv = state["found"] & (res <= thr) & ok
        return dict(
            state,
            lam=lam,
            res=res,
            thr=thr,
            conv=conv,
            ok=ok,
            anorm=anorm,
            y=vs,
            matvecs=state["matvecs"] + self.k_total,
            done=jnp.array(True),
        )

    def finalize(self, op, state):
        lam = state["lam"]
        order = jnp.argsort(lam)
        vecs = to_like(
            jax.tree_util.tree_map(lambda x: x[order], state["y"]),
            op.like,
        )
        finite = state["ok"] & jnp.all(jnp.isfinite(lam)) & jnp.all(jnp.isfinite(state["res"]))
        return (
            lam[order],
            vecs,
            state["res"][order],
            state["conv"][order],
            state["matvecs"],
            state["thr"][order],
            finite,
        )

    def progress(self, state) -> Progress:
        phase = int(state["phase"])
        if phase == 0:
            rel = np.asarray(state["bounds"]) / np.maximum(
                np.asarray(
                    self._thresholds(state["ritz"], state["anorm"], state["tol"], state["zero"])
                ),
                1e-300,
            )
            text = f"first pass, step {int(state['j'])}, worst bound/threshold {rel.max():.2e}"
        elif phase == 1:
            text = f"second pass (eigenvectors), step {int(state['i'])} of {int(state['j']) - 1}"
        else:
            text = "true residuals"
        return Progress(matvecs=int(state["matvecs"]), total=None, text=text)

    progress_keys: ClassVar[tuple[str, ...]] = (
        "phase",
        "j",
        "i",
        "bounds",
        "ritz",
        "anorm",
        "tol",
        "zero",
        "matvecs",
    )


def _initial_state(alg: LeanLanczos, start, like, tol, zero, max_steps):
    acc = acc_dtype(like)
    v0 = tu.cast(start, acc)
    nv = tu.norm(v0)
    v0 = tu.scale(1.0 / jnp.where(nv > 0, nv, 1.0), v0)
    m, kt = alg.m, alg.k_total
    zeros_k = jnp.zeros((kt,), acc)
    # y holds the Ritz vectors in the second pass; in the first its row 0 keeps the start vector
    # (one parameter-sized vector less than a separate entry).
    y = jax.tree_util.tree_map(lambda x: jnp.zeros((kt,) + x.shape, x.dtype).at[0].set(x), v0)
    y = tu.stacked_like(y, like) if not tu.is_traced(v0) else y
    return dict(
        v=v0,
        v_prev=tu.zeros_like(v0),
        y=y,
        alpha1=jnp.zeros((m,), acc),
        alpha2=jnp.zeros((m,), acc),
        beta=jnp.zeros((m,), acc),
        S=jnp.zeros((m, kt), acc),
        found=jnp.zeros((kt,), bool),
        bounds=jnp.full((kt,), jnp.inf, acc),
        ritz=zeros_k,
        lam=zeros_k,
        res=jnp.full((kt,), jnp.inf, acc),
        thr=zeros_k,
        conv=jnp.zeros((kt,), bool),
        j=jnp.zeros((), jnp.int32),
        i=jnp.zeros((), jnp.int32),
        anorm=jnp.zeros((), acc),
        ok=jnp.array(True),
        tol=jnp.asarray(tol, acc),
        zero=jnp.asarray(zero, acc),  # zero_tol: the test near 0, relative to ||A||
        max_steps=jnp.asarray(max_steps, jnp.int32),
        matvecs=jnp.zeros((), jnp.int32),
        phase=jnp.zeros((), jnp.int32),
        done=jnp.array(False),
    )


def lean_eigsh(
    op,
    k: int,
    *,
    start,
    key,
    v0,
    which: str,
    num_iters: int,
    tol: float,
    zero_tol: float | None = None,
    driver: str,
    progress: bool | None,
    checkpoint: Checkpoint | str | os.PathLike | None,
) -> LeanEigshResult:
    """Run the lean mode of :func:`hvp.eigsh` (arguments already checked there).

    ``num_iters`` is the most Lanczos steps of the first pass (the second pass repeats as many);
    ``start`` the unit start vector.
    """
    param_dtypes = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(op.like)]
    low = max(param_dtypes, key=lambda d: float(jnp.finfo(d).eps))
    acc = tu.accumulation_dtype(*param_dtypes)
    alg = LeanLanczos(
        m=num_iters,
        k=k,
        which=which,
        eps=float(jnp.finfo(low).eps),
        eps_acc=float(jnp.finfo(acc).eps),
    )
    floor = max(_FLOOR * alg.eps_acc, 4.0 * alg.eps)  # what round-off lets one verify
    zero = max(zero_floor(low) if zero_tol is None else zero_tol, floor)
    state = _initial_state(alg, start, op.like, tol, zero, num_iters)
    del start  # (the state holds its own copy: one parameter-sized vector less during the run)
    out, _ = run(
        alg,
        op,
        state,
        driver=driver,
        progress=progress,
        checkpoint=checkpoint,
        traced=(key, v0),
        consume=True,
    )
    lam, vecs, res, conv, nmv, thr, finite = out
    if not tu.is_traced(nmv):
        nmv = int(nmv)
    result = LeanEigshResult(
        eigenvalues=lam,
        eigenvectors=vecs,
        residuals=res,
        converged=conv,
        num_matvecs=nmv,
        num_restarts=0,
        thresholds=thr,
        which=which,
        dtype_policy=dtype_policy(op.like),
    )
    if tu.is_traced(lam, conv):
        return result
    if not bool(finite):
        raise NonFiniteError(
            f"eigsh(basis='none') on the {op.name} operator produced NaN or Inf (within {nmv} "
            "matvecs): its matvec returns non-finite values. Check the parameters and data "
            "(`hvp.tree.nonfinite_leaves`), or build the operator with `check_finite=True`."
        )
    if not bool(jnp.all(conv)):
        k_total = 2 * k if which == "both" else k
        steps = (nmv - k_total + 1) // 2  # first pass j steps, second j - 1, then k_total
        if steps >= num_iters:
            why = (
                f"its first pass used all `num_iters`={num_iters} Lanczos steps: raise "
                "`num_iters` (the lean mode's memory does not grow with it; each step costs 2 "
                "products)"
            )
        else:
            why = (
                "the Krylov space holds fewer distinct eigenvalues than `k` (it returns each "
                "distinct eigenvalue once), or the pairs met their Lanczos bound but not the "
                "true-residual check: ask for fewer pairs, or use `basis='device'` (restarts, "
                "multiplicities)"
            )
        warn_not_converged(
            f"eigsh(basis='none', {which}, k={k}) on the {op.name} operator: only "
            f"{int(jnp.sum(conv))} of {k_total} eigenpairs reached tol={tol:g} after {nmv} "
            f"matvecs (largest residual {float(jnp.max(res)):.3g}, threshold "
            f"{float(jnp.min(thr)):.3g}). The lean mode does not restart; {why}. "
            "`result.converged` marks the pairs that did converge.",
            stacklevel=3,
        )
    return result
