r"""Data sets for curvature operators: one batch or many, weighted exactly.

A *batch* is any pytree of arrays that share a leading example axis (a tuple
``(x, y)``, a dict ``{"image": ..., "label": ...}``, a single array). A *data
set* is a ``list`` of batches, or any other iterable of batches (a generator is
read once and kept). A ``tuple``, ``dict`` or array is always read as **one**
batch; wrap several batches in a list.

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

import collections.abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hvp import tree as tu

__all__ = [
    "Dataset",
    "as_dataset",
    "is_batch_sequence",
    "split_batch",
    "batch_weights",
    "default_unpack",
    "UnpackError",
    "weighted_sum",
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


def _scale(w, x):
    """``w x`` with a (possibly array) weight cast to each leaf's dtype."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(w, a.dtype) * a, x)


def _axpy(w, x, y):
    """``w x + y`` with a (possibly array) weight cast to each leaf's dtype."""
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(w, a.dtype) * a + b, x, y)


def weighted_sum(fn, dataset: Dataset, reduction: str = "mean", *, sources=None, zeros=None):
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

    Examples:
      >>> import jax.numpy as jnp
      >>> from hvp.operators import as_dataset, weighted_sum
      >>> ds = as_dataset([(jnp.array([1.0, 2.0]), jnp.zeros(2)), (jnp.array([6.0]), jnp.zeros(1))])
      >>> float(weighted_sum(lambda b: jnp.mean(b[0]), ds))  # mean of 1, 2, 6
      3.0
    """
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
