"""Symmetric linear operators on parameter pytrees.

:class:`LinearOperator` is what every algorithm in :mod:`hvp.linalg` consumes.
It is a JAX pytree: its arrays (parameters, data, a matrix) are children and
everything else is static, so an operator can be passed straight into a
``jax.jit``-compiled function, and ``op.matvec(v)`` works on concrete arrays
and on tracers alike.

Concrete kinds:

* :class:`CurvatureOperator` (built by :func:`hvp.hessian`, :func:`hvp.ggn`,
  :func:`hvp.empirical_fisher`): curvature of a loss over a data set.
* :class:`MatvecOperator` (:func:`hvp.operators.from_matvec`): wraps any
  user function ``v -> A v`` on pytrees shaped like an example pytree.
* :class:`DenseOperator` (:func:`hvp.operators.from_dense`): a dense symmetric
  matrix acting on flat vectors or on pytrees through ravel/unravel (tests,
  small problems).
* :class:`~hvp.operators.SumOperator` and :class:`~hvp.operators.DiagonalOperator`
  (:mod:`hvp.operators._algebra`): ``op + damping``, ``alpha * op``, sums, and
  diagonals.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from hvp import tree as tu
from hvp.typing import Array, OperatorLike, PyTree

__all__ = [
    "LinearOperator",
    "MatvecOperator",
    "DenseOperator",
    "NonFiniteError",
    "from_matvec",
    "from_dense",
    "DEFAULT_DENSE_LIMIT",
    "BLOCK_MODES",
]

#: Largest ``n`` for which :meth:`LinearOperator.dense` builds the ``n x n``
#: matrix unless told otherwise (20,000^2 float64 entries are 3.2 GB).
DEFAULT_DENSE_LIMIT = 20_000

#: How an operator applies itself to a block of vectors (``block=`` of every operator):
#: ``"vmap"`` (one vectorised product of the whole block), ``"map"`` (a sequential
#: ``lax.map`` of single products inside one compiled call) or ``"auto"``, see
#: :meth:`LinearOperator.block_mode`.
BLOCK_MODES = ("auto", "vmap", "map")


class NonFiniteError(FloatingPointError, ValueError):
    """A matvec or a result contained NaN or Inf.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_matvec(lambda v: v / 0.0, jnp.zeros(2), check_finite=True)
        >>> op @ jnp.ones(2)
        Traceback (most recent call last):
        ...
        hvp.operators._base.NonFiniteError: ...
    """


class LinearOperator:
    """A symmetric ``n x n`` linear operator acting on pytrees.

    Subclasses implement :meth:`_apply` (a pure function of the operator's
    array children and a vector pytree) and define ``like`` (an example pytree
    fixing the structure, shapes and dtypes of the vectors), ``_children`` and
    ``_static``. Users and algorithms call only the public products
    :meth:`mv` (also ``matvec``, ``op @ v``, ``op(v)``) and :meth:`matmat`.

    **One trace of the product.** The single product is traced once per
    operator structure (the static fields: functions, data layout, settings),
    argument shapes/dtypes and JAX configuration (x64, default matmul
    precision, abstract mesh) into a jaxpr that is kept in a small cache
    (:data:`_JAXPR_CACHE_SIZE` entries) and reused by :meth:`mv`, by
    :meth:`matmat` of every block size and by operators rebuilt with the same
    functions at other parameters or data of the same shapes: the user's loss
    is traced once for all of them. On concrete inputs each of ``mv`` and
    ``matmat`` of one block size is one compiled call, shared by every
    algorithm (the host drivers of :mod:`hvp.linalg` call ``matmat``).

    **Algebra.** ``op + c`` (``c`` a scalar: the damped operator ``A + c I``),
    ``c + op``, ``op - c``, ``alpha * op``, ``op / alpha``, ``-op``, and
    ``op1 + op2`` / ``op1 - op2`` for operators on the same parameters give
    new operators (:class:`~hvp.operators.SumOperator`); scalars may be traced
    (a damping changing inside ``jit`` does not retrace). See
    :mod:`hvp.operators._algebra`.

    Attributes:
      like: example pytree; every vector ``v`` must match it.
      size: ``n``, the number of scalar entries of ``like``.
      shape: ``(n, n)``.
      dtype: the result dtype of ``like``'s leaves.
      name: a short name used in messages (``"hessian"``, ``"ggn"``, ...).
      block: how :meth:`matmat` runs a block, one of :data:`BLOCK_MODES`
        (see :meth:`block_mode`).
      psd: whether the operator is known to be positive semi-definite
        (structure, not checked numerically; ``False`` unless known).

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
        >>> isinstance(op, hvp.LinearOperator), op.shape, op.size
        (True, (2, 2), 2)
        >>> op.mv(jnp.array([1.0, 0.0]))
        Array([2., 1.], dtype=float64)
        >>> op.matmat(jnp.eye(2))  # one vector per row
        Array([[2., 1.],
               [1., 2.]], dtype=float64)
    """

    name: str = "linear"
    check_finite: bool = False
    block: str = "auto"
    #: Whether the operator is known to be positive semi-definite (``v^T A v >= 0``). Every
    #: operator is symmetric; ``psd`` is structure, never verified numerically: ``True`` for the
    #: GGN (convex output loss), the empirical Fisher and the Fisher, ``False`` for the Hessian
    #: and by default; see :mod:`hvp.operators._algebra` for sums and dampings. Solvers read it
    #: (``getattr(op, "psd", False)``) to choose CG (PSD) or MINRES (indefinite).
    psd: bool = False
    # NumPy scalars and arrays defer to the operator's reflected methods (``np.float64(2) * op``).
    __array_ufunc__ = None

    # --- to be provided by subclasses -------------------------------------
    like: Any

    def _apply(self, v):  # pragma: no cover - abstract
        raise NotImplementedError

    def _children(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def _static(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def _rebuild(cls, static, children):  # pragma: no cover - abstract
        raise NotImplementedError

    # --- pytree protocol ----------------------------------------------------
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node(
            cls,
            lambda op: (op._children(), op._static()),
            lambda static, children: cls._rebuild(static, children),
        )

    # --- shape information --------------------------------------------------
    @property
    def size(self) -> int:
        return tu.size(self.like)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def dtype(self):
        leaves = jax.tree_util.tree_leaves(self.like)
        return jnp.result_type(*leaves) if leaves else jnp.float32

    # --- products -------------------------------------------------------------
    def mv(self, v):
        """``A v`` for a pytree ``v`` shaped like :attr:`like` (the same as ``matvec``, ``op @ v``).

        On concrete inputs the structure is validated first, the product runs
        as one compiled call (compiled once per operator structure and
        shapes) and, when ``check_finite`` is set, a result with NaN/Inf
        raises :class:`NonFiniteError` naming the leaf. Under ``jit``/``vmap``
        the product is inlined into the caller's trace without checks.

        Examples:
            >>> import jax.numpy as jnp
            >>> import hvp
            >>> hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0]))).mv(jnp.ones(2))
            Array([1., 2.], dtype=float64)
        """
        if self._traced(v):
            return _apply_cached(self, v)
        self._check_vectors(v, "v", leading=0)
        out, finite = _jit_apply(self, v)
        if finite is not None and not bool(finite):
            self._raise_if_nonfinite(out, "matvec")
        return out

    def matvec(self, v):
        """``A v``: the same as :meth:`mv`."""
        return self.mv(v)

    def __matmul__(self, v):
        return self.mv(v)

    def __call__(self, v):
        return self.mv(v)

    def matmat(self, vs):
        """``A`` applied to each vector of a block stacked on a leading axis (``A v_i`` in row ``i``).

        ``vs`` is a pytree like :attr:`like` with an extra leading axis of size
        ``b``; validated as in :meth:`mv`. How the block runs follows
        :meth:`block_mode`: ``"vmap"`` is one compiled, vectorised call per
        block size; ``"map"`` on concrete inputs runs the single compiled
        product of :meth:`mv` on each vector in turn (so it costs exactly what
        ``b`` single products cost) and under ``jit``/``vmap`` is a ``lax.map``
        of the single product.

        Examples:
            >>> import jax.numpy as jnp
            >>> import hvp
            >>> op = hvp.from_matvec(lambda v: 2.0 * v, jnp.zeros(2), block="map")
            >>> op.matmat(jnp.eye(2))
            Array([[2., 0.],
                   [0., 2.]], dtype=float64)
        """
        if self._traced(vs):
            return _block_apply(self, vs)
        self._check_vectors(vs, "vs", leading=1)
        if self.block_mode() == "map":
            rows = [_jit_apply(self, v) for v in _rows(vs)]
            out = _stack_rows([r[0] for r in rows])
            finite = None if rows[0][1] is None else all(bool(r[1]) for r in rows)
        else:
            out, finite = _jit_matmat(self, vs)
        if finite is not None and not bool(finite):
            self._raise_if_nonfinite(out, "matmat")
        return out

    def _traced(self, v) -> bool:
        """Whether ``v`` or the operator's arrays are tracers (then products are inlined)."""
        children = self.__dict__.get("_children_traced")
        if children is None:  # the arrays of an operator never change: look once
            children = self.__dict__["_children_traced"] = tu.is_traced(self._children())
        return children or tu.is_traced(v)

    def _check_vectors(self, v, name: str, *, leading: int) -> None:
        """:func:`hvp.tree.assert_same_structure` against ``like``, with a fast path for matches.

        The signature of ``like`` (structure, shapes, dtypes) is computed once per operator, so
        a matching ``v`` costs a flatten and a comparison, not a full description of both trees.
        """
        sig = self.__dict__.get("_like_signature")
        if sig is None:
            leaves, tdef = jax.tree_util.tree_flatten(self.like)
            sig = (tdef, tuple((tuple(np.shape(x)), np.dtype(x.dtype)) for x in leaves))
            self.__dict__["_like_signature"] = sig
        leaves, tdef = jax.tree_util.tree_flatten(v)
        if tdef == sig[0] and _leaves_match(leaves, sig[1], leading):
            return
        tu.assert_same_structure(
            v, self.like, name=name, like_name=f"{self.name} vectors (`op.like`)", leading=leading
        )

    def block_mode(self) -> str:
        """``"vmap"`` or ``"map"``: how :meth:`matmat` runs a block of concrete vectors.

        ``block="vmap"`` / ``"map"`` force one. ``block="auto"`` (the default)
        chooses ``"map"`` (one single product after the other: per vector it
        costs exactly a single product) when the default backend is the CPU
        and the product contains a convolution (``conv_general_dilated``),
        and ``"vmap"`` otherwise. Measured on 2 CPU cores
        (``benchmarks/bench_hvp_modes.py``): vmapped blocks of 4-8 vectors cost
        0.5-0.8x a single product per vector for MLPs, a transformer and a
        small ResNet, but 2.3x for a CNN with 16-32 channels, where a
        ``lax.map`` inside one compiled call was even 9-77x slower (XLA:CPU
        runs convolutions inside loops slowly). Under ``jit``/``vmap``,
        ``"auto"`` therefore always vectorises, and only ``block="map"`` gives
        a ``lax.map``.

        Examples:
            >>> import jax.numpy as jnp
            >>> import hvp
            >>> hvp.from_dense(jnp.eye(2)).block_mode()
            'vmap'
            >>> hvp.from_matvec(lambda v: v, jnp.zeros(2), block="map").block_mode()
            'map'
        """
        if self.block != "auto":
            return self.block
        mode = self.__dict__.get("_block_mode")
        if mode is None:  # decided once per operator object
            mode = "vmap"
            if jax.default_backend() == "cpu":
                closed, _ = _single_jaxpr(self, self.like)
                if _has_primitive(closed, "conv_general_dilated"):
                    mode = "map"
            self.__dict__["_block_mode"] = mode
        return mode

    @property
    def label(self) -> str:
        """``"the <name> operator"``, for messages (``name`` never ends in "operator")."""
        return f"the {self.name} operator"

    def _raise_if_nonfinite(self, out, what: str) -> None:
        if bool(tu.all_finite(out)):
            return
        bad = tu.nonfinite_leaves(out)
        raise NonFiniteError(
            f"The {what} of {self.label} produced NaN or Inf in leaf(s) {', '.join(repr(b) for b in bad)}. "
            "Check the parameters (`hvp.tree.nonfinite_leaves(params)`), the data and the loss for "
            "overflow (float64 or a smaller learning rate may help); pass `check_finite=False` to get "
            "the raw result instead of this error."
        )

    # --- dense materialisation -------------------------------------------------
    def dense(
        self, *, max_size: int | None = DEFAULT_DENSE_LIMIT, chunk_size: int = 256
    ) -> jax.Array:
        """The ``n x n`` matrix in the order of :func:`hvp.tree.ravel` (for validation).

        Built column block by column block with :meth:`matmat` (at most
        ``chunk_size`` columns at a time). Refuses when ``n > max_size`` (default
        ``DEFAULT_DENSE_LIMIT`` = 20,000, i.e. 3.2 GB in float64); pass
        ``max_size=None`` to lift the limit.

        Raises:
          ValueError: ``n > max_size``.
          TypeError, ValueError: ``chunk_size`` not a positive int.

        Examples:
            >>> import jax.numpy as jnp
            >>> import hvp
            >>> hvp.from_dense(jnp.array([[2.0, 1.0], [1.0, 2.0]])).dense(chunk_size=1).tolist()
            [[2.0, 1.0], [1.0, 2.0]]
        """
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
            raise TypeError(
                f"`chunk_size` must be an int (columns computed at once), got "
                f"{type(chunk_size).__name__} ({chunk_size!r})."
            )
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be at least 1, got {chunk_size}.")
        n = self.size
        if max_size is not None and n > max_size:
            gb = n * n * np.dtype(self.dtype).itemsize / 1e9
            raise ValueError(
                f"dense() would build a {n} x {n} matrix ({gb:.1f} GB in {np.dtype(self.dtype)}), above "
                f"max_size={max_size}. Use the matrix-free algorithms (hvp.eigsh, hvp.trace, ...), a "
                f"parameter block (`wrt=`), or pass a larger `max_size` if you have the memory."
            )
        chunk = int(chunk_size)
        unravel = tu.unravel_fn(self.like)
        cols = []
        eye_dtype = self.dtype
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            basis = jnp.eye(n, dtype=eye_dtype)[start:stop]
            vs = jax.vmap(unravel)(basis)
            out = self.matmat(vs)
            cols.append(jax.vmap(tu.ravel)(out))
        rows = jnp.concatenate(cols, axis=0)  # row i = (A e_i)^T = column i of A
        return rows.T

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, size={self.size}, "
            f"dtype={np.dtype(self.dtype)}, psd={self.psd})"
        )

    # --- algebra (hvp.operators._algebra) ---------------------------------------------
    def __add__(self, other):
        from hvp.operators import _algebra

        if isinstance(other, LinearOperator):
            return _algebra.add(self, other)
        if _algebra._is_scalar_like(other) or isinstance(other, bool):
            return _algebra.add_scalar(self, other)
        raise TypeError(
            f"Cannot add {type(other).__name__} to {self.label}: add a scalar (a damping, "
            "`op + 1e-3`), another operator on the same parameters, or a diagonal "
            "(`op + hvp.operators.from_diagonal(d)`)."
        )

    def __radd__(self, other):
        return self.__add__(other)

    def __sub__(self, other):
        from hvp.operators import _algebra

        if isinstance(other, LinearOperator):
            return _algebra.add(self, _algebra.negate(other))
        if _algebra._is_scalar_like(other) or isinstance(other, bool):
            return _algebra.add_scalar(self, other, negative=True)
        raise TypeError(
            f"Cannot subtract {type(other).__name__} from {self.label}: subtract a scalar or "
            "another operator on the same parameters."
        )

    def __rsub__(self, other):
        from hvp.operators import _algebra

        return _algebra.negate(self).__add__(other)

    def __mul__(self, other):
        from hvp.operators import _algebra

        if isinstance(other, LinearOperator):
            raise TypeError(
                f"Products of operators ({self.label} * {other.label}) are not supported: the "
                "product of two symmetric operators is not symmetric in general. Multiply by a "
                "scalar (`2.0 * op`), or apply them in turn (`A @ (B @ v)`)."
            )
        if _algebra._is_scalar_like(other) or isinstance(other, bool):
            return _algebra.scale(self, other)
        raise TypeError(
            f"Cannot multiply {self.label} by {type(other).__name__}: multiply by a scalar "
            "(a Python number or a 0-d array), or use `hvp.operators.from_diagonal(d)` for a "
            "diagonal scaling."
        )

    def __rmul__(self, other):
        return self.__mul__(other)

    def __truediv__(self, other):
        from hvp.operators import _algebra

        if isinstance(other, LinearOperator) or not (
            _algebra._is_scalar_like(other) or isinstance(other, bool)
        ):
            raise TypeError(
                f"{self.label} can only be divided by a scalar, got {type(other).__name__}."
            )
        alpha = _algebra.as_scalar(other, self, "divisor of an operator")
        if not isinstance(alpha, jax.core.Tracer) and float(alpha) == 0.0:
            raise ZeroDivisionError(f"Dividing {self.label} by zero.")
        return _algebra.scale(self, 1.0 / alpha)

    def __neg__(self):
        from hvp.operators import _algebra

        return _algebra.negate(self)

    def __pos__(self):
        return self


# --- the traced single product, shared by mv and matmat of every block size ----------------
#: Entries of the cache of traced single products (least recently used ones are dropped).
_JAXPR_CACHE_SIZE = 128
_JAXPRS: collections.OrderedDict = collections.OrderedDict()


def _config_key() -> tuple:
    """The JAX settings that change a traced jaxpr (the cache key's last part)."""
    return (
        bool(jax.config.jax_enable_x64),
        str(jax.config.jax_default_matmul_precision),
        jax.sharding.get_abstract_mesh(),
    )


def _single_jaxpr(op: LinearOperator, v):
    """``(closed jaxpr, output treedef)`` of ``op._apply`` on the types of ``op``'s leaves and ``v``.

    Traced once per operator structure, leaf types and JAX settings; the
    jaxpr takes ``op``'s leaves then ``v``'s leaves. Not cached when it
    captured a tracer of an enclosing trace (a loss closing over a traced value).
    """
    op_leaves, op_def = jax.tree_util.tree_flatten(op)
    v_leaves, v_def = jax.tree_util.tree_flatten(v)
    key = (
        op_def,
        tuple(jax.typeof(x) for x in op_leaves),
        v_def,
        tuple(jax.typeof(x) for x in v_leaves),
        _config_key(),
    )
    hit = _JAXPRS.get(key)
    if hit is not None:
        _JAXPRS.move_to_end(key)
        return hit

    def single(op_leaves, v_leaves):
        o = jax.tree_util.tree_unflatten(op_def, op_leaves)
        return o._apply(jax.tree_util.tree_unflatten(v_def, v_leaves))

    closed, out_shape = jax.make_jaxpr(single, return_shape=True)(op_leaves, v_leaves)
    hit = (closed, jax.tree_util.tree_structure(out_shape))
    if not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        _JAXPRS[key] = hit
        while len(_JAXPRS) > _JAXPR_CACHE_SIZE:
            _JAXPRS.popitem(last=False)
    return hit


def _apply_cached(op: LinearOperator, v):
    """``op._apply(v)`` through the cached jaxpr (works on concrete values and on tracers)."""
    closed, out_def = _single_jaxpr(op, v)
    args = jax.tree_util.tree_leaves(op) + jax.tree_util.tree_leaves(v)
    return jax.tree_util.tree_unflatten(out_def, jex_core.jaxpr_as_fun(closed)(*args))


def _block_apply(op: LinearOperator, vs):
    """``A v`` for every row of ``vs`` in one trace: a vmap, or a ``lax.map`` when ``block="map"``."""
    if op.block == "map":
        return lax.map(lambda v: _apply_cached(op, v), vs)
    return jax.vmap(lambda v: _apply_cached(op, v))(vs)


def _has_primitive(jaxpr, prefix: str) -> bool:
    """Whether a jaxpr (or any jaxpr nested in its equations) has a primitive named ``prefix...``."""
    stack = [jaxpr]
    while stack:
        jp = stack.pop()
        jp = getattr(jp, "jaxpr", jp)  # ClosedJaxpr -> Jaxpr
        for eqn in getattr(jp, "eqns", ()):
            if eqn.primitive.name.startswith(prefix):
                return True
            for val in eqn.params.values():
                vals = val if isinstance(val, (tuple, list)) else (val,)
                stack.extend(x for x in vals if hasattr(x, "eqns") or hasattr(x, "jaxpr"))
    return False


@jax.jit
def _rows(vs):
    """The vectors of a block (pytrees without the leading axis), in one compiled call."""
    return [jax.tree_util.tree_map(lambda x, i=i: x[i], vs) for i in range(tu.leading_dim(vs))]


@jax.jit
def _stack_rows(rows):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *rows)


def _leaves_match(leaves, signature, leading: int) -> bool:
    """Whether array ``leaves`` have the ``(shape, dtype)`` of ``signature`` after ``leading`` axes."""
    lead = None
    for x, (shape, dtype) in zip(leaves, signature):
        xs, xd = getattr(x, "shape", None), getattr(x, "dtype", None)
        if xs is None or xd is None or len(xs) != len(shape) + leading:
            return False
        if tuple(xs[leading:]) != shape or xd != dtype:
            return False
        if leading:
            if lead is None:
                lead = tuple(xs[:leading])
            elif tuple(xs[:leading]) != lead:
                return False
    return True


def _with_finite_flag(op: LinearOperator, out):
    """``(out, all entries finite)`` when the operator checks results, else ``(out, None)``.

    The check is part of the compiled product (no second dispatch); it is read on the host.
    """
    return out, (tu.all_finite(out) if op.check_finite else None)


@jax.jit
def _jit_apply(op: LinearOperator, v):
    return _with_finite_flag(op, _apply_cached(op, v))


@jax.jit
def _jit_matmat(op: LinearOperator, vs):
    return _with_finite_flag(op, _block_apply(op, vs))


def check_block(block) -> str:
    """``block`` if it is one of :data:`BLOCK_MODES`, else a ``ValueError`` naming them.

    Examples:
        >>> from hvp.operators._base import check_block
        >>> check_block("map")
        'map'
    """
    if not isinstance(block, str) or block not in BLOCK_MODES:
        raise ValueError(
            f"`block` must be one of {BLOCK_MODES} (how a block of vectors is multiplied: "
            f'"vmap" vectorises the product, "map" runs single products one after the other, '
            f'"auto" chooses), got {block!r}.'
        )
    return block


class MatvecOperator(LinearOperator):
    """Wraps a user function ``matvec(v)`` on pytrees shaped like ``like``.

    The function is static (hashed by identity), ``like`` is only used for its
    structure, shapes and dtypes.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.operators.MatvecOperator(lambda v: {"w": 3.0 * v["w"]}, {"w": jnp.zeros(2)})
        >>> op @ {"w": jnp.ones(2)}
        {'w': Array([3., 3.], dtype=float64)}
    """

    def __init__(
        self,
        matvec: Callable,
        like,
        *,
        name: str = "matvec",
        check_finite: bool = False,
        block: str = "auto",
        psd: bool = False,
    ):
        if not callable(matvec):
            raise TypeError(f"`matvec` must be callable, got {type(matvec).__name__}.")
        self._fn = matvec
        self.like = as_zeros(like)
        self.name = _operator_name(name, "matvec")
        self.check_finite = check_finite
        self.block = check_block(block)
        self.psd = _check_psd(psd)

    def _apply(self, v):
        return self._fn(v)

    def _children(self):
        return (self.like,)

    def _static(self):
        return (self._fn, self.name, self.check_finite, self.block, self.psd)

    @classmethod
    def _rebuild(cls, static, children):
        op = object.__new__(cls)
        op._fn, op.name, op.check_finite, op.block, op.psd = static
        (op.like,) = children
        return op


class DenseOperator(LinearOperator):
    """A dense symmetric matrix acting on pytrees shaped like ``like``.

    If ``like`` is omitted, vectors are flat arrays of length ``n``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.operators.DenseOperator(jnp.diag(jnp.array([1.0, 2.0, 3.0])), {"a": jnp.zeros(1), "b": jnp.zeros(2)})
        >>> op @ {"a": jnp.ones(1), "b": jnp.ones(2)}
        {'a': Array([1.], dtype=float64), 'b': Array([2., 3.], dtype=float64)}
    """

    def __init__(
        self,
        matrix,
        like=None,
        *,
        name: str = "dense",
        check_finite: bool = False,
        psd: bool = False,
    ):
        matrix = jnp.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"`matrix` must be square, got shape {matrix.shape}.")
        if like is None:
            like = jax.ShapeDtypeStruct((matrix.shape[0],), matrix.dtype)
        elif tu.size(like) != matrix.shape[0]:
            raise ValueError(
                f"`like` has {tu.size(like)} entries but the matrix is {matrix.shape[0]} x "
                f"{matrix.shape[0]}."
            )
        self.matrix = matrix
        self.like = as_zeros(like)
        self.name = _operator_name(name, "dense")
        self.check_finite = check_finite
        self.psd = _check_psd(psd)

    def _apply(self, v):
        flat = tu.ravel(v)
        return tu.unravel_fn(self.like)(self.matrix.astype(flat.dtype) @ flat)

    def _children(self):
        return (self.matrix, self.like)

    def _static(self):
        return (self.name, self.check_finite, self.block, self.psd)

    @classmethod
    def _rebuild(cls, static, children):
        op = object.__new__(cls)
        op.matrix, op.like = children
        op.name, op.check_finite, op.block, op.psd = static
        return op


def _check_psd(psd) -> bool:
    if not isinstance(psd, (bool, np.bool_)):
        raise TypeError(
            f"`psd` must be True or False (whether you know the operator to be positive "
            f"semi-definite; it is not checked), got {psd!r}."
        )
    return bool(psd)


def _operator_name(name, default: str) -> str:
    """A short operator name for messages ("the <name> operator"): no trailing "operator"."""
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a string, got {type(name).__name__}.")
    short = name.strip()
    if short.lower().endswith("operator"):
        short = short[: -len("operator")].strip()
    return short or default


def as_zeros(like):
    """Replace ``jax.ShapeDtypeStruct`` leaves of an example pytree by zero arrays.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from hvp.operators import as_zeros
        >>> as_zeros({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})["w"]
        Array([0., 0.], dtype=float32)
    """
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, like
    )


def from_matvec(
    matvec: Callable,
    like,
    *,
    name: str = "matvec",
    check_finite: bool = False,
    block: str = "auto",
    psd: bool = False,
) -> MatvecOperator:
    """A :class:`LinearOperator` from any symmetric ``matvec(v)`` on pytrees shaped like ``like``.

    ``psd=True`` declares the operator positive semi-definite (``op.psd``,
    read by solvers to choose CG over MINRES); it is **not verified**: a
    wrong declaration makes such algorithms misbehave. Default ``False``.

    ``name`` is used in messages as "the <name> operator" (a trailing
    "operator" in it is dropped, so messages never say "operator operator").
    ``block`` (one of :data:`BLOCK_MODES`) says how ``op.matmat`` runs a block
    of vectors: see :meth:`LinearOperator.block_mode`.

    Raises:
      TypeError: ``matvec`` is not callable.
      ValueError: ``block`` is not one of :data:`BLOCK_MODES`.

    Examples:
        >>> import jax.numpy as jnp
        >>> op = from_matvec(lambda v: 2.0 * v, jnp.zeros(3), name="doubling")
        >>> op.label, (op @ jnp.ones(3)).tolist()
        ('the doubling operator', [2.0, 2.0, 2.0])
    """
    return MatvecOperator(matvec, like, name=name, check_finite=check_finite, block=block, psd=psd)


def from_dense(
    matrix, like: PyTree | None = None, *, name: str = "dense", psd: bool = False
) -> DenseOperator:
    """A :class:`LinearOperator` from a dense symmetric matrix (flat vectors, or pytrees like ``like``).

    ``psd=True`` declares the matrix positive semi-definite (``op.psd``); it is
    **not verified** (no eigenvalue computation). Default ``False``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> op = hvp.from_dense(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
        >>> op @ jnp.array([1.0, 0.0])
        Array([2., 1.], dtype=float64)
    """
    return DenseOperator(matrix, like, name=name, psd=psd)


def as_operator(op: OperatorLike | Array, like: PyTree | None = None) -> LinearOperator:
    """Coerce ``op`` to a :class:`LinearOperator`.

    Accepts a :class:`LinearOperator`, a callable ``matvec`` together with an
    example pytree ``like``, or a dense square array.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> hvp.operators.as_operator(jnp.eye(2)).shape  # a dense square array
        (2, 2)
        >>> op = hvp.operators.as_operator(lambda v: 2.0 * v, like=jnp.zeros(3))  # a matvec
        >>> op @ jnp.ones(3)
        Array([2., 2., 2.], dtype=float64)
    """
    if isinstance(op, LinearOperator):
        return op
    if callable(op):
        if like is None:
            raise TypeError(
                "A plain matvec function needs an example vector: pass `like=` (a pytree "
                "shaped like the vectors it acts on)."
            )
        return MatvecOperator(op, like)
    if hasattr(op, "shape") and len(op.shape) == 2:
        return DenseOperator(op, like)
    raise TypeError(
        f"Expected an hvp operator, a matvec callable with `like=`, or a square matrix; got "
        f"{type(op).__name__}."
    )
