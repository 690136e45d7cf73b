"""Shared type aliases of the public API (one place, reused by every layer).

Import them as ``from hvp.typing import PyTree, PRNGKey, Operator`` in annotations. They
describe what the functions accept; JAX's own types do the checking at run time.

* :data:`PyTree` - any JAX pytree (nested tuples, lists, dicts, dataclasses, Flax states)
  whose leaves are arrays: parameters, vectors shaped like them, blocks of vectors.
* :data:`PRNGKey` - a JAX random key, ``jax.random.key(0)`` or the legacy
  ``jax.random.PRNGKey(0)`` (a ``uint32[2]`` array).
* :data:`Array` / :data:`ArrayLike` / :data:`DTypeLike` - JAX's array types.
* :data:`Matvec` - a function ``v -> A v`` on pytrees.
* :class:`Operator` - the structural interface of :class:`hvp.operators.LinearOperator`:
  anything with ``like``, ``size``, ``shape``, ``dtype``, ``matvec`` and ``matmat``.
* :data:`OperatorLike` - what the algorithms of :mod:`hvp.linalg` accept: an
  :class:`Operator`, or a :data:`Matvec` together with ``like=``.

This module imports nothing from :mod:`hvp`, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeAlias, runtime_checkable

import jax
import jax.typing

__all__ = [
    "Array",
    "ArrayLike",
    "DTypeLike",
    "Matvec",
    "Operator",
    "OperatorLike",
    "PRNGKey",
    "PyTree",
]

PyTree: TypeAlias = Any
"""Any JAX pytree with array leaves (``dict``, ``list``, ``tuple``, dataclasses, Flax states)."""

Array: TypeAlias = jax.Array
"""A JAX array."""

ArrayLike: TypeAlias = jax.typing.ArrayLike
"""Anything ``jnp.asarray`` accepts (JAX or NumPy arrays, Python scalars)."""

DTypeLike: TypeAlias = jax.typing.DTypeLike
"""A dtype or something that names one (``jnp.float32``, ``"float64"``)."""

PRNGKey: TypeAlias = jax.Array
"""A JAX random key: ``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``."""

Matvec: TypeAlias = Callable[[PyTree], PyTree]
"""A function ``v -> A v`` mapping a pytree to a pytree of the same structure."""


@runtime_checkable
class Operator(Protocol):
    """Structural type of a symmetric linear operator on pytrees.

    :class:`hvp.operators.LinearOperator` and its subclasses satisfy it; so does any
    object with the same members.

    Attributes:
      like: example pytree fixing the structure, shapes and dtypes of the vectors.
      size: ``n``, the number of scalar entries of ``like``.
      shape: ``(n, n)``.
      dtype: the dtype of the products.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> from hvp.typing import Operator
        >>> op = hvp.operators.from_dense(jnp.diag(jnp.array([1.0, 2.0])))
        >>> isinstance(op, Operator)
        True
        >>> op.shape
        (2, 2)
    """

    like: PyTree

    @property
    def size(self) -> int:
        """``n``, the number of scalar entries of ``like``."""
        ...

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)``."""
        ...

    @property
    def dtype(self) -> Any:
        """The dtype of the products."""
        ...

    def matvec(self, v: PyTree) -> PyTree:
        """``A v`` for a pytree ``v`` shaped like :attr:`like`."""
        ...

    def matmat(self, vs: PyTree) -> PyTree:
        """``A`` applied to a block of vectors stacked on a leading axis."""
        ...


OperatorLike: TypeAlias = Operator | Matvec
"""An :class:`Operator`, or a :data:`Matvec` (then the algorithm also needs ``like=``)."""
