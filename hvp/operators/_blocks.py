"""Parameter blocks: curvature with respect to a subset of the parameters.

A *filter* picks leaves of the parameter pytree by their path (the
``"layer/0/kernel"`` strings of :func:`hvp.tree.leaf_paths`):

* a string: a regular expression searched in each path (``"Dense_0"``,
  ``"kernel$"``);
* a list/tuple of strings: a leaf is kept if any of them matches;
* a callable ``(path: str, leaf) -> bool``.

The block's parameters are the full pytree with the unselected leaves
replaced by ``None`` (an empty subtree in JAX), so vectors for the block keep
the model's structure and only carry the selected leaves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from hvp import tree as tu

__all__ = ["select", "merge"]


def _matcher(wrt) -> Callable[[str, Any], bool]:
    if callable(wrt):
        return wrt
    if isinstance(wrt, str):
        pats = [wrt]
    elif isinstance(wrt, (list, tuple)) and all(isinstance(w, str) for w in wrt):
        pats = list(wrt)
    else:
        raise TypeError(
            "`wrt` must be a regular expression string, a list of them, or a callable "
            f"(path, leaf) -> bool; got {type(wrt).__name__}."
        )
    compiled = [re.compile(p) for p in pats]
    return lambda path, _leaf: any(c.search(path) for c in compiled)


def select(params, wrt) -> tuple[Any, tuple[bool, ...]]:
    """Split ``params`` by the filter ``wrt``.

    Returns ``(block, mask)``: ``block`` is ``params`` with unselected leaves
    set to ``None``; ``mask`` flags the selected leaves in ``tree_leaves`` order.

    Raises:
      ValueError: the filter selects no leaf (the message lists the paths).

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.operators import select
        >>> params = {"dense": {"bias": jnp.zeros(2), "kernel": jnp.ones((3, 2))}}
        >>> block, mask = select(params, "kernel")
        >>> mask, block["dense"]["bias"]
        ((False, True), None)
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    match = _matcher(wrt)
    mask = tuple(bool(match(tu.path_str(p), x)) for p, x in flat)
    if not any(mask):
        paths = [tu.path_str(p) for p, _ in flat]
        shown = ", ".join(paths[:20]) + (" ..." if len(paths) > 20 else "")
        raise ValueError(f"`wrt={wrt!r}` selects no parameter. Parameter paths are: {shown}.")
    block = jax.tree_util.tree_unflatten(
        treedef, [x if m else None for (_, x), m in zip(flat, mask)]
    )
    return block, mask


def merge(block, full, mask: tuple[bool, ...]):
    """Put the leaves of ``block`` back into ``full`` at the selected positions.

    Examples:
        >>> import jax.numpy as jnp
        >>> from hvp.operators import merge, select
        >>> params = {"bias": jnp.zeros(2), "kernel": jnp.zeros(2)}
        >>> block, mask = select(params, "kernel")
        >>> merge({"bias": None, "kernel": jnp.ones(2)}, params, mask)
        {'bias': Array([0., 0.], dtype=float64), 'kernel': Array([1., 1.], dtype=float64)}
    """
    full_leaves, treedef = jax.tree_util.tree_flatten(full)
    it = iter(jax.tree_util.tree_leaves(block))
    leaves = [next(it) if m else x for x, m in zip(full_leaves, mask)]
    return jax.tree_util.tree_unflatten(treedef, leaves)
