"""Argument validation and shared policies of the :mod:`hvp.linalg` algorithms.

One place for the checks every algorithm needs, so that a bad argument gets the same
clear message everywhere (``key=0`` to any algorithm says "pass key=jax.random.key(seed)";
``tol=inf`` is refused wherever a finite value is meant), and for the two policies the
algorithms share:

* **Precision** (:class:`DtypePolicy`, :func:`dtype_policy`): operator products run in the
  parameters' dtype; inner products, norms, accumulations, projected/tridiagonal matrices
  and small dense factorisations (QR, ``eigh``) in :func:`hvp.tree.accumulation_dtype`
  (at least float32). Every result reports the policy it used in a ``dtype_policy`` field.
* **Memory** (:func:`default_chunk_size`): with ``chunk_size=None`` at most
  :data:`DEFAULT_MAX_CHUNK` products run at once, fewer when the per-probe vectors
  of an algorithm would exceed :data:`DEFAULT_CHUNK_BYTES`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, overload

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp.operators import LinearOperator, NonFiniteError, as_operator, as_zeros

__all__ = [
    "ConvergenceWarning",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_CHUNK",
    "DtypePolicy",
    "apply_in_dtype",
    "check_chunk",
    "check_finite_float",
    "check_int",
    "check_key",
    "coerce_operator",
    "default_chunk_size",
    "dtype_policy",
    "raise_if_nonfinite",
    "resolve_chunk",
    "warn_not_converged",
]

KEY_HINT = "pass key=jax.random.key(seed)"

#: Default cap on the number of operator products run at once (``chunk_size=None``).
#: The memory of one product of a curvature operator over a data set is dominated by the
#: activations of the forward/backward pass, which the algorithms cannot see; a run with
#: all 99 probes at once peaked at 24 GB on an 18k-parameter transformer over 512 x 32
#: tokens where 8 at a time needed 4.3 GB (issue 18).
DEFAULT_MAX_CHUNK = 8

#: Default budget for the per-probe vectors an algorithm keeps while the products of one
#: chunk run (e.g. the Lanczos basis of each SLQ probe): 1 GiB.
DEFAULT_CHUNK_BYTES = 1 << 30


# ------------------------------------------------------------------------------------------------
# keys and numbers
# ------------------------------------------------------------------------------------------------
def check_key(key, *, name: str = "key") -> None:
    """Raise one clear error unless ``key`` is a single JAX PRNG key.

    Accepts typed keys (``jax.random.key(seed)``, shape ``()``) and old-style raw keys
    (``jax.random.PRNGKey(seed)``, ``uint32[2]``), concrete or traced (under ``jit``/``vmap``).

    Raises:
      TypeError: ``None``, a Python/NumPy integer or any other non-key object.
      ValueError: a batch of keys where one key is expected.

    >>> import jax
    >>> check_key(jax.random.key(0))
    >>> check_key(0)
    Traceback (most recent call last):
    ...
    TypeError: `key` must be a JAX PRNG key, got int (0): pass key=jax.random.key(seed).
    """
    if key is None:
        raise TypeError(f"`{name}` is required: {KEY_HINT}.")
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", ()))
    if dtype is None or isinstance(key, (np.ndarray, np.generic)) and np.ndim(key) == 0:
        raise TypeError(
            f"`{name}` must be a JAX PRNG key, got {type(key).__name__} ({key!r}): {KEY_HINT}."
        )
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"`{name}` must be a single PRNG key, got a batch of keys of shape {shape}: "
                f"{KEY_HINT} (use `jax.vmap` over the call to run several keys)."
            )
        return
    raw_sizes = (2, 4)  # threefry (default) and rbg raw keys
    if dtype == jnp.uint32 and len(shape) == 1 and shape[0] in raw_sizes:
        return
    if dtype == jnp.uint32 and len(shape) > 1 and shape[-1] in raw_sizes:
        raise ValueError(
            f"`{name}` must be a single PRNG key, got a batch of raw keys of shape {shape}: "
            f"{KEY_HINT} (use `jax.vmap` over the call to run several keys)."
        )
    raise TypeError(
        f"`{name}` must be a JAX PRNG key, got an array of dtype {dtype} and shape {shape}: "
        f"{KEY_HINT}."
    )


def check_int(name: str, value, *, minimum: int, hint: str = "") -> int:
    """``value`` as a Python int ``>= minimum``, or a ``TypeError``/``ValueError`` naming it.

    >>> check_int("num_iters", 5, minimum=1)
    5
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"`{name}` must be an int, got {type(value).__name__} ({value!r})."
            + (f" {hint}" if hint else "")
        )
    if value < minimum:
        raise ValueError(
            f"`{name}` must be at least {minimum}, got {value}." + (f" {hint}" if hint else "")
        )
    return int(value)


@overload
def check_finite_float(
    name: str, value, *, positive: bool = ..., allow_none: Literal[False] = ..., hint: str = ...
) -> float: ...


@overload
def check_finite_float(
    name: str, value, *, positive: bool = ..., allow_none: bool = ..., hint: str = ...
) -> float | None: ...


def check_finite_float(
    name: str, value, *, positive: bool = False, allow_none: bool = False, hint: str = ""
) -> float | None:
    """``value`` as a finite Python float (``> 0`` with ``positive``, else ``>= 0``).

    NaN, ``inf``, negative values (and zero with ``positive``), booleans and non-numbers
    are refused with a ``ValueError``/``TypeError`` that names the argument: a tolerance
    of ``inf`` would make every run "converged" after one step.

    >>> check_finite_float("tol", 1e-6, positive=True)
    1e-06
    >>> check_finite_float("tol", float("inf"))
    Traceback (most recent call last):
    ...
    ValueError: `tol` must be a finite number >= 0, got inf.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        if not (isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0):
            raise TypeError(
                f"`{name}` must be a number, got {type(value).__name__} ({value!r})."
                + (f" {hint}" if hint else "")
            )
        if isinstance(value, jax.core.Tracer):
            raise TypeError(
                f"`{name}` must be a concrete number, not a traced value: pass it as a Python "
                "float (a static argument of `jax.jit`)."
            )
    v = float(value)
    bound = "> 0" if positive else ">= 0"
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(
            f"`{name}` must be a finite number {bound}, got {v!r}." + (f" {hint}" if hint else "")
        )
    return v


def check_chunk(chunk_size) -> int | None:
    """``None`` (automatic, see :func:`default_chunk_size`) or a positive int.

    >>> check_chunk(None) is None, check_chunk(4)
    (True, 4)
    """
    if chunk_size is None:
        return None
    return check_int(
        "chunk_size",
        chunk_size,
        minimum=1,
        hint="It is the number of products computed at once; use None for the automatic "
        f"default (at most {DEFAULT_MAX_CHUNK}).",
    )


# ------------------------------------------------------------------------------------------------
# memory: the default block size
# ------------------------------------------------------------------------------------------------
def default_chunk_size(count: int, bytes_per_probe: int = 0, *, budget: int | None = None) -> int:
    """Products run at once when ``chunk_size=None``: the memory rule of every algorithm.

    ``min(count, DEFAULT_MAX_CHUNK, budget // bytes_per_probe)`` and at least 1, where
    ``bytes_per_probe`` is what the algorithm keeps per probe while a chunk runs (e.g. an
    SLQ probe's Lanczos basis, ``(num_iters + 1) * n`` numbers) and ``budget`` defaults to
    :data:`DEFAULT_CHUNK_BYTES` (1 GiB).

    >>> default_chunk_size(99)
    8
    >>> default_chunk_size(99, bytes_per_probe=400 << 20)  # 400 MiB per probe: 2 fit in 1 GiB
    2
    """
    budget = DEFAULT_CHUNK_BYTES if budget is None else int(budget)
    cap = DEFAULT_MAX_CHUNK
    if bytes_per_probe > 0:
        cap = min(cap, budget // int(bytes_per_probe))
    return max(1, min(int(count), cap))


def resolve_chunk(chunk_size, count: int, bytes_per_probe: int = 0) -> int:
    """A validated ``chunk_size``, or the automatic default for ``count`` products."""
    chunk = check_chunk(chunk_size)
    if chunk is None:
        return default_chunk_size(count, bytes_per_probe)
    return min(chunk, max(int(count), 1))


# ------------------------------------------------------------------------------------------------
# precision
# ------------------------------------------------------------------------------------------------
@tu.result(static=("compute", "accumulate"))
class DtypePolicy:
    """The precision policy a result was computed with (field ``dtype_policy`` of every result).

    Attributes:
      compute: dtype name of the operator products (the parameters' dtype).
      accumulate: dtype name of inner products, norms, sums, projected matrices and small
        dense factorisations (:func:`hvp.tree.accumulation_dtype`, at least float32).

    Examples:
      >>> import jax.numpy as jnp
      >>> from hvp.linalg import DtypePolicy
      >>> DtypePolicy(compute="bfloat16", accumulate="float32").to_dict()
      {'compute': 'bfloat16', 'accumulate': 'float32'}
    """

    compute: str
    accumulate: str

    def __str__(self) -> str:
        return f"compute={self.compute}, accumulate={self.accumulate}"


def dtype_policy(like) -> DtypePolicy:
    """The :class:`DtypePolicy` for vectors shaped like ``like`` (the operator's ``like``)."""
    dts = [jnp.result_type(x) for x in jax.tree_util.tree_leaves(like)]
    compute = jnp.result_type(*dts) if dts else jnp.dtype(jnp.float32)
    return DtypePolicy(compute=jnp.dtype(compute).name, accumulate=tu.accumulation_dtype(*dts).name)


def acc_dtype(like):
    """:func:`hvp.tree.accumulation_dtype` of the leaves of ``like``."""
    return tu.accumulation_dtype(*[jnp.result_type(x) for x in jax.tree_util.tree_leaves(like)])


def apply_in_dtype(op: LinearOperator, v):
    """``A v`` (the public ``op.mv``) with ``v`` cast to the operator's dtypes first (``v`` may be in the accumulation dtype)."""
    v = jax.tree_util.tree_map(lambda x, lk: x.astype(jnp.result_type(lk)), v, op.like)
    return op.mv(v)


# ------------------------------------------------------------------------------------------------
# operators and results
# ------------------------------------------------------------------------------------------------
def coerce_operator(op, like=None, *, what: str = "trace") -> LinearOperator:
    """``as_operator`` plus the checks every algorithm needs (floating vectors, n >= 1)."""
    if like is not None:
        like = as_zeros(like)
    if isinstance(op, LinearOperator) and like is not None:
        tu.assert_same_structure(like, op.like, name="like", like_name=f"{op.name} vectors")
    op = as_operator(op, like)
    tu.assert_floating(op.like, name="like")
    if op.size < 1:
        raise ValueError(
            f"The operator acts on empty vectors (size 0): there is no {what} to estimate."
        )
    return op


def raise_if_nonfinite(op: LinearOperator, what: str, *values: Any) -> None:
    """Raise :class:`~hvp.NonFiniteError` when a concrete result is NaN/Inf (skipped under jit)."""
    if tu.is_traced(*values):
        return
    if all(bool(np.all(np.isfinite(np.asarray(v, np.float64)))) for v in values):
        return
    raise NonFiniteError(
        f"The {what} of the {op.name} operator is NaN or Inf: its matrix-vector products produced "
        "non-finite values (in half precision, float16 overflows above 65504). Check the "
        "parameters (`hvp.tree.nonfinite_leaves(params)`), the data and the loss for overflow "
        "(float32/float64 parameters may help), or test the operator on one vector (`op @ v`)."
    )


# ------------------------------------------------------------------------------------------------
# convergence
# ------------------------------------------------------------------------------------------------
class ConvergenceWarning(RuntimeWarning):
    """An iterative algorithm returned a result that did not meet its tolerance.

    One rule for every iterative algorithm of :mod:`hvp.linalg` (:func:`hvp.solve` with every
    method, :func:`hvp.eigsh`, :func:`hvp.power_iteration`, :func:`hvp.trace` in adaptive
    mode): **outside** ``jax.jit`` a result
    with ``converged=False`` emits this warning, naming what was reached against what was
    asked, the products used and what can help (more iterations, damping, a higher precision
    dtype, a preconditioner); **inside** ``jax.jit`` (and ``vmap``) nothing is emitted and the
    result's ``converged`` field says it. A subclass of ``RuntimeWarning`` (as NumPy's and
    SciPy's numerical warnings), so existing ``RuntimeWarning`` filters keep working; silence it
    with ``warnings.simplefilter("ignore", hvp.ConvergenceWarning)``.

    Examples:
      >>> import warnings, jax.numpy as jnp, hvp
      >>> A = hvp.from_dense(jnp.diag(jnp.arange(1.0, 9.0)))
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     r = hvp.solve(A, jnp.ones(8), method="cg", max_matvecs=3)
      >>> bool(r.converged), caught[0].category.__name__
      (False, 'ConvergenceWarning')
    """


def warn_not_converged(message: str, *, stacklevel: int = 3) -> None:
    """Emit :class:`ConvergenceWarning` with ``message`` (callers skip it under ``jax.jit``)."""
    warnings.warn(ConvergenceWarning(message), stacklevel=stacklevel)
