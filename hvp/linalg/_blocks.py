"""Block algebra on pytree vectors: the one row-dot and the one combine of :mod:`hvp.linalg`.

A *block* is a pytree whose leaves carry a leading axis of ``k`` rows, each row a vector shaped
like the parameters (a Krylov basis, a block of probes, a sketch). Every algorithm projects onto
and combines blocks through these functions, so that the precision policy (inner products in at
least float32, ``precision=HIGHEST`` on accelerators) and the sharding rules
(:func:`hvp.tree.contract_rows`: no raveling, sharded leaves contracted where they live) hold
everywhere.

=====================  ==========================================  =================
function               math                                        shape
=====================  ==========================================  =================
``rows_dot(V, w)``     :math:`c_a = \\langle v_a, w\\rangle`          ``(k,)``
``gram(X, Y)``         :math:`G_{ab} = \\langle x_a, y_b\\rangle`     ``(k, k')``
``rowwise(X, Y)``      :math:`d_a = \\langle x_a, y_a\\rangle`        ``(k,)``
``combine(c, V)``      :math:`\\sum_a c_a v_a` (``c`` 1-D)           one vector
``combine(C, V)``      :math:`y_b = \\sum_a C_{ab} v_a` (``C`` 2-D)   block ``(k',)``
=====================  ==========================================  =================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from hvp import tree as tu

__all__ = [
    "HIGHEST",
    "acc_of",
    "combine",
    "gram",
    "get_row",
    "rows_dot",
    "rowwise",
    "set_row",
    "to_like",
]

HIGHEST = lax.Precision.HIGHEST


def acc_of(x) -> jax.Array:
    """``x`` cast to its accumulation dtype (:func:`hvp.tree.accumulation_dtype`, >= float32)."""
    x = jnp.asarray(x)
    return x.astype(tu.accumulation_dtype(x.dtype))


def _sum_parts(parts):
    dtype = jnp.result_type(*parts)
    return sum((p.astype(dtype) for p in parts[1:]), parts[0].astype(dtype))


def _contract(xs, ys, kind: str) -> jax.Array:
    parts = [
        tu.contract_rows(acc_of(x), acc_of(y), kind=kind, precision=HIGHEST)
        for x, y in zip(jax.tree_util.tree_leaves(xs), jax.tree_util.tree_leaves(ys), strict=True)
    ]
    return _sum_parts(parts)


def rows_dot(V, w) -> jax.Array:
    """``V^T w``: the inner products of every row of the block ``V`` with the vector ``w``.

    Accumulated in at least float32. Shape ``(k,)``.
    """
    return _contract(V, w, "rows")


def gram(X, Y) -> jax.Array:
    """``G[a, b] = <x_a, y_b>`` for two blocks (``(k, k')``), accumulated in at least float32."""
    return _contract(X, Y, "gram")


def rowwise(X, Y) -> jax.Array:
    """``d[a] = <x_a, y_a>`` for two blocks of the same length (``(k,)``)."""
    return _contract(X, Y, "rowwise")


def combine(c: jax.Array, V, like=None):
    """``sum_a c[a] V_a`` for a 1-D ``c`` (one vector), or the block ``C^T V`` for a 2-D ``C``.

    With a 2-D ``C`` of shape ``(k, k')`` row ``b`` of the result is ``sum_a C[a, b] V_a``.
    The result has the dtypes of ``like`` when given (e.g. the parameters' or the
    accumulation dtype of the vectors), else the accumulation dtype of ``V``'s leaves.
    """

    def one(Vl, ref):
        dt = jnp.result_type(ref) if ref is not None else acc_of(Vl[:0]).dtype
        return jnp.tensordot(c.astype(dt), Vl.astype(dt), axes=([0], [0]), precision=HIGHEST)

    if like is None:
        return jax.tree_util.tree_map(lambda Vl: one(Vl, None), V)
    return jax.tree_util.tree_map(one, V, like)


def get_row(V, j, like=None):
    """Row ``j`` of the block ``V`` (in the dtypes of ``like`` when given)."""
    if like is None:
        return jax.tree_util.tree_map(lambda Vl: Vl[j], V)
    return jax.tree_util.tree_map(lambda Vl, x: Vl[j].astype(jnp.result_type(x)), V, like)


def set_row(V, j, v):
    """``V`` with row ``j`` replaced by ``v`` (cast to ``V``'s dtypes)."""
    return jax.tree_util.tree_map(lambda Vl, x: Vl.at[j].set(x.astype(Vl.dtype)), V, v)


def to_like(v, like):
    """``v`` (a vector or a block) cast leaf by leaf to the dtypes of ``like``."""
    return jax.tree_util.tree_map(lambda x, lk: jnp.asarray(x).astype(jnp.result_type(lk)), v, like)
