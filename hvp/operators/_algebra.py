r"""Operator algebra: damping, scaling, sums of operators, diagonal operators.

Every operator of :mod:`hvp` is symmetric, and so is every result here:

* ``op + c``, ``c + op`` (``c`` a scalar: ``op + c I``, the damped operator),
  ``op - c``, ``c - op``;
* ``alpha * op``, ``op * alpha``, ``op / alpha``, ``-op``;
* ``op1 + op2``, ``op1 - op2`` for operators on the same parameters (the same
  pytree structure, leaf shapes and dtypes of ``like``);
* :func:`from_diagonal` (``diag(d)`` for a pytree ``d``) and :func:`identity`.

The results are :class:`SumOperator` / :class:`DiagonalOperator` objects,
ordinary :class:`~hvp.operators.LinearOperator` s: ``mv``, ``matmat`` of any
block size, ``dense()`` and every algorithm of :mod:`hvp.linalg` accept them.
A sum is kept flat, :math:`A = \sum_k a_k A_k + \lambda I` (nested sums,
scalings and dampings are merged), and its product is

.. math::

   A v = \sum_k a_k (A_k v) + \lambda v,

one product of each operator per vector, each through that operator's own
traced product (a sum of curvature operators traces each user loss once, as
the operators alone do).

**Scalars** (``c``, ``alpha``) are Python numbers or 0-d arrays, traced ones
included; they are stored as arrays among the operator's children (cast to the
operator's dtype), never as static settings: a damping that changes at every
step of a training loop does not retrace or recompile a jitted function taking
the operator (Hessian-free optimisation, Martens 2010, changes it every step).

**Structure.** ``op.psd`` says whether the operator is known to be positive
semi-definite: a sum is PSD when every term is PSD with a non-negative
coefficient and the damping is non-negative; ``alpha * op`` is PSD when ``op``
is and ``alpha >= 0``. A scalar that is a tracer (inside ``jit``) cannot be
inspected: it is *taken to be non-negative as written* for ``psd`` (dampings
and scale factors are), so ``G + lam`` with a traced ``lam`` stays PSD while
``G - lam`` and ``-(lam * G)`` do not; build the operator outside ``jit`` with a
concrete scalar to have its sign checked. The flag is conservative: ``-(-G)``
or ``(G - H) + H`` are not recognised as PSD.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp.operators._base import LinearOperator, _apply_cached, _operator_name, check_block

__all__ = ["SumOperator", "DiagonalOperator", "from_diagonal", "identity"]


# --- scalars -----------------------------------------------------------------------------------
def _is_scalar_like(x) -> bool:
    """Whether ``x`` can be a scalar of the algebra (a number or an array; shape checked later)."""
    return isinstance(x, (int, float, np.number, np.ndarray, jax.Array)) and not isinstance(
        x, (bool, np.bool_)
    )


def as_scalar(x, op: LinearOperator, what: str) -> jax.Array:
    """``x`` as a 0-d array of ``op``'s dtype, or a clear error.

    Python numbers, NumPy scalars and 0-d (possibly traced) JAX/NumPy arrays of a real
    dtype are accepted; concrete values must be finite.
    """
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(
            f"The {what} must be a real number, got the bool {x!r}; write 1.0 or 0.0 if you mean one."
        )
    if isinstance(x, (complex, np.complexfloating)) or (
        hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.complexfloating)
    ):
        raise TypeError(f"The {what} must be real, got the complex value {x!r}.")
    shape = np.shape(x)
    if shape != ():
        raise ValueError(
            f"The {what} must be a scalar (a Python number or a 0-d array), got an array of shape "
            f"{shape}. For a per-parameter damping use `op + hvp.operators.from_diagonal(d)` with "
            "`d` a pytree shaped like the parameters."
        )
    dtype = op.dtype
    if hasattr(x, "dtype") and not (
        jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)
    ):
        raise TypeError(f"The {what} must be a real number, got dtype {x.dtype}.")
    if not isinstance(x, jax.core.Tracer):
        value = float(np.asarray(x))
        if not math.isfinite(value):
            raise ValueError(f"The {what} must be finite, got {value}.")
    return jnp.asarray(x).astype(dtype)


def _nonnegative(x) -> bool:
    """``x >= 0`` for a concrete scalar; ``True`` for a tracer (taken to be non-negative, see the module)."""
    if x is None or isinstance(x, jax.core.Tracer):
        return True
    return bool(np.asarray(x) >= 0)


def _format_scalar(x) -> str:
    if isinstance(x, jax.core.Tracer):
        return "<traced>"
    return f"{float(np.asarray(x)):g}"


def check_same_like(a: LinearOperator, b: LinearOperator) -> None:
    """Raise a ``ValueError`` naming the difference unless ``a`` and ``b`` act on the same vectors."""
    la, lb = a.like, b.like
    da: Any = jax.tree_util.tree_structure(la)
    db: Any = jax.tree_util.tree_structure(lb)
    if da != db:
        raise ValueError(
            f"Cannot add {a.label} and {b.label}: their vectors have different pytree structures "
            f"({da} vs {db}). Operators can be added only when they act on the same parameters "
            "(build both at the same `params` and `wrt`)."
        )
    for path, x, y in zip(
        tu.leaf_paths(la), jax.tree_util.tree_leaves(la), jax.tree_util.tree_leaves(lb)
    ):
        sx, sy = (tuple(np.shape(x)), jnp.result_type(x)), (tuple(np.shape(y)), jnp.result_type(y))
        if sx != sy:
            raise ValueError(
                f"Cannot add {a.label} and {b.label}: leaf {path!r} is {sx[0]} {sx[1]} in the first "
                f"and {sy[0]} {sy[1]} in the second. Build both operators at parameters of the same "
                "shapes and dtypes (cast with `hvp.tree.cast(params, dtype)`)."
            )


# --- the flat linear combination -----------------------------------------------------------------
class SumOperator(LinearOperator):
    r"""``sum_k a_k A_k + damping * I``: a linear combination of operators plus a damping.

    Built by the operator arithmetic (``G + 1e-3``, ``2.0 * H``, ``G + P``,
    ``-H``), not directly. Symmetric like its terms; kept flat (combining sums
    merges their terms and adds their dampings). Products apply each term once:
    :math:`A v = \sum_k a_k (A_k v) + \lambda v`.

    Attributes:
      terms: tuple of ``(coefficient, operator)`` pairs; the coefficient is a
        0-d array or ``None`` (1).
      damping: the 0-d array :math:`\lambda` (of the operator's dtype), or
        ``None`` without damping.
      psd: whether the combination is known to be positive semi-definite (see
        :mod:`hvp.operators._algebra`; traced scalars count as non-negative).
      like, size, shape, dtype, name, block: as for every
        :class:`~hvp.operators.LinearOperator`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> A = hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0])), psd=True)
        >>> B = 2.0 * A + 0.5
        >>> B
        SumOperator(2 * dense + 0.5 * I, size=2, dtype=float64, psd=True)
        >>> B @ jnp.ones(2)
        Array([2.5, 4.5], dtype=float64)
        >>> float(B.damping), (A - A).psd
        (0.5, False)
    """

    def __init__(
        self,
        terms: tuple,
        damping=None,
        *,
        psd: bool | None = None,
        name: str | None = None,
    ):
        if not terms:
            raise ValueError("A SumOperator needs at least one operator term.")
        self.terms = tuple(terms)
        self.damping = damping
        ops = [op for _, op in self.terms]
        if psd is None:
            psd = all(
                bool(getattr(op, "psd", False)) and _nonnegative(c) for c, op in self.terms
            ) and _nonnegative(damping)
        self.psd = bool(psd)
        if name is None:
            parts = [op.name if c is None else f"scaled {op.name}" for c, op in self.terms]
            if damping is not None:
                parts.append("damping")
            name = " + ".join(parts)
        self.name = name
        self.check_finite = any(op.check_finite for op in ops)
        self.block = "map" if any(op.block == "map" for op in ops) else "auto"

    @property
    def like(self):
        return self.terms[0][1].like

    @property
    def streaming(self) -> bool:
        """Whether a term streams its data set (then products run on the host, term by term)."""
        return any(getattr(op, "streaming", False) is True for _, op in self.terms)

    def mv(self, v):
        if not self.streaming:
            return super().mv(v)
        return self._host_product(v, block=False)

    def matmat(self, vs):
        if not self.streaming:
            return super().matmat(vs)
        return self._host_product(vs, block=True)

    def _combine(self, v, product):
        """``sum_i coef_i product(op_i, v) + damping v`` over the terms."""
        total = None
        for coef, op in self.terms:
            out = product(op, v)
            if coef is not None:
                out = tu.scale(coef, out)
            total = out if total is None else tu.add(total, out)
        if self.damping is not None:
            total = tu.axpy(self.damping, v, total)
        return total

    def _host_product(self, v, *, block: bool):
        """With a streamed term: each term's own product (one data pass per streamed term)."""
        return self._combine(v, lambda op, x: op.matmat(x) if block else op.mv(x))

    def _apply(self, v):
        return self._combine(v, _apply_cached)

    def _children(self):
        return (
            tuple(op for _, op in self.terms),
            tuple(c for c, _ in self.terms),
            self.damping,
        )

    def _static(self):
        return (self.name, self.psd, self.check_finite, self.block)

    @classmethod
    def _rebuild(cls, static, children):
        op = object.__new__(cls)
        op.name, op.psd, op.check_finite, op.block = static
        ops, coefs, op.damping = children
        op.terms = tuple(zip(coefs, ops))
        return op

    def __repr__(self) -> str:
        parts = []
        for c, op in self.terms:
            parts.append(op.name if c is None else f"{_format_scalar(c)} * {op.name}")
        if self.damping is not None:
            parts.append(f"{_format_scalar(self.damping)} * I")
        return (
            f"SumOperator({' + '.join(parts)}, size={self.size}, dtype={np.dtype(self.dtype)}, "
            f"psd={self.psd})"
        )


def _split(op: LinearOperator):
    """``(terms, damping)`` of ``op`` seen as a linear combination."""
    if isinstance(op, SumOperator):
        return op.terms, op.damping
    return ((None, op),), None


def _add_scalars(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _mul_scalars(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a * b


def _signed_nonnegative(x, negative: bool) -> bool:
    """Whether ``-x`` (``negative``) or ``x`` is known to be ``>= 0``; a tracer counts as ``>= 0``.

    A traced scalar is taken to be non-negative as the user wrote it, so it is
    non-positive once subtracted (``op - lam``) or negated.
    """
    if isinstance(x, jax.core.Tracer):
        return not negative
    value = float(np.asarray(x))
    return (-value if negative else value) >= 0


def add(a: LinearOperator, b: LinearOperator) -> SumOperator:
    """``a + b`` for two operators on the same parameters (``ValueError`` naming the mismatch)."""
    check_same_like(a, b)
    ta, da = _split(a)
    tb, db = _split(b)
    psd = bool(getattr(a, "psd", False)) and bool(getattr(b, "psd", False))
    return SumOperator(ta + tb, _add_scalars(da, db), psd=psd)


def add_scalar(op: LinearOperator, c, *, negative: bool = False) -> SumOperator:
    """``op + c I`` (the damped operator), or ``op - c I`` with ``negative=True``."""
    c = as_scalar(c, op, "scalar subtracted from an operator" if negative else "damping")
    terms, d = _split(op)
    psd = bool(getattr(op, "psd", False)) and _signed_nonnegative(c, negative)
    return SumOperator(terms, _add_scalars(d, -c if negative else c), psd=psd)


def scale(op: LinearOperator, alpha, *, negative: bool = False) -> SumOperator:
    """``alpha * op`` (``-alpha * op`` with ``negative=True``)."""
    alpha = as_scalar(alpha, op, "factor multiplying an operator")
    psd = bool(getattr(op, "psd", False)) and _signed_nonnegative(alpha, negative)
    if negative:
        alpha = -alpha
    terms, d = _split(op)
    return SumOperator(
        tuple((_mul_scalars(c, alpha), o) for c, o in terms),
        None if d is None else d * alpha,
        psd=psd,
    )


def negate(op: LinearOperator) -> SumOperator:
    """``-op``."""
    return scale(op, 1.0, negative=True)


# --- diagonal operators ----------------------------------------------------------------------------
class DiagonalOperator(LinearOperator):
    r"""The diagonal operator ``v -> d * v`` (leaf by leaf) for a pytree ``d``.

    Built by :func:`from_diagonal` or :func:`identity`. ``like`` is ``d``
    itself (vectors are shaped like it).

    Attributes:
      diagonal: the pytree ``d`` of diagonal entries.
      psd: ``True`` when every entry is ``>= 0`` (checked on concrete ``d``),
        or as given to :func:`from_diagonal`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> D = hvp.operators.DiagonalOperator({"a": jnp.array([1.0, 3.0])})
        >>> D @ {"a": jnp.ones(2)}, D.psd
        ({'a': Array([1., 3.], dtype=float64)}, True)
    """

    def __init__(
        self,
        diagonal,
        *,
        psd: bool | None = None,
        name: str = "diagonal",
        check_finite: bool = False,
        block: str = "auto",
    ):
        leaves = jax.tree_util.tree_leaves(diagonal)
        if not leaves:
            raise ValueError("The diagonal must be a pytree with at least one array leaf.")
        diagonal = jax.tree_util.tree_map(jnp.asarray, diagonal)
        tu.assert_floating(diagonal, name="diagonal")
        concrete = not tu.is_traced(diagonal)
        if concrete and not bool(tu.all_finite(diagonal)):
            raise ValueError(
                f"The diagonal contains NaN or Inf in leaf(s) "
                f"{', '.join(repr(b) for b in tu.nonfinite_leaves(diagonal))}."
            )
        if psd is None:
            psd = concrete and all(
                bool(jnp.all(x >= 0)) for x in jax.tree_util.tree_leaves(diagonal)
            )
        elif not isinstance(psd, (bool, np.bool_)):
            raise TypeError(f"`psd` must be True, False or None, got {psd!r}.")
        self.diagonal = diagonal
        self.psd = bool(psd)
        self.name = _operator_name(name, "diagonal")
        self.check_finite = check_finite
        self.block = check_block(block)

    @property
    def like(self):
        return self.diagonal

    def _apply(self, v):
        return jax.tree_util.tree_map(lambda d, x: d.astype(x.dtype) * x, self.diagonal, v)

    def _children(self):
        return (self.diagonal,)

    def _static(self):
        return (self.psd, self.name, self.check_finite, self.block)

    @classmethod
    def _rebuild(cls, static, children):
        op = object.__new__(cls)
        op.psd, op.name, op.check_finite, op.block = static
        (op.diagonal,) = children
        return op


def from_diagonal(diagonal, *, psd: bool | None = None, name: str = "diagonal") -> DiagonalOperator:
    r"""The diagonal operator :math:`\mathrm{diag}(d)` for a pytree ``d`` of floating arrays.

    Vectors are pytrees shaped like ``d``; the product is ``d * v`` leaf by
    leaf. Use it for a per-parameter damping or prior precision
    (``G + from_diagonal(prior_precision)``, a Laplace approximation's
    posterior precision) or a diagonal preconditioner.

    Args:
      diagonal: pytree of floating arrays (the diagonal entries, in the
        layout of the parameters).
      psd: ``None`` (default) checks ``d >= 0`` on concrete entries (a traced
        ``d`` gives ``False``: unknown); ``True``/``False`` set the flag
        without checking.
      name: used in messages (``"the <name> operator"``).

    Raises:
      ValueError: an empty pytree, NaN/Inf entries (concrete ``d``).
      TypeError: non-floating leaves, ``psd`` not a bool or ``None``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> D = hvp.operators.from_diagonal({"w": jnp.array([1.0, 2.0]), "b": jnp.array([4.0])})
        >>> (D @ {"w": jnp.ones(2), "b": jnp.ones(1)})["w"], D.psd
        (Array([1., 2.], dtype=float64), True)
        >>> (D + 1.0).dense().diagonal().tolist()  # ravel order: "b" before "w"
        [5.0, 2.0, 3.0]
    """
    return DiagonalOperator(diagonal, psd=psd, name=name)


def identity(like, *, name: str = "identity") -> DiagonalOperator:
    """The identity operator on pytrees shaped like ``like`` (PSD).

    ``like`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves (only shapes
    and dtypes are used). ``c * identity(like)`` is a scaled identity; to damp
    an operator, ``op + c`` is simpler and cheaper.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> I = hvp.operators.identity({"w": jnp.zeros(3)})
        >>> I.dense().tolist(), I.psd
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], True)
    """
    ones = jax.tree_util.tree_map(lambda x: jnp.ones(np.shape(x), x.dtype), like)
    return DiagonalOperator(ones, psd=True, name=name)
