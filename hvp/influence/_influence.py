r"""Influence functions: which training examples drove a prediction (Koh & Liang, 2017).

For a model trained to a minimum :math:`\hat\theta` of the mean training loss
:math:`L(\theta) = \frac1n \sum_i \ell(z_i, \theta)`, up-weighting a training example
:math:`z` by :math:`\epsilon` moves the loss on a test example :math:`z_t` by
:math:`\epsilon\, \mathcal I(z_t, z)` to first order, with

.. math::

   \mathcal I(z_t, z) = -\nabla_\theta \ell(z_t)^\top (H + \mu I)^{-1} \nabla_\theta \ell(z)

(Koh & Liang, 2017, "Understanding black-box predictions via influence functions", eq. 2;
:math:`H` the Hessian of :math:`L` or a positive semi-definite surrogate, the GGN; :math:`\mu`
the ``damping``). Removing :math:`z` is :math:`\epsilon = -1/n`, so the leave-one-out change of
the test loss is predicted as :math:`\ell(z_t; \hat\theta_{-z}) - \ell(z_t; \hat\theta) \approx
-\mathcal I(z_t, z) / n`: a **negative** score marks a *helpful* example (removing it raises the
test loss), a positive one a *harmful* example. The self-influence
:math:`\nabla\ell(z)^\top (H + \mu I)^{-1} \nabla\ell(z) \ge 0` (:func:`self_influence`) flags
outliers and mislabelled examples (Pruthi et al., 2020; Schioppa et al., 2022).

No per-example Hessian and no ``n x n`` matrix of the parameters is formed (except by the
small-model reference ``method="dense"``). Three ways to apply :math:`(H + \mu I)^{-1}`:

* ``"arnoldi"``: project on the top-``rank`` eigenvectors of the operator from
  :func:`hvp.eigsh` (Schioppa, Zablotskaia, Vilar & Sokolov, 2022, "Scaling up influence
  functions"; they use Arnoldi, which for a symmetric operator is Lanczos):
  :math:`(H + \mu I)^{-1} \approx \sum_{j \le p} v_j v_j^\top / (\lambda_j + \mu)`. It **ignores
  the rest of the spectrum**: gradient components outside the top-``p`` subspace contribute
  nothing (as if their eigenvalues were infinite), which keeps the dominant, most reliable
  curvature directions and is exact when ``p`` is the number of parameters. Every gradient is
  reduced to ``p`` numbers, so scores for many pairs cost one small matrix product.
* ``"solve"``: :math:`s_t = (H + \mu I)^{-1} \nabla\ell(z_t)` per test example by
  :func:`hvp.solve` (conjugate gradients, MINRES or the Neumann series/LiSSA of Agarwal et al.,
  2017, used by Koh & Liang), then :math:`\mathcal I = -s_t^\top \nabla\ell(z)` for every
  training example: one system per test example (per training example for the
  self-influence), solved ``chunk_size`` at a time as one block (one block product per
  iteration).
* ``"dense"``: the reference for small models: the dense matrix, ``numpy.linalg.solve`` in
  the operator's dtype (float64 for float64 parameters).

Per-example gradients :math:`\nabla\ell(z_i)` are the gradients of the operator's loss
(:func:`hvp.operators.batch_loss`) on one-example batches, computed under ``jax.vmap`` for
``chunk_size`` examples at a time (one compilation for all chunks), as pytrees like the
parameters (each leaf keeps its sharding); only their inner products with a few vectors (the
eigenvectors or the :math:`s_t`) leave the chunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hvp import linalg as _linalg
from hvp import operators as _ops
from hvp import tree as tu
from hvp.linalg import _blocks
from hvp.linalg._checks import check_finite_float, check_int, check_key, resolve_chunk

__all__ = ["InfluenceResult", "influence", "self_influence", "per_example_grads"]

METHODS = ("arnoldi", "solve", "dense")


@tu.result(static=("method", "operator", "solver"))
class InfluenceResult:
    """Influence scores (:func:`influence`) or self-influences (:func:`self_influence`).

    Attributes:
      scores: ``(n_test, n_train)`` array of :math:`-\\nabla\\ell(z_t)^\\top (H + \\mu
        I)^{-1} \\nabla\\ell(z_i)` (negative: helpful, positive: harmful), or ``None`` for
        :func:`self_influence`.
      self_influence: ``(n_train,)`` array of :math:`\\nabla\\ell(z_i)^\\top (H + \\mu
        I)^{-1} \\nabla\\ell(z_i)`, or ``None`` unless asked.
      damping: :math:`\\mu`.
      rank: number of eigenpairs used (``"arnoldi"``), else ``None``.
      eigenvalues: the eigenvalues used (``"arnoldi"``, descending), else ``None``.
      converged: whether the inverse was applied as verified: every eigenpair converged
        (``"arnoldi"``; the truncation itself is a model choice, not an error), every solve
        reached its tolerance (``"solve"``), always ``True`` for ``"dense"``.
      num_matvecs: operator products (Lanczos, solves, or the dense matrix's columns).
      num_gradients: per-example gradients computed.
      method: ``"arnoldi"``, ``"solve"`` or ``"dense"``.
      operator: the operator's ``kind`` (``"hessian"``, ``"ggn"``, ...).
      solver: the :func:`hvp.solve` method (``"solve"`` only), else ``""``.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> loss = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2)
      >>> x, y = jnp.eye(2), jnp.array([1.0, -1.0])
      >>> H = hvp.hessian(loss, jnp.zeros(2), (x, y))  # H = I, g_i = -2 y_i e_i
      >>> r = hvp.influence(H, (x, y), (x, y), method="dense")
      >>> r.scores.tolist()  # -g_t . g_i
      [[-4.0, -0.0], [-0.0, -4.0]]
    """

    scores: object
    self_influence: object
    damping: float
    rank: object
    eigenvalues: object
    converged: bool
    num_matvecs: int
    num_gradients: int
    method: str = "arnoldi"
    operator: str = "hessian"
    solver: str = ""


# ------------------------------------------------------------------------------------------------
# per-example gradients
# ------------------------------------------------------------------------------------------------
def _num_examples(batch, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or any(np.ndim(x) == 0 for x in leaves):
        raise ValueError(
            f"`{name}` must be one batch: a pytree of arrays with a leading example axis, e.g. "
            "(inputs, targets); use x[None] for a single example."
        )
    sizes = {int(np.shape(x)[0]) for x in leaves}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"The leaves of `{name}` must share one non-zero leading (example) axis, got sizes "
            f"{sorted(sizes)}."
        )
    return sizes.pop()


def _example_grad(op, params, example):
    f = _ops.batch_loss(op)
    return jax.grad(f)(params, tu.map(lambda a: a[None], example))


@jax.jit
def _grads_chunk(op, params, chunk):
    return jax.vmap(lambda ex: _example_grad(op, params, ex))(chunk)


@jax.jit
def _dots_chunk(op, params, rows, chunk):
    """``G R^T`` for the per-example gradients ``G`` of a chunk and a block of rows ``R``."""
    return _blocks.gram(_grads_chunk(op, params, chunk), rows)


def _chunks(batch, n: int, chunk: int):
    """Chunks of ``chunk`` examples; the last one padded with copies of the last example."""
    padded = -(-n // chunk) * chunk
    idx = np.minimum(np.arange(padded), n - 1)
    for s in range(0, padded, chunk):
        take = jnp.asarray(idx[s : s + chunk])
        yield s, tu.map(lambda a, take=take: jnp.take(a, take, axis=0), batch)


def _dots(op, batch, rows, n: int, chunk: int) -> np.ndarray:
    out = [np.asarray(_dots_chunk(op, op.params, rows, c)) for _, c in _chunks(batch, n, chunk)]
    return np.concatenate(out)[:n]


def per_example_grads(op: _ops.CurvatureOperator, batch, *, chunk_size: int | None = None):
    """The gradient of the operator's loss on each example of ``batch``, stacked.

    Example ``i``'s gradient is that of :func:`hvp.operators.batch_loss` on the one-example
    batch ``batch[i:i+1]`` (the per-example loss), at ``op.params``, computed under ``vmap``
    ``chunk_size`` examples at a time. Memory is ``n`` parameter vectors: for many examples use
    :func:`influence`, which keeps only inner products.

    Args:
      op: a curvature operator over a data set (its loss and parameters are used).
      batch: one batch (a pytree of arrays with a leading example axis).
      chunk_size: examples per compiled chunk (default up to 8).

    Returns:
      A pytree like ``op.params`` with a leading axis of length ``n``.

    Raises:
      TypeError: ``op`` is not a curvature operator.
      ValueError: ``batch`` has no common leading example axis.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2), jnp.zeros(2),
      ...                 (jnp.eye(2), jnp.ones(2)))
      >>> hvp.influence.per_example_grads(H, (jnp.eye(2), jnp.ones(2))).tolist()
      [[-2.0, 0.0], [0.0, -2.0]]
    """
    _check_op(op)
    n = _num_examples(batch, "batch")
    chunk = resolve_chunk(chunk_size, n)
    parts = [_grads_chunk(op, op.params, c) for _, c in _chunks(batch, n, chunk)]
    return tu.map(lambda *xs: jnp.concatenate(xs)[:n], *parts)


def _check_op(op) -> None:
    if not isinstance(op, _ops.CurvatureOperator):
        raise TypeError(
            "Influence functions need a curvature operator over the training set (hvp.hessian, "
            f"hvp.ggn or hvp.empirical_fisher), got {type(op).__name__}: its loss gives the "
            "per-example gradients."
        )


# ------------------------------------------------------------------------------------------------
# the three inverses
# ------------------------------------------------------------------------------------------------
def _arnoldi_basis(op, rank, key, damping, eigsh, which):
    if eigsh is None:
        check_key(key)
        rank = check_int("rank", rank, minimum=1, hint="It is the number of eigenpairs kept.")
        if rank > op.size:
            raise ValueError(f"`rank` ({rank}) exceeds the number of parameters ({op.size}).")
        eig = _linalg.eigsh(op, rank, key=key, which=which)
        matvecs = int(eig.num_matvecs)
    else:
        if not isinstance(eigsh, _linalg.EigshResult):
            raise TypeError(f"`eigsh` must be an hvp.eigsh result, got {type(eigsh).__name__}.")
        eig, matvecs = eigsh, 0
    lam = np.asarray(eig.eigenvalues, dtype=np.float64)
    order = np.argsort(-lam, kind="stable")
    lam = lam[order]
    shifted = lam + damping
    if np.any(shifted <= 0):
        bad = lam[shifted <= 0]
        raise ValueError(
            f"The Arnoldi inverse needs lambda_j + damping > 0 for every eigenpair kept; "
            f"{bad.size} eigenvalue(s) ({', '.join(f'{v:.3g}' for v in bad[:3])}) are <= "
            f"-damping ({damping:g}). Use a larger `damping`, fewer pairs (`rank`), or the GGN "
            "(hvp.ggn, positive semi-definite for convex losses)."
        )
    rows = tu.map(lambda a: jnp.take(a, jnp.asarray(order), axis=0), eig.eigenvectors)
    return rows, lam, 1.0 / shifted, matvecs, bool(np.all(np.asarray(eig.converged)))


def _dense_inverse(op, damping):
    A = np.asarray(op.dense(), dtype=np.dtype(op.dtype))
    A = 0.5 * (A + A.T) + damping * np.eye(A.shape[0], dtype=A.dtype)
    rows = jax.vmap(tu.unravel_fn(op.params))(jnp.eye(op.size, dtype=op.dtype))
    return A, rows


def _solve(op, B, damping, solver, rtol, max_matvecs, key):
    """``(H + damping I)^{-1}`` applied to a block of gradients by :func:`hvp.solve` (one call)."""
    kwargs = {"method": solver, "damping": damping, "block": True}
    if rtol is not None:
        kwargs["rtol"] = rtol
    if max_matvecs is not None:
        kwargs["max_matvecs"] = max_matvecs
    if key is not None:
        kwargs["key"] = key
    r = _linalg.solve(op, B, **kwargs)
    return r.x, int(r.num_matvecs), bool(np.all(np.asarray(r.converged)))


def _common(op, damping, method, chunk_size, n):
    _check_op(op)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    damping = check_finite_float("damping", damping)
    return damping, resolve_chunk(chunk_size, n)


def influence(
    op: _ops.CurvatureOperator,
    test,
    train,
    *,
    method: str = "arnoldi",
    damping: float = 0.0,
    rank: int = 20,
    key=None,
    eigsh=None,
    which: str = "largest",
    solver: str = "cg",
    rtol: float | None = None,
    max_matvecs: int | None = None,
    chunk_size: int | None = None,
    with_self_influence: bool = False,
    self_influence_method: str | None = None,
) -> InfluenceResult:
    r"""Influence of every training example on the loss of every test example.

    ``scores[t, i]`` :math:`= -\nabla\ell(z_t)^\top (H + \mu I)^{-1} \nabla\ell(z_i)` with
    :math:`H` the operator (the Hessian or GGN of the mean training loss) and :math:`\mu` the
    ``damping`` (Koh & Liang, 2017; see the module docstring for the methods and the signs).
    The predicted change of the test loss when example ``i`` is removed from the ``n``
    training examples and the model retrained is ``-scores[t, i] / n``.

    Args:
      op: the curvature operator over the training set at the trained parameters
        (:func:`hvp.hessian`, :func:`hvp.ggn`, :func:`hvp.empirical_fisher`).
      test: one batch of test examples (pytree with a leading example axis).
      train: one batch of training examples (usually the operator's data, concatenated).
      method: ``"arnoldi"`` (default), ``"solve"`` or ``"dense"``.
      damping: :math:`\mu \ge 0` added to the operator.
      rank: eigenpairs kept by ``"arnoldi"`` (:func:`hvp.eigsh` with ``k=rank``).
      key: PRNG key of :func:`hvp.eigsh` (``"arnoldi"`` without ``eigsh``); with ``"solve"``
        passed to :func:`hvp.solve` (needed by ``solver="neumann"`` for its scale).
      eigsh: an :func:`hvp.eigsh` result of ``op`` to reuse (``"arnoldi"``; then ``rank``
        and ``key`` are not used).
      which: the eigenpairs of ``"arnoldi"``: ``"largest"`` (default).
      solver: the :func:`hvp.solve` method of ``"solve"`` (``"cg"``, ``"minres"``,
        ``"neumann"``).
      rtol: relative tolerance of each solve, on the true residual (default:
        :func:`hvp.solve`'s, :func:`hvp.linalg.default_rtol`: 1e-6 in float64, 3.45e-4 in
        float32).
      max_matvecs: product budget per right-hand side (default: :func:`hvp.solve`'s).
      chunk_size: examples whose gradients are computed at once (default up to 8).
      with_self_influence: also return the training examples' self-influence (free for
        ``"arnoldi"`` and ``"dense"``; one solve per training example for ``"solve"``).
      self_influence_method: ``None`` (default: the scores' method) or ``"arnoldi"``: with
        ``method="solve"``, the self-influence from the top-``rank`` eigenpairs (``eigsh`` or
        ``key``) instead of one solve per training example, in the same pass over the training
        gradients as the scores (``rank`` and ``eigenvalues`` then describe those pairs).

    Returns:
      An :class:`InfluenceResult` with ``scores`` (NumPy, float64 for float64 parameters).

    Raises:
      TypeError: ``op`` is not a curvature operator; a missing key for ``"arnoldi"``.
      ValueError: unknown ``method``; ``self_influence_method`` not ``None``/``"arnoldi"`` or
        ``"arnoldi"`` with ``method="dense"``; negative ``damping``; ``lambda_j + damping <= 0`` for a
        kept eigenpair (``"arnoldi"``) or a singular matrix (``"dense"``); batches without a
        common leading axis.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> loss = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2)
      >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 1.0])
      >>> H = hvp.hessian(loss, jnp.zeros(2), (x, y))
      >>> exact = hvp.influence(H, (x, y), (x, y), method="dense").scores
      >>> arnoldi = hvp.influence(H, (x, y), (x, y), rank=2, key=jax.random.key(0)).scores
      >>> bool(jnp.allclose(exact, arnoldi))  # rank = number of parameters: exact
      True
    """
    n_test = _num_examples(test, "test")
    n_train = _num_examples(train, "train")
    damping, chunk = _common(op, damping, method, chunk_size, max(n_test, n_train))
    if self_influence_method not in (None, "arnoldi") or (
        self_influence_method == "arnoldi" and method == "dense"
    ):
        raise ValueError(
            "`self_influence_method` must be None (the scores' method) or 'arnoldi' with "
            f"method='solve' or 'arnoldi', got {self_influence_method!r} with method={method!r}."
        )
    self_inf = None
    solver_name = ""
    rank_used = eigenvalues = None
    if method == "arnoldi":
        rows, lam, inv, matvecs, converged = _arnoldi_basis(op, rank, key, damping, eigsh, which)
        p_test = _dots(op, test, rows, n_test, chunk)
        p_train = _dots(op, train, rows, n_train, chunk)
        scores = -(p_test * inv) @ p_train.T
        if with_self_influence:
            self_inf = (p_train**2) @ inv
        rank_used, eigenvalues = int(lam.size), lam
        grads = n_test + n_train
    elif method == "dense":
        A, rows = _dense_inverse(op, damping)
        g_test = _dots(op, test, rows, n_test, chunk)  # raveled gradients (small models only)
        g_train = _dots(op, train, rows, n_train, chunk)
        x = _dense_solve(A, g_train.T)  # (n, n_train)
        scores = -g_test @ x
        if with_self_influence:
            self_inf = np.einsum("ij,ji->i", g_train, x)
        matvecs, converged, grads = op.size, True, n_test + n_train
    else:
        solver_name = solver
        g_test = per_example_grads(op, test, chunk_size=chunk)
        sols, matvecs, converged = [], 0, True
        for start in range(0, n_test, chunk):  # s_t = (H + mu I)^-1 g_t, a block per chunk
            block = tu.map(lambda a, start=start: a[start : start + chunk], g_test)
            x, m, c = _solve(op, block, damping, solver, rtol, max_matvecs, key)
            sols.append(x)
            matvecs += m
            converged &= c
        solutions = tu.map(lambda *xs: jnp.concatenate(xs), *sols)
        grads = n_test + n_train
        if with_self_influence and self_influence_method == "arnoldi":
            # the eigenvectors join the solutions: one pass over the training gradients
            rows, lam, inv, m, c = _arnoldi_basis(op, rank, key, damping, eigsh, which)
            both = tu.map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)]), solutions, rows)
            dots = _dots(op, train, both, n_train, chunk)
            scores = -dots[:, :n_test].T
            self_inf = (dots[:, n_test:] ** 2) @ inv
            rank_used, eigenvalues = int(lam.size), lam
            matvecs += m
            converged &= c
        else:
            scores = -_dots(op, train, solutions, n_train, chunk).T
        if with_self_influence and self_influence_method != "arnoldi":
            r = self_influence(
                op,
                train,
                method="solve",
                damping=damping,
                solver=solver,
                rtol=rtol,
                max_matvecs=max_matvecs,
                chunk_size=chunk_size,
                key=key,
            )
            self_inf = r.self_influence
            matvecs += r.num_matvecs
            converged &= r.converged
            grads += r.num_gradients
    return InfluenceResult(
        scores=scores,
        self_influence=self_inf,
        damping=damping,
        rank=rank_used,
        eigenvalues=eigenvalues,
        converged=bool(converged),
        num_matvecs=int(matvecs),
        num_gradients=int(grads),
        method=method,
        operator=op.kind,
        solver=solver_name,
    )


def _dense_solve(A, B):
    try:
        return np.linalg.solve(A, B)
    except np.linalg.LinAlgError:
        raise ValueError(
            "The damped matrix H + damping I is singular: pass a positive `damping`."
        ) from None


def self_influence(
    op: _ops.CurvatureOperator,
    train,
    *,
    method: str = "arnoldi",
    damping: float = 0.0,
    rank: int = 20,
    key=None,
    eigsh=None,
    which: str = "largest",
    solver: str = "cg",
    rtol: float | None = None,
    max_matvecs: int | None = None,
    chunk_size: int | None = None,
) -> InfluenceResult:
    r"""Self-influence :math:`\nabla\ell(z_i)^\top (H + \mu I)^{-1} \nabla\ell(z_i)` of each example.

    Large values flag examples the model finds surprising (outliers, mislabelled data;
    Schioppa et al., 2022, sec. 5; Pruthi et al., 2020). Arguments as in :func:`influence`;
    ``"solve"`` runs one solve per example.

    Returns:
      An :class:`InfluenceResult` with ``self_influence`` (``scores`` is ``None``).

    Raises:
      TypeError: ``op`` is not a curvature operator; a missing key for ``"arnoldi"``.
      ValueError: as :func:`influence`.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> loss = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2)
      >>> H = hvp.hessian(loss, jnp.zeros(2), (jnp.eye(2), jnp.array([1.0, 3.0])))
      >>> hvp.influence.self_influence(H, (jnp.eye(2), jnp.array([1.0, 3.0])), method="dense").self_influence.tolist()
      [4.0, 36.0]
    """
    n = _num_examples(train, "train")
    damping, chunk = _common(op, damping, method, chunk_size, n)
    rank_used = eigenvalues = None
    solver_name = ""
    if method == "arnoldi":
        rows, lam, inv, matvecs, converged = _arnoldi_basis(op, rank, key, damping, eigsh, which)
        values = (_dots(op, train, rows, n, chunk) ** 2) @ inv
        rank_used, eigenvalues = int(lam.size), lam
    elif method == "dense":
        A, rows = _dense_inverse(op, damping)
        g = _dots(op, train, rows, n, chunk)
        values = np.einsum("ij,ji->i", g, _dense_solve(A, g.T))
        matvecs, converged = op.size, True
    else:
        solver_name = solver
        values, matvecs, converged = [], 0, True
        for start, c in _chunks(train, n, chunk):
            valid = min(chunk, n - start)
            grads = tu.map(lambda a, valid=valid: a[:valid], _grads_chunk(op, op.params, c))
            x, m, ok = _solve(op, grads, damping, solver, rtol, max_matvecs, key)
            values.append(np.asarray(_blocks.rowwise(grads, x)))
            matvecs += m
            converged &= ok
        values = np.concatenate(values)
    return InfluenceResult(
        scores=None,
        self_influence=values,
        damping=damping,
        rank=rank_used,
        eigenvalues=eigenvalues,
        converged=bool(converged),
        num_matvecs=int(matvecs),
        num_gradients=int(n),
        method=method,
        operator=op.kind,
        solver=solver_name,
    )
