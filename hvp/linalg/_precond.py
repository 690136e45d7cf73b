r"""Preconditioners for :func:`hvp.solve`: the Hutchinson diagonal, spectral deflation, or your own.

A preconditioner here is the action of :math:`P^{-1} \approx (A + \delta I)^{-1}`, symmetric
positive definite, applied to a block of residuals. Build one once with
:meth:`Preconditioner.from_diagonal`, :meth:`Preconditioner.from_eigsh` or
:meth:`Preconditioner.from_operator` and reuse it across solves (the damping :math:`\delta` of
each solve is added when it is applied, so one preconditioner serves every damping).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hvp import tree as tu
from hvp.linalg._blocks import combine, gram, to_like
from hvp.linalg._checks import (
    acc_dtype,
    check_finite_float,
    check_int,
    coerce_operator,
)
from hvp.linalg._diagonal import diagonal
from hvp.linalg._lanczos import eigsh
from hvp.operators import LinearOperator
from hvp.typing import OperatorLike, PRNGKey, PyTree

__all__ = ["Preconditioner", "PRECONDITIONERS"]

PRECONDITIONERS = ("diagonal", "deflation")


@tu.result(static=("kind", "num_matvecs"))
class Preconditioner:
    r"""An SPD preconditioner :math:`P^{-1} \approx (A + \delta I)^{-1}` for :func:`hvp.solve`.

    Three kinds (build them with the class methods, once, and pass the object as
    ``preconditioner=`` to any number of solves; the solve's damping :math:`\delta` is added at
    application time):

    * ``"diagonal"`` (Jacobi): :math:`P^{-1} = \operatorname{diag}(\hat d + \delta)^{-1}` with
      :math:`\hat d` the Hutchinson estimate of :math:`\operatorname{diag}(A)` (Bekas,
      Kokiopoulou & Saad 2007) floored at ``floor`` times the mean of :math:`|\hat d|` (the
      estimate of a PSD diagonal can be small or negative by noise; the floor keeps
      :math:`P^{-1}` positive definite and bounded).
    * ``"deflation"`` (a spectral low-rank preconditioner, Frank & Vuik 2001; Giraud & Gratton
      2006): with the top-``k`` eigenpairs :math:`(\lambda_i, v_i)` of :math:`A` from
      :func:`hvp.eigsh`, :math:`\mu_i = |\lambda_i + \delta|` and :math:`c = \min_i \mu_i`,

      .. math:: P^{-1} = V \operatorname{diag}(\mu)^{-1} V^\top + \frac{1}{c}(I - V V^\top).

      The preconditioned operator maps the deflated eigenvalues to 1 and the rest to
      :math:`(\lambda_j + \delta)/c \le 1`, so the condition number drops from
      :math:`(\lambda_1 + \delta) / (\lambda_n + \delta)` to about
      :math:`(\lambda_k + \delta) / (\lambda_n + \delta)`: large when the spectrum has a few
      outliers, as the GGNs and Hessians of trained networks do.
    * ``"operator"``: your own :math:`P^{-1}` (an :class:`hvp.LinearOperator` or a matvec
      callable); it must be symmetric positive definite.

    Attributes:
      kind: ``"diagonal"``, ``"deflation"`` or ``"operator"``.
      diagonal: the floored diagonal estimate (pytree like the parameters), or ``None``.
      vectors: the deflated eigenvectors (block, leading axis ``k``), or ``None``.
      eigenvalues: their eigenvalues ``(k,)``, or ``None``.
      operator: the user's :math:`P^{-1}`, or ``None``.
      num_matvecs: products of ``A`` spent building it (added to a solve's ``num_matvecs``).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> op = hvp.from_dense(jnp.diag(jnp.array([100.0, 1.0, 2.0, 4.0])))
      >>> pre = hvp.linalg.Preconditioner.from_diagonal(op, key=jax.random.key(0), num_matvecs=4)
      >>> r = hvp.solve(op, jnp.ones(4), method="cg", preconditioner=pre)  # exact Jacobi: 1 step
      >>> bool(r.converged), r.preconditioner, r.num_iters, r.x.tolist()
      (True, 'diagonal', 1, [0.01, 1.0, 0.5, 0.25])
    """

    kind: str
    diagonal: PyTree = None
    vectors: PyTree = None
    eigenvalues: jax.Array | None = None
    operator: LinearOperator | None = None
    num_matvecs: int = 0

    def apply(self, R, damping):
        r"""``P^{-1}`` applied to every row of the block ``R`` (accumulation dtype), for ``damping``."""
        if self.kind == "diagonal":
            return jax.tree_util.tree_map(
                lambda r, d: r / (d + damping).astype(r.dtype), R, self.diagonal
            )
        if self.kind == "deflation":
            mu = jnp.abs(self.eigenvalues + damping)
            tiny = jnp.finfo(mu.dtype).tiny
            mu = jnp.maximum(mu, tiny)
            c = jnp.min(mu)
            coef = gram(self.vectors, R)  # (k, m)
            low = combine(coef * (1.0 / mu - 1.0 / c)[:, None], self.vectors)
            return jax.tree_util.tree_map(
                lambda r, lo: r / c.astype(r.dtype) + lo.astype(r.dtype), R, low
            )
        out = self.operator.matmat(to_like(R, self.operator.like))
        return jax.tree_util.tree_map(lambda o, r: o.astype(r.dtype), out, R)

    # --- builders -------------------------------------------------------------------------------
    @classmethod
    def from_diagonal(
        cls,
        op: OperatorLike,
        *,
        key: PRNGKey,
        num_matvecs: int = 100,
        floor: float = 1e-3,
        like: PyTree | None = None,
    ) -> Preconditioner:
        r"""Jacobi preconditioner from :func:`hvp.diagonal` (``num_matvecs`` Rademacher probes).

        Entries below ``floor * mean(|d|)`` are raised to it (``floor > 0``). With ``num_matvecs
        >= n`` the diagonal is exact.

        Raises:
          TypeError: ``key`` is not a PRNG key.
          ValueError: ``num_matvecs < 1`` or ``floor`` not a finite positive number.

        Examples:
          >>> import jax, jax.numpy as jnp, hvp
          >>> op = hvp.from_dense(jnp.diag(jnp.array([4.0, 1.0])))
          >>> pre = hvp.linalg.Preconditioner.from_diagonal(op, key=jax.random.key(0), num_matvecs=2)
          >>> pre.kind, pre.diagonal.tolist()
          ('diagonal', [4.0, 1.0])
        """
        op = coerce_operator(op, like, what="diagonal")
        num_matvecs = check_int("num_matvecs", num_matvecs, minimum=1)
        floor = check_finite_float("floor", floor, positive=True)
        est = diagonal(op, key=key, num_matvecs=num_matvecs)
        d = tu.cast(est.estimate, acc_dtype(op.like))
        leaves = jax.tree_util.tree_leaves(d)
        total = sum(jnp.sum(jnp.abs(x)) for x in leaves)
        mean = total / tu.size(d)
        lo = jnp.maximum(floor * mean, jnp.finfo(jnp.result_type(*leaves)).tiny)
        d = jax.tree_util.tree_map(lambda x: jnp.maximum(x, lo.astype(x.dtype)), d)
        return cls(kind="diagonal", diagonal=d, num_matvecs=int(est.num_matvecs))

    @classmethod
    def from_eigsh(
        cls,
        op: OperatorLike,
        k: int = 10,
        *,
        key: PRNGKey,
        which: str = "largest",
        tol: float = 1e-4,
        like: PyTree | None = None,
        **eigsh_kwargs,
    ) -> Preconditioner:
        r"""Spectral deflation preconditioner from the ``k`` eigenpairs of :func:`hvp.eigsh`.

        ``which="largest"`` (the default) deflates the top of a PSD spectrum; for an indefinite
        Hessian ``which="both"`` deflates both ends (the magnitudes :math:`|\lambda_i+\delta|`
        are used, so :math:`P^{-1}` stays positive definite). Further keywords go to
        :func:`hvp.eigsh`.

        Raises:
          ValueError: ``k`` not in ``[1, n - 1]`` (deflating every direction leaves nothing to
            iterate on), and :func:`hvp.eigsh`'s errors.

        Examples:
          >>> import jax, jax.numpy as jnp, hvp
          >>> op = hvp.from_dense(jnp.diag(jnp.array([50.0, 1.0, 2.0])))
          >>> pre = hvp.linalg.Preconditioner.from_eigsh(op, k=1, key=jax.random.key(0))
          >>> pre.kind, pre.eigenvalues.round(6).tolist()
          ('deflation', [50.0])
        """
        op = coerce_operator(op, like, what="eigenpair")
        k = check_int("k", k, minimum=1)
        if k >= op.size:
            raise ValueError(
                f"`k` must be below the operator's size n = {op.size}, got {k}: deflating every "
                "direction leaves no iteration (solve densely instead)."
            )
        res = eigsh(op, k, key=key, which=which, tol=tol, **eigsh_kwargs)
        acc = acc_dtype(op.like)
        return cls(
            kind="deflation",
            vectors=tu.cast(res.eigenvectors, acc),
            eigenvalues=jnp.asarray(res.eigenvalues, acc),
            num_matvecs=int(res.num_matvecs),
        )

    @classmethod
    def from_operator(cls, p_inv, like: PyTree | None = None) -> Preconditioner:
        r"""Your own :math:`P^{-1}`: an :class:`hvp.LinearOperator` or a matvec with ``like=``.

        It must be symmetric positive definite (CG and MINRES assume it; a negative
        :math:`r^\top P^{-1} r` stops the row with ``converged=False``).

        Examples:
          >>> import jax.numpy as jnp, hvp
          >>> pre = hvp.linalg.Preconditioner.from_operator(lambda v: v / 2.0, like=jnp.zeros(2))
          >>> pre.kind
          'operator'
        """
        p_inv = coerce_operator(p_inv, like, what="preconditioner")
        return cls(kind="operator", operator=p_inv)


def as_preconditioner(pre, op: LinearOperator, *, key) -> Preconditioner | None:
    """``preconditioner=`` of :func:`hvp.solve` as a :class:`Preconditioner` (``None``: none)."""
    if pre is None:
        return None
    if isinstance(pre, Preconditioner):
        return pre
    if isinstance(pre, str):
        if pre not in PRECONDITIONERS:
            raise ValueError(
                f"`preconditioner` must be one of {PRECONDITIONERS}, a "
                f"hvp.linalg.Preconditioner, an hvp.LinearOperator or a callable, got {pre!r}."
            )
        if key is None:
            raise TypeError(
                f"preconditioner={pre!r} is estimated from random probes: pass "
                "`key=jax.random.key(seed)` to hvp.solve (or build it once with "
                "hvp.linalg.Preconditioner.from_diagonal / from_eigsh and reuse it)."
            )
        if pre == "diagonal":
            return Preconditioner.from_diagonal(op, key=key)
        return Preconditioner.from_eigsh(op, min(10, op.size - 1), key=key)
    if isinstance(pre, LinearOperator):
        return Preconditioner.from_operator(pre)
    if callable(pre):
        return Preconditioner.from_operator(pre, like=op.like)
    raise TypeError(
        "`preconditioner` must be None, 'diagonal', 'deflation', a hvp.linalg.Preconditioner, an "
        f"hvp.LinearOperator or a callable, got {type(pre).__name__}."
    )
