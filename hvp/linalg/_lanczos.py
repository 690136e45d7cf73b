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
* Full reorthogonalisation (classical Gram-Schmidt, applied twice and a third
  time when the second pass still cancels, "twice is enough", Giraud et al.
  2005). With it, ghost copies of converged eigenvalues cannot appear and
  :math:`T_j` is formed from the Gram-Schmidt coefficients.
* Breakdown (:math:`\beta_j \approx 0`: the Krylov space is invariant, e.g.
  for a zero or low-rank operator) continues with a fresh random vector
  orthogonalised against the basis (coupling 0), so no NaN appears and
  repeated eigenvalues (which a single Krylov sequence cannot see) are found.
  A cycle in which a breakdown happened is run to its end before convergence
  is declared.
* Thick restart (Wu & Simon, 2000; Stathopoulos, Saad & Wu, 1998): when the
  basis is full and the wanted pairs have not converged, the best ``p`` Ritz
  vectors are kept together with the last Lanczos vector (the projected
  matrix becomes an arrowhead) and the iteration continues. Memory stays at
  ``num_iters + 1`` basis vectors.
* Convergence: a wanted pair is converged when its residual is at most
  ``tol * max|theta|``. The iteration stops as soon as all wanted pairs meet
  it; the reported ``residuals`` are recomputed with true products at the end
  (``k`` extra matvecs, counted in ``num_matvecs``).

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
from hvp.operators import LinearOperator, NonFiniteError, as_operator
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["eigsh", "EigshResult", "WHICH"]

WHICH = ("largest", "smallest", "both")
_HI = lax.Precision.HIGHEST


@tu.result(static=("which",))
class EigshResult:
    """Result of :func:`eigsh`.

    Attributes:
      eigenvalues: shape ``(k,)`` (``(2k,)`` for ``which="both"``), ascending.
      eigenvectors: pytree like the parameters with a leading axis matching
        ``eigenvalues`` (unit norm; use ``hvp.tree.index(r.eigenvectors, i)``).
      residuals: ``||A v_i - lambda_i v_i||`` per pair, from true products.
      converged: bool per pair, ``residual <= tol * max|lambda|``.
      num_matvecs: operator products used (Lanczos steps + final residuals).
      num_restarts: thick restarts performed.
      which: ``"largest"``, ``"smallest"`` or ``"both"``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))  # eigenvalues 1, ..., 6
        >>> res = hvp.eigsh(op, k=1, which="both", key=jax.random.PRNGKey(0))
        >>> res.eigenvalues.round(6), bool(res.converged.all()), res.which
        (Array([1., 6.], dtype=float64), True, 'both')
        >>> res.eigenvectors.shape  # one eigenvector per row (a pytree like op.like in general)
        (2, 6)
    """

    eigenvalues: jax.Array
    eigenvectors: object
    residuals: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array
    num_restarts: jax.Array
    which: str = "largest"


# ---------------------------------------------------------------------------
# Per-leaf block helpers (a "block" is a pytree with a leading axis).
# ---------------------------------------------------------------------------


def _rows_dot(V, w):
    """``V^T w``: inner products of every row of the block ``V`` with ``w``, shape ``(rows,)``."""
    parts = []
    for Vl, wl in zip(jax.tree_util.tree_leaves(V), jax.tree_util.tree_leaves(w)):
        ct = jnp.result_type(wl)
        parts.append(
            jnp.tensordot(
                Vl.reshape(Vl.shape[0], -1).astype(ct), wl.reshape(-1), axes=1, precision=_HI
            )
        )
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
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros((rows,) + jnp.shape(x), basis_dtype or jnp.result_type(x)), like
    )


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
    nr = tu.norm(r)
    tiny = jnp.finfo(nr.dtype).tiny
    ok = nr > jnp.sqrt(tiny) * 1e3
    return tu.scale(jnp.where(ok, 1.0 / jnp.where(ok, nr, 1.0), 0.0), r)


def _eps(like, basis_dtype):
    dts = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(like)]
    if basis_dtype is not None:
        dts.append(jnp.dtype(basis_dtype))
    return max(float(jnp.finfo(d).eps) for d in dts)


def lanczos_step(op, V, j, anorm, key, like, *, eps):
    """One fully reorthogonalised Lanczos (Arnoldi) step on basis row ``j``.

    Returns ``(h, beta, v_next, anorm, broke)``: ``h`` the projection
    coefficients of ``A v_j`` on rows ``0..j`` (``h[j]`` is alpha), ``beta`` the
    coupling to the next vector (0 on breakdown), ``v_next`` the next unit
    basis vector (a fresh random one on breakdown, zero if the space is
    exhausted).
    """
    rows = tu.leading_dim(V)
    v = _get_row(V, j, like)
    w = op._apply(v)
    anorm = jnp.maximum(anorm, tu.norm(w))
    mask = (jnp.arange(rows) <= j).astype(anorm.dtype)
    h, w = _orthogonalize(V, w, mask, like)
    beta = tu.norm(w)
    broke = beta <= 10.0 * eps * anorm

    def normal(_):
        return beta, tu.scale(1.0 / jnp.where(beta > 0, beta, 1.0), w)

    def fresh(_):
        return jnp.zeros_like(beta), _fresh_vector(key, V, mask, like)

    beta_rec, v_next = lax.cond(broke, fresh, normal, None)
    return h, beta_rec, v_next, anorm, broke


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


@partial(
    jax.jit, static_argnames=("m", "k_total", "which", "p", "max_restarts", "basis_dtype", "eps")
)
def _eigsh_run(op, v0, key, tol, *, m, k_total, which, p, max_restarts, basis_dtype, eps):
    like = op.like
    real = jnp.result_type(*jax.tree_util.tree_leaves(like))
    V = _set_row(_empty_basis(like, m + 1, basis_dtype), 0, v0)
    H = jnp.zeros((m + 1, m), real)
    zero_i = jnp.zeros((), jnp.int32)
    state = dict(
        V=V,
        H=H,
        j=zero_i,
        restarts=zero_i,
        matvecs=zero_i,
        done=jnp.array(False),
        broke=jnp.array(False),
        anorm=jnp.zeros((), real),
    )

    def restart(s, theta, S):
        if which == "both":
            lo, hi = _split_keep(p)
            idx = jnp.concatenate([jnp.arange(lo), m - hi + jnp.arange(hi)])
        elif which == "largest":
            idx = m - p + jnp.arange(p)
        else:
            idx = jnp.arange(p)
        Y = S[:, idx]  # (m, p)
        Vm = jax.tree_util.tree_map(lambda Vl: Vl[:m], s["V"])
        kept = _combine(Y.T, Vm, like)  # (p, ...) in the compute dtype
        last = _get_row(s["V"], m, like)
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
        return dict(
            s,
            V=newV,
            H=newH,
            j=jnp.asarray(p, jnp.int32),
            restarts=s["restarts"] + 1,
            broke=jnp.array(False),
        )

    def body(s):
        j = s["j"]
        step_key = jax.random.fold_in(jax.random.fold_in(key, s["restarts"]), j)
        h, beta, v_next, anorm, broke = lanczos_step(
            op, s["V"], j, s["anorm"], step_key, like, eps=eps
        )
        H = s["H"].at[:, j].set(jnp.where(jnp.arange(m + 1) <= j, h, s["H"][:, j]))
        H = H.at[j + 1, j].set(beta)
        V = _set_row(s["V"], j + 1, v_next)
        c = j + 1
        broke_any = s["broke"] | broke
        full = c == m
        s = dict(s, V=V, H=H, j=c, matvecs=s["matvecs"] + 1, broke=broke_any, anorm=anorm)
        check = (c >= k_total) & (full | ~broke_any)

        def test(_):
            theta, S = _ritz(H, c, m)
            wi = _wanted(c, k_total, which)
            scale = jnp.maximum(jnp.abs(theta[0]), jnp.abs(theta[c - 1]))
            res = jnp.abs(H[c, c - 1] * S[c - 1, wi])
            return jnp.all(res <= tol * scale), theta, S

        def skip(_):
            return jnp.array(False), jnp.zeros((m,), real), jnp.zeros((m, m), real)

        conv, theta, S = lax.cond(check | full, test, skip, None)
        conv = conv & check
        need_restart = full & ~conv & (s["restarts"] < max_restarts)
        s = lax.cond(need_restart, lambda a: restart(*a), lambda a: a[0], (s, theta, S))
        return dict(s, done=conv | (full & ~need_restart))

    state = lax.while_loop(lambda s: ~s["done"], body, state)

    c = state["j"]
    theta, S = _ritz(state["H"], c, m)
    wi = _wanted(c, k_total, which)
    Vm = jax.tree_util.tree_map(lambda Vl: Vl[:m], state["V"])
    Y = _combine(S[:, wi].T, Vm, like)  # (k_total, ...)
    norms = jnp.sqrt(jax.vmap(lambda y: tu.dot(y, y))(Y))
    Y = jax.vmap(lambda y, nn: tu.scale(1.0 / jnp.where(nn > 0, nn, 1.0), y))(Y, norms)
    AY = jax.vmap(op._apply)(Y)
    lam = jax.vmap(tu.dot)(Y, AY)
    res = jnp.sqrt(
        jax.vmap(lambda ay, y, mu: tu.dot(tu.axpy(-mu, y, ay), tu.axpy(-mu, y, ay)))(AY, Y, lam)
    )
    order = jnp.argsort(lam)
    lam, res = lam[order], res[order]
    Y = jax.tree_util.tree_map(lambda x: x[order], Y)
    scale = jnp.maximum(jnp.max(jnp.abs(theta[:m] * (jnp.arange(m) < c))), jnp.max(jnp.abs(lam)))
    converged = res <= tol * scale
    return lam, Y, res, converged, state["matvecs"] + k_total, state["restarts"]


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
    like: PyTree | None = None,
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
      tol: convergence tolerance on the residual
        :math:`\|A v - \lambda v\| \le \mathrm{tol} \cdot \max|\lambda|`.
      max_restarts: thick restarts allowed before giving up (a warning is
        emitted and ``converged`` says which pairs missed ``tol``).
      v0: optional warm start: a pytree like the parameters, or a stacked
        block of vectors (e.g. the previous call's ``eigenvectors``), whose sum
        is used as start vector.
      reorthogonalize: only ``"full"`` is supported (selective/partial
        reorthogonalisation would save little with a restarted, bounded basis).
      basis_dtype: storage dtype of the Lanczos basis (e.g. ``jnp.float32`` or
        ``jnp.bfloat16`` for float32/float64 parameters) to save memory; products
        and projections run in the parameters' dtype. Lower precision limits
        the attainable accuracy (about ``1e-6`` with float32, ``1e-2`` with
        bfloat16 storage).
      like: example pytree when ``op`` is a plain matvec callable.

    Returns:
      :class:`EigshResult`.

    Raises:
      ValueError: ``k`` outside ``1..n`` (``2k > n`` for ``"both"``), unknown
        ``which``, ``v0`` not shaped like the parameters, bad ``num_iters``.
      NonFiniteError: NaN or Inf in the result (the operator produced them).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 7.0)))  # eigenvalues 1, ..., 6
        >>> res = hvp.eigsh(op, k=1, which="both", key=jax.random.PRNGKey(0))
        >>> res.eigenvalues.round(6)  # the smallest and the largest, ascending
        Array([1., 6.], dtype=float64)
        >>> bool((res.residuals <= 1e-6 * 6).all())
        True
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
    if not (isinstance(tol, (int, float, np.floating)) and tol >= 0):
        raise ValueError(f"`tol` must be a non-negative float, got {tol!r}.")
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
    m = min(m, n)
    # Ritz vectors kept at a thick restart: the wanted ones plus half the spare room.
    p = max(min(m - 1, k_total + (m - k_total) // 2), 0)
    if basis_dtype is not None:
        basis_dtype = jnp.dtype(basis_dtype)
        if not jnp.issubdtype(basis_dtype, jnp.floating):
            raise TypeError(f"`basis_dtype` must be a floating dtype, got {basis_dtype}.")
    key = jax.random.PRNGKey(0) if key is None else key
    k_start, k_run = jax.random.split(key)
    start = _start_vector(v0, op.like, k_start)
    out = _eigsh_run(
        op,
        start,
        k_run,
        jnp.asarray(tol, op.dtype),
        m=m,
        k_total=k_total,
        which=which,
        p=p,
        max_restarts=int(max_restarts),
        basis_dtype=basis_dtype,
        eps=_eps(op.like, basis_dtype),
    )
    lam, vecs, res, conv, nmv, nrs = out
    if not (bool(jnp.all(jnp.isfinite(lam))) and bool(tu.all_finite(vecs))):
        raise NonFiniteError(
            f"eigsh on the {op.name} operator produced NaN or Inf: its matvec returns non-finite values. "
            "Check the parameters and data (`hvp.tree.nonfinite_leaves`), or build the operator with "
            "`check_finite=True` to find the leaf."
        )
    result = EigshResult(
        eigenvalues=lam,
        eigenvectors=vecs,
        residuals=res,
        converged=conv,
        num_matvecs=nmv,
        num_restarts=nrs,
        which=which,
    )
    if not bool(jnp.all(conv)):
        nc = int(jnp.sum(conv))
        warnings.warn(
            f"eigsh ({which}, k={k}) on the {op.name} operator: only {nc} of {k_total} eigenpairs reached "
            f"tol={tol:g} after {int(nrs)} restarts and {int(nmv)} matvecs (largest residual "
            f"{float(jnp.max(res)):.3g}). Increase `num_iters` or `max_restarts`, or loosen `tol`; "
            "`result.converged` marks the pairs that did converge.",
            RuntimeWarning,
            stacklevel=2,
        )
    return result
