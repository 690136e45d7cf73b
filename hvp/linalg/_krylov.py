r"""The Krylov step shared by the Lanczos-based algorithms (full reorthogonalisation, breakdown).

One Lanczos step extends an orthonormal basis :math:`V_j = [v_0, \dots, v_j]` of the Krylov space
by the product :math:`w = A v_j`:

.. math::

    h = V_j^\top w, \qquad r = w - V_j h, \qquad \beta = \|r\|, \qquad v_{j+1} = r / \beta .

The projection is classical Gram-Schmidt applied twice, and a third time when the second pass
still removes more than half of the norm ("twice is enough", Giraud, Langou & Rozloznik, 2005),
so the basis stays orthonormal to working accuracy and ghost copies of converged eigenvalues
cannot appear (Paige, 1971). ``h[:j+1]`` is column ``j`` of the projected matrix
:math:`T = V^\top A V` (``h[j]`` is :math:`\alpha_j`).

Breakdown: when :math:`\beta \le \epsilon_{\mathrm{break}}\,\|A\|` (relative to the running
estimate of :math:`\|A\|`) the Krylov space is invariant to working accuracy (a zero or low-rank
operator, or an exhausted space). The step then returns coupling 0 and a fresh random unit vector
orthogonal to the basis (zero when no room is left), so the iteration continues; the caller keeps
the dropped :math:`\beta` in its residual bound.

A *block* is a pytree whose leaves carry a leading axis of rows (:mod:`hvp.linalg._blocks`); the
basis is a block of ``rows`` vectors, of which rows ``0..j`` are in use. The product itself is
not computed here: algorithms obtain it through the drivers' block product
(:func:`hvp.linalg._driver.block_product`) and pass it in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from hvp import tree as tu
from hvp.linalg._blocks import combine, rows_dot

__all__ = ["empty_basis", "fresh_vector", "lanczos_extend", "orthogonalize"]


def empty_basis(like, rows: int, dtype=None):
    """A zero block of ``rows`` vectors shaped like ``like`` (in ``dtype``, default ``like``'s).

    Each row keeps the sharding of its parameter leaf.
    """
    zeros = jax.tree_util.tree_map(
        lambda x: jnp.zeros((rows,) + jnp.shape(x), dtype or jnp.result_type(x)), like
    )
    return tu.stacked_like(zeros, like)


def orthogonalize(V, w, mask, like):
    """Classical Gram-Schmidt of ``w`` against the rows of ``V`` selected by ``mask`` (0/1).

    Two passes, and a third when the second still removes more than half of the norm (a
    near-invariant subspace). Returns ``(h, w)``: the total coefficients (shape ``(rows,)``) and
    the orthogonalised vector in the dtypes of ``like``.
    """

    def one_pass(w):
        h = rows_dot(V, w) * mask
        return h, tu.sub(w, combine(h, V, like))

    h1, w1 = one_pass(w)
    h2, w2 = one_pass(w1)
    n1, n2 = tu.norm(w1), tu.norm(w2)

    def third(args):
        h, w = args
        h3, w3 = one_pass(w)
        return h + h3, w3

    return lax.cond(n2 < 0.5 * n1, third, lambda a: a, (h1 + h2, w2))


def fresh_vector(key, V, mask, like):
    """A random unit vector orthogonal to the masked rows of ``V`` (zero if no room is left)."""
    r = tu.normal_like(key, like)
    for _ in range(2):  # a random vector is far from the span: two plain passes suffice
        r = tu.sub(r, combine(rows_dot(V, r) * mask, V, like))
    nr = tu.norm(r)  # about sqrt(n - rank) if room is left, round-off (about eps sqrt(n)) if not
    ok = nr > jnp.sqrt(jnp.finfo(nr.dtype).eps) * jnp.sqrt(jnp.asarray(tu.size(like), nr.dtype))
    return tu.scale(jnp.where(ok, 1.0 / jnp.where(ok, nr, 1.0), 0.0), r)


def lanczos_extend(V, j, w, anorm, key, like, *, eps_break: float):
    """Extend the basis ``V`` (rows ``0..j`` in use) by the product ``w = A v_j``.

    Args:
      V: the basis block (leading axis ``rows > j``).
      j: the row whose product ``w`` is (int32 scalar, may be traced).
      w: ``A v_j`` in the dtypes of ``like`` (the accumulation dtype).
      anorm: running estimate of ``||A||`` (scalar).
      key: PRNG key of the fresh vector drawn on breakdown.
      like: a pytree giving the vectors' shapes, dtypes and sharding.
      eps_break: breakdown when ``||r|| <= eps_break * ||A||``.

    Returns:
      ``(h, beta, v_next, anorm, broke, beta_raw)``: ``h`` the coefficients of ``w`` on rows
      ``0..j`` (shape ``(rows,)``, zero beyond ``j``; ``h[j]`` is alpha), ``beta`` the coupling
      to ``v_next`` (0 on breakdown), ``v_next`` the next unit basis vector (a fresh random one
      on breakdown, zero when the space is exhausted), ``anorm`` updated with ``||w||``,
      ``broke`` the breakdown flag and ``beta_raw`` the norm of the orthogonalised product.
    """
    rows = tu.leading_dim(V)
    anorm = jnp.maximum(anorm, tu.norm(w))
    mask = (jnp.arange(rows) <= j).astype(anorm.dtype)
    h, r = orthogonalize(V, w, mask, like)
    beta = tu.norm(r)
    broke = beta <= eps_break * anorm

    def normal(_):
        return beta, tu.scale(1.0 / jnp.where(beta > 0, beta, 1.0), r)

    def fresh(_):
        return jnp.zeros_like(beta), fresh_vector(key, V, mask, like)

    beta_rec, v_next = lax.cond(broke, fresh, normal, None)
    return h, beta_rec, v_next, anorm, broke, beta
