"""Frozen result types that are JAX pytrees and serialise to JSON.

Decorate a class with :func:`result` to make it a frozen dataclass whose
fields are pytree children (so results can be returned from ``jit``) and that
gains ``to_dict()`` / ``to_json()``: arrays become (nested) lists, pytrees of
arrays become ``{"path/to/leaf": ...}`` dicts, NumPy scalars become Python
numbers.

Fields listed in ``static=(...)`` are pytree metadata instead of children
(strings, method names, Python ints that must stay static under ``jit``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, dataclass_transform

import jax
import numpy as np

__all__ = ["result", "to_jsonable"]


def to_jsonable(x: Any) -> Any:
    """Convert arrays, pytrees, dataclasses and NumPy scalars to JSON-ready Python objects."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (str, bool, int, float)) or x is None:
        if isinstance(x, float) and not np.isfinite(x):
            return None if np.isnan(x) else ("inf" if x > 0 else "-inf")
        return x
    if isinstance(x, (np.generic,)):
        return to_jsonable(x.item())
    if isinstance(x, (np.ndarray, jax.Array)):
        arr = np.asarray(x)
        if arr.ndim == 0:
            return to_jsonable(arr.item())
        if np.issubdtype(arr.dtype, np.floating):
            return (
                [to_jsonable(v) for v in arr.tolist()]
                if arr.ndim == 1
                else [to_jsonable(a) for a in arr]
            )
        return arr.tolist()
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    leaves = jax.tree_util.tree_flatten_with_path(x)[0]
    if leaves:
        from hvp.tree._tree import path_str

        return {path_str(p) or "<root>": to_jsonable(v) for p, v in leaves}
    return str(x)


@dataclass_transform(frozen_default=True)
def result(cls=None, *, static: tuple[str, ...] = ()):
    """Class decorator: frozen dataclass + pytree + ``to_dict``/``to_json``."""

    def wrap(c):
        c = dataclasses.dataclass(frozen=True)(c)
        names = [f.name for f in dataclasses.fields(c)]
        children = [n for n in names if n not in static]

        def flatten(obj):
            return [getattr(obj, n) for n in children], tuple(getattr(obj, n) for n in static)

        def unflatten(aux, kids):
            obj = object.__new__(c)
            for n, v in zip(children, kids):
                object.__setattr__(obj, n, v)
            for n, v in zip(static, aux):
                object.__setattr__(obj, n, v)
            return obj

        jax.tree_util.register_pytree_node(c, flatten, unflatten)

        def to_dict(self) -> dict:
            return to_jsonable(self)

        def to_json(self, **kwargs) -> str:
            return json.dumps(self.to_dict(), **kwargs)

        c.to_dict = to_dict
        c.to_json = to_json
        return c

    return wrap if cls is None else wrap(cls)
