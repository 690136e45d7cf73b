"""Pytree arithmetic shared by every layer of :mod:`hvp`.

Everything in :mod:`hvp` works on parameter pytrees directly: a vector is a
pytree with the same structure, shapes and dtypes as the parameters, and a
block of ``k`` vectors is the same pytree with a leading axis of length ``k``
on every leaf. These helpers never ravel to one flat vector (except
:func:`ravel`, which exists for dense validation), so each leaf keeps its own
shape and its own sharding.

Precision policy: reductions (:func:`dot`, :func:`vdot_batched`, :func:`norm`,
:func:`leaf_dots`, :func:`leaf_norms`) accumulate in at least float32, whatever the
leaves' dtype (:func:`accumulation_dtype`): a bfloat16 or float16 vector's norm neither
overflows nor loses its digits, and the algorithms of :mod:`hvp.linalg` keep their
small projected matrices and scalars in that dtype. They return a scalar array and are
safe to call under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp.typing import PyTree

__all__ = [
    "PyTree",
    "accumulation_dtype",
    "dot",
    "vdot_batched",
    "norm",
    "add",
    "sub",
    "scale",
    "axpy",
    "zeros_like",
    "ones_like",
    "explicit_sharding",
    "like_sharding",
    "stacked_like",
    "check_mesh_context",
    "place_batch",
    "contract_rows",
    "size",
    "rademacher_like",
    "normal_like",
    "ravel",
    "unravel_fn",
    "stack",
    "unstack",
    "index",
    "leading_dim",
    "leaf_paths",
    "path_str",
    "assert_same_structure",
    "assert_floating",
    "all_finite",
    "is_traced",
    "nonfinite_leaves",
    "nonfinite_counts",
    "shape_summary",
    "leaf_norms",
    "leaf_dots",
    "cast",
    "map",
]


def map(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:  # noqa: A001
    """``jax.tree_util.tree_map`` (re-exported so that callers use one name).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> tree.map(lambda x: 2 * x, {'w': jnp.array([1.0, 2.0])})
        {'w': Array([2., 4.], dtype=float64)}
    """
    return jax.tree_util.tree_map(fn, tree, *rest)


def accumulation_dtype(*dtypes) -> np.dtype:
    """The dtype in which reductions over vectors of ``dtypes`` accumulate: at least float32.

    ``bfloat16``/``float16`` -> ``float32``; ``float32`` -> ``float32``; ``float64`` ->
    ``float64`` (complex types keep their kind). This is the one precision policy of
    :mod:`hvp`: products run in the parameters' dtype, inner products, norms and small
    dense factorisations in this one.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.tree import accumulation_dtype
        >>> accumulation_dtype(jnp.bfloat16).name
        'float32'
    """
    dts = [jnp.dtype(d) for d in dtypes] or [jnp.dtype(jnp.float32)]
    return jnp.dtype(jnp.result_type(jnp.float32, *dts))


def _acc(x):
    return x.astype(accumulation_dtype(x.dtype)) if x.dtype != accumulation_dtype(x.dtype) else x


def _vdot(x, y):
    if explicit_sharding(x) is None and explicit_sharding(y) is None:
        return jnp.vdot(x, y)
    return contract_rows(jnp.conj(x), y, kind="dot")  # explicit mesh: no flattening


def dot(a: PyTree, b: PyTree) -> jax.Array:
    """Euclidean inner product ``<a, b>`` summed over all leaves, accumulated in >= float32.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> float(tree.dot(a, a))
        14.0
    """
    leaves = [
        _vdot(_acc(x), _acc(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    ]
    if not leaves:
        return jnp.zeros(())
    return sum(leaves[1:], leaves[0])


def leaf_dots(a: PyTree, b: PyTree) -> PyTree:
    """Per-leaf inner products ``<a_l, b_l>`` (accumulated in >= float32), as a pytree of scalars.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> {k: float(v) for k, v in tree.leaf_dots(a, a).items()}
        {'b': 9.0, 'w': 5.0}
    """
    return jax.tree_util.tree_map(lambda x, y: _vdot(_acc(x), _acc(y)), a, b)


def vdot_batched(stacked: PyTree, b: PyTree) -> jax.Array:
    """Inner products of each row of ``stacked`` (leading axis ``k``) with ``b``: shape ``(k,)``.

    Accumulated in >= float32 (see :func:`accumulation_dtype`).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> rows = tree.stack([a, tree.scale(-1.0, a)])
        >>> tree.vdot_batched(rows, a)
        Array([ 14., -14.], dtype=float64)
    """
    parts = [
        contract_rows(_acc(x), _acc(y))
        for x, y in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(b))
    ]
    return sum(parts[1:], parts[0])


def norm(a: PyTree) -> jax.Array:
    """Euclidean norm over all leaves.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> round(float(tree.norm(a)), 4)
        3.7417
    """
    return jnp.sqrt(dot(a, a))


def leaf_norms(a: PyTree) -> PyTree:
    """Per-leaf Euclidean norms (accumulated in >= float32), as a pytree of scalars shaped like ``a``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([3.0, 4.0]), "b": jnp.array(-2.0)}
        >>> {k: float(v) for k, v in tree.leaf_norms(a).items()}
        {'b': 2.0, 'w': 5.0}
    """
    return jax.tree_util.tree_map(lambda x: jnp.sqrt(_vdot(_acc(x), _acc(x))), a)


def add(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-by-leaf sum ``a + b``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.add(a, a)['w']
        Array([2., 4.], dtype=float64)
    """
    return jax.tree_util.tree_map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-by-leaf difference ``a - b``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> float(tree.norm(tree.sub(a, a)))
        0.0
    """
    return jax.tree_util.tree_map(jnp.subtract, a, b)


def scale(alpha, a: PyTree) -> PyTree:
    """``alpha * a`` (``alpha`` is cast to each leaf's dtype).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.scale(0.5, a)['w']
        Array([0.5, 1. ], dtype=float64)
    """
    return jax.tree_util.tree_map(lambda x: jnp.asarray(alpha, x.dtype) * x, a)


def axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leaf by leaf.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.axpy(2.0, a, a)['b']
        Array(9., dtype=float64)
    """
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(alpha, a.dtype) * a + b, x, y)


def zeros_like(a: PyTree) -> PyTree:
    """A pytree of zeros shaped like ``a`` (same dtypes).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.zeros_like(a)['w']
        Array([0., 0.], dtype=float64)
    """
    return jax.tree_util.tree_map(jnp.zeros_like, a)


def ones_like(a: PyTree) -> PyTree:
    """A pytree of ones shaped like ``a`` (same dtypes).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.ones_like(a)['w']
        Array([1., 1.], dtype=float64)
    """
    return jax.tree_util.tree_map(jnp.ones_like, a)


def cast(a: PyTree, dtype) -> PyTree:
    """Cast every leaf to ``dtype`` (``None`` leaves it unchanged).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.cast(a, jnp.float32)['w'].dtype
        dtype('float32')
    """
    if dtype is None:
        return a
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), a)


def size(a: PyTree) -> int:
    """Number of scalar entries over all leaves (a Python int, static).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.size(a)
        3
    """
    return int(sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(a)))


def _fmix32(x):
    """MurmurHash3's 32-bit finaliser: a bijective integer mixer with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _leaf_bits(seeds, shape):
    """Counter-based uint32 bits of a leaf: ``fmix(fmix(index ^ s0) + s1)`` over its linear index."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % (1 << 32))
        stride *= shape[d]
    return _fmix32(_fmix32(idx ^ seeds[0]) + seeds[1])


def _random_like(key, like, kind: str):
    """Random pytree like ``like``, generated leaf by leaf in each leaf's own shape.

    One threefry call (``jax.random.bits``) draws four 32-bit seeds per leaf;
    the entries are a counter-based hash of (seed, linear index). This is
    elementwise in the leaf's shape (so it partitions like the leaf under
    ``jit``) and compiles an order of magnitude faster than one
    ``jax.random`` call per leaf, especially under ``vmap`` over many probes,
    while being statistically adequate for probe vectors (MurmurHash3's
    finaliser has full avalanche). Normal entries use Box-Muller on 24-bit
    uniforms.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    seeds = jax.random.bits(key, (max(len(leaves), 1), 4), jnp.uint32)
    out = []
    for i, x in enumerate(leaves):
        shape, dtype = tuple(jnp.shape(x)), jnp.result_type(x)
        if kind == "rademacher":
            b = _leaf_bits(seeds[i, :2], shape)
            val = jnp.where((b >> 31) == 1, 1.0, -1.0).astype(dtype)
        else:
            u1 = ((_leaf_bits(seeds[i, :2], shape) >> 8).astype(jnp.float32) + 1.0) * (2.0**-24)
            u2 = (_leaf_bits(seeds[i, 2:], shape) >> 8).astype(jnp.float32) * (2.0**-24)
            val = (jnp.sqrt(-2.0 * jnp.log(u1)) * jnp.cos(2.0 * jnp.pi * u2)).astype(dtype)
        out.append(_keep_sharding(val, x))
    return jax.tree_util.tree_unflatten(treedef, out)


def rademacher_like(key: jax.Array, like: PyTree) -> PyTree:
    """A random pytree like ``like`` with i.i.d. +-1 entries (same shapes, dtypes, sharding).

    Deterministic: the same key gives the same pytree, also under ``vmap``.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> z = tree.rademacher_like(jax.random.PRNGKey(0), a)
        >>> sorted(set(abs(float(x)) for x in tree.ravel(z)))
        [1.0]
    """
    return _random_like(key, like, "rademacher")


def normal_like(key: jax.Array, like: PyTree) -> PyTree:
    """A random pytree like ``like`` with i.i.d. standard normal entries (see :func:`rademacher_like`).

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> z = tree.normal_like(jax.random.PRNGKey(0), a)
        >>> z['w'].shape, z['w'].dtype
        ((2,), dtype('float64'))
    """
    return _random_like(key, like, "normal")


def _keep_sharding(new: jax.Array, like) -> jax.Array:
    """Give ``new`` the sharding of ``like``.

    Under an explicit mesh its sharding type (also when traced), else its placement when
    ``like`` is a concrete array on several devices.
    """
    if explicit_sharding(like) is not None:
        return _like_sharding_leaf(new, like, 0)
    sharding = getattr(like, "sharding", None)
    if sharding is None or isinstance(like, jax.core.Tracer) or isinstance(new, jax.core.Tracer):
        return new
    try:
        if len(sharding.device_set) > 1:
            return jax.device_put(new, sharding)
    except Exception:  # pragma: no cover - exotic shardings
        pass
    return new


# --- explicit-axis meshes ("sharding in types") --------------------------------------------
#
# Under a mesh whose axes are ``jax.sharding.AxisType.Explicit``, an array's sharding is part of
# its type (``float32[8,16@model]``): arithmetic, ``lax.scan`` carries and JVP tangents must
# agree on it. Arrays created from shapes inside ``jit`` (``jnp.zeros(shape)``, random bits,
# ``broadcasted_iota``) carry no sharding, so every vector that :mod:`hvp` builds from scratch is
# given its parameter leaf's type with the helpers below. Under automatic meshes and on one
# device they return their input unchanged.


def explicit_sharding(x) -> jax.sharding.NamedSharding | None:
    """The sharding in the type of ``x`` when it is split over an Explicit mesh axis, else ``None``.

    Works on concrete arrays and on tracers (``jax.typeof(x).sharding``). ``None`` for arrays
    on one device, on meshes with automatic axes, replicated arrays and non-arrays.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.tree import explicit_sharding
        >>> explicit_sharding(jnp.ones(3)) is None
        True
    """
    if not hasattr(x, "shape") or isinstance(x, (np.ndarray, np.generic, jax.ShapeDtypeStruct)):
        return None
    try:
        s = jax.typeof(x).sharding
    except Exception:  # pragma: no cover - objects jax cannot type
        return None
    if not isinstance(s, jax.sharding.NamedSharding) or s.mesh.empty:
        return None
    explicit = {
        name
        for name, t in zip(s.mesh.axis_names, s.mesh.axis_types)
        if t == jax.sharding.AxisType.Explicit
    }
    used = {n for e in s.spec if e is not None for n in (e if isinstance(e, tuple) else (e,))}
    return s if used & explicit else None


def _target_sharding(like, leading: int):
    s = explicit_sharding(like)
    if s is None:
        return None
    spec = jax.sharding.PartitionSpec(*((None,) * leading), *s.spec)
    # A concrete leaf gives its concrete mesh: ``reshard`` then also works eagerly, outside a
    # ``jax.set_mesh`` context. A tracer's type only knows the abstract mesh.
    concrete = getattr(like, "sharding", None) if not isinstance(like, jax.core.Tracer) else None
    mesh = concrete.mesh if isinstance(concrete, jax.sharding.NamedSharding) else s.mesh
    return jax.sharding.NamedSharding(mesh, spec)


def _like_sharding_leaf(new, like, leading: int):
    target = _target_sharding(like, leading)
    if target is None or not hasattr(new, "shape"):
        return new
    cur = jax.typeof(new).sharding
    if (
        isinstance(cur, jax.sharding.NamedSharding)
        and not cur.mesh.empty
        and cur.spec._normalized_spec_for_aval(jnp.ndim(new))
        == target.spec._normalized_spec_for_aval(jnp.ndim(new))
    ):
        return new
    return jax.sharding.reshard(new, target)


def like_sharding(new: PyTree, like: PyTree) -> PyTree:
    """``new`` with, leaf by leaf, the sharding type of ``like`` (explicit meshes; else unchanged).

    Use it on vectors built from shapes (``jnp.zeros(shape)``, random bits, an unravelled flat
    vector) so that they can meet the parameters, their tangents and ``lax.scan`` carries
    under a mesh with ``AxisType.Explicit`` axes. Inside ``jit`` this needs the mesh in context
    (``with jax.set_mesh(mesh):``), as JAX requires for explicit sharding; see
    :func:`check_mesh_context`. ``new`` and ``like`` have the same structure and shapes.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.tree import like_sharding
        >>> like_sharding({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})["w"].shape
        (2,)
    """
    return jax.tree_util.tree_map(lambda n, x: _like_sharding_leaf(n, x, 0), new, like)


def stacked_like(new: PyTree, like: PyTree, leading: int = 1) -> PyTree:
    """A stacked block ``new`` (``leading`` extra leading axes) with ``like``'s per-leaf sharding type.

    The leading (block) axes stay unsharded, the others are sharded like ``like``'s leaves: a
    Krylov basis or a block of probes of shape ``(k,) + leaf.shape`` under an explicit mesh.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.tree import stacked_like
        >>> stacked_like({"w": jnp.zeros((3, 2))}, {"w": jnp.ones(2)})["w"].shape
        (3, 2)
    """
    return jax.tree_util.tree_map(lambda n, x: _like_sharding_leaf(n, x, leading), new, like)


def check_mesh_context(tree: PyTree, *, what: str = "the parameters") -> None:
    """Raise a clear ``RuntimeError`` when ``tree`` lives on an explicit mesh that is not in context.

    JAX traces computations on explicitly sharded arrays only inside the mesh's context; without
    it errors surface deep inside JAX (``Please enter your jit into a mesh context``, ``Reshard
    should only be used with out_shardings which ... have a non-empty mesh``). Does nothing for
    unsharded trees, automatic meshes, or when a mesh is set (``jax.set_mesh``).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.tree import check_mesh_context
        >>> check_mesh_context({"w": jnp.ones(2)})  # one device: nothing to check
    """
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        s = explicit_sharding(x)
        if s is None:
            continue
        ctx = jax.sharding.get_abstract_mesh()
        if ctx.empty:
            names = ", ".join(f"'{n}'" for n in s.mesh.axis_names)
            raise RuntimeError(
                f"Leaf '{path_str(path) or '<root>'}' of {what} is sharded over a mesh with Explicit "
                f"axes ({names}; type {jax.typeof(x)}), but no mesh is set. JAX computes with "
                "explicitly sharded arrays only inside the mesh's context: call hvp under "
                "`with jax.set_mesh(mesh):` (the mesh the model was created on), or use "
                "`jax.set_mesh(mesh)` once at the top of the program."
            )
        return


def contract_rows(x: jax.Array, y: jax.Array, *, kind: str = "rows", precision=None) -> jax.Array:
    """Inner products of one leaf's rows over its parameter axes, without flattening the leaf.

    With ``s`` the parameter leaf's shape:

    * ``kind="rows"`` (default): ``x`` is a block ``(k,) + s``, ``y`` one vector ``s``:
      returns ``(k,)``, ``out[a] = <x_a, y>``;
    * ``"gram"``: two blocks ``(k,) + s`` and ``(k',) + s``: returns ``(k, k')``;
    * ``"rowwise"``: two blocks of the same length: returns ``(k,)``, ``out[a] = <x_a, y_a>``;
    * ``"dot"``: two vectors ``s``: returns the scalar ``<x, y>``.

    Dtypes are those of the inputs (cast first to accumulate in another dtype). Unsharded and
    automatically sharded leaves are flattened to rows and multiplied as before; a leaf split
    over an Explicit mesh axis cannot be flattened without moving its data, so it is
    multiplied elementwise (keeping its sharding) and summed over its parameter axes into a
    replicated result (one all-reduce); a Gram matrix then takes one pass per row of ``y``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.tree import contract_rows
        >>> contract_rows(jnp.ones((3, 2)), jnp.ones(2)).tolist()
        [2.0, 2.0, 2.0]
    """
    lead = {"rows": (1, 0), "gram": (1, 1), "rowwise": (1, 1), "dot": (0, 0)}
    if kind not in lead:
        raise ValueError(f"`kind` must be one of {sorted(lead)}, got {kind!r}.")
    lx, ly = lead[kind]
    sharding = explicit_sharding(x) or explicit_sharding(y)
    if sharding is None:
        xr = x.reshape(x.shape[:lx] + (-1,))
        yr = y.reshape(y.shape[:ly] + (-1,))
        if kind == "rowwise":
            return jnp.einsum("ij,ij->i", xr, yr, precision=precision)
        return jnp.matmul(xr, yr.T if ly else yr, precision=precision)
    # Elementwise products keep the sharding type and the sum all-reduces into a replicated
    # result. (``tensordot(..., out_sharding=P())`` would do the same but fails under ``vmap``
    # in JAX 0.10.) Both operands first get the same type on the parameter axes.
    src, skip = (x, lx) if explicit_sharding(x) is not None else (y, ly)
    core = tuple(sharding.spec._normalized_spec_for_aval(jnp.ndim(src)))[skip:]
    x = _with_spec(x, sharding.mesh, (None,) * lx + core)
    y = _with_spec(y, sharding.mesh, (None,) * ly + core)
    axes = tuple(range(lx, x.ndim))
    if kind == "gram":
        return jax.lax.map(lambda yb: jnp.sum(x * yb, axis=axes), y).T
    return jnp.sum(x * y, axis=axes)


def _with_spec(x, mesh, spec: tuple):
    """``x`` resharded to ``PartitionSpec(*spec)`` on ``mesh`` unless its type already says so."""
    target = jax.sharding.PartitionSpec(*spec)._normalized_spec_for_aval(jnp.ndim(x))
    cur = jax.typeof(x).sharding
    if isinstance(cur, jax.sharding.NamedSharding) and not cur.mesh.empty:
        if cur.spec._normalized_spec_for_aval(jnp.ndim(x)) == target:
            return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, target))


def place_batch(batch: PyTree, params: PyTree, *, leading: int = 0) -> PyTree:
    """Put a host or single-device batch on the explicit mesh of ``params``, split like data.

    When ``params`` are sharded over a mesh with Explicit axes, every leaf of ``batch`` that is
    not split over a mesh (a NumPy array, a single-device or replicated ``jax.Array``) is put
    on the parameters' mesh with a ``NamedSharding``: its example axis (after ``leading``
    stacking axes) is split over the mesh axes that no parameter uses (the data-parallel axes,
    e.g. ``'batch'`` of a ``('batch', 'model')`` mesh) when the number of examples divides
    their size, and it is replicated otherwise. Leaves that are already split over the mesh keep their sharding; on
    other meshes, on one device and under ``jit`` the batch is returned unchanged.

    Examples:
        >>> import numpy as np, jax.numpy as jnp
        >>> from hvp.tree import place_batch
        >>> place_batch({"x": np.ones((4, 2))}, {"w": jnp.ones(2)})["x"].shape
        (4, 2)
    """
    shardings = [explicit_sharding(x) for x in jax.tree_util.tree_leaves(params)]
    concrete = [
        x.sharding
        for x, s in zip(jax.tree_util.tree_leaves(params), shardings)
        if s is not None and not isinstance(x, jax.core.Tracer)
    ]
    if not concrete or not isinstance(concrete[0].mesh, jax.sharding.Mesh):
        return batch
    mesh = concrete[0].mesh
    used = {
        n
        for s in shardings
        if s is not None
        for e in s.spec
        if e is not None
        for n in (e if isinstance(e, tuple) else (e,))
    }
    data_axes = tuple(
        n
        for n, t in zip(mesh.axis_names, mesh.axis_types)
        if n not in used and t == jax.sharding.AxisType.Explicit and mesh.shape[n] > 1
    )
    data_size = math.prod(mesh.shape[n] for n in data_axes)

    def put(x):
        if isinstance(x, jax.core.Tracer) or not hasattr(x, "shape"):
            return x
        if explicit_sharding(x) is not None:
            return x  # placed by the user
        split = bool(data_axes) and np.ndim(x) > leading and np.shape(x)[leading] % data_size == 0
        if not split:  # no free data axis (every mesh axis holds parameters) or ragged: replicate
            return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        spec = (None,) * leading + ((data_axes if len(data_axes) > 1 else data_axes[0]),)
        return jax.device_put(
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        )

    return jax.tree_util.tree_map(put, batch)


def ravel(a: PyTree) -> jax.Array:
    """Concatenate all leaves into one flat vector (for dense validation only).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.ravel(a)  # leaves in tree_leaves order: 'b' then 'w'
        Array([3., 1., 2.], dtype=float64)
    """
    leaves = jax.tree_util.tree_leaves(a)
    if not leaves:
        return jnp.zeros((0,))
    return jnp.concatenate([jnp.ravel(_replicated(x)) for x in leaves])


def _replicated(x):
    """``x`` gathered to every device when it is split over an Explicit mesh axis (else ``x``)."""
    s = explicit_sharding(x)
    if s is None:
        return x
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec()))


def unravel_fn(like: PyTree) -> Callable[[jax.Array], PyTree]:
    """Inverse of :func:`ravel` for pytrees shaped like ``like``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> unravel = tree.unravel_fn(a)
        >>> unravel(tree.ravel(a))['w']
        Array([1., 2.], dtype=float64)
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    shapes = [jnp.shape(x) for x in leaves]
    dtypes = [jnp.result_type(x) for x in leaves]
    sizes = [math.prod(s) for s in shapes]
    offsets = np.cumsum([0] + sizes)

    def unravel(flat: jax.Array) -> PyTree:
        out = [
            _like_sharding_leaf(
                flat[offsets[i] : offsets[i + 1]].reshape(shapes[i]).astype(dtypes[i]), leaves[i], 0
            )
            for i in range(len(leaves))
        ]
        return jax.tree_util.tree_unflatten(treedef, out)

    return unravel


def stack(trees) -> PyTree:
    """Stack a list of like-shaped pytrees along a new leading axis.

    Under an explicit mesh every leaf takes the sharding type of the first explicitly sharded
    one among its group (JAX stacks only arrays of one sharding type).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> s = tree.stack([a, tree.scale(2.0, a)])
        >>> s["w"].tolist(), s["b"].tolist()
        ([[1.0, 2.0], [2.0, 4.0]], [3.0, 6.0])
    """

    def one(*xs):
        typed = next((x for x in xs if explicit_sharding(x) is not None), None)
        if typed is not None:
            xs = [_like_sharding_leaf(x, typed, 0) for x in xs]
        return jnp.stack(xs)

    return jax.tree_util.tree_map(one, *trees)


def unstack(stacked: PyTree) -> list:
    """Inverse of :func:`stack`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> len(tree.unstack(tree.stack([a, a, a])))
        3
    """
    n = leading_dim(stacked)
    return [index(stacked, i) for i in range(n)]


def index(stacked: PyTree, i) -> PyTree:
    """Row ``i`` of a stacked pytree.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> rows = tree.stack([a, tree.scale(2.0, a)])
        >>> tree.index(rows, 1)['b']
        Array(6., dtype=float64)
    """
    return jax.tree_util.tree_map(lambda x: x[i], stacked)


def leading_dim(tree: PyTree) -> int:
    """The common leading-axis length of all leaves; raises if they disagree.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.leading_dim(tree.stack([a, a, a]))
        3
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError("The pytree has no array leaves, so it has no leading axis.")
    if any(np.ndim(x) == 0 for x in leaves):
        raise ValueError("A leaf of the pytree is a scalar and has no leading (example) axis.")
    dims = {int(np.shape(x)[0]) for x in leaves}
    if len(dims) != 1:
        raise ValueError(f"Leaves disagree on the leading axis length: {sorted(dims)}.")
    return dims.pop()


def path_str(path) -> str:
    """A readable ``a/b/0/kernel`` string for a ``jax.tree_util`` key path.

    Examples:
        >>> import jax
        >>> from hvp import tree
        >>> (path, _), = jax.tree_util.tree_leaves_with_path({'dense': {'kernel': 1.0}})
        >>> tree.path_str(path)
        'dense/kernel'
    """
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(str(k.name))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:  # pragma: no cover
            parts.append(str(k))
    return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
    """The ``path_str`` of every leaf, in ``tree_leaves`` order.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> tree.leaf_paths({'dense': {'kernel': jnp.ones(2), 'bias': jnp.ones(1)}})
        ['dense/bias', 'dense/kernel']
    """
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _describe(tree: PyTree) -> list[tuple[str, tuple, Any]]:
    return [
        (path_str(p), tuple(np.shape(x)), jnp.result_type(x))
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def assert_same_structure(
    v: PyTree,
    like: PyTree,
    *,
    name: str = "v",
    like_name: str = "params",
    check_dtype: bool = True,
    leading: int = 0,
) -> None:
    """Raise a clear ``ValueError`` if ``v`` is not shaped like ``like``.

    ``leading`` extra leading axes on ``v``'s leaves are allowed (e.g. 1 for a
    stacked block of vectors).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
        >>> tree.assert_same_structure(a, a)  # passes silently
        >>> tree.assert_same_structure({'w': jnp.ones(3)}, a)
        Traceback (most recent call last):
        ...
        ValueError: ...
    """
    t_v = jax.tree_util.tree_structure(v)
    t_l = jax.tree_util.tree_structure(like)
    if t_v != t_l:
        raise ValueError(
            f"`{name}` must have the same pytree structure as `{like_name}`.\n"
            f"  {name}: {t_v}\n  {like_name}: {t_l}\n"
            f"Build it with e.g. `jax.tree_util.tree_map(jnp.zeros_like, {like_name})` "
            f"or `hvp.tree.normal_like(key, {like_name})`."
        )
    lead_shape = None
    for (path, s_v, d_v), (_, s_l, d_l) in zip(_describe(v), _describe(like)):
        core = s_v[leading:]
        if core != s_l or len(s_v) < leading:
            raise ValueError(
                f"Leaf '{path or '<root>'}' of `{name}` has shape {s_v} but `{like_name}` has {s_l}"
                + (f" (with {leading} leading batch axis expected)" if leading else "")
                + ". Every leaf must match the parameters' shapes."
            )
        if leading:
            if lead_shape is None:
                lead_shape = s_v[:leading]
            elif s_v[:leading] != lead_shape:
                raise ValueError(
                    f"Leaf '{path}' of `{name}` has leading axes {s_v[:leading]} but another leaf has "
                    f"{lead_shape}; a block of vectors needs the same leading axis on every leaf."
                )
        if check_dtype and d_v != d_l:
            raise ValueError(
                f"Leaf '{path or '<root>'}' of `{name}` has dtype {d_v} but `{like_name}` has {d_l}. "
                f"Cast it with `hvp.tree.cast({name}, ...)` or build it from `{like_name}`."
            )


def assert_floating(tree: PyTree, *, name: str = "params") -> None:
    """Raise ``TypeError`` if any leaf is not a floating-point array.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> tree.assert_floating({'w': jnp.ones(2)})  # passes silently
        >>> tree.assert_floating({'w': jnp.arange(2)})
        Traceback (most recent call last):
        ...
        TypeError: ...
    """
    bad = [(p, d) for p, _, d in _describe(tree) if not jnp.issubdtype(d, jnp.floating)]
    if bad:
        listing = ", ".join(f"'{p or '<root>'}' ({d})" for p, d in bad[:5])
        raise TypeError(
            f"All leaves of `{name}` must be floating-point arrays; found {listing}"
            + (" and more" if len(bad) > 5 else "")
            + ". Curvature is only defined with respect to real floating parameters: cast them "
            "(e.g. `.astype(jnp.float32)`) or exclude them with `wrt=`."
        )
    if not jax.tree_util.tree_leaves(tree):
        raise ValueError(f"`{name}` has no array leaves: there is nothing to differentiate.")


def is_traced(*trees: PyTree) -> bool:
    """``True`` if any leaf of the trees is a JAX tracer (we are inside ``jit``/``vmap``/``grad``).

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> tree.is_traced(jnp.ones(2))
        False
        >>> jax.jit(lambda x: jnp.array(tree.is_traced(x)))(jnp.ones(2))
        Array(True, dtype=bool)
    """
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree_util.tree_leaves(t))


def all_finite(tree: PyTree) -> jax.Array:
    """A scalar bool array: every entry of every leaf is finite.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> bool(tree.all_finite({'w': jnp.array([1.0, jnp.nan])}))
        False
    """
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


@jax.jit
def _finite_flags(leaves):
    """Whether each leaf is finite, in one compiled program (eagerly: two per leaf shape)."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: PyTree) -> list[str]:
    """Paths of the leaves that contain NaN or Inf (forces a host sync).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> tree.nonfinite_leaves({'w': jnp.array([1.0, jnp.nan]), 'b': jnp.ones(1)})
        ['w']
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return []
    flags = jax.device_get(_finite_flags([x for _, x in flat]))
    return [path_str(p) or "<root>" for (p, _), ok in zip(flat, np.asarray(flags)) if not ok]


@jax.jit
def _nonfinite_counts(leaves):
    """The number of NaN/Inf entries of each leaf, in one compiled program."""
    return jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves])


def nonfinite_counts(tree: PyTree) -> dict[str, int]:
    """``{path: number of NaN/Inf entries}`` of the floating leaves that have any (host sync).

    One reduction per floating leaf: NumPy on host memory (NumPy arrays, memory maps, and JAX
    arrays held whole by CPU devices, read without a copy) and one compiled program for the
    leaves on accelerators. Integer and boolean leaves (labels, masks) are always finite and are
    skipped. Paths are those of :func:`leaf_paths` (``"<root>"`` for a bare array).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> tree.nonfinite_counts((jnp.array([[1.0, jnp.nan], [jnp.inf, 0.0]]), jnp.arange(2)))
        {'0': 2}
    """
    flat = [
        (path_str(p) or "<root>", x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    if not flat:
        return {}
    counts: list[int] = [0] * len(flat)
    on_device = []
    for i, (_, x) in enumerate(flat):
        if _on_host(x):
            counts[i] = int(x.size - np.count_nonzero(np.isfinite(np.asarray(x))))
        else:
            on_device.append(i)
    if on_device:
        got = np.asarray(jax.device_get(_nonfinite_counts([flat[i][1] for i in on_device])))
        for i, c in zip(on_device, got):
            counts[i] = int(c)
    return {p: c for (p, _), c in zip(flat, counts) if c}


def _on_host(x) -> bool:
    """Whether ``x`` can be read as a NumPy array without a transfer (and without compiling)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return True
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return False
    try:
        return x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices())
    except Exception:  # noqa: BLE001 - a deleted or unusual array: use the compiled path
        return False


class _Shape:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _shape_text(x) -> str:
    return f"{jnp.result_type(x)}[{','.join(str(d) for d in np.shape(x))}]"


def shape_summary(tree: PyTree) -> str:
    """The structure of a pytree with each leaf written as ``dtype[shape]``, for error messages.

    Works on arrays, tracers and ``jax.ShapeDtypeStruct`` leaves; containers keep their own
    ``repr`` (tuple, list, dict, named tuple), other nodes are listed by leaf path.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp import tree
        >>> tree.shape_summary((jnp.zeros((8, 3), jnp.float32), {"y": jnp.zeros(8, jnp.int32)}))
        "(float32[8,3], {'y': int32[8]})"
    """
    try:
        return repr(jax.tree_util.tree_map(lambda x: _Shape(_shape_text(x)), tree))
    except Exception:  # noqa: BLE001 - a node that cannot hold placeholders: list the leaves
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return (
            "{" + ", ".join(f"{path_str(p) or '<root>'}: {_shape_text(x)}" for p, x in flat) + "}"
        )
