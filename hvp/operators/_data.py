r"""Data sets for curvature operators: one batch or many, weighted exactly.

A *batch* is any pytree of arrays that share a leading example axis (a tuple
``(x, y)``, a dict ``{"image": ..., "label": ...}``, a single array). A *data
set* is a ``list`` of batches, or any other iterable of batches (a generator is
read once and kept), or a callable returning a fresh iterator of batches. A
``tuple``, ``dict`` or array is always read as **one** batch; wrap several
batches in a list.

Data sets that do not fit on the device are **streamed** (:class:`StreamingDataset`,
:func:`as_data`): a re-iterable source (a callable returning a fresh iterator, a
list of host batches, :class:`ArrayBatches` over NumPy arrays, memory maps or
``.npy`` files, a loader whose ``__iter__`` starts over) is read one batch at a
time on every product, with the same batch weights.

Batches with the same shapes and dtypes are stacked into one array per leaf so
that the operator can accumulate over them inside a single compiled
``lax.scan``; a last batch of a different size forms its own group. The
weights make the operator over the data set equal to the operator on the
concatenated data set (see :class:`Dataset`).

Batch conventions (:func:`split_batch`, :func:`batch_weights`):

* ``(inputs, targets)`` or a dict with keys ``inputs``/``targets``,
  ``x``/``y``, ``image``/``label`` or ``images``/``labels``;
* **weighted batches**: ``(inputs, targets, weights)`` or any of those dicts
  with a ``"weights"`` key. ``weights`` has a leading example axis and the
  shape of the targets' positions or a prefix of it (per example, or per
  token for sequences; a padding mask is a 0/1 weight);
* **language-model batches** ``{"inputs": tokens}`` (integer tokens, no
  other key but an optional ``"weights"``; the lm1b example's convention;
  packed examples with ``inputs_position``/``inputs_segmentation`` need an
  ``unpack`` that passes them to the model): the targets are the inputs
  themselves (the model shifts its inputs right internally, as lm1b's
  ``shift_right`` does) and, unless a ``"weights"`` key is given, the weights
  are the padding mask ``inputs > 0``.

With weights, batch ``b`` enters the data-set mean with weight
:math:`W_b / W` (:math:`W_b` the sum of its weights, :math:`W` the total over
all batches) instead of :math:`n_b / N`: exact when each batch's loss is
normalised by the sum of its weights, :math:`L_b = \sum_i w_i \ell_i / W_b`,
as the :mod:`hvp.losses` and the lm1b example do, because then
:math:`\sum_b (W_b/W) L_b = \sum_{\text{all}} w_i \ell_i / W`. Weights
must then be given at the granularity the loss sums over (per token for
token losses when sequence lengths differ between batches).
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import functools
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hvp import tree as tu
from hvp.operators._base import NonFiniteError

__all__ = [
    "Dataset",
    "as_dataset",
    "is_batch_sequence",
    "split_batch",
    "batch_weights",
    "default_unpack",
    "UnpackError",
    "ArrayBatches",
    "StreamingDataset",
    "NonDeterministicDataError",
    "DEFAULT_STREAM_BUDGET",
    "default_stream_budget",
    "as_data",
    "weighted_sum",
    "check_finite_data",
]

_KEY_PAIRS = (("inputs", "targets"), ("x", "y"), ("image", "label"), ("images", "labels"))


class UnpackError(TypeError):
    """A batch cannot be split into ``(inputs, targets[, weights])`` by the default conventions.

    Examples:
        >>> from hvp.operators import UnpackError, default_unpack
        >>> try:
        ...     default_unpack("not a batch")
        ... except UnpackError as e:
        ...     print(isinstance(e, TypeError))
        True
    """


def _lm_inputs(batch):
    """The token array of a language-model batch ``{"inputs": int tokens}`` (no targets), or ``None``."""
    if not isinstance(batch, dict) or "inputs" not in batch:
        return None
    if not set(batch) <= {"inputs", "weights"}:
        # e.g. lm1b's packed examples (inputs_position, inputs_segmentation) need those keys in
        # the model call: never drop them silently
        return None
    x = batch["inputs"]
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        return None
    return x


def batch_weights(batch):
    """The per-example / per-token weights a batch carries, or ``None``.

    ``batch[2]`` of a 3-tuple/list ``(inputs, targets, weights)``; ``batch["weights"]``
    of a dict; for a language-model batch ``{"inputs": tokens}`` without a
    ``"weights"`` key, the padding mask ``tokens > 0`` as float32 (the lm1b
    example's weights).

    Examples:
        >>> import jax.numpy as jnp
        >>> tokens = jnp.array([[5, 7, 0], [3, 0, 0]])
        >>> batch_weights({"inputs": tokens}).tolist()
        [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
        >>> batch_weights((tokens, tokens)) is None
        True
    """
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields") and len(batch) == 3:
        return batch[2]
    if isinstance(batch, dict):
        if "weights" in batch:
            return batch["weights"]
        tokens = _lm_inputs(batch)
        if tokens is not None:
            return (tokens > 0).astype(jnp.float32)
    return None


def default_unpack(batch):
    """Split a batch into ``(inputs, targets)``, or ``(inputs, targets, weights)`` for weighted batches.

    Accepts ``(inputs, targets)``, ``(inputs, targets, weights)``, a dict with
    keys ``inputs``/``targets``, ``x``/``y``, ``image``/``label`` or
    ``images``/``labels`` (plus an optional ``"weights"`` key), and the
    language-model batch ``{"inputs": tokens}`` (targets = the tokens,
    weights = ``tokens > 0``; see :mod:`hvp.operators._data`).

    Raises:
      UnpackError: (a ``TypeError``) none of these conventions applies; pass
        ``unpack=lambda batch: (inputs, targets)`` to the function that built
        the operator.

    Examples:
      >>> import jax.numpy as jnp
      >>> x, y = default_unpack({"image": jnp.zeros((2, 3)), "label": jnp.array([0, 1])})
      >>> x.shape, y.tolist()
      ((2, 3), [0, 1])
    """
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields") and len(batch) in (2, 3):
        return tuple(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:  # a 2-field namedtuple
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for a, b in _KEY_PAIRS:
            if a in batch and b in batch:
                if "weights" in batch:
                    return batch[a], batch[b], batch["weights"]
                return batch[a], batch[b]
        tokens = _lm_inputs(batch)
        if tokens is not None:
            return tokens, tokens, batch_weights(batch)
    if isinstance(batch, dict):
        keys = f" with keys {sorted(batch)}"
        if "inputs" in batch:
            keys += (
                " ('inputs' is read as language-model tokens only when it holds integers and is the "
                "only key besides 'weights'; here 'inputs' has dtype "
                f"{getattr(batch['inputs'], 'dtype', type(batch['inputs']).__name__)})"
            )
    elif isinstance(batch, (tuple, list)):
        keys = f" of length {len(batch)}"
    else:
        keys = ""
    raise UnpackError(
        f"Cannot split a batch of type {type(batch).__name__}{keys} into (inputs, targets): use "
        "(inputs, targets), (inputs, targets, weights), a dict with keys inputs/targets, x/y or "
        "image/label (optionally 'weights'), or {'inputs': integer tokens}; or pass "
        "`unpack=lambda batch: (inputs, targets)`"
    )


def split_batch(batch, unpack=None):
    """``(inputs, targets, weights)`` of a batch; ``weights`` is ``None`` for an unweighted batch.

    ``unpack`` (default :func:`default_unpack`) may return ``(inputs,
    targets)`` or ``(inputs, targets, weights)``.

    Raises:
      UnpackError: the default conventions do not apply.
      ValueError: ``unpack`` returned something else than 2 or 3 values.

    Examples:
      >>> import jax.numpy as jnp
      >>> x, y, w = split_batch((jnp.zeros((2, 3)), jnp.array([0, 1])))
      >>> w is None
      True
    """
    out = default_unpack(batch) if unpack is None else unpack(batch)
    if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
        got = f"{len(out)} values" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ValueError(
            f"`unpack(batch)` must return (inputs, targets) or (inputs, targets, weights), got {got}."
        )
    if len(out) == 2:
        return out[0], out[1], None
    return out[0], out[1], out[2]


@dataclasses.dataclass(frozen=True)
class GroupMeta:
    """Static description of one group of equally shaped batches."""

    num_batches: int  # batches in the group
    batch_size: int  # examples per batch
    stacked: bool  # arrays carry an extra leading batch axis (num_batches > 1)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Batches grouped by shape, ready for a compiled weighted reduction.

    Attributes:
      groups: per group, the batch pytree (stacked along a new leading axis when
        the group holds more than one batch).
      meta: per group, a :class:`GroupMeta`.
      num_examples: total number of examples ``N`` over all batches.
      totals: per group, the weight of each batch in the data-set mean: an
        array of shape ``(num_batches,)`` (stacked group) or ``()``, holding the
        sum of the batch's weights for weighted batches and its number of
        examples otherwise (float32 or float64).
      weighted: whether the batches carry weights (:func:`batch_weights`).

    Examples:
      >>> import jax.numpy as jnp
      >>> from hvp.operators import Dataset
      >>> from hvp.operators._data import as_dataset
      >>> batch = lambda n: (jnp.ones((n, 3)), jnp.zeros(n))
      >>> ds = as_dataset([batch(2), batch(2), batch(1)])  # two shapes: two groups
      >>> isinstance(ds, Dataset), ds.num_examples, len(ds.groups), ds.weighted
      (True, 5, 2, False)
    """

    groups: tuple
    meta: tuple
    num_examples: int
    totals: tuple = ()
    weighted: bool = False

    @property
    def num_batches(self) -> int:
        return sum(m.num_batches for m in self.meta)

    def weights(self, reduction: str) -> tuple:
        """Weight of each batch of each group in the reduction (per group, shaped like ``totals``).

        With ``reduction="mean"`` the loss is a per-batch mean, so batch ``b``
        with ``n_b`` examples enters with weight ``n_b / N``: the sum over
        batches is then exactly the curvature of the mean loss over all ``N``
        examples. Weighted batches enter with ``W_b / W`` (sums of weights; see
        the module docstring). With ``reduction="sum"`` every batch has weight 1.
        """
        if reduction == "mean":
            if not self.totals:  # built by hand without totals: by batch size
                return tuple(m.batch_size / self.num_examples for m in self.meta)
            total = sum(jnp.sum(t) for t in self.totals)
            return tuple(t / total for t in self.totals)
        return tuple(1.0 for _ in self.meta)


def is_batch_sequence(data: Any) -> bool:
    """``True`` if ``data`` is read as several batches rather than one."""
    if isinstance(data, list):
        return True
    if isinstance(data, (tuple, dict, np.ndarray, jax.Array)) or hasattr(data, "_fields"):
        return False
    if np.isscalar(data) or data is None:
        return False
    if isinstance(data, collections.abc.Iterator):  # generators: never hand them to tree_leaves
        return True
    return hasattr(data, "__iter__") and not _is_registered_pytree_node(data)


def _is_registered_pytree_node(x) -> bool:
    leaves = jax.tree_util.tree_leaves(x)
    return not (len(leaves) == 1 and leaves[0] is x)


def _check_batch(batch, i: int | None) -> int:
    where = "the batch" if i is None else f"batch {i}"
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError(
            f"{where.capitalize()} has no array leaves; a batch is a pytree of arrays "
            "with a leading example axis."
        )
    dims = {}
    for path, x in leaves:
        if np.ndim(x) == 0:
            raise ValueError(
                f"Leaf '{tu.path_str(path) or '<root>'}' of {where} is a scalar; every leaf of a batch "
                "needs a leading example axis (use x[None] for a single example)."
            )
        dims.setdefault(int(np.shape(x)[0]), []).append(tu.path_str(path) or "<root>")
    if len(dims) > 1:
        listing = "; ".join(f"{n}: {', '.join(p)}" for n, p in sorted(dims.items()))
        raise ValueError(
            f"The leaves of {where} disagree on the number of examples (leading axis): {listing}. "
            "Every array in a batch must have the same leading (example) axis length."
        )
    n = next(iter(dims))
    if n == 0:
        raise ValueError(
            f"{where.capitalize()} has zero examples; drop empty batches from the data set."
        )
    return n


def _looks_like_tuple_of_batches(data) -> bool:
    """A tuple whose elements are themselves batches (containers) of one structure."""
    if not isinstance(data, tuple) or hasattr(data, "_fields") or len(data) < 2:
        return False
    if not all(isinstance(b, (tuple, list, dict)) for b in data):
        return False
    treedefs = {jax.tree_util.tree_structure(b) for b in data}
    if len(treedefs) != 1:
        return False
    for b in data:
        leaves = jax.tree_util.tree_leaves(b)
        if not leaves or len({np.shape(x)[0] if np.ndim(x) else None for x in leaves}) != 1:
            return False
    return True


def tuple_of_batches_hint(data) -> str:
    """A sentence for errors when ``data`` looks like a tuple of batches (``""`` otherwise)."""
    if not _looks_like_tuple_of_batches(data):
        return ""
    return (
        f" The data is a tuple of {len(data)} elements of the same structure that each look like a "
        "batch; a tuple is always read as ONE batch. To pass several batches, use a list: "
        f"`[{', '.join(f'batch{i}' for i in range(min(len(data), 3)))}{', ...' if len(data) > 3 else ''}]`"
        " (e.g. `list(data)`)."
    )


def _check_weights(w, i: int | None, n: int) -> None:
    """Concrete weights: finite, >= 0, with a positive sum."""
    where = "the batch" if i is None else f"batch {i}"
    if np.ndim(w) == 0 or int(np.shape(w)[0]) != n:
        raise ValueError(
            f"The weights of {where} have shape {np.shape(w)}; they need the batch's leading example "
            f"axis ({n}) and the shape of the targets' positions or a prefix of it."
        )
    if isinstance(w, jax.core.Tracer):
        return
    a = np.asarray(w)
    if not (
        np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool
    ):
        raise TypeError(
            f"The weights of {where} have dtype {a.dtype}; use a float, int or bool array."
        )
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        bad = np.argwhere(~np.isfinite(a) | (a < 0))[:5]
        vals = ", ".join(f"{tuple(int(j) for j in idx)}: {a[tuple(idx)]}" for idx in bad)
        raise ValueError(
            f"The weights of {where} must be finite and >= 0; found {vals}. Use 0 for padding or masked "
            "positions."
        )
    if a.sum() <= 0:
        raise ValueError(
            f"The weights of {where} sum to 0 (every position is masked or padding): it contributes "
            "nothing and its normalised loss is 0/0. Drop it from the data set."
        )


def _total(batch, n: int, weighted: bool, dtype):
    if not weighted:
        return jnp.asarray(n, dtype)
    return jnp.sum(jnp.asarray(batch_weights(batch), dtype))


def _signature(batch):
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


def as_dataset(data: Any) -> Dataset:
    """Validate ``data`` and group its batches for a compiled reduction.

    Raises:
      ValueError: the data set is empty, a batch has no leaves, or the leaves of
        one batch disagree on the number of examples.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.operators import as_dataset
        >>> batches = [(jnp.ones((2, 3)), jnp.zeros(2))] * 3  # three batches of the same shape
        >>> ds = as_dataset(batches)
        >>> ds.num_examples, ds.num_batches, len(ds.groups)  # one group, stacked
        (6, 3, 1)
    """
    if isinstance(data, Dataset):
        return data
    if is_batch_sequence(data):
        batches = list(data)
        if not batches:
            raise ValueError(
                "The data set is empty: pass at least one batch (a pytree of arrays "
                "with a leading example axis) or a non-empty list of batches."
            )
        sizes = [_check_batch(b, i) for i, b in enumerate(batches)]
        tdef0 = jax.tree_util.tree_structure(batches[0])
        for i, b in enumerate(batches[1:], start=1):
            tdef = jax.tree_util.tree_structure(b)
            if tdef != tdef0:
                raise ValueError(
                    f"Batch {i}'s structure differs from batch 0's: every batch of a data set must be "
                    f"the same kind of pytree (same tuple length / dict keys).\n  batch 0: {tdef0}\n"
                    f"  batch {i}: {tdef}\nConvert them to one layout, e.g. all (inputs, targets) tuples."
                )
    else:
        batches = [data]
        try:
            sizes = [_check_batch(data, None)]
        except ValueError as e:
            hint = tuple_of_batches_hint(data)
            if hint:
                raise ValueError(f"{e}{hint}") from None
            raise

    weights = [batch_weights(b) for b in batches]
    weighted = weights[0] is not None
    for i, (w, n) in enumerate(zip(weights, sizes)):
        if (w is not None) != weighted:
            raise ValueError(
                f"Batch {i} {'carries' if w is not None else 'carries no'} weights but batch 0 "
                f"{'does' if weighted else 'does not'}; either every batch has weights or none."
            )
        if w is not None and not hasattr(w, "shape"):
            raise ValueError(
                f"The weights of {'batch ' + str(i) if len(batches) > 1 else 'the batch'} (the third "
                "element of an (inputs, targets, weights) tuple, or the 'weights' key) must be an array, "
                f"got a {type(w).__name__}.{tuple_of_batches_hint(data)}"
            )
        if w is not None:
            _check_weights(w, i if len(batches) > 1 else None, n)
    tdtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32

    order: list = []
    members: dict = {}
    for b in batches:
        sig = _signature(b)
        if sig not in members:
            members[sig] = []
            order.append(sig)
        members[sig].append(b)

    groups, meta, totals = [], [], []
    for sig in order:
        bs = members[sig]
        n = int(np.shape(jax.tree_util.tree_leaves(bs[0])[0])[0])
        if len(bs) == 1:
            groups.append(jax.tree_util.tree_map(jnp.asarray, bs[0]))
            totals.append(_total(bs[0], n, weighted, tdtype))
        else:
            groups.append(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *bs))
            totals.append(jnp.stack([_total(b, n, weighted, tdtype) for b in bs]))
        meta.append(GroupMeta(num_batches=len(bs), batch_size=n, stacked=len(bs) > 1))
    return Dataset(
        groups=tuple(groups),
        meta=tuple(meta),
        num_examples=int(sum(sizes)),
        totals=tuple(totals),
        weighted=weighted,
    )


# ------------------------------------------------------------------------------------------------
# streaming data sets: re-iterable sources read one batch at a time on every product pass
# ------------------------------------------------------------------------------------------------
#: Streaming budget on CPU and when the device reports no memory limit (bytes): a re-iterable
#: data set of more bytes is streamed by ``stream="auto"`` (2 GiB).
DEFAULT_STREAM_BUDGET = 2 << 30

#: Fraction of an accelerator's memory (``device.memory_stats()["bytes_limit"]``) that
#: ``stream="auto"`` lets an in-memory data set take.
STREAM_DEVICE_FRACTION = 0.25

_STREAM_CHOICES = (True, False, "auto")
_SAMPLES_PER_LEAF = 8  # values read per leaf and batch for the determinism fingerprint


def default_stream_budget(device=None) -> int:
    """Bytes a data set may take on the device before ``stream="auto"`` streams it.

    On an accelerator that reports its memory (``device.memory_stats()["bytes_limit"]``),
    :data:`STREAM_DEVICE_FRACTION` (a quarter) of it; on the CPU and elsewhere the fixed
    :data:`DEFAULT_STREAM_BUDGET` (2 GiB).

    Examples:
        >>> import jax
        >>> from hvp.operators import default_stream_budget
        >>> default_stream_budget() == (2 << 30) if jax.default_backend() == "cpu" else True
        True
    """
    device = jax.devices()[0] if device is None else device
    if device.platform != "cpu":
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            limit = None
        if limit:
            return int(STREAM_DEVICE_FRACTION * limit)
    return DEFAULT_STREAM_BUDGET


class NonDeterministicDataError(ValueError):
    """A streamed data set yielded other data on a later pass than on the first one.

    Every product of a streamed operator reads the whole data set again; Krylov methods (Lanczos,
    SLQ, Hutch++, CG) assume every product applies the same matrix. A loader that shuffles or
    augments at random changes the matrix between products and makes every result wrong, so
    each pass is compared with the first one (the shapes of every batch and a checksum of a few
    sampled values of every leaf), and a difference raises this error (a ``ValueError``).

    Examples:
        >>> import numpy as np
        >>> from hvp.operators import NonDeterministicDataError
        >>> issubclass(NonDeterministicDataError, ValueError)
        True
    """


class ArrayBatches:
    """A re-iterable data set over arrays kept on the host: NumPy arrays, ``np.memmap`` or ``.npy`` files.

    ``arrays`` is a batch-shaped pytree (``(x, y)``, ``{"image": ..., "label": ...}``) whose
    leaves are NumPy arrays, memory maps or paths of ``.npy`` files (opened with
    ``np.load(path, mmap_mode="r")``: nothing is read until a batch is sliced). Every
    ``iter(...)`` starts over and yields the slices ``[i : i + batch_size]`` of every leaf
    (views of memory maps: read from disk when they are moved to the device), the last one
    smaller unless ``drop_remainder=True``. Pass it as the ``data`` of :func:`hvp.hessian`,
    :func:`hvp.ggn` or :func:`hvp.empirical_fisher` to stream a data set that does not fit on
    the device.

    Args:
      arrays: pytree of arrays or ``.npy`` paths with a common leading example axis.
      batch_size: examples per batch (an int >= 1).
      drop_remainder: drop a last, smaller batch.

    Raises:
      ValueError: leaves disagree on the number of examples, or ``batch_size`` < 1.
      TypeError: ``batch_size`` is not an int.

    Examples:
        >>> import numpy as np
        >>> from hvp.operators import ArrayBatches
        >>> ds = ArrayBatches((np.arange(10.0).reshape(5, 2), np.zeros(5)), batch_size=2)
        >>> len(ds), [b[0].shape[0] for b in ds], ds.nbytes
        (3, [2, 2, 1], 120)
    """

    def __init__(self, arrays, batch_size: int, *, drop_remainder: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"`batch_size` must be an int, got {type(batch_size).__name__}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be at least 1, got {batch_size}.")

        def load(x):
            if isinstance(x, (str, os.PathLike)):
                return np.load(os.fspath(x), mmap_mode="r")
            return x

        self.arrays = jax.tree_util.tree_map(
            load, arrays, is_leaf=lambda x: isinstance(x, (str, os.PathLike))
        )
        leaves = jax.tree_util.tree_leaves(self.arrays)
        sizes = {int(np.shape(x)[0]) for x in leaves if np.ndim(x)}
        if not leaves or len(sizes) != 1 or any(np.ndim(x) == 0 for x in leaves):
            raise ValueError(
                "The arrays of an ArrayBatches need one common leading (example) axis; got shapes "
                f"{[np.shape(x) for x in leaves]}."
            )
        self.num_examples = sizes.pop()
        self.batch_size = int(batch_size)
        self.drop_remainder = bool(drop_remainder)

    def __len__(self) -> int:
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    @property
    def nbytes(self) -> int:
        """Bytes of all batches (from the shapes; nothing is read)."""
        used = len(self) * self.batch_size if self.drop_remainder else self.num_examples
        return sum(
            used * int(np.prod(np.shape(x)[1:], dtype=np.int64)) * np.dtype(x.dtype).itemsize
            for x in jax.tree_util.tree_leaves(self.arrays)
        )

    def __iter__(self):
        for k in range(len(self)):
            lo = k * self.batch_size
            hi = min(lo + self.batch_size, self.num_examples)
            yield jax.tree_util.tree_map(lambda x, lo=lo, hi=hi: x[lo:hi], self.arrays)

    def __repr__(self) -> str:
        return (
            f"ArrayBatches(num_examples={self.num_examples}, batch_size={self.batch_size}, "
            f"batches={len(self)})"
        )


def is_reiterable(data) -> bool:
    """Whether ``data`` can be read several times as a sequence of batches.

    A callable (returning a fresh iterator of batches each time) or an iterable of batches
    whose ``__iter__`` starts over (a list, :class:`ArrayBatches`, a data loader object); not
    a generator or another iterator (they are read once), and not a single batch.
    """
    if isinstance(data, (Dataset, StreamingDataset)):
        return False
    if callable(data) and not isinstance(data, (np.ndarray, jax.Array)):
        return not _is_registered_pytree_node(data)
    if isinstance(data, collections.abc.Iterator):
        return False
    return is_batch_sequence(data)


def _leaf_nbytes(x) -> int:
    dtype = getattr(x, "dtype", None)
    itemsize = np.dtype(dtype).itemsize if dtype is not None else np.asarray(x).dtype.itemsize
    return int(np.prod(np.shape(x), dtype=np.int64)) * itemsize


def batch_nbytes(batch) -> int:
    """Bytes of the arrays of one batch (from their shapes and dtypes; nothing is read).

    Examples:
        >>> import numpy as np
        >>> from hvp.operators._data import batch_nbytes
        >>> batch_nbytes((np.zeros((4, 3)), np.zeros(4, np.int32)))
        112
    """
    return sum(_leaf_nbytes(x) for x in jax.tree_util.tree_leaves(batch))


def _sample_positions(size: int) -> np.ndarray:
    k = min(size, _SAMPLES_PER_LEAF)
    return np.unique(np.linspace(0, size - 1, k).round().astype(np.int64))


def batch_digest(batch) -> str:
    """A checksum of a batch's structure, shapes, dtypes and a few values of every leaf.

    Reads at most 8 evenly spaced values per leaf (first and last included), so it costs next
    to nothing on a memory-mapped batch; used to check that every pass over a streamed data set
    sees the data of the first pass (:class:`NonDeterministicDataError`).

    Examples:
        >>> import numpy as np
        >>> from hvp.operators._data import batch_digest
        >>> a = np.arange(6.0).reshape(3, 2)
        >>> batch_digest((a, a)) == batch_digest((a.copy(), a)), batch_digest((a, a)) == batch_digest((a + 1, a))
        (True, False)
    """
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    h = hashlib.sha256(str(treedef).encode())
    positions = [
        tuple(_sample_positions(int(np.prod(np.shape(x), dtype=np.int64))).tolist()) for x in leaves
    ]
    on_device = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    sampled = {}
    if on_device:  # one compiled gather and one small copy for all device leaves
        got = jax.device_get(
            _take(tuple(leaves[i] for i in on_device), tuple(positions[i] for i in on_device))
        )
        sampled = dict(zip(on_device, got))
    for i, x in enumerate(leaves):
        pos = np.asarray(positions[i], np.int64)
        vals = sampled[i] if i in sampled else np.asarray(x).flat[pos]
        h.update(str((tuple(np.shape(x)), str(getattr(x, "dtype", vals.dtype)))).encode())
        h.update(np.ascontiguousarray(vals).tobytes())
    return h.hexdigest()


@functools.partial(jax.jit, static_argnums=1)
def _take(leaves, positions):
    return [jnp.ravel(x)[np.asarray(p, np.int64)] for x, p in zip(leaves, positions)]


def _structure_error(i, tdef0, tdef) -> ValueError:
    return ValueError(
        f"Batch {i}'s structure differs from batch 0's: every batch of a data set must be "
        f"the same kind of pytree (same tuple length / dict keys).\n  batch 0: {tdef0}\n"
        f"  batch {i}: {tdef}\nConvert them to one layout, e.g. all (inputs, targets) tuples."
    )


def _host_total(batch, n: int, weighted: bool) -> float:
    if not weighted:
        return float(n)
    return float(np.sum(np.asarray(batch_weights(batch), np.float64)))


_NOT_REITERABLE = (
    "A generator or iterator can be read only once, but a streamed data set is read again on every "
    "product: pass a callable returning a fresh iterator (e.g. `lambda: make_batches()`), a list of "
    "host (NumPy) batches, hvp.operators.ArrayBatches(arrays_or_npy_paths, batch_size), or a "
    "loader object whose `__iter__` starts over"
)


def _fresh_iterator(source, pass_index: int):
    it = source() if callable(source) else source
    try:
        return iter(it)
    except TypeError:
        raise TypeError(
            f"The data source {'returned ' if callable(source) else 'is '}a "
            f"{type(it).__name__}, which is not an iterable of batches (pass {pass_index}). "
            f"{_NOT_REITERABLE}."
        ) from None


class StreamingDataset:
    """A data set read from its source one batch at a time on every product pass.

    Built by the operators (``stream=True``, or ``stream="auto"`` for a re-iterable data set of
    more bytes than the budget, see :func:`as_data`) from one first pass over the source, which
    validates every batch as :func:`as_dataset` does and records the number of examples, the
    weight of every batch in the data-set mean (the same :math:`n_b/N` or :math:`W_b/W` as the
    in-memory :class:`Dataset`), the shape group of every batch, a checksum of every batch
    (:func:`batch_digest`) and the first batch of each shape group (to check the loss, as the
    in-memory path does). Nothing of the data stays on the device.

    :meth:`reduce` is one pass: batch ``i + 1`` (up to ``prefetch`` batches ahead) is put on the
    device (``jax.device_put``, or the parameters' explicit mesh with the example axis over the
    data axes, :func:`hvp.tree.place_batch`) while batch ``i`` computes; a batch's device arrays
    are deleted as soon as its product has finished, so at most ``prefetch + 1`` batches are on
    the device at any time. Every pass is checked against the first one
    (:class:`NonDeterministicDataError`).

    Attributes:
      source: the callable or re-iterable object.
      num_examples, num_batches: size of the data set.
      totals: per batch, its number of examples or its sum of weights (float64 NumPy array).
      weighted: whether the batches carry weights.
      meta: per shape group, a :class:`GroupMeta` (``num_batches`` counts its batches).
      probe: a :class:`Dataset` of the first batch of each shape group, as the source yielded
        it (NumPy batches stay on the host).
      prefetch: batches put on the device ahead of the one computing.
      nbytes: bytes of one pass (all batches).
      passes: passes read so far, the first (building) pass included.

    Examples:
        >>> import numpy as np
        >>> from hvp.operators import ArrayBatches, StreamingDataset
        >>> from hvp.operators._data import as_data
        >>> ds = as_data(ArrayBatches((np.ones((5, 2)), np.zeros(5)), 2), stream=True)
        >>> isinstance(ds, StreamingDataset), ds.num_examples, ds.num_batches, ds.passes
        (True, 5, 3, 1)
    """

    def __init__(
        self, source, *, prefetch: int = 1, _keep: int | None = None, check_finite: bool = False
    ):
        self.source = source
        self.prefetch = prefetch
        self.passes = 0
        it = _fresh_iterator(source, 0)
        self.passes = 1
        sizes, totals, group_of, digests = [], [], [], []
        order: dict = {}
        first: list = []
        kept: list | None = [] if _keep is not None else None
        nbytes = 0
        tdef0 = weighted = None
        for i, b in enumerate(it):
            n = _check_batch(b, i)
            if check_finite:
                _raise_if_nonfinite_batch(b, i)
            tdef = jax.tree_util.tree_structure(b)
            w = batch_weights(b)
            if i == 0:
                tdef0, weighted = tdef, w is not None
            elif tdef != tdef0:
                raise _structure_error(i, tdef0, tdef)
            if (w is not None) != weighted:
                raise ValueError(
                    f"Batch {i} {'carries' if w is not None else 'carries no'} weights but batch 0 "
                    f"{'does' if weighted else 'does not'}; either every batch has weights or none."
                )
            if w is not None:
                if not hasattr(w, "shape"):
                    raise ValueError(
                        f"The weights of batch {i} (the third element of an (inputs, targets, "
                        f"weights) tuple, or the 'weights' key) must be an array, got a "
                        f"{type(w).__name__}."
                    )
                _check_weights(w, i, n)
            sig = _signature(b)
            if sig not in order:
                order[sig] = len(order)
                first.append(b)
            group_of.append(order[sig])
            sizes.append(n)
            totals.append(_host_total(b, n, weighted))
            digests.append(batch_digest(b))
            nbytes += batch_nbytes(b)
            if kept is not None and _keep is not None:
                if nbytes <= _keep:
                    kept.append(b)
                else:
                    kept = None  # over the budget: stream, keep nothing
        if not sizes:
            raise ValueError(
                "The data set is empty: the source yielded no batch. Pass at least one batch (a "
                "pytree of arrays with a leading example axis)."
            )
        self.kept = kept
        self.num_examples = int(sum(sizes))
        self.num_batches = len(sizes)
        self.totals = np.asarray(totals, np.float64)
        self.weighted = bool(weighted)
        self.nbytes = int(nbytes)
        self._group_of = tuple(group_of)
        self._digests = tuple(digests)
        self._sizes = tuple(sizes)
        counts = np.bincount(np.asarray(group_of), minlength=len(first))
        self.meta = tuple(
            GroupMeta(num_batches=int(c), batch_size=int(_check_batch(b, None)), stacked=False)
            for b, c in zip(first, counts)
        )
        # the first batch of each shape, kept as the source yielded it (host arrays stay on the
        # host: nothing of the data set stays on the device between passes)
        self.probe = Dataset(
            groups=tuple(first),
            meta=tuple(
                GroupMeta(num_batches=1, batch_size=m.batch_size, stacked=False) for m in self.meta
            ),
            num_examples=sum(m.batch_size for m in self.meta),
            weighted=self.weighted,
        )

    def __repr__(self) -> str:
        return (
            f"StreamingDataset(num_examples={self.num_examples}, num_batches={self.num_batches}, "
            f"prefetch={self.prefetch})"
        )

    def weights(self, reduction: str) -> np.ndarray:
        """Weight of each batch in the reduction: ``n_b / N`` (``W_b / W``) for ``"mean"``, 1 for ``"sum"``."""
        if reduction == "mean":
            return self.totals / self.totals.sum()
        return np.ones_like(self.totals)

    def _mismatch(self, what: str) -> NonDeterministicDataError:
        return NonDeterministicDataError(
            f"The streamed data set changed between passes: on pass {self.passes} {what} "
            f"(compared with the first pass, which read {self.num_batches} batches). Every product "
            "reads the whole data set again and every iterative method (Lanczos/eigsh, SLQ, "
            "Hutch++, CG) needs the same matrix in each product, so results would be wrong. The "
            "usual cause is a loader that shuffles or augments at random: turn shuffling and "
            "random augmentation off (or reseed the loader identically for every pass), and make "
            "a callable source return a fresh iterator over the same batches each time. (Dropout "
            "or other train-mode randomness in the model is not seen here: evaluate the model in "
            "deterministic/eval mode.)"
        )

    def _verify(self, i: int, batch) -> None:
        if i >= self.num_batches:
            raise self._mismatch(f"it yielded more than {self.num_batches} batches")
        if batch_digest(batch) != self._digests[i]:
            raise self._mismatch(f"batch {i} differs (its shapes or a checksum of sampled values)")

    def in_memory_index(self) -> tuple:
        """Per batch (in the order read), its index in the in-memory :class:`Dataset`'s batch order.

        :func:`as_dataset` groups the batches by shape, so its batch ``k`` counts the batches of
        the first shape group, then of the second, ...; a data set whose only odd batch is the
        last has the identity order. Used where a batch's index must match the in-memory path
        (:func:`hvp.fisher` samples batch ``k`` with ``jax.random.fold_in(key, k)``).

        Examples:
            >>> import numpy as np
            >>> from hvp.operators._data import as_data
            >>> b = lambda n: (np.ones((n, 2)), np.zeros(n))
            >>> as_data([b(2), b(1), b(2)], stream=True).in_memory_index()  # groups [0, 2], [1]
            (0, 2, 1)
        """
        group_of = np.asarray(self._group_of)
        counts = np.bincount(group_of, minlength=len(self.meta))
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        seen = np.zeros(len(self.meta), np.int64)
        out = []
        for g in group_of:
            out.append(int(start[g] + seen[g]))
            seen[g] += 1
        return tuple(out)

    def reduce(self, params, step, acc, weights, *, indexed: bool = False):
        """One pass: ``acc = step(device_batch, weights[i], acc)`` for every batch ``i``, in order.

        ``weights`` is :meth:`weights` of the operator's reduction; with ``indexed=True`` the step
        is called as ``step(i, device_batch, weights[i], acc)``. Batches are placed like the
        parameters (:func:`hvp.tree.place_batch`) and prefetched as described in the class
        docstring.

        Raises:
          NonDeterministicDataError: the pass differs from the first one.
          TypeError: a callable source did not return an iterable.
        """
        it = _fresh_iterator(self.source, self.passes)
        self.passes += 1
        pending: collections.deque = collections.deque()
        running: list = []  # device arrays of the batch whose step is in flight
        count = 0

        def release():
            jax.block_until_ready(acc)  # the step in flight has finished: free its batch
            for x in running:
                x.delete()
            running.clear()

        def run_oldest():
            nonlocal acc
            i, b, owned = pending.popleft()
            acc = step(i, b, weights[i], acc) if indexed else step(b, weights[i], acc)
            running.extend(owned)

        for i, hb in enumerate(it):  # reading batch i on the host overlaps the step in flight
            self._verify(i, hb)
            release()
            pending.append((i, *put_batch(hb, params)))
            if len(pending) > self.prefetch:
                run_oldest()
            count = i + 1
        if count != self.num_batches:
            detail = (
                "it yielded no batch (a callable source must return a FRESH iterator each time, "
                "not the same exhausted one)"
                if count == 0
                else f"it yielded {count} batches"
            )
            raise self._mismatch(detail)
        while pending:
            release()
            run_oldest()
        release()
        return acc


def put_batch(batch, params):
    """``(device batch, arrays this call created)``: a host batch moved to the device.

    On an explicit mesh of ``params`` the example axis is split over the data axes
    (:func:`hvp.tree.place_batch`); other host leaves go to the default device
    (``jax.device_put``, asynchronous). Leaves that already are ``jax.Array`` are kept as they
    are and never listed as created (the streaming pass deletes only what it created).

    Examples:
        >>> import numpy as np, jax.numpy as jnp
        >>> from hvp.operators._data import put_batch
        >>> b, created = put_batch((np.ones((2, 3)), jnp.zeros(2)), jnp.ones(3))
        >>> type(b[0]).__name__ != "ndarray", len(created)
        (True, 1)
    """
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    placed = jax.tree_util.tree_leaves(tu.place_batch(batch, params))
    out, created = [], []
    for x, y in zip(leaves, placed):
        if not isinstance(y, jax.Array):
            y = jax.device_put(y)
        if not isinstance(x, jax.Array):
            created.append(y)
        out.append(y)
    return jax.tree_util.tree_unflatten(treedef, out), created


def as_data(
    data, *, stream="auto", budget: int | None = None, prefetch: int = 1, check_finite=False
):
    """The data of an operator: an in-memory :class:`Dataset` or a :class:`StreamingDataset`.

    With ``check_finite=True`` the data are checked for NaN/Inf (:func:`check_finite_data`):
    in memory once, streamed batch by batch as the first pass reads them.

    The memory rule of ``stream="auto"``: a re-iterable data set (a callable returning a fresh
    iterator, a list of batches, :class:`ArrayBatches`, a loader whose ``__iter__`` starts over)
    is streamed when its bytes (summed from the batches' shapes and dtypes) exceed ``budget``
    (default :func:`default_stream_budget`: a quarter of an accelerator's memory, 2 GiB on the
    CPU), and stacked on the device otherwise; one batch, a generator or another iterator are
    always kept in memory (they can be read only once). ``stream=True`` always streams (a
    re-iterable data set is required) and ``stream=False`` never does (a callable is called
    once and its batches kept).

    Raises:
      TypeError: ``stream=True`` with a generator/iterator (pass a callable returning a fresh
        iterator) or one batch.
      ValueError: ``stream``, ``budget`` or ``prefetch`` not allowed values; the errors of
        :func:`as_dataset`.

    Examples:
        >>> import numpy as np
        >>> from hvp.operators._data import as_data
        >>> batches = [(np.ones((2, 3)), np.zeros(2))] * 3
        >>> type(as_data(batches)).__name__, type(as_data(batches, budget=100)).__name__
        ('Dataset', 'StreamingDataset')
    """
    if not any(stream is c for c in (True, False)) and stream != "auto":
        raise ValueError(f'`stream` must be True, False or "auto", got {stream!r}.')
    for name, val in (("prefetch", prefetch), ("stream_budget", budget)):
        if val is None and name == "stream_budget":
            continue
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
            raise ValueError(f"`{name}` must be an int >= 0, got {val!r}.")
    if isinstance(data, StreamingDataset):
        return data
    if isinstance(data, Dataset):
        return _checked(data, check_finite)
    reiterable = is_reiterable(data)
    if stream is False:
        if callable(data) and reiterable:
            data = list(_fresh_iterator(data, 0))
        return _checked(as_dataset(data), check_finite)
    if stream is True:
        if not reiterable:
            if isinstance(data, collections.abc.Iterator):
                raise TypeError(f"stream=True: {_NOT_REITERABLE}.")
            raise TypeError(
                "stream=True needs a data set of several batches that can be read again: a "
                "callable returning a fresh iterator of batches, a list of batches or "
                f"hvp.operators.ArrayBatches; got a {type(data).__name__} (one batch).{tuple_of_batches_hint(data)}"
            )
        return StreamingDataset(data, prefetch=int(prefetch), check_finite=check_finite)
    if not reiterable:  # one batch, or a generator: read once and kept
        return _checked(as_dataset(data), check_finite)
    budget = default_stream_budget() if budget is None else int(budget)
    if isinstance(data, list):  # bytes from the shapes, without reading twice
        if sum(batch_nbytes(b) for b in data) <= budget:
            return _checked(as_dataset(data), check_finite)
        return StreamingDataset(data, prefetch=int(prefetch), check_finite=check_finite)
    ds = StreamingDataset(data, prefetch=int(prefetch), _keep=budget, check_finite=check_finite)
    if ds.kept is not None:
        kept = as_dataset(ds.kept)
        kept.__dict__["_finite_checked"] = check_finite  # checked batch by batch as read
        return kept
    return ds


def _checked(dataset: Dataset, check: bool) -> Dataset:
    if check:
        check_finite_data(dataset)
    return dataset


def _nonfinite_message(where: str, counts: dict, sizes: dict) -> str:
    leaves = ", ".join(f"leaf '{p}' ({c} of {sizes[p]} values)" for p, c in sorted(counts.items()))
    return (
        f"The data contain NaN or Inf: {where}, {leaves}. Every curvature product over them "
        "would be NaN. Remove or impute those examples (e.g. keep the rows where "
        "`np.isfinite(x).all(axis=tuple(range(1, x.ndim)))`), or pass `check_finite=False` to "
        "build the operator anyway (with a loss that masks such entries)."
    )


def _raise_if_nonfinite_batch(batch, index: int) -> None:
    """A streamed batch as it is read: raise naming its index, the leaf paths and the counts."""
    counts = tu.nonfinite_counts(batch)
    if counts:
        sizes = {
            tu.path_str(p) or "<root>": int(np.size(x))
            for p, x in jax.tree_util.tree_flatten_with_path(batch)[0]
        }
        raise NonFiniteError(_nonfinite_message(f"batch {index}", counts, sizes))


def check_finite_data(dataset: Dataset) -> None:
    """Raise :class:`~hvp.operators.NonFiniteError` if the batches of ``dataset`` hold NaN or Inf.

    One reduction per floating leaf over the stacked batches (NumPy on the CPU, one compiled
    program on accelerators; integer leaves are skipped); only when one is found are the leaves
    read batch by batch, so that the message names the first batch (in the data set's order of
    shape groups, as the operators' other messages), each leaf path and its count of non-finite
    values. Done once per data set; skipped for traced data (inside ``jit``).

    Raises:
      NonFiniteError: naming the batch, the leaf paths and the counts.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.operators import check_finite_data, NonFiniteError
        >>> from hvp.operators._data import as_dataset
        >>> x = jnp.ones((6, 2)).at[4, 1].set(jnp.nan)
        >>> ds = as_dataset([(x[:3], jnp.zeros(3)), (x[3:], jnp.zeros(3))])
        >>> try:
        ...     check_finite_data(ds)
        ... except NonFiniteError as e:
        ...     print(str(e)[:60])
        The data contain NaN or Inf: batch 1, leaf '0' (1 of 6 value
    """
    if dataset.__dict__.get("_finite_checked") or tu.is_traced(dataset.groups):
        return
    if tu.nonfinite_counts(dataset.groups):
        k = 0
        for group, meta in zip(dataset.groups, dataset.meta):
            for j in range(meta.num_batches):
                batch = tu.index(group, j) if meta.stacked else group
                _raise_if_nonfinite_batch(jax.device_get(batch), k)
                k += 1
    dataset.__dict__["_finite_checked"] = True  # frozen dataclass: bypass setattr


def _scale(w, x):
    """``w x`` with a (possibly array) weight cast to each leaf's dtype."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(w, a.dtype) * a, x)


def _axpy(w, x, y):
    """``w x + y`` with a (possibly array) weight cast to each leaf's dtype."""
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(w, a.dtype) * a + b, x, y)


def weighted_sum(
    fn, dataset: Dataset, reduction: str = "mean", *, sources=None, zeros=None, like=None
):
    r"""The data-set reduction :math:`\sum_b w_b\, \mathrm{fn}(\mathrm{batch}_b)` in one trace.

    The one data loop of the library: the curvature operators' products and the data-set
    loss and gradient (:func:`hvp.operators.data_loss`) both go through it. Batches of a
    stacked group are reduced inside one ``lax.scan``; the weights are
    :meth:`Dataset.weights` (``n_b / N``, ``W_b / W`` or 1), so with ``reduction="mean"``
    the result is exactly ``fn`` of the concatenated data set when ``fn`` is a batch mean.
    Works under ``jit`` and ``vmap`` (``fn`` may close over traced values).

    Args:
      fn: ``batch -> pytree`` of floating arrays (the same structure for every batch).
      dataset: a :class:`Dataset` (:func:`as_dataset`).
      reduction: ``"mean"`` or ``"sum"`` (every weight 1).
      sources: per group, what ``fn`` is applied to instead of the group's batches (stacked
        like them); default ``dataset.groups``.
      zeros: a pytree shaped like ``fn``'s output, used as the scan's start value (default:
        zeros of ``fn``'s output shape, traced once with ``jax.eval_shape``).
      like: streamed data sets: parameters whose explicit mesh the batches are placed on
        (:func:`hvp.tree.place_batch`); default ``None`` (the default device).

    A :class:`StreamingDataset` is reduced in one pass over its source, outside ``jit``: ``fn``
    is compiled once per call and batch shape and applied to each batch as it arrives (the
    accumulation order differs from the in-memory scan's, so results agree to rounding).

    Raises:
      ValueError: a streamed data set inside ``jax.jit``/``jax.vmap`` (``fn`` closes over
        traced values), or with ``sources``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from hvp.operators import as_dataset, weighted_sum
      >>> ds = as_dataset([(jnp.array([1.0, 2.0]), jnp.zeros(2)), (jnp.array([6.0]), jnp.zeros(1))])
      >>> float(weighted_sum(lambda b: jnp.mean(b[0]), ds))  # mean of 1, 2, 6
      3.0
    """
    if isinstance(dataset, StreamingDataset):
        return _streamed_sum(fn, dataset, reduction, sources=sources, zeros=zeros, like=like)
    sources = dataset.groups if sources is None else sources
    weights = dataset.weights(reduction)
    if dataset.num_batches == 1 and reduction == "mean":
        # one batch: its weight n_b / N (or W_b / W) is exactly 1, skip the scaling pass
        return fn(sources[0])
    total = None
    for src, meta, w in zip(sources, dataset.meta, weights):
        if meta.stacked:
            ws = jnp.broadcast_to(jnp.asarray(w), (meta.num_batches,))

            def body(acc, sw):
                s, wb = sw
                return _axpy(wb, fn(s), acc), None

            if total is not None:
                init = total
            elif zeros is not None:
                init = jax.tree_util.tree_map(jnp.zeros_like, zeros)
            else:
                shapes = jax.eval_shape(fn, jax.tree_util.tree_map(lambda a: a[0], src))
                init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            total, _ = lax.scan(body, init, (src, ws))
        else:
            total = _scale(w, fn(src)) if total is None else _axpy(w, fn(src), total)
    return total


def _streamed_in_jit_error() -> ValueError:
    return ValueError(
        "A streamed data set (stream=True, or stream='auto' for data larger than the budget) is "
        "read on the host, one pass over its source per call, so a reduction over it (the data-set "
        "loss, its gradient, a curvature product) cannot run inside jax.jit/jax.vmap or a compiled "
        "loop. Call it outside jit (the algorithms of hvp.linalg pick driver='host' for streamed "
        "operators), or build the operator with stream=False if the data fit on the device."
    )


def _streamed_sum(fn, ds: StreamingDataset, reduction: str, *, sources, zeros, like):
    """:func:`weighted_sum` over a streamed data set: one pass, ``fn`` compiled per batch shape."""
    if sources is not None:
        raise ValueError(
            "`sources` replaces the batches of an in-memory Dataset; a streamed data set reads "
            "its batches from its source (pass sources=None)."
        )
    if zeros is None:
        _, first = next(_first_batches(ds.probe))
        zeros = jax.eval_shape(fn, first)
    acc = jax.tree_util.tree_map(lambda s: jnp.zeros(np.shape(s), s.dtype), zeros)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(acc)):
        raise _streamed_in_jit_error()
    jitted = jax.jit(lambda b, w, a: _axpy(w, fn(b), a))

    def step(b, w, a):
        out = jitted(b, w, a)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(out)):
            raise _streamed_in_jit_error()  # fn closes over values of a vmap
        return out

    return ds.reduce(like, step, acc, ds.weights(reduction))


def _first_batches(dataset: Dataset):
    """``(index, batch)`` of the first batch of each shape group of an in-memory data set."""
    k = 0
    for group, meta in zip(dataset.groups, dataset.meta):
        yield k, (jax.tree_util.tree_map(lambda a: a[0], group) if meta.stacked else group)
        k += meta.num_batches
