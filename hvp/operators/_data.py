"""Data sets for curvature operators: one batch or many, weighted exactly.

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
"""

from __future__ import annotations

import collections.abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu

__all__ = ["Dataset", "as_dataset", "is_batch_sequence"]


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

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.operators import as_dataset
        >>> ds = as_dataset([(jnp.ones((3, 2)), jnp.zeros(3)), (jnp.ones((1, 2)), jnp.zeros(1))])
        >>> ds.num_examples, ds.num_batches, ds.weights("mean")
        (4, 2, (0.75, 0.25))
    """

    groups: tuple
    meta: tuple
    num_examples: int

    @property
    def num_batches(self) -> int:
        return sum(m.num_batches for m in self.meta)

    def first_batch(self):
        g, m = self.groups[0], self.meta[0]
        return tu.index(g, 0) if m.stacked else g

    def weights(self, reduction: str) -> tuple[float, ...]:
        """Weight of each batch of each group in the reduction.

        With ``reduction="mean"`` the loss is a per-batch mean, so batch ``b``
        with ``n_b`` examples enters with weight ``n_b / N``: the sum over
        batches is then exactly the curvature of the mean loss over all ``N``
        examples. With ``reduction="sum"`` every batch has weight 1.
        """
        if reduction == "mean":
            return tuple(m.batch_size / self.num_examples for m in self.meta)
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
    else:
        batches = [data]
        sizes = [_check_batch(data, None)]

    order: list = []
    members: dict = {}
    for b in batches:
        sig = _signature(b)
        if sig not in members:
            members[sig] = []
            order.append(sig)
        members[sig].append(b)

    groups, meta = [], []
    for sig in order:
        bs = members[sig]
        n = int(np.shape(jax.tree_util.tree_leaves(bs[0])[0])[0])
        if len(bs) == 1:
            groups.append(jax.tree_util.tree_map(jnp.asarray, bs[0]))
        else:
            groups.append(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *bs))
        meta.append(GroupMeta(num_batches=len(bs), batch_size=n, stacked=len(bs) > 1))
    return Dataset(groups=tuple(groups), meta=tuple(meta), num_examples=int(sum(sizes)))
