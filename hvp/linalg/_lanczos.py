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
  shape and sharding. The whole run is one ``jax.jit``-compiled
  ``lax.while_loop``; the operator is passed in as an argument (it is a pytree).
  :func:`eigsh` itself cannot be called inside ``jit``/``vmap`` (it checks
  its result on the host): it raises a ``TypeError`` saying so.
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
  single-vector Lanczos or ARPACK).
* Convergence, per pair (ARPACK convention, documented in ``docs/algorithms.md``):
  :math:`\|A y_i - \theta_i y_i\| \le \max(\mathrm{tol}\cdot\max(|\theta_i|,
  \epsilon^{2/3}\|A\|),\ 64\,\epsilon\,\|A\|)`, with :math:`\epsilon` the
  machine epsilon of the products' dtype and :math:`\|A\|` the largest
  :math:`\|Av\|` or :math:`|\theta|` seen. Every eigenvalue thus gets an error
  small relative to *its own* magnitude (at most about ``tol * |lambda_i|``,
  usually ``tol**2``-like), down to the round-off floor
  :math:`64\epsilon\|A\|` below which a residual cannot be verified (zero
  eigenvalues of a singular operator come back as :math:`O(\epsilon\|A\|)`).
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

Memory: the basis holds ``(num_iters + 1) * n`` numbers of ``basis_dtype``
(e.g. ``num_iters=40`` and ``n = 10^7`` float32 parameters: 1.6 GB), plus
``k`` Ritz vectors at the end. ``basis_dtype=jnp.bfloat16`` halves float32
storage but limits orthogonality, hence accuracy, to about ``1e-2`` relative;
float32 storage with float64 products gives about ``1e-6``.
"""

from __future__ import annotations

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hvp import tree as tu
from hvp.linalg._checks import DtypePolicy, check_key, dtype_policy
from hvp.operators import LinearOperator, NonFiniteError, as_operator
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["eigsh", "EigshResult", "WHICH"]

WHICH = ("largest", "smallest", "both")
_HI = lax.Precision.HIGHEST


@tu.result(static=("which", "dtype_policy"))
class EigshResult:
    """Result of :func:`eigsh`.

    Attributes:
      eigenvalues: shape ``(k,)`` (``(2k,)`` for ``which="both"``), ascending.
      eigenvectors: pytree like the parameters with a leading axis matching
        ``eigenvalues`` (unit norm; use ``hvp.tree.index(r.eigenvectors, i)``).
      residuals: ``||A v_i - lambda_i v_i||`` per pair, from true products.
      converged: bool per pair: ``residuals <= thresholds`` and the wanted set
        (with its multiplicities) was confirmed from a fresh start vector.
      num_matvecs: operator products used (Lanczos steps + true residuals).
      num_restarts: restarts performed (thick restarts, locking/confirmation
        restarts and explicit restarts after a failed residual check).
      thresholds: the per-pair tolerance the residuals were tested against,
        ``max(tol * max(|lambda_i|, eps**(2/3) ||A||), 64 eps ||A||)`` (the floor is
        ``4 eps ||A||`` for half-precision products, see :func:`eigsh`).
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
    num_restarts: jax.Array
    thresholds: jax.Array
    which: str = "largest"
    dtype_policy: DtypePolicy | None = None


# ---------------------------------------------------------------------------
# Per-leaf block helpers (a "block" is a pytree with a leading axis).
# ---------------------------------------------------------------------------


def _rows_dot(V, w):
    """``V^T w``: inner products of every row of the block ``V`` with ``w``, shape ``(rows,)``."""
    parts = []
    for Vl, wl in zip(jax.tree_util.tree_leaves(V), jax.tree_util.tree_leaves(w)):
        ct = jnp.result_type(wl)
        parts.append(tu.contract_rows(Vl.astype(ct), wl, precision=_HI))
    return sum(parts[1:], parts[0])


def _combine(c, V, like):
    """``sum_i c_i V_i`` (``c`` of shape ``(rows,)``) in the dtypes of ``like``; or ``C V`` for 2-D ``c``."""
    return jax.tree_util.tree_map(
        lambda Vl, x: jnp.tensordot(c.astype(x.dtype), Vl.astype(x.dtype), axes=1, precision=_HI),
        V,
        like,
    )


def _get_row(V, j, like):
    return jax.tree_util.tree_map(lambda Vl, x: Vl[j].astype(x.dtype), V, like)


def _set_row(V, j, v):
    return jax.tree_util.tree_map(lambda Vl, x: Vl.at[j].set(x.astype(Vl.dtype)), V, v)


def _empty_basis(like, rows, basis_dtype):
    zeros = jax.tree_util.tree_map(
        lambda x: jnp.zeros((rows,) + jnp.shape(x), basis_dtype or jnp.result_type(x)), like
    )
    return tu.stacked_like(zeros, like)  # each row sharded like its parameter leaf


def _orthogonalize(V, w, mask, like):
    """Classical Gram-Schmidt of ``w`` against the rows of ``V`` selected by ``mask``.

    Two passes, and a third when the second still removes more than half of
    the norm (near-invariant subspace). Returns the total coefficients and the
    orthogonalised vector.
    """

    def one_pass(w):
        h = _rows_dot(V, w) * mask
        return h, tu.sub(w, _combine(h, V, like))

    h1, w1 = one_pass(w)
    h2, w2 = one_pass(w1)
    n1, n2 = tu.norm(w1), tu.norm(w2)

    def third(args):
        h, w = args
        h3, w3 = one_pass(w)
        return h + h3, w3

    h, w = lax.cond(n2 < 0.5 * n1, third, lambda a: a, (h1 + h2, w2))
    return h, w


def _fresh_vector(key, V, mask, like):
    """A random unit vector orthogonal to the masked rows of ``V`` (zero if none is left)."""
    r = tu.normal_like(key, like)
    for _ in range(2):  # a random vector is far from the span: two plain passes suffice
        r = tu.sub(r, _combine(_rows_dot(V, r) * mask, V, like))
    nr = tu.norm(r)  # about sqrt(n - rank) if room is left, round-off (about eps sqrt(n)) if not
    ok = nr > jnp.sqrt(jnp.finfo(nr.dtype).eps) * jnp.sqrt(jnp.asarray(tu.size(like), nr.dtype))
    return tu.scale(jnp.where(ok, 1.0 / jnp.where(ok, nr, 1.0), 0.0), r)


def _eps(like, basis_dtype):
    dts = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(like)]
    if basis_dtype is not None:
        dts.append(jnp.dtype(basis_dtype))
    return max(float(jnp.finfo(d).eps) for d in dts)


def lanczos_step(op, V, j, anorm, key, like, *, eps):
    """One fully reorthogonalised Lanczos (Arnoldi) step on basis row ``j``.

    Returns ``(h, beta, v_next, anorm, broke)``, see :func:`_lanczos_step`.
    """
    return _lanczos_step(op, V, j, anorm, key, like, eps=eps)[:5]


def _lanczos_step(op, V, j, anorm, key, like, *, eps, apply=None):
    """One fully reorthogonalised Lanczos (Arnoldi) step on basis row ``j``.

    Returns ``(h, beta, v_next, anorm, broke, beta_raw)``: ``h`` the projection
    coefficients of ``A v_j`` on rows ``0..j`` (``h[j]`` is alpha), ``beta`` the
    coupling to the next vector (0 on breakdown), ``v_next`` the next unit
    basis vector (a fresh random one orthogonal to the basis on breakdown, zero
    if the space is exhausted), ``broke`` whether ``beta_raw``, the norm of the
    orthogonalised product, is below ``_BREAKDOWN * eps * anorm`` (relative to
    the running estimate ``anorm`` of ``||A||``).
    """
    apply = op._apply if apply is None else apply
    rows = tu.leading_dim(V)
    v = _get_row(V, j, like)
    w = apply(v)
    anorm = jnp.maximum(anorm, tu.norm(w))
    mask = (jnp.arange(rows) <= j).astype(anorm.dtype)
    h, w = _orthogonalize(V, w, mask, like)
    beta = tu.norm(w)
    broke = beta <= _BREAKDOWN * eps * anorm

    def normal(_):
        return beta, tu.scale(1.0 / jnp.where(beta > 0, beta, 1.0), w)

    def fresh(_):
        return jnp.zeros_like(beta), _fresh_vector(key, V, mask, like)

    beta_rec, v_next = lax.cond(broke, fresh, normal, None)
    return h, beta_rec, v_next, anorm, broke, beta


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
# The compiled driver.
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


def zero_floor(dtype, tol: float = 1e-6) -> float:
    """The smallest tolerance, relative to ``||A||``, that :func:`eigsh` applies to a pair.

    ``max(tol * eps**(2/3), 64 * eps)`` with ``eps`` the machine epsilon of ``dtype``
    (the products' dtype): eigenvalues of magnitude below ``zero_floor * ||A||`` cannot be
    told from 0 by their residuals. Used as the least "zero" threshold of
    :func:`hvp.linalg.spectrum_summary`.

    Examples:
        >>> import numpy as np
        >>> from hvp.linalg import zero_floor
        >>> zero_floor(np.float32) == 64 * float(np.finfo(np.float32).eps)  # 64 eps > 1e-6 eps**(2/3)
        True
    """
    eps = float(jnp.finfo(dtype).eps)
    return max(float(tol) * eps ** (2.0 / 3.0), _round_off_floor(dtype))


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


@partial(
    jax.jit,
    static_argnames=(
        "m",
        "k_total",
        "which",
        "p",
        "max_locks",
        "basis_dtype",
        "eps",
        "eps_break",
        "floor",
        "confirm",
        "full_space",
    ),
)
def _eigsh_run(
    op,
    v0,
    key,
    tol,
    max_restarts,
    *,
    m,
    k_total,
    which,
    p,
    max_locks,
    basis_dtype,
    eps,
    eps_break,
    floor,
    confirm,
    full_space=False,
):
    like = op.like
    acc = tu.accumulation_dtype(*[jnp.result_type(x) for x in jax.tree_util.tree_leaves(like)])
    # the algorithm's vectors: shaped like the parameters, in the accumulation dtype
    wl = tu.like_sharding(
        jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x), acc), like), like
    )
    store = basis_dtype or acc

    def apply(v):  # products in the parameters' dtype, everything else in `acc`
        v = jax.tree_util.tree_map(lambda x, ref: x.astype(jnp.result_type(ref)), v, like)
        return jax.tree_util.tree_map(lambda y: jnp.asarray(y).astype(acc), op._apply(v))

    eps23 = eps ** (2.0 / 3.0)

    def thresholds(lam, anorm):
        """Per-pair tolerance (ARPACK convention, floored at the product round-off)."""
        return jnp.maximum(tol * jnp.maximum(jnp.abs(lam), eps23 * anorm), floor * anorm)

    V = _set_row(_empty_basis(wl, m + 1, store), 0, tu.cast(v0, acc))
    zero_i = jnp.zeros((), jnp.int32)
    false = jnp.array(False)
    state = dict(
        V=V,
        H=jnp.zeros((m + 1, m), acc),
        rho=jnp.zeros((m + 1,), acc),  # norm of the residual part that left the basis, per row
        j=zero_i,
        restarts=zero_i,
        locks=zero_i,
        matvecs=zero_i,
        done=false,
        anorm=jnp.zeros((), acc),
        phase=zero_i,  # 0: searching; 1: confirming a locked set from a fresh vector
        nconf=zero_i,  # consecutive confirmations that reproduced the locked set
        rec=jnp.zeros((k_total,), acc),
        tight=jnp.ones((), acc),
        have_out=false,
        confirmed=false,
        Y=tu.stacked_like(
            jax.tree_util.tree_map(lambda x: jnp.zeros((k_total,) + x.shape, acc), wl), wl
        ),
        lam=jnp.zeros((k_total,), acc),
        res=jnp.zeros((k_total,), acc),
        ok=false,
    )

    def ritz_vectors(s, cols):
        Vm = jax.tree_util.tree_map(lambda Vl: Vl[:m], s["V"])
        return _combine(cols.T, Vm, wl)

    def verify(s, S, wi, confirmed):
        """True residuals of the wanted Ritz pairs (``k_total`` products)."""
        Y = ritz_vectors(s, S[:, wi])
        norms = jnp.sqrt(jax.vmap(lambda y: tu.dot(y, y))(Y))
        Y = jax.vmap(lambda y, nn: tu.scale(1.0 / jnp.where(nn > 0, nn, 1.0), y))(Y, norms)
        AY = jax.vmap(apply)(Y)
        lam = jax.vmap(tu.dot)(Y, AY)
        R = jax.vmap(lambda ay, y, mu: tu.axpy(-mu, y, ay))(AY, Y, lam)
        res = jnp.sqrt(jax.vmap(lambda r: tu.dot(r, r))(R))
        anorm = jnp.maximum(s["anorm"], jnp.max(jnp.sqrt(jax.vmap(lambda a: tu.dot(a, a))(AY))))
        ok = jnp.all(res <= thresholds(lam, anorm))
        return dict(
            s,
            Y=Y,
            lam=lam,
            res=res,
            ok=ok,
            anorm=anorm,
            have_out=jnp.array(True),
            confirmed=confirmed,
            matvecs=s["matvecs"] + k_total,
        )

    def lock(s, theta, S, wi, est, key, confirmed_once):
        """Lock the wanted Ritz pairs, restart from a fresh random vector orthogonal to them."""
        kept = ritz_vectors(s, S[:, wi])
        rows = jnp.arange(m + 1)
        newV = jax.tree_util.tree_map(
            lambda Vl, K: jnp.zeros_like(Vl).at[:k_total].set(K.astype(Vl.dtype)), s["V"], kept
        )
        fresh = _fresh_vector(key, newV, (rows < k_total).astype(acc), wl)
        newV = _set_row(newV, k_total, fresh)
        newH = jnp.zeros_like(s["H"]).at[jnp.arange(k_total), jnp.arange(k_total)].set(theta[wi])
        newrho = jnp.zeros_like(s["rho"]).at[:k_total].set(est[wi])
        return dict(
            s,
            V=newV,
            H=newH,
            rho=newrho,
            j=jnp.asarray(k_total, jnp.int32),
            locks=s["locks"] + 1,
            phase=jnp.ones((), jnp.int32),
            rec=theta[wi],
            nconf=jnp.where(confirmed_once, s["nconf"] + 1, 0),
        )

    def restart(s, theta, S):
        """Thick restart: keep ``p`` Ritz vectors and the last Lanczos vector (arrowhead)."""
        if which == "both":
            lo, hi = _split_keep(p)
            idx = jnp.concatenate([jnp.arange(lo), m - hi + jnp.arange(hi)])
        elif which == "largest":
            idx = m - p + jnp.arange(p)
        else:
            idx = jnp.arange(p)
        kept = ritz_vectors(s, S[:, idx])
        last = _get_row(s["V"], m, wl)
        newV = jax.tree_util.tree_map(
            lambda Vl, K, L: (
                jnp.zeros_like(Vl).at[:p].set(K.astype(Vl.dtype)).at[p].set(L.astype(Vl.dtype))
            ),
            s["V"],
            kept,
            last,
        )
        b = s["H"][m, m - 1]
        newH = jnp.zeros_like(s["H"])
        newH = newH.at[jnp.arange(p), jnp.arange(p)].set(theta[idx])
        newH = newH.at[p, :p].set(b * S[m - 1, idx])
        newH = newH.at[:p, p].set(b * S[m - 1, idx])
        newrho = jnp.zeros_like(s["rho"]).at[:p].set(jnp.abs(S[:, idx]).T @ s["rho"][:m])
        return dict(
            s, V=newV, H=newH, rho=newrho, j=jnp.asarray(p, jnp.int32), restarts=s["restarts"] + 1
        )

    def explicit_restart(s):
        """Start again from the sum of the verified Ritz vectors (nothing locked or frozen)."""
        v = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), s["Y"])
        v = tu.scale(1.0 / jnp.maximum(tu.norm(v), jnp.finfo(acc).tiny), v)
        newV = _set_row(jax.tree_util.tree_map(jnp.zeros_like, s["V"]), 0, v)
        return dict(
            s,
            V=newV,
            H=jnp.zeros_like(s["H"]),
            rho=jnp.zeros_like(s["rho"]),
            j=jnp.zeros((), jnp.int32),
            phase=jnp.zeros((), jnp.int32),
            tight=0.1 * s["tight"],
        )

    can_confirm = confirm

    def body(s):
        j = s["j"]
        base = jax.random.fold_in(jax.random.fold_in(key, s["restarts"]), s["locks"])
        step_key = jax.random.fold_in(base, j)
        h, beta, v_next, anorm, broke, beta_raw = _lanczos_step(
            op, s["V"], j, s["anorm"], step_key, wl, eps=eps_break, apply=apply
        )
        H = s["H"].at[:, j].set(jnp.where(jnp.arange(m + 1) <= j, h, s["H"][:, j]))
        H = H.at[j + 1, j].set(beta)
        rho = s["rho"].at[j].set(jnp.where(broke, beta_raw, 0.0))
        V = _set_row(s["V"], j + 1, v_next)
        c = j + 1
        full = c == m
        s = dict(s, V=V, H=H, rho=rho, j=c, matvecs=s["matvecs"] + 1, have_out=jnp.array(False))

        theta, S = _ritz(H, c, m)
        active = jnp.arange(m) < c
        anorm = jnp.maximum(anorm, jnp.max(jnp.where(active, jnp.abs(theta), 0.0)))
        s = dict(s, anorm=anorm)
        # Residual bound of every Ritz pair: the Lanczos coupling plus what left the basis.
        coupling = jnp.abs(H[c, c - 1] * S[c - 1, :])  # the Lanczos part of the residual
        est = coupling + jnp.abs(S).T @ rho[:m]
        thr = thresholds(theta, anorm) * s["tight"]
        wi = _wanted(c, k_total, which)
        if can_confirm:
            xi = _extra(c, k_total, which)
            confirming = s["phase"] == 1
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
            go_verify = passed & (confirmed | (s["locks"] >= max_locks))
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
            # Without confirmation (asked for, or no room: m == n) a copy may be missing
            # unless the basis spans the whole space.
            go_verify = (c >= (m if full_space else k_total)) & jnp.all(est[wi] <= thr[wi])
            go_lock = jnp.array(False)

        s = lax.cond(go_verify, lambda a: verify(*a), lambda a: a[0], (s, S, wi, confirmed))
        done = go_verify & s["ok"]
        # The bound and the true residual disagree (round-off, or frozen residuals of locked
        # pairs adding up): restart explicitly from the verified vectors, asking more of the bound.
        failed = go_verify & ~s["ok"]
        s = dict(s, restarts=s["restarts"] + failed.astype(jnp.int32))
        out_of_budget = s["restarts"] > max_restarts
        s = lax.cond(
            failed & ~out_of_budget,
            lambda a: explicit_restart(a),
            lambda a: a,
            s,
        )
        if can_confirm:
            s = lax.cond(
                try_true & ~out_of_budget,
                lambda a: verify(*a),
                lambda a: a[0],
                (s, S, wi, jnp.array(False)),
            )
            true_lock = try_true & ~out_of_budget & jnp.all(s["res"] <= 0.5 * thr[wi])
            go_lock = go_lock | true_lock
            est = jnp.where(true_lock, est.at[wi].set(s["res"]), est)
            lock_key = jax.random.fold_in(base, m + 1)
            s = lax.cond(
                go_lock,
                lambda a: lock(*a),
                lambda a: a[0],
                (s, theta, S, wi, est, lock_key, confirmed_once),
            )
        full = s["j"] == m
        need_restart = full & ~done & (s["restarts"] < max_restarts) & ~out_of_budget
        s = lax.cond(need_restart, lambda a: restart(*a), lambda a: a[0], (s, theta, S))
        stop = done | out_of_budget | (full & ~need_restart)
        return dict(s, done=stop)

    state = lax.while_loop(lambda s: ~s["done"], body, state)

    def final(s):
        c = s["j"]
        theta, S = _ritz(s["H"], c, m)
        wi = _wanted(c, k_total, which)
        return verify(s, S, wi, jnp.array(not can_confirm))

    state = lax.cond(state["have_out"], lambda s: s, final, state)
    lam, res, Y = state["lam"], state["res"], state["Y"]
    order = jnp.argsort(lam)
    lam, res = lam[order], res[order]
    Y = jax.tree_util.tree_map(lambda x: x[order], Y)
    thr = thresholds(lam, state["anorm"])
    # Two returned vectors that are (nearly) the same vector are not two eigenpairs: a
    # duplicate never counts as converged, whatever its residual.
    gram = jax.vmap(lambda a: jax.vmap(lambda b: tu.dot(a, b))(Y))(Y)
    independent = jnp.max(jnp.abs(gram - jnp.eye(k_total, dtype=gram.dtype))) <= 0.5
    converged = (res <= thr) & state["confirmed"] & independent
    return (
        lam,
        Y,
        res,
        converged,
        state["matvecs"],
        state["restarts"] + state["locks"],
        thr,
        state["confirmed"],
    )


# ---------------------------------------------------------------------------
# Public entry point.
# ---------------------------------------------------------------------------


_normal_like_jit = jax.jit(tu.normal_like)


def _start_vector(v0, like, key, *, what="v0"):
    """A unit start vector: random, a params-shaped pytree, or the sum of a stacked block."""
    if v0 is None:
        v = _normal_like_jit(
            key, like
        )  # compiled: eager generation cost ~15 ms per call (benchmarks/)
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
                    f"`{what}` must be a pytree shaped like the operator's parameters, or a stacked block "
                    f"of such vectors (leading axis on every leaf, e.g. a previous result's "
                    f"`eigenvectors`). {single_err}"
                ) from None
            v = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), v0)
        v = jax.tree_util.tree_map(lambda x, ref: jnp.asarray(x, jnp.result_type(ref)), v, like)
        v = tu.like_sharding(v, like)  # explicit mesh: a user's vector takes each leaf's type
    nv = float(tu.norm(v))
    if not np.isfinite(nv):
        raise ValueError(
            f"`{what}` contains NaN or Inf; pass a finite start vector or `{what}=None`."
        )
    if nv == 0.0:
        raise ValueError(
            f"`{what}` is the zero vector; pass a non-zero start vector or `{what}=None`."
        )
    return tu.scale(1.0 / nv, v)


def _check_like(op: LinearOperator):
    tu.assert_floating(op.like, name="operator.like")
    n = op.size
    if n == 0:
        raise ValueError("The operator acts on vectors with 0 entries; there is no spectrum.")
    return n


def eigsh(
    op: OperatorLike,
    k: int = 6,
    *,
    which: str = "largest",
    key: PRNGKey | None = None,
    num_iters: int | None = None,
    tol: float = 1e-6,
    max_restarts: int = 30,
    v0: PyTree | None = None,
    reorthogonalize: str = "full",
    basis_dtype=None,
    confirm: bool = True,
    like=None,
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
      which: ``"largest"``, ``"smallest"`` or ``"both"`` (algebraic order).
      key: PRNG key for the start vector and breakdown restarts
        (default ``jax.random.PRNGKey(0)``); same key, same result.
      num_iters: Lanczos basis size ``m`` per restart cycle (default
        ``max(2 * k_total + 10, 30)`` with ``k_total`` = ``2k`` for ``"both"``,
        capped at ``n``). Memory is
        ``(m + 1) * n * bytes(basis_dtype)``.
      tol: convergence tolerance relative to each eigenvalue (ARPACK
        convention): :math:`\|A v_i - \lambda_i v_i\| \le \max(\mathrm{tol}
        \cdot \max(|\lambda_i|, \epsilon^{2/3}\|A\|),\ 64\,\epsilon\,\|A\|)`
        with :math:`\epsilon` the machine epsilon of the products' dtype
        (the floor is what round-off lets one verify; it is
        :math:`4\epsilon\|A\|` for bfloat16/float16 products; the per-pair
        values are returned in ``thresholds``).
      max_restarts: thick/explicit restarts allowed before giving up (a
        warning is emitted and ``converged`` says which pairs missed ``tol``).
        Locking/confirmation restarts are budgeted separately (at most
        ``k + 3``, ``2k + 3`` for ``"both"``).
      v0: optional warm start: a pytree like the parameters, or a stacked
        block of vectors (e.g. the previous call's ``eigenvectors``), whose sum
        is used as start vector.
      reorthogonalize: only ``"full"`` is supported (selective/partial
        reorthogonalisation would save little with a restarted, bounded basis).
      basis_dtype: storage dtype of the Lanczos basis (e.g. ``jnp.float32`` or
        ``jnp.bfloat16`` for float32/float64 parameters) to save memory; products
        and projections run in the parameters' dtype. Lower precision limits
        the attainable accuracy (about ``1e-6`` with float32, ``1e-2`` with
        bfloat16 storage). Default: the accumulation dtype (at least float32,
        also for bfloat16/float16 parameters).
      confirm: confirm the wanted set, with its multiplicities, by a restart
        from a fresh random vector orthogonal to the converged pairs (see the
        module docstring). ``False`` saves that Lanczos sequence but may
        return a repeated eigenvalue with too few copies.
      like: example pytree when ``op`` is a plain matvec callable.

    Returns:
      :class:`EigshResult`.

    Raises:
      ValueError: ``k`` outside ``1..n`` (``2k > n`` for ``"both"``), unknown
        ``which``, ``v0`` not shaped like the parameters, bad ``num_iters``.
      TypeError: called inside ``jax.jit``/``jax.vmap`` (call it outside).
      NonFiniteError: NaN or Inf in the result (the operator produced them,
        e.g. an overflow of half-precision products).

    Examples:
      >>> # A rank-2 operator with a triple zero eigenvalue at the bottom.
      >>> import jax, numpy as np, hvp
      >>> A = np.diag([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
      >>> r = hvp.eigsh(hvp.from_dense(A), 3, which="smallest", key=jax.random.key(0))
      >>> np.round(np.asarray(r.eigenvalues), 6).tolist(), bool(r.converged.all())
      ([0.0, 0.0, 0.0], True)
    """
    op = as_operator(op, like)
    n = _check_like(op)
    if which not in WHICH:
        raise ValueError(f"`which` must be one of {WHICH}, got {which!r}.")
    if reorthogonalize != "full":
        raise ValueError(
            f"`reorthogonalize` must be 'full' for eigsh, got {reorthogonalize!r}. (Without "
            "it Lanczos produces spurious copies of converged eigenvalues.)"
        )
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"`k` must be an int, got {type(k).__name__}.")
    k = int(k)
    k_total = 2 * k if which == "both" else k
    if k <= 0:
        raise ValueError(f"`k` must be at least 1, got {k}.")
    if k_total > n:
        what = "2k" if which == "both" else "k"
        raise ValueError(
            f"{what}={k_total} exceeds the operator size n={n}; ask for at most "
            f"{n // 2 if which == 'both' else n} eigenpairs"
            f"{' per end' if which == 'both' else ''}."
        )
    if not (
        isinstance(tol, (int, float, np.floating))
        and not isinstance(tol, bool)
        and 0 <= tol < float("inf")
    ):
        raise ValueError(
            f"`tol` must be a finite non-negative float (relative accuracy per eigenvalue, e.g. "
            f"1e-6), got {tol!r}."
        )
    if int(max_restarts) < 0:
        raise ValueError(f"`max_restarts` must be >= 0, got {max_restarts}.")
    if num_iters is None:
        m = max(2 * k_total + 10, 30)
    else:
        m = int(num_iters)
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
    if key is not None:
        check_key(key)
    key = jax.random.PRNGKey(0) if key is None else key
    if tu.is_traced(op, v0, key):
        raise TypeError(
            "eigsh cannot run inside a JAX transformation (jax.jit, jax.vmap, jax.grad): it is "
            "already one compiled XLA program, and it checks its result on the host (non-finite "
            "products raise NonFiniteError, unconverged pairs warn). Call it outside the "
            "transformation, e.g. `jax.jit` only the function that builds the operator's "
            "parameters, and loop in Python over several operators instead of `vmap`."
        )
    param_dtypes = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(op.like)]
    acc = tu.accumulation_dtype(*param_dtypes)
    low = max(param_dtypes, key=lambda d: float(jnp.finfo(d).eps))  # the least precise
    eps = float(jnp.finfo(low).eps)
    floor = _round_off_floor(low, basis_dtype)
    n_extra = _num_extra(which)
    # Confirmation needs room for one more pair per end, in the space and in the basis.
    can_confirm = bool(confirm) and k_total + n_extra <= n and m >= k_total + 2 * n_extra
    k_start, k_run = jax.random.split(key)
    start = _start_vector(v0, op.like, k_start)
    out = _eigsh_run(
        op,
        start,
        k_run,
        jnp.asarray(tol, acc),
        jnp.asarray(int(max_restarts), jnp.int32),
        m=m,
        k_total=k_total,
        which=which,
        p=p,
        max_locks=k_total + 1 + _CONFIRMATIONS,
        basis_dtype=basis_dtype,
        eps=eps,
        # breakdown at 32 eps_acc ||A||, or at the round-off of a half-precision product
        eps_break=max(float(jnp.finfo(acc).eps), eps / _BREAKDOWN),
        floor=floor,
        confirm=can_confirm,
        full_space=bool(confirm) and not can_confirm,
    )
    lam, vecs, res, conv, nmv, nrs, thr, confirmed = out
    if not (bool(jnp.all(jnp.isfinite(lam))) and bool(tu.all_finite(vecs))):
        raise NonFiniteError(
            f"eigsh on the {op.name} operator produced NaN or Inf: its matvec returns non-finite "
            "values (in half precision, a product may overflow: use float32 parameters or scale "
            "the loss). Check the parameters and data (`hvp.tree.nonfinite_leaves`), or build "
            "the operator with `check_finite=True` to find the leaf."
        )
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
    if not bool(jnp.all(conv)):
        nc = int(jnp.sum(conv))
        why = (
            ""
            if bool(confirmed) or not can_confirm
            else " (the multiplicities were not confirmed by a restart from a fresh vector)"
        )
        warnings.warn(
            f"eigsh ({which}, k={k}) on the {op.name} operator: only {nc} of {k_total} "
            f"eigenpairs reached tol={tol:g}{why} after {int(nrs)} restarts and {int(nmv)} "
            f"matvecs (largest residual {float(jnp.max(res)):.3g}). Increase `num_iters` or "
            "`max_restarts`, or loosen `tol`; `result.converged` marks the pairs that did "
            "converge.",
            RuntimeWarning,
            stacklevel=2,
        )
    return result
