r"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

Given a symmetric operator :math:`A` (a Hessian, a GGN, any
:class:`hvp.LinearOperator`), Lanczos builds an orthonormal basis
:math:`V_j = [v_0, \dots, v_{j-1}]` of the Krylov space
:math:`\mathcal K_j(A, v_0) = \operatorname{span}\{v_0, A v_0, \dots, A^{j-1} v_0\}`
with one matrix-vector product per step, and the projected matrix
:math:`T_j = V_j^\top A V_j` (tridiagonal in exact arithmetic). The
eigenpairs :math:`(\theta_i, s_i)` of :math:`T_j` give Ritz pairs
:math:`(\theta_i, V_j s_i)`, whose extreme members converge quickly to the
extreme eigenpairs of :math:`A` (Lanczos, 1950; Paige, 1971; Saad,
*Numerical Methods for Large Eigenvalue Problems*, 2011, ch. 6). The Lanczos
relation :math:`A V_j = V_j T_j + \beta_j v_j e_j^\top` gives each Ritz
pair's residual for free: :math:`\|A y_i - \theta_i y_i\| = |\beta_j\, s_{j-1,i}|`.

Implementation (:func:`eigsh`):

* Pytree-native: the basis is a pytree shaped like the parameters with a
  leading axis of length ``num_iters + 1``; inner products and updates are
  per-leaf ``tensordot``\ s, never a raveled vector, so every leaf keeps its
  shape and sharding (the block algebra of :mod:`hvp.linalg._blocks`).
* A state machine (:class:`ThickRestartLanczos`, :mod:`hvp.linalg._driver`): phase 0 is one
  Lanczos step (one product, :mod:`hvp.linalg._krylov`) followed by its Ritz extraction and
  tests; phase 1 computes the true residuals of the ``k`` wanted Ritz vectors with one block
  product of ``k`` vectors; phase 2 (no product) accepts, restarts explicitly, locks, restarts
  thickly, or ends a run whose budget is spent (after a final residual check). The host
  driver (default outside ``jit``) runs the steps from Python around the operator's one
  compiled block product, with progress, checkpoints and resume; the compiled driver runs them
  in one ``lax.while_loop``, so :func:`eigsh` works inside ``jax.jit`` and ``jax.vmap`` (there a
  non-finite result is NaN instead of an error). ``tol`` and ``max_restarts`` live in the
  state: other values reuse the compiled steps.
* Full reorthogonalisation (classical Gram-Schmidt, applied twice and a third
  time when the second pass still cancels, "twice is enough", Giraud et al.
  2005). With it, ghost copies of converged eigenvalues cannot appear and
  :math:`T_j` is formed from the Gram-Schmidt coefficients.
* Breakdown (:math:`\beta_j \le 32\,\epsilon\,\|A\|`, relative to the running
  estimate of :math:`\|A\|`: the Krylov space is invariant to working
  accuracy, e.g. for a zero or low-rank operator) does not stop the
  iteration: it continues with a fresh random vector orthogonalised against
  the basis (coupling 0; the dropped coupling is kept in the residual bound).
* Thick restart (Wu & Simon, 2000; Stathopoulos, Saad & Wu, 1998): when the
  basis is full and the wanted pairs have not converged, the best ``p`` Ritz
  vectors are kept together with the last Lanczos vector (the projected
  matrix becomes an arrowhead) and the iteration continues. Memory stays at
  ``num_iters + 1`` basis vectors.
* Multiplicities: locking and confirmation from a fresh vector. A single
  Krylov sequence sees each distinct eigenvalue once, so once the wanted pairs
  have converged they are *locked* (kept in the basis, deflated) and the
  iteration restarts from a fresh random vector orthogonal to them, the
  thick-restart-with-locking scheme of Wu & Simon (2000) and the "implicit
  deflation" of ARPACK (Lehoucq & Sorensen, 1996; Saad 2011, sec. 4.2 and
  6.4). The new Krylov sequence lives in the complement of the locked pairs,
  where a missed copy of a wanted eigenvalue is again an extreme eigenvalue.
  A sequence *confirms* the locked set when it has converged its extreme pair at
  each wanted end (one pair beyond the wanted ones, to the full tolerance) and
  the wanted eigenvalues did not change; if they changed (a copy was found),
  the new set is locked and confirmed again. The run is accepted after two
  consecutive confirmations from independent fresh vectors: a single sequence
  misses a copy when its random start vector happens to have a small component
  along it and the copy is close to the next eigenvalue (seen in about 1 in 40
  float32 runs on 4-fold spectra with a relative gap of 1e-3); two independent
  sequences rarely both do. Like every Krylov method the confirmation is
  probabilistic in this sense. A cycle that changes the set has found a missed
  copy, so any multiplicity up to ``k`` is resolved (at most ``k + 3`` cycles);
  the price is two extra Lanczos sequences in the common case. ``confirm=False`` skips it
  (then a repeated eigenvalue may be returned with too few copies, as by any
  single-vector Lanczos or ARPACK). With ``k=1`` (per end) there is nothing to confirm: one
  wanted eigenvalue per end cannot be missing a copy (whatever its multiplicity it is one
  number), so no confirming sequence runs (14 products instead of 47 for the top eigenvalue
  of the test MLP Hessian); when the residual bound stays above the tolerance on breakdown
  residuals of a low-rank operator, a full basis whose Lanczos part passes is accepted on
  its true residuals.
* Convergence, per pair (documented in ``docs/algorithms.md``): a relative test away from 0
  and a backward-error test near 0,
  :math:`\|A y_i - \theta_i y_i\| \le \max(\mathrm{tol}\cdot|\theta_i|,\
  \mathrm{zero\_tol}\cdot\|A\|)`, with ``zero_tol`` by default
  :math:`\max(\epsilon^{2/3}, 64\,\epsilon)` (:math:`\epsilon` the machine epsilon of the
  products' dtype: ARPACK's :math:`\epsilon^{2/3}` floor of the relative test, Lehoucq,
  Sorensen & Yang 1998, sec. 4.6; SLEPc's ``EPS_CONV_NORM`` is the same test relative to
  :math:`\|A\|`, Hernandez, Roman & Vidal 2005). :math:`\|A\|` is the largest
  :math:`\|Av\|` or :math:`|\theta|` seen, a lower bound of :math:`\|A\|_2`, so the test is
  never looser than stated. Every eigenvalue thus gets an error small relative to *its own*
  magnitude (at most about ``tol * |lambda_i|``), except near 0, where no relative accuracy
  is achievable in floating point (the products' own round-off is :math:`O(\epsilon\|A\|)`)
  and none is useful: a pair that passes there is an exact eigenpair of :math:`A + E` with
  :math:`\|E\| \le \mathrm{zero\_tol}\,\|A\|`, and an eigenvalue of :math:`A` lies within
  its residual of :math:`\theta_i` (Parlett, *The Symmetric Eigenvalue Problem*, Thm 4.5.1).
  Zero eigenvalues of a singular operator whose null space is separated from the rest of the
  spectrum come back as zeros to :math:`O(\epsilon\|A\|)`. A *continuum* of eigenvalues
  near 0 (the GGN of a trained network often has eigenvalues at every scale from
  :math:`10^{-9}\|A\|` up) is resolved slowly by any Krylov method: the wanted pairs then
  reach ``zero_tol`` only with a larger ``num_iters`` or ``max_restarts``, or not at all in the
  budget (``converged`` False, and the warning gives the accuracy that was reached).
  The stopping test uses a rigorous bound (Lanczos coupling plus the residuals
  that left the basis at locking or breakdown); when it passes, the residuals
  are recomputed with true products (``k`` matvecs). That bound adds up the
  breakdown residuals (each up to :math:`32\epsilon\|A\|`), so on a low-rank
  operator it can stay above the lock level of a zero eigenvalue; when the basis
  is full and the Lanczos part passes, the wanted pairs are locked on their true
  residuals instead (``k`` matvecs). Returned vectors that are not orthonormal
  (a vector returned twice) are never marked converged. If a true residual misses
  its tolerance the run does not stop: it restarts explicitly from the Ritz
  vectors with a 10x stricter bound. ``converged`` is the true-residual test
  and the confirmation; a warning means the restart budget was really spent.
* Precision policy (issue 9): products run in the parameters' dtype; the
  basis, inner products, projected matrix and its small ``eigh`` in the
  accumulation dtype :func:`hvp.tree.accumulation_dtype` (at least float32),
  so bfloat16/float16 parameters work. The result records both
  (``dtype_policy``). A product that overflows
  raises :class:`hvp.NonFiniteError`, never a silent zero.

Memory: the basis holds ``(num_iters + 1) * n`` numbers of ``basis_dtype`` (in host RAM with
``basis="host"``, :mod:`hvp.linalg._host_basis`)
(e.g. ``num_iters=40`` and ``n = 10^7`` float32 parameters: 1.6 GB), plus
``k`` Ritz vectors at the end. ``basis_dtype=jnp.bfloat16`` halves float32
storage but limits orthogonality, hence accuracy, to about ``1e-2`` relative;
float32 storage with float64 products gives about ``1e-6``.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hvp import tree as tu
from hvp.linalg._blocks import combine, get_row, gram, rowwise, set_row
from hvp.linalg._checks import (
    ConvergenceWarning,
    DtypePolicy,
    acc_dtype,
    check_finite_float,
    check_int,
    check_key,
    coerce_operator,
    dtype_policy,
)
from hvp.linalg._driver import Checkpoint, Progress, StateMachine, run
from hvp.linalg._krylov import empty_basis, fresh_vector, lanczos_extend
from hvp.operators import NonFiniteError
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["eigsh", "EigshResult", "WHICH"]

WHICH = ("largest", "smallest", "both")
#: where :func:`eigsh` keeps its Krylov basis (``"none"``: the lean mode of :mod:`._lean`).
BASES = ("device", "host", "none")


@tu.result(static=("which", "dtype_policy"))
class EigshResult:
    """Result of :func:`eigsh`.

    Attributes:
      eigenvalues: shape ``(k,)`` (``(2k,)`` for ``which="both"``), ascending.
      eigenvectors: pytree like the parameters with a leading axis matching
        ``eigenvalues`` (unit norm; use ``hvp.tree.index(r.eigenvectors, i)``).
      residuals: ``||A v_i - lambda_i v_i||`` per pair, from true products.
      converged: bool per pair: ``residuals <= thresholds`` and the wanted set
        (with its multiplicities) was confirmed from a fresh start vector (for ``k > 1``).
      num_matvecs: operator products used (Lanczos steps + true residuals): a Python
        ``int``, a traced int32 scalar inside ``jax.jit``/``jax.vmap``.
      num_restarts: restarts performed (thick restarts, locking/confirmation
        restarts and explicit restarts after a failed residual check); an ``int`` likewise.
      thresholds: the per-pair tolerance the residuals were tested against,
        ``max(tol * |lambda_i|, zero_tol * ||A||)`` (see :func:`eigsh`; ``||A||`` is the
        run's lower bound of the operator norm): an eigenvalue of the operator lies within
        ``residuals[i]`` of ``eigenvalues[i]``.
      which: ``"largest"``, ``"smallest"`` or ``"both"``.
      dtype_policy: the :class:`~hvp.linalg.DtypePolicy` used: ``compute`` is the dtype of
        the operator products (the parameters'), ``accumulate`` that of the basis, inner
        products, projected matrix and results (:func:`hvp.tree.accumulation_dtype`, at
        least float32).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> r = hvp.eigsh(hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0, 5.0]))), 1, key=jax.random.key(0))
      >>> r.which, [round(float(x), 4) for x in r.eigenvalues], bool(r.converged.all())
      ('largest', [5.0], True)
    """

    eigenvalues: jax.Array
    eigenvectors: object
    residuals: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array
    num_restarts: int | jax.Array
    thresholds: jax.Array
    which: str = "largest"
    dtype_policy: DtypePolicy | None = None


# ---------------------------------------------------------------------------
# Ritz extraction on a partially filled projected matrix (static shapes).
# ---------------------------------------------------------------------------


def _ritz(H, c, m):
    """Eigenpairs of the leading ``c x c`` block of the projected matrix, in a static ``m x m`` frame.

    The symmetric projected matrix is read from the upper triangle of ``H``
    (Gram-Schmidt coefficients). Inactive rows/columns get a sentinel diagonal
    strictly above the active spectrum, so the active Ritz values are
    ``theta[:c]`` (ascending) and their vectors vanish on inactive rows.
    """
    T = jnp.triu(H[:m, :m])
    T = T + jnp.triu(T, 1).T
    active = jnp.arange(m) < c
    T = jnp.where(active[:, None] & active[None, :], T, 0.0)
    sentinel = 2.0 * jnp.sqrt(jnp.sum(T * T)) + 1.0
    T = T + jnp.diag(jnp.where(active, 0.0, sentinel))
    theta, S = jnp.linalg.eigh(T)
    return theta, S


def _wanted(c, k, which):
    """Indices (into ascending active Ritz values ``theta[:c]``) of the ``k`` wanted pairs."""
    if which == "largest":
        return c - k + jnp.arange(k)
    if which == "smallest":
        return jnp.arange(k)
    h = k // 2
    return jnp.concatenate([jnp.arange(h), c - h + jnp.arange(h)])


def _split_keep(p):
    lo = (p + 1) // 2
    return lo, p - lo


# ---------------------------------------------------------------------------
# Constants.
# ---------------------------------------------------------------------------

#: breakdown: ``beta <= _BREAKDOWN * eps * ||A||`` (the Krylov space is invariant to working
#: accuracy). Tolerance floor: a residual of ``_FLOOR * eps * ||A||`` always counts as converged
#: (the rounding error of a product is of that order, a smaller one cannot be verified).
_BREAKDOWN = 32.0
_FLOOR = 64.0
#: a pair is locked when its residual bound is below ``_LOCK`` times its tolerance.
_LOCK = 0.1
#: consecutive fresh-vector sequences that must reproduce the locked set before it is accepted.
_CONFIRMATIONS = 2


def zero_floor(dtype, tol: float | None = None) -> float:
    """The default ``zero_tol`` of :func:`eigsh`: its accuracy near 0, relative to ``||A||``.

    ``max(eps**(2/3), 64 * eps)`` with ``eps`` the machine epsilon of ``dtype`` (the
    products' dtype; the round-off floor is ``4 eps`` for half precision): ARPACK's
    ``eps**(2/3)``, above the products' own round-off. A converged pair with
    ``|lambda| <= zero_floor * ||A||`` is an eigenvalue within about ``zero_floor * ||A||`` of 0:
    smaller eigenvalues cannot be told from 0 by :func:`eigsh`'s test. Used as the least "zero"
    threshold of :func:`hvp.linalg.spectrum_summary`, :func:`hvp.classify_critical_point` and
    ``hvp analyze``.

    Args:
      dtype: the products' dtype (``result.dtype_policy.compute``).
      tol: accepted for compatibility: the level does not depend on the relative tolerance
        (``tol`` applies to ``|lambda|``, ``zero_tol`` to ``||A||``).

    Examples:
        >>> import numpy as np
        >>> from hvp.linalg import zero_floor
        >>> f32, f64 = (float(np.finfo(t).eps) for t in (np.float32, np.float64))
        >>> zero_floor(np.float32) == f32 ** (2 / 3), zero_floor(np.float64) == f64 ** (2 / 3)
        (True, True)
    """
    del tol
    eps = float(jnp.finfo(dtype).eps)
    return max(eps ** (2.0 / 3.0), _round_off_floor(dtype))


def _round_off_floor(dtype, basis_dtype=None) -> float:
    """Residual floor relative to ``||A||``: ``max(64 eps_acc, 4 eps)`` (+ ``8 eps_basis``).

    ``eps`` is the products' machine epsilon, ``eps_acc`` that of the accumulation dtype
    (a float32/float64 product's round-off grows with the reductions inside it; a
    half-precision product is dominated by the rounding of its inputs and output).
    """
    eps = float(jnp.finfo(dtype).eps)
    floor = max(_FLOOR * float(jnp.finfo(tu.accumulation_dtype(dtype)).eps), 4.0 * eps)
    if basis_dtype is not None and float(jnp.finfo(basis_dtype).eps) > eps:
        floor += 8.0 * float(jnp.finfo(basis_dtype).eps)  # storage round-off limits accuracy
    return floor


def _extra(c, k_total, which):
    """Wanted indices plus the next pair beyond them at each wanted end (the confirmation set)."""
    if which == "largest":
        return c - (k_total + 1) + jnp.arange(k_total + 1)
    if which == "smallest":
        return jnp.arange(k_total + 1)
    h = k_total // 2 + 1
    return jnp.concatenate([jnp.arange(h), c - h + jnp.arange(h)])


def _num_extra(which):
    return 2 if which == "both" else 1


# ---------------------------------------------------------------------------
# The state machine.
# ---------------------------------------------------------------------------

#: what the pending residual check (phase 1) is for; _DECIDE: no check, only decisions (phase 2)
_CHECK, _TRY_TRUE, _FINAL, _DECIDE = 0, 1, 2, 3


def _work_like(like):
    """Zeros shaped (and sharded) like ``like`` in its accumulation dtype: the algorithm's vectors."""
    acc = acc_dtype(like)
    return tu.like_sharding(
        jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), acc), like), like
    )


def _rows_scale(c, V):
    """Row ``a`` of the block ``V`` times ``c[a]``."""
    return jax.tree_util.tree_map(
        lambda x: x * c.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), V
    )


# ---------------------------------------------------------------------------
# Every access to the Krylov basis ``V`` (a block of ``m + 1`` rows). The state machine calls
# them on its device basis; ``eigsh(basis="host")`` (:mod:`hvp.linalg._host_basis`) calls the
# same functions, compiled for the host's CPU device, on a basis kept in host memory.
# ---------------------------------------------------------------------------


def _ritz_combine(cols, V, wl):
    """``V[:m]^T cols`` for ``cols`` of shape ``(m, c)``, as ``V^T [cols; 0]`` on the whole basis.

    Slicing the basis to its first ``m`` rows made XLA copy it (a whole basis of temporary
    memory in the residual check, the lock and the restart: measured 21 ``n`` of 21); a zero
    coefficient for the rows beyond ``m`` reads the basis in place.
    """
    pad = tu.leading_dim(V) - cols.shape[0]
    if pad:
        cols = jnp.concatenate([cols, jnp.zeros((pad,) + cols.shape[1:], cols.dtype)])
    return combine(cols, V, wl)


def _unit_ritz(V, cols, wl):
    """The unit Ritz vectors ``V[:m]^T cols`` (one per column of ``cols``, shape ``(m, c)``)."""
    Y = _ritz_combine(cols, V, wl)
    norms = jnp.sqrt(rowwise(Y, Y))
    return _rows_scale(1.0 / jnp.where(norms > 0, norms, 1.0), Y)


def _extend_basis(V, j, w, anorm, key, wl, *, eps_break):
    """One Lanczos step on the basis: row ``j + 1`` set, and the step's numbers.

    Returns ``(V, (h, beta, anorm, broke, beta_raw))`` (see :func:`lanczos_extend`).
    """
    h, beta, v_next, anorm, broke, beta_raw = lanczos_extend(
        V, j, w, anorm, key, wl, eps_break=eps_break
    )
    return set_row(V, j + 1, v_next), (h, beta, anorm, broke, beta_raw)


def _rows_into_empty(V, rows):
    """A basis shaped like ``V`` whose first rows are the block ``rows`` and the rest zero.

    Written as one update of a zero basis (XLA does it in the donated basis's memory); ``.at[]``
    updates of the old basis, or building the new one from it, cost a whole basis of temporary
    memory each (measured: 22 and 43 ``n`` for a 21-vector basis).
    """
    return jax.tree_util.tree_map(
        lambda Vl, R: lax.dynamic_update_slice(
            jnp.zeros_like(Vl), R.astype(Vl.dtype), (0,) * Vl.ndim
        ),
        V,
        rows,
    )


def _stack_rows(*blocks):
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *blocks)


def _locked_basis(V, cols, key, k_total, wl):
    """Locking: the ``k_total`` wanted Ritz vectors, then a fresh vector orthogonal to them."""
    kept = _ritz_combine(cols, V, wl)
    fresh = fresh_vector(key, kept, jnp.ones((k_total,), cols.dtype), wl)
    return _rows_into_empty(V, _stack_rows(kept, tu.map(lambda x: x[None], fresh)))


def _restarted_basis(V, cols, wl):
    """Thick restart: the ``p`` kept Ritz vectors (``cols``: ``(m, p)``), then the last row."""
    m, _ = cols.shape
    kept = _ritz_combine(cols, V, wl)
    last = get_row(V, m, wl)
    return _rows_into_empty(V, _stack_rows(kept, tu.map(lambda x: x[None], last)))


def _reset_basis(V, v):
    """Explicit restart: ``v`` in row 0 of an empty basis."""
    return _rows_into_empty(V, tu.map(lambda x: x[None], v))


def _unit_sum(Y, acc):
    """The normalised sum of the rows of ``Y`` (the explicit restart's start vector)."""
    v = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), Y)
    return tu.scale(1.0 / jnp.maximum(tu.norm(v), jnp.finfo(acc).tiny), v)


@dataclasses.dataclass(frozen=True)
class ThickRestartLanczos(StateMachine):
    """Thick-restart Lanczos with locking and confirmation (:func:`eigsh`) as a state machine.

    Phases:

    * 0 (block size 1): one Lanczos step on basis row ``j``, then the Ritz extraction and the
      tests of the step; most steps go on with phase 0, some ask for a residual check
      (phase 1) or for decisions that change the basis (phase 2);
    * 1 (block size ``k_total``): true residuals of the wanted Ritz vectors (one block
      product); ``mode`` says what the check is for: the stopping test, a lock on true
      residuals when the bound is stuck on breakdown residuals, or the final check of a run
      that spent its budget;
    * 2 (no product): accept, restart explicitly (a true residual missed its threshold), lock
      the wanted pairs and restart from a fresh vector, restart thickly, or stop.

    Static fields fix shapes and dtypes (basis size ``m``, ``k_total``, ``which``, the number
    ``p`` of Ritz vectors kept at a thick restart, the round-off constants); ``tol``,
    ``max_restarts`` and the key live in the state, so other values reuse the compiled steps.
    """

    name: ClassVar[str] = "eigsh"
    m: int
    k_total: int
    which: str
    p: int
    max_locks: int
    basis_dtype: str | None
    eps: float
    eps_break: float
    floor: float
    confirm: bool
    full_space: bool
    single: bool = False

    @property
    def block_sizes(self) -> tuple[int, ...]:
        return (1, self.k_total, 0)

    # --- helpers -------------------------------------------------------------------------
    def thresholds(self, s, lam, anorm):
        """Per-pair tolerance: ``tol * |lam|``, or ``zero_tol * ||A||`` near 0 (a backward error).

        ``s["zero"]`` is ``zero_tol``, already at least the round-off floor.
        """
        return jnp.maximum(s["tol"] * jnp.abs(lam), s["zero"] * anorm)

    def base_key(self, s):
        return jax.random.fold_in(jax.random.fold_in(s["key"], s["restarts"]), s["locks"])

    def step_key(self, s):
        """The key of the fresh vector a breakdown at the current step draws."""
        return jax.random.fold_in(self.base_key(s), s["j"])

    # --- the basis: storage interface (HostBasisLanczos keeps it in host memory) -----------
    def rewrite(self, s, kind: str, arg, key, wl):
        """The state with its basis rewritten by a lock, a thick restart or an explicit restart.

        ``kind`` is ``"lock"`` (``arg``: the wanted Ritz coefficients, ``key``: the fresh
        vector's), ``"restart"`` (``arg``: the kept Ritz coefficients) or ``"reset"`` (``arg``:
        the new start vector).
        """
        if kind == "lock":
            return dict(s, V=_locked_basis(s["V"], arg, key, self.k_total, wl))
        if kind == "restart":
            return dict(s, V=_restarted_basis(s["V"], arg, wl))
        return dict(s, V=_reset_basis(s["V"], arg))

    # --- the driver's interface ------------------------------------------------------------
    def prepare(self, op, state, phase):
        wl = _work_like(op.like)
        if phase == 2:
            return None
        if phase == 0:
            v = get_row(state["V"], state["j"], wl)
            return jax.tree_util.tree_map(lambda x: x[None], v)
        # phase 1: the unit wanted Ritz vectors of the current basis
        return _unit_ritz(state["V"], self.wanted_cols(state), wl)

    def wanted_cols(self, state):
        """The Ritz coefficients ``S[:, wanted]`` of the pairs the residual check tests."""
        return state["S"][:, _wanted(state["j"], self.k_total, self.which)]

    def update(self, op, state, phase, vs, avs):
        wl = _work_like(op.like)
        if phase == 2:
            return self.decide(state, wl)
        avs = tu.cast(avs, acc_dtype(op.like))
        if phase == 0:
            return self.lanczos_step(state, get_row(avs, 0), wl)
        return self.residual_check(state, vs, avs)

    def finalize(self, op, state):  # noqa: ARG002
        lam, res, Y = state["lam"], state["res"], state["Y"]
        order = jnp.argsort(lam)
        lam, res = lam[order], res[order]
        Y = jax.tree_util.tree_map(lambda x: x[order], Y)
        thr = self.thresholds(state, lam, state["anorm"])
        # Two returned vectors that are (nearly) the same vector are not two eigenpairs: a
        # duplicate never counts as converged, whatever its residual.
        G = gram(Y, Y)
        independent = jnp.max(jnp.abs(G - jnp.eye(self.k_total, dtype=G.dtype))) <= 0.5
        finite = state["finite"] & jnp.all(jnp.isfinite(lam)) & tu.all_finite(Y)
        converged = (res <= thr) & state["confirmed"] & independent & finite
        nan = jnp.full_like(lam, jnp.nan)
        lam, res = jnp.where(finite, lam, nan), jnp.where(finite, res, nan)
        return (
            lam,
            Y,
            res,
            converged,
            state["matvecs"],
            state["restarts"] + state["locks"],
            thr,
            state["confirmed"],
            finite,
            state["anorm"],
        )

    def progress(self, state) -> Progress:
        steps = int(state["matvecs"])
        if not steps:
            return Progress(matvecs=0)
        worst = float(state["worst"])
        locked = self.k_total if int(state["stage"]) == 1 else 0
        text = (
            f"worst wanted residual / threshold {worst:.2g}, {locked} pairs locked, "
            f"{int(state['restarts']) + int(state['locks'])} restarts"
        )
        return Progress(matvecs=steps, total=None, text=text)

    # --- phase 0: a Lanczos step and its decisions ---------------------------------------
    def lanczos_step(self, s, w, wl):
        V, ext = _extend_basis(
            s["V"], s["j"], w, s["anorm"], self.step_key(s), wl, eps_break=self.break_level
        )
        return self.step_tail(dict(s, V=V), *ext, tu.all_finite(w))

    @property
    def break_level(self) -> float:
        """Breakdown when ``beta <= break_level * ||A||``."""
        return _BREAKDOWN * self.eps_break

    def step_tail(self, s, h, beta, anorm, broke, beta_raw, finite):
        """The Lanczos step after the basis was extended: projected matrix, Ritz pairs, tests."""
        m, k_total, which = self.m, self.k_total, self.which
        j = s["j"]
        H = s["H"].at[:, j].set(jnp.where(jnp.arange(m + 1) <= j, h, s["H"][:, j]))
        H = H.at[j + 1, j].set(beta)
        rho = s["rho"].at[j].set(jnp.where(broke, beta_raw, 0.0))
        c = j + 1
        full = c == m
        s = dict(s, H=H, rho=rho, j=c, matvecs=s["matvecs"] + 1, have_out=jnp.array(False))

        theta, S = _ritz(H, c, m)
        active = jnp.arange(m) < c
        anorm = jnp.maximum(anorm, jnp.max(jnp.where(active, jnp.abs(theta), 0.0)))
        s = dict(s, anorm=anorm)
        # Residual bound of every Ritz pair: the Lanczos coupling plus what left the basis.
        coupling = jnp.abs(H[c, c - 1] * S[c - 1, :])  # the Lanczos part of the residual
        est = coupling + jnp.abs(S).T @ rho[:m]
        thr = self.thresholds(s, theta, anorm) * s["tight"]
        wi = _wanted(c, k_total, which)
        false = jnp.array(False)
        if self.confirm:
            xi = _extra(c, k_total, which)
            confirming = s["stage"] == 1
            # Searching: lock when the wanted pairs' residual bounds are below tol with headroom
            # (a locked pair's residual is frozen, and Ritz vectors that mix locked rows add
            # their frozen residuals up).
            ok_lock = (c >= k_total) & jnp.all(est[wi] <= _LOCK * thr[wi])
            # Confirming: the fresh Krylov sequence has converged its extreme pairs (one beyond
            # the wanted ones at each wanted end), so a missed copy would have shown up.
            # The pair beyond the wanted ones converges to the full tolerance too: a loose
            # (sqrt(tol)) test let a sequence whose start vector had a small component along a
            # missed copy stop on the next eigenvalue before that copy was drawn out (float32,
            # 4-fold spectra).
            ok_x = (
                (c >= k_total + _num_extra(which))
                & jnp.all(coupling[wi] <= thr[wi])
                & jnp.all(coupling[xi] <= thr[xi])
            )
            passed = jnp.where(confirming, ok_x, ok_lock)
            unchanged = jnp.all(jnp.abs(theta[wi] - s["rec"]) <= thr[wi] / s["tight"])
            # Two consecutive confirmations from independent fresh vectors: one sequence misses
            # a copy when its start vector happens to have a small component along it (about
            # 1 in 40 float32 runs on 4-fold spectra, gap 1e-3 relative); two rarely both do.
            confirmed_once = confirming & unchanged
            confirmed = confirmed_once & (s["nconf"] >= _CONFIRMATIONS - 1)
            go_verify = passed & (confirmed | (s["locks"] >= self.max_locks))
            go_lock = passed & ~go_verify
            # The bound adds up the residuals that left the basis at breakdowns (each up to
            # 32 eps ||A||, above the lock level 6.4 eps ||A|| of a zero eigenvalue): on a
            # low-rank operator in float32 it may never pass although the Ritz pairs have
            # converged. When the basis is full and the Lanczos part passes, test the true
            # residuals instead (k_total products) and lock on them.
            try_true = (
                ~confirming
                & ~passed
                & full
                & (c >= k_total)
                & jnp.all(coupling[wi] <= _LOCK * thr[wi])
            )
        else:
            confirmed = jnp.array(True)
            confirmed_once = false
            # Without confirmation (asked for, or no room: m == n) a copy may be missing
            # unless the basis spans the whole space.
            passed = jnp.all(est[wi] <= thr[wi])
            go_verify = (c >= (m if self.full_space else k_total)) & passed
            if self.single:
                # One wanted pair per end: no copy can be missing, so no confirmation. When the
                # bound is stuck on breakdown residuals (low-rank operators in float32, see
                # try_true above) but the Lanczos part passes on a full basis, the true
                # residuals decide (a failed check restarts explicitly with a stricter bound).
                go_verify = go_verify | (full & ~passed & jnp.all(coupling[wi] <= _LOCK * thr[wi]))
            go_lock = false
            try_true = false
        worst = jnp.max(est[wi] / jnp.where(thr[wi] > 0, thr[wi], 1.0))
        s = dict(s, theta=theta, S=S, est=est, thr=thr, worst=worst)

        # Next: a residual check (phase 1), the decisions that change the basis (phase 2: lock,
        # thick restart or stop), or the next Lanczos step (most steps).
        check = go_verify | try_true
        phase = jnp.where(check, 1, jnp.where(go_lock | full, 2, 0)).astype(jnp.int32)
        mode = jnp.where(go_verify, _CHECK, jnp.where(try_true, _TRY_TRUE, _DECIDE))
        s = dict(
            s,
            phase=phase,
            mode=mode.astype(jnp.int32),
            confirmed=jnp.where(go_verify, confirmed, jnp.where(try_true, False, s["confirmed"])),
            go_lock=go_lock,
            confirmed_once=confirmed_once,
        )
        # A product with NaN/Inf ends the run (the result is NaN and raises outside jit).
        return dict(s, finite=s["finite"] & finite, done=s["done"] | ~finite)

    # --- phase 1: true residuals of the wanted Ritz vectors --------------------------------
    def residual_check(self, s, Y, AY):
        lam = rowwise(Y, AY)
        R = tu.sub(AY, _rows_scale(lam, Y))
        res = jnp.sqrt(rowwise(R, R))
        anorm = jnp.maximum(s["anorm"], jnp.max(jnp.sqrt(rowwise(AY, AY))))
        ok = jnp.all(res <= self.thresholds(s, lam, anorm))
        finite = tu.all_finite(AY)
        s = dict(
            s,
            Y=Y,
            lam=lam,
            res=res,
            ok=ok,
            anorm=anorm,
            have_out=jnp.array(True),
            matvecs=s["matvecs"] + self.k_total,
            phase=jnp.zeros((), jnp.int32),
        )
        return dict(
            s,
            phase=jnp.full((), 2, jnp.int32),
            finite=s["finite"] & finite,
            done=s["done"] | ~finite,
        )

    # --- phase 2: the decisions that follow a step or a check (no product) ----------------
    def decide(self, s, wl):
        base = self.base_key(s)
        mode = s["mode"]

        def final(s):
            return dict(s, done=jnp.array(True))

        def after(s):
            return self.after(
                s,
                base,
                wl,
                go_verify=mode == _CHECK,
                try_true=mode == _TRY_TRUE,
                go_lock=s["go_lock"],
                confirmed_once=s["confirmed_once"],
            )

        s = lax.cond(mode == _FINAL, final, after, dict(s, phase=jnp.zeros((), jnp.int32)))
        return dict(s, go_lock=jnp.array(False), confirmed_once=jnp.array(False))

    # --- what follows a step or a check ----------------------------------------------------
    def after(self, s, base, wl, *, go_verify, try_true, go_lock, confirmed_once):
        """Accept, restart explicitly, lock, restart thickly or stop (and ask for the final check)."""
        m, k_total, which = self.m, self.k_total, self.which
        theta, S, est, thr = s["theta"], s["S"], s["est"], s["thr"]
        wi = _wanted(s["j"], k_total, which)
        done = go_verify & s["ok"]
        # The bound and the true residual disagree (round-off, or frozen residuals of locked
        # pairs adding up): restart explicitly from the verified vectors, asking more of the bound.
        failed = go_verify & ~s["ok"]
        s = dict(s, restarts=s["restarts"] + failed.astype(jnp.int32))
        out_of_budget = s["restarts"] > s["max_restarts"]
        s = lax.cond(failed & ~out_of_budget, self.explicit_restart, lambda a: a, s)
        if self.confirm:
            true_lock = try_true & ~out_of_budget & jnp.all(s["res"] <= 0.5 * thr[wi])
            go_lock = go_lock | true_lock
            est = jnp.where(true_lock, est.at[wi].set(s["res"]), est)
            lock_key = jax.random.fold_in(base, m + 1)
            s = lax.cond(
                go_lock,
                lambda a: self.lock(*a, wl),
                lambda a: a[0],
                (s, theta, S, wi, est, lock_key, confirmed_once),
            )
        full = s["j"] == m
        need_restart = full & ~done & (s["restarts"] < s["max_restarts"]) & ~out_of_budget
        s = lax.cond(need_restart, lambda a: self.restart(*a, wl), lambda a: a[0], (s, theta, S))
        stop = done | out_of_budget | (full & ~need_restart)
        # A run that stops without checked residuals (its budget is spent) checks the wanted
        # Ritz vectors of its last basis: the final phase-1 step.
        final = stop & ~s["have_out"]
        return dict(
            s,
            done=stop & ~final,
            phase=jnp.where(final, 1, s["phase"]).astype(jnp.int32),
            mode=jnp.where(final, _FINAL, s["mode"]).astype(jnp.int32),
            confirmed=jnp.where(final, not self.confirm, s["confirmed"]),
        )

    def lock(self, s, theta, S, wi, est, key, confirmed_once, wl):
        """Lock the wanted Ritz pairs, restart from a fresh random vector orthogonal to them."""
        k_total = self.k_total
        s = self.rewrite(s, "lock", S[:, wi], key, wl)
        newH = jnp.zeros_like(s["H"]).at[jnp.arange(k_total), jnp.arange(k_total)].set(theta[wi])
        newrho = jnp.zeros_like(s["rho"]).at[:k_total].set(est[wi])
        return dict(
            s,
            H=newH,
            rho=newrho,
            j=jnp.asarray(k_total, jnp.int32),
            locks=s["locks"] + 1,
            stage=jnp.ones((), jnp.int32),
            rec=theta[wi],
            nconf=jnp.where(confirmed_once, s["nconf"] + 1, 0),
        )

    def restart(self, s, theta, S, wl):
        """Thick restart: keep ``p`` Ritz vectors and the last Lanczos vector (arrowhead)."""
        m, p, which = self.m, self.p, self.which
        if which == "both":
            lo, hi = _split_keep(p)
            idx = jnp.concatenate([jnp.arange(lo), m - hi + jnp.arange(hi)])
        elif which == "largest":
            idx = m - p + jnp.arange(p)
        else:
            idx = jnp.arange(p)
        s = self.rewrite(s, "restart", S[:, idx], None, wl)
        b = s["H"][m, m - 1]
        newH = jnp.zeros_like(s["H"])
        newH = newH.at[jnp.arange(p), jnp.arange(p)].set(theta[idx])
        newH = newH.at[p, :p].set(b * S[m - 1, idx])
        newH = newH.at[:p, p].set(b * S[m - 1, idx])
        newrho = jnp.zeros_like(s["rho"]).at[:p].set(jnp.abs(S[:, idx]).T @ s["rho"][:m])
        return dict(s, H=newH, rho=newrho, j=jnp.asarray(p, jnp.int32), restarts=s["restarts"] + 1)

    def explicit_restart(self, s):
        """Start again from the sum of the verified Ritz vectors (nothing locked or frozen)."""
        s = self.rewrite(s, "reset", _unit_sum(s["Y"], s["lam"].dtype), None, None)
        return dict(
            s,
            H=jnp.zeros_like(s["H"]),
            rho=jnp.zeros_like(s["rho"]),
            j=jnp.zeros((), jnp.int32),
            stage=jnp.zeros((), jnp.int32),
            tight=0.1 * s["tight"],
        )


def _initial_state(alg: ThickRestartLanczos, v0, key, like, tol, max_restarts, zero):
    """The state before the first step: ``v0`` (unit) in row 0 of an empty basis."""
    m, k_total = alg.m, alg.k_total
    acc = acc_dtype(like)
    wl = _work_like(like)
    zero_i = jnp.zeros((), jnp.int32)
    false = jnp.array(False)
    if alg.host_steps:  # the basis lives in host memory (HostBasisLanczos adds it) ...
        # ... and a decision that rewrites it leaves a plan here (kind, coefficients, key)
        V = dict(
            plan=zero_i,
            plan_C=jnp.zeros((m, m), acc),
            plan_key=jax.random.fold_in(key, 0),
        )
    else:
        store = jnp.dtype(alg.basis_dtype) if alg.basis_dtype is not None else acc
        V = dict(V=set_row(empty_basis(wl, m + 1, store), 0, tu.cast(v0, acc)))
    return dict(
        **V,
        H=jnp.zeros((m + 1, m), acc),
        rho=jnp.zeros((m + 1,), acc),  # norm of the residual part that left the basis, per row
        j=zero_i,
        restarts=zero_i,
        locks=zero_i,
        matvecs=zero_i,
        done=false,
        phase=zero_i,  # 0: a Lanczos step; 1: a residual check of the wanted Ritz vectors
        mode=zero_i,  # what the residual check is for (_CHECK, _TRY_TRUE, _FINAL) or _DECIDE
        go_lock=false,  # phase 2: lock the wanted pairs (decided by the last Lanczos step)
        confirmed_once=false,  # phase 2: the last sequence reproduced the locked set
        anorm=jnp.zeros((), acc),
        stage=zero_i,  # 0: searching; 1: confirming a locked set from a fresh vector
        nconf=zero_i,  # consecutive confirmations that reproduced the locked set
        rec=jnp.zeros((k_total,), acc),
        tight=jnp.ones((), acc),
        have_out=false,
        confirmed=false,
        finite=jnp.array(True),
        Y=tu.stacked_like(
            jax.tree_util.tree_map(lambda x: jnp.zeros((k_total,) + x.shape, acc), wl), wl
        ),
        lam=jnp.zeros((k_total,), acc),
        res=jnp.zeros((k_total,), acc),
        ok=false,
        # the last step's Ritz decomposition, kept for the residual check that follows it
        theta=jnp.zeros((m,), acc),
        S=jnp.zeros((m, m), acc),
        est=jnp.zeros((m,), acc),
        thr=jnp.ones((m,), acc),
        worst=jnp.full((), jnp.inf, acc),
        # dynamic settings: other values reuse the compiled steps
        key=key,
        tol=jnp.asarray(tol, acc),
        zero=jnp.asarray(zero, acc),  # zero_tol: the test near 0, relative to ||A||
        max_restarts=jnp.asarray(max_restarts, jnp.int32),
    )


_initial_state_jit = jax.jit(_initial_state, static_argnums=0)


@partial(jax.jit, static_argnums=0)
def _random_initial_state(alg: ThickRestartLanczos, key, like, tol, max_restarts, zero):
    """The initial state from a random unit start vector (``v0=None``), in one program."""
    k_start, k_run = jax.random.split(key)
    v = tu.normal_like(k_start, like)
    return _initial_state(alg, tu.scale(1.0 / tu.norm(v), v), k_run, like, tol, max_restarts, zero)


@jax.jit
def _random_start(key, like):
    """The random unit start vector of :func:`_random_initial_state` and the run's key."""
    k_start, k_run = jax.random.split(key)
    v = tu.normal_like(k_start, like)
    return tu.scale(1.0 / tu.norm(v), v), k_run


# ---------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------


_normal_like_jit = jax.jit(tu.normal_like)


def _start_vector(v0, like, key, *, what="v0"):
    """A unit start vector: random, a params-shaped pytree, or the sum of a stacked block."""
    if v0 is None:
        # compiled: eager generation costs ~15 ms per call (benchmarks/)
        v = _normal_like_jit(key, like)
    else:
        try:
            tu.assert_same_structure(
                v0, like, name=what, like_name="operator.like", check_dtype=False
            )
            v = v0
        except ValueError as single_err:
            try:
                tu.assert_same_structure(
                    v0, like, name=what, like_name="operator.like", check_dtype=False, leading=1
                )
            except ValueError:
                raise ValueError(
                    f"`{what}` must be a pytree shaped like the operator's parameters, or a "
                    "stacked block of such vectors (leading axis on every leaf, e.g. a previous "
                    f"result's `eigenvectors`). {single_err}"
                ) from None
            v = _sum_rows(v0)
        v = _cast_like(v, like)
        v = tu.like_sharding(v, like)  # explicit mesh: a user's vector takes each leaf's type
    nv = _norm_jit(v)
    if not tu.is_traced(nv):
        if not np.isfinite(float(nv)):
            raise ValueError(
                f"`{what}` contains NaN or Inf; pass a finite start vector or `{what}=None`."
            )
        if float(nv) == 0.0:
            raise ValueError(
                f"`{what}` is the zero vector; pass a non-zero start vector or `{what}=None`."
            )
    # under jit a zero v0 gives NaN eigenvalues instead of an error
    return _unit_jit(nv, v)


# one compiled program each (eagerly: one per leaf and operation, compiled at the first warm start)
_sum_rows = jax.jit(lambda v0: jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), v0))
_cast_like = jax.jit(
    lambda v, like: jax.tree_util.tree_map(
        lambda x, ref: jnp.asarray(x, jnp.result_type(ref)), v, like
    )
)
_norm_jit = jax.jit(tu.norm)
_unit_jit = jax.jit(lambda nv, v: tu.scale(1.0 / nv, v))


def eigsh(
    op: OperatorLike,
    k: int = 6,
    *,
    key: PRNGKey,
    which: str = "largest",
    num_iters: int | None = None,
    tol: float = 1e-6,
    zero_tol: float | None = None,
    max_restarts: int = 30,
    v0: PyTree | None = None,
    reorthogonalize: bool = True,
    basis_dtype=None,
    confirm: bool = True,
    like=None,
    basis: str = "device",
    driver: str = "auto",
    progress: bool | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
) -> EigshResult:
    r"""The ``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Finds the algebraically largest (``which="largest"``), smallest
    (``"smallest"``) or both ends (``"both"``: ``k`` of each) eigenvalues
    :math:`\lambda_i` and unit eigenvectors :math:`v_i` of :math:`A` using only
    products :math:`A v` (see the module docstring for the algorithm and
    references: Lanczos 1950, Paige 1971, Wu & Simon 2000).

    Args:
      op: a :class:`hvp.LinearOperator` (``hvp.hessian(...)``, ``hvp.ggn(...)``,
        ``hvp.from_dense(...)``) or a matvec callable together with ``like=``.
      k: number of eigenpairs (per end for ``"both"``); ``1 <= k <= n``.
      key: PRNG key (required) for the start vector and the fresh vectors of breakdowns,
        locking and confirmation: ``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``;
        same key, same result, whichever driver.
      which: ``"largest"``, ``"smallest"`` or ``"both"`` (algebraic order).
      num_iters: Lanczos basis size ``m`` per restart cycle, i.e. the Krylov steps (products)
        of one cycle (default ``max(2 * k_total + 10, 30)`` with ``k_total`` = ``2k`` for
        ``"both"``, capped at ``n``). Memory is ``(m + 1) * n * bytes(basis_dtype)``.
      tol: convergence tolerance relative to each eigenvalue:
        :math:`\|A v_i - \lambda_i v_i\| \le \max(\mathrm{tol}\cdot|\lambda_i|,\
        \mathrm{zero\_tol}\cdot\|A\|)` (the per-pair values are returned in
        ``thresholds``; see the module docstring for the sources).
      zero_tol: the test near 0, relative to :math:`\|A\|` (a backward error: a pair that
        passes is an exact eigenpair of :math:`A + E`, :math:`\|E\| \le
        \mathrm{zero\_tol}\,\|A\|`). Default :func:`hvp.linalg.zero_floor`:
        :math:`\max(\epsilon^{2/3}, 64\epsilon)` with :math:`\epsilon` the machine epsilon of
        the products' dtype (about ``3.7e-11`` in float64, ``2.4e-5`` in float32, ARPACK's
        :math:`\epsilon^{2/3}`); values below the round-off floor (:math:`64\epsilon`,
        :math:`4\epsilon` for bfloat16/float16 products) are raised to it, since a smaller
        residual cannot be verified. Eigenvalues within ``zero_tol * ||A||`` of 0 are not
        resolved relative to their own size; eigenvalues above it get ``tol`` relative
        accuracy. :math:`\|A\|` is the largest :math:`\|Av\|` or Ritz value magnitude seen (a
        lower bound: the test is never looser than stated).
      max_restarts: thick/explicit restarts allowed before giving up (a
        warning is emitted and ``converged`` says which pairs missed ``tol``).
        Locking/confirmation restarts are budgeted separately (at most
        ``k + 3``, ``2k + 3`` for ``"both"``).
      v0: optional warm start: a pytree like the parameters, or a stacked
        block of vectors (e.g. the previous call's ``eigenvectors``), whose sum
        is used as start vector.
      reorthogonalize: must be ``True`` (full reorthogonalisation): without it the
        Lanczos basis loses orthogonality and returns spurious copies of converged
        eigenvalues, which locking and confirmation cannot tell from true multiplicities.
      basis_dtype: storage dtype of the Lanczos basis (e.g. ``jnp.float32`` or
        ``jnp.bfloat16`` for float32/float64 parameters) to save memory; products
        and projections run in the parameters' dtype. Lower precision limits
        the attainable accuracy (about ``1e-6`` with float32, ``1e-2`` with
        bfloat16 storage). Default: the accumulation dtype (at least float32,
        also for bfloat16/float16 parameters).
      confirm: confirm the wanted set, with its multiplicities, by a restart
        from a fresh random vector orthogonal to the converged pairs (see the
        module docstring). ``False`` saves those Lanczos sequences but may
        return a repeated eigenvalue with too few copies. Ignored for ``k=1``, where
        no copy can be missing.
      like: example pytree when ``op`` is a plain matvec callable.
      basis: where the Krylov basis lives. ``"device"`` (default): thick-restart Lanczos with
        the full basis, ``(num_iters + 1) n`` numbers. ``"host"``: the same algorithm and result
        with the basis in host RAM (JAX arrays on the host's CPU device,
        :mod:`hvp.linalg._host_basis`): the device holds ``k`` Ritz vectors, two vectors per
        Lanczos step and about ``3k`` during a residual check; each step sends ``A v_j`` to the
        host and the next basis vector back (``2n`` numbers) and reorthogonalises on the host
        (``4-6 (j + 1) n`` flops). Host driver only (progress and checkpoints work), one
        process. ``"none"``: the memory-lean mode for very
        large models (:mod:`hvp.linalg._lean`): Lanczos without reorthogonalisation, the
        Cullum-Willoughby test against spurious Ritz values and a second pass for the
        eigenvectors; ``(4 + 2k) n`` numbers whatever ``num_iters`` (then the most Lanczos steps,
        default ``max(4 k_total + 60, 300)``; the second pass repeats them). It returns each
        *distinct* eigenvalue once (multiplicities are not seen), does not restart, and ignores
        ``max_restarts`` and ``confirm``; the result is a :class:`LeanEigshResult`.
      driver: ``"auto"`` (compiled inside ``jax.jit``/``vmap``, host otherwise), ``"compiled"``
        or ``"host"``; see :mod:`hvp.linalg._driver`. Both give the same numbers.
      progress: host driver: show products, the worst wanted residual relative to its
        threshold, the locked pairs and the restarts on stderr (``None``: when stderr is a
        terminal). The number of products is not known in advance (no time estimate).
      checkpoint: host driver: a path or :class:`hvp.linalg.Checkpoint` to save the state to
        and resume from (same arguments, same result, bit for bit).

    Returns:
      :class:`EigshResult`. Outside ``jit`` ``num_matvecs`` and ``num_restarts`` are Python
      ints; inside ``jax.jit``/``jax.vmap`` (compiled driver) they are traced int32 scalars, a
      non-finite result is returned as NaN instead of raising, and no warning is emitted
      (read ``converged``).

    Raises:
      ValueError: ``k`` outside ``1..n`` (``2k > n`` for ``"both"``), unknown
        ``which``, ``v0`` not shaped like the parameters, bad ``num_iters``,
        ``reorthogonalize=False``, negative or non-finite ``tol`` or ``zero_tol``, an unknown
        ``basis``,
        ``basis_dtype`` with ``basis="none"``, ``basis="host"`` with ``driver="compiled"``,
        inside ``jax.jit``/``jax.vmap`` or with several processes.
      TypeError: ``key`` is not a PRNG key, ``k`` not an int.
      NonFiniteError: NaN or Inf in the result (the operator produced them,
        e.g. an overflow of half-precision products).

    Examples:
      >>> # A rank-2 operator with a triple zero eigenvalue at the bottom.
      >>> import jax, numpy as np, hvp
      >>> A = np.diag([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
      >>> r = hvp.eigsh(hvp.from_dense(A), 3, which="smallest", key=jax.random.key(0))
      >>> np.round(np.asarray(r.eigenvalues), 6).tolist(), bool(r.converged.all())
      ([0.0, 0.0, 0.0], True)
      >>> # inside jax.jit (the compiled driver)
      >>> top = jax.jit(lambda a: hvp.eigsh(hvp.from_dense(a), 1, key=jax.random.key(0)).eigenvalues)
      >>> round(float(top(jax.numpy.asarray(A))[0]), 6)
      2.0
      >>> # the basis in host memory (same result; host driver only)
      >>> h = hvp.eigsh(hvp.from_dense(A), 3, which="smallest", basis="host", key=jax.random.key(0))
      >>> np.round(np.asarray(h.eigenvalues), 6).tolist(), h.num_matvecs == r.num_matvecs
      ([0.0, 0.0, 0.0], True)
    """
    op = coerce_operator(op, like, what="spectrum")
    n = op.size
    check_key(key)
    if which not in WHICH:
        raise ValueError(f"`which` must be one of {WHICH}, got {which!r}.")
    if not isinstance(reorthogonalize, (bool, np.bool_)):
        raise TypeError(
            f"`reorthogonalize` must be a bool, got {type(reorthogonalize).__name__} "
            f"({reorthogonalize!r})."
        )
    if not reorthogonalize:
        raise ValueError(
            "eigsh needs `reorthogonalize=True` (full reorthogonalisation): without it the Lanczos "
            "basis loses orthogonality and produces spurious copies of converged eigenvalues, "
            "which its locking and confirmation would take for multiplicities. Its basis is "
            "bounded by `num_iters` (thick restarts), so full reorthogonalisation costs little; "
            "to save memory lower `num_iters` or use `basis_dtype=jnp.float32`."
        )
    k = check_int("k", k, minimum=1)
    k_total = 2 * k if which == "both" else k
    if k_total > n:
        what = "2k" if which == "both" else "k"
        raise ValueError(
            f"{what}={k_total} exceeds the operator size n={n}; ask for at most "
            f"{n // 2 if which == 'both' else n} eigenpairs"
            f"{' per end' if which == 'both' else ''}."
        )
    tol = check_finite_float(
        "tol", tol, hint="It is the relative accuracy per eigenvalue (e.g. 1e-6)."
    )
    if zero_tol is not None:
        zero_tol = check_finite_float(
            "zero_tol",
            zero_tol,
            hint="It is the accuracy near 0 relative to ||A|| (e.g. 1e-8; None: the default).",
        )
        if zero_tol >= 1.0:
            raise ValueError(
                f"`zero_tol`={zero_tol:g} must be below 1: it is the accuracy near 0 relative to "
                "||A||, and at 1 or more every Ritz pair would pass whatever its eigenvalue "
                "(e.g. 1e-3 accepts values within 0.001 ||A|| of 0; None: the default)."
            )
    max_restarts = check_int("max_restarts", max_restarts, minimum=0)
    if basis not in BASES:
        raise ValueError(
            f"`basis` must be one of {BASES}, got {basis!r}: 'device' keeps the full Lanczos "
            "basis on the device, 'host' keeps it in host memory (the device holds O(k) vectors), "
            "'none' keeps O(1) vectors (the memory-lean mode)."
        )
    if basis == "host":
        from hvp.linalg._host_basis import check_host_basis

        check_host_basis(op, key, v0, driver)
    if basis == "none":
        from hvp.linalg._lean import lean_eigsh

        if basis_dtype is not None:
            raise ValueError(
                "`basis_dtype` does not apply to basis='none' (no basis is stored); drop it."
            )
        m = max(4 * k_total + 60, 300) if num_iters is None else num_iters
        m = check_int("num_iters", m, minimum=1)
        k_start, _ = jax.random.split(key)
        return lean_eigsh(
            op,
            k,
            start=_start_vector(v0, op.like, k_start),
            key=key,
            v0=v0,
            which=which,
            num_iters=m,
            tol=tol,
            zero_tol=zero_tol,
            driver=driver,
            progress=progress,
            checkpoint=checkpoint,
        )
    if num_iters is None:
        m = max(2 * k_total + 10, 30)
    else:
        m = check_int("num_iters", num_iters, minimum=1)
        if m < k_total:
            raise ValueError(
                f"`num_iters`={m} must be at least the number of wanted pairs ({k_total})."
            )
    if confirm:  # room for the locked pairs and a confirming sequence
        m = max(m, k_total + 2 * _num_extra(which))
    m = min(m, n)
    # Ritz vectors kept at a thick restart: the wanted ones plus half the spare room.
    p = max(min(m - 1, k_total + (m - k_total) // 2), 0)
    if basis_dtype is not None:
        basis_dtype = jnp.dtype(basis_dtype)
        if not jnp.issubdtype(basis_dtype, jnp.floating):
            raise TypeError(f"`basis_dtype` must be a floating dtype, got {basis_dtype}.")
    param_dtypes = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(op.like)]
    acc = tu.accumulation_dtype(*param_dtypes)
    low = max(param_dtypes, key=lambda d: float(jnp.finfo(d).eps))  # the least precise
    eps = float(jnp.finfo(low).eps)
    n_extra = _num_extra(which)
    # Confirmation needs room for one more pair per end, in the space and in the basis.
    # One wanted pair per end (k=1) cannot hide a copy: whatever its multiplicity, the extreme
    # eigenvalue is one number; no confirmation is needed (it tripled the cost of k=1).
    single = k == 1
    room = k_total + n_extra <= n and m >= k_total + 2 * n_extra
    can_confirm = bool(confirm) and not single and room
    floor = _round_off_floor(low, basis_dtype)
    zero = max(zero_floor(low) if zero_tol is None else zero_tol, floor)
    alg = ThickRestartLanczos(
        m=m,
        k_total=k_total,
        which=which,
        p=p,
        max_locks=k_total + 1 + _CONFIRMATIONS,
        basis_dtype=None if basis_dtype is None else basis_dtype.name,
        eps=eps,
        # breakdown at 32 eps_acc ||A||, or at the round-off of a half-precision product
        eps_break=max(float(jnp.finfo(acc).eps), eps / _BREAKDOWN),
        floor=_round_off_floor(low, basis_dtype),
        confirm=can_confirm,
        full_space=bool(confirm) and not single and not room,
        single=single,
    )
    if basis == "host":  # the same algorithm with its basis in host memory
        from hvp.linalg._host_basis import HostBasisLanczos, host_initial_state

        alg = HostBasisLanczos(**{f.name: getattr(alg, f.name) for f in dataclasses.fields(alg)})
        if v0 is None:
            start, k_run = _random_start(key, op.like)
        else:
            k_start, k_run = jax.random.split(key)
            start = _start_vector(v0, op.like, k_start)
        state = _initial_state_jit(alg, start, k_run, op.like, tol, max_restarts, zero)
        state = host_initial_state(alg, state, start)
    elif v0 is None:  # one compiled program (eagerly: about 50 small ones, 0.5 s cold on CPU)
        state = _random_initial_state(alg, key, op.like, tol, max_restarts, zero)
    else:
        k_start, k_run = jax.random.split(key)
        start = _start_vector(v0, op.like, k_start)
        state = _initial_state_jit(alg, start, k_run, op.like, tol, max_restarts, zero)
    out, chosen = run(
        alg,
        op,
        state,
        driver=driver,
        progress=progress,
        checkpoint=checkpoint,
        traced=(key, v0),
        consume=True,
    )
    lam, vecs, res, conv, nmv, nrs, thr, confirmed, finite, anorm = out
    if not tu.is_traced(nmv, nrs):  # host driver, or the compiled one called outside jit
        nmv, nrs = int(nmv), int(nrs)
    result = EigshResult(
        eigenvalues=lam,
        eigenvectors=vecs,
        residuals=res,
        converged=conv,
        num_matvecs=nmv,
        num_restarts=nrs,
        thresholds=thr,
        which=which,
        dtype_policy=dtype_policy(op.like),
    )
    if tu.is_traced(lam, conv):
        return result  # inside jit/vmap: NaN instead of an error, `converged` instead of a warning
    if not bool(finite):
        raise NonFiniteError(
            f"eigsh on the {op.name} operator produced NaN or Inf (within {int(nmv)} matvecs): "
            "its matvec returns non-finite values (in half precision, a product may overflow: "
            "use float32 parameters or scale the loss). Check the parameters and data "
            "(`hvp.tree.nonfinite_leaves`), or build the operator with `check_finite=True` to "
            "find the leaf."
        )
    if not np.all(np.asarray(conv)):
        warnings.warn(
            _not_converged_message(
                f"eigsh ({which}, k={k}) on the {op.name} operator",
                lam=lam,
                res=res,
                conv=conv,
                thr=thr,
                tol=tol,
                zero=zero,
                anorm=float(anorm),
                confirmed=bool(confirmed) or not can_confirm,
                restarts=int(nrs),
                matvecs=int(nmv),
            ),
            ConvergenceWarning,
            stacklevel=2,
        )
    return result


def _not_converged_message(
    what, *, lam, res, conv, thr, tol, zero, anorm, confirmed, restarts, matvecs
) -> str:
    """The warning of a run whose pairs missed their thresholds: what can help, case by case.

    Pairs near 0 (``|lambda| <= residual + zero_tol * ||A||``: the value cannot be told from 0)
    are told the accuracy reached relative to ``||A||`` and the ``zero_tol`` that accepts it (a
    looser ``tol`` cannot help them); the others the accuracy reached relative to ``|lambda|``.
    """
    lam, res, thr = (np.asarray(x, np.float64) for x in (lam, res, thr))
    conv = np.asarray(conv, bool)
    miss = ~conv & (res > thr)
    # near 0: the value cannot be told from 0 by its residual (its interval holds 0)
    near = miss & (np.abs(lam) <= res + zero * anorm)
    far = miss & ~near
    parts = [
        f"{what}: {int(conv.sum())} of {conv.size} eigenpairs converged after {restarts} "
        f"restarts and {matvecs} matvecs."
    ]
    if near.any():
        reached = float(np.max(res[near])) / anorm if anorm > 0 else float("inf")
        parts.append(
            f" {int(near.sum())} Ritz value(s) near 0 (|lambda| <= "
            f"{float(np.max(np.abs(lam[near]))):.3g}, ||A|| >= {anorm:.3g}) are tested relative "
            f"to ||A||: their residuals reach {reached:.2g} ||A|| against zero_tol={zero:.2g}. "
            "Eigenvalues clustered near 0 (a singular GGN's null space and its smallest "
            "eigenvalues) converge slowly: increase `num_iters` (a longer basis separates them "
            f"faster than restarts) or `max_restarts`, or accept a coarser accuracy near 0 with "
            f"zero_tol={_up(10 * reached)} (pairs lock at a tenth of their threshold; each "
            "such value is then an eigenvalue to within zero_tol * ||A||); `tol` does not "
            "apply there."
        )
    if far.any():
        rel = float(np.max(res[far] / np.abs(lam[far])))
        parts.append(
            f" {int(far.sum())} pair(s) miss tol={tol:g} relative to |lambda| (residual/|lambda| "
            f"up to {rel:.2g}): increase `num_iters` or `max_restarts`, or accept "
            f"tol={_up(10 * rel)} (pairs lock at a tenth of their threshold)."
        )
    if not confirmed and not miss.any():
        parts.append(
            " The residuals are within their thresholds, but the set was not confirmed by a "
            "restart from a fresh vector (a repeated eigenvalue may lack copies): increase "
            "`max_restarts`."
        )
    parts.append(
        " `result.converged` marks the pairs that did converge; an eigenvalue of the operator "
        "lies within `result.residuals[i]` of each `eigenvalues[i]`."
    )
    return "".join(parts)


def _up(x: float) -> str:
    """``x`` rounded up to two significant digits (a tolerance that accepts what was reached)."""
    if not np.isfinite(x) or x <= 0:
        return f"{x:.2g}"
    e = np.floor(np.log10(x)) - 1
    return f"{np.ceil(x / 10**e) * 10**e:.2g}"
