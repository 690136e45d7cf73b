"""Reading Orbax checkpoints (read-only) into Flax models, with a structure check.

Accepted layouts of the checkpoint directory:

* an *item* directory, as written by ``ocp.StandardCheckpointer().save(path, tree)``
  or ``ocp.PyTreeCheckpointer`` (it holds a ``_METADATA`` file);
* a ``CheckpointManager`` *step* directory (``root/<step>``) holding one or more
  item directories (``default`` for ``manager.save(step, args=StandardSave(...))``,
  the item names otherwise): the only item, or ``--item NAME``;
* a ``CheckpointManager`` *root* (numbered step directories): the latest step,
  or ``--step N``.

The saved tree is an NNX state (``nnx.state(model)`` or ``nnx.state(model,
nnx.Param)``, with or without ``nnx.to_pure_dict``) or Linen variables
(``{"params": ..., "batch_stats": ...}``, a bare params tree, or a dict such as a
``TrainState`` holding ``"params"``).

Nothing is ever written: the arrays are read with Orbax against an abstract
target built from the checkpoint's own metadata, and the checkpoint directory
is left exactly as it was (the test suite hashes every file before and after).

Structure check, with paths written ``layer/0/kernel``:

* NNX: every variable of the model's state except its RNG state (``nnx.RngState``:
  keys and counts, which play no part in a deterministic forward pass and are
  kept from the model) must be in the checkpoint with the model's shape;
  checkpoint arrays the model does not have are *unexpected*.
* Linen: every collection of the example variables must be in the checkpoint
  with the same keys and shapes. Top-level checkpoint entries that are not
  collections of the model (``step``, ``opt_state`` of a ``TrainState``) are
  ignored and listed in the report.

Any missing key, unexpected key or shape mismatch raises
:class:`~hvp.analysis.StructureMismatchError` listing all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp.analysis._errors import AnalysisError, StructureMismatchError

__all__ = ["Checkpoint", "resolve_checkpoint", "read_checkpoint", "restore_into", "RestoredModel"]

_STEP_RE = re.compile(r"^(?:[A-Za-z_-]*?)(\d+)$")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read into memory.

    Attributes:
      path: the item directory the arrays were read from.
      requested: the directory the user named.
      step: the step number when read from a ``CheckpointManager`` layout.
      item: the item name when read from a step directory.
      tree: the arrays, as a nested dict of NumPy arrays.

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import flax.linen as nn
        >>> import orbax.checkpoint as ocp
        >>> import hvp
        >>> def tiny():  # a model factory: ((Linen module, variables), loss)
        ...     net = nn.Dense(2)
        ...     return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse"
        >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> checkpointer = ocp.StandardCheckpointer()
        >>> checkpointer.save(ckpt, tiny()[0][1])
        >>> checkpointer.wait_until_finished(); checkpointer.close()
        >>> ck = hvp.analysis.read_checkpoint(ckpt)
        >>> ck.step, ck.item, ck.tree["params"]["kernel"].shape
        (None, None, (3, 2))
    """

    path: str
    requested: str
    step: int | None
    item: str | None
    tree: Any


def _is_item_dir(p: Path) -> bool:
    return (p / "_METADATA").is_file()


def _step_dirs(root: Path) -> dict[int, Path]:
    out = {}
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if child.is_dir() and m:
            out[int(m.group(1))] = child
    return out


def resolve_checkpoint(
    path, *, step: int | None = None, item: str | None = None
) -> tuple[Path, int | None, str | None]:
    """Find the Orbax item directory under ``path`` (see the module docstring).

    Returns ``(item_dir, step, item)``.

    Raises:
      AnalysisError: the directory does not exist, is a file, or holds no
        Orbax checkpoint; the step or item asked for does not exist.

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import flax.linen as nn
        >>> import orbax.checkpoint as ocp
        >>> import hvp
        >>> def tiny():  # a model factory: ((Linen module, variables), loss)
        ...     net = nn.Dense(2)
        ...     return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse"
        >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> checkpointer = ocp.StandardCheckpointer()
        >>> checkpointer.save(ckpt, tiny()[0][1])
        >>> checkpointer.wait_until_finished(); checkpointer.close()
        >>> path, step, item = hvp.analysis.resolve_checkpoint(ckpt)
        >>> os.path.basename(path), step, item
        ('ckpt', None, None)
    """
    root = Path(path)
    if not root.exists():
        raise AnalysisError(f"The checkpoint directory '{root}' does not exist.")
    if not root.is_dir():
        raise AnalysisError(
            f"The checkpoint '{root}' is a file; pass the directory that Orbax wrote (the one holding "
            "'_METADATA', a CheckpointManager step, or its root)."
        )
    found_step = None
    if not _is_item_dir(root):
        steps = _step_dirs(root)
        has_items = any(_is_item_dir(c) for c in root.iterdir() if c.is_dir())
        if steps and not has_items:
            if step is None:
                found_step = max(steps)
            elif step in steps:
                found_step = step
            else:
                raise AnalysisError(
                    f"The checkpoint root '{root}' has no step {step}; steps: "
                    f"{', '.join(map(str, sorted(steps)))}."
                )
            root = steps[found_step]
        elif step is not None:
            raise AnalysisError(
                f"--step {step} was given but '{root}' is not a CheckpointManager root "
                "(it has no numbered step directories)."
            )
    elif step is not None:
        raise AnalysisError(
            f"--step {step} was given but '{root}' is already a single checkpoint item."
        )

    if _is_item_dir(root):
        if item is not None:
            raise AnalysisError(
                f"--item {item!r} was given but '{root}' is already a single checkpoint item."
            )
        return root, found_step, None
    items = sorted(c.name for c in root.iterdir() if c.is_dir() and _is_item_dir(c))
    if not items:
        raise AnalysisError(
            f"'{root}' is not an Orbax checkpoint: it holds no '_METADATA' file, no item directories and "
            "no numbered step directories. Pass the directory that ocp.StandardCheckpointer().save(...) "
            "or a CheckpointManager wrote."
        )
    if item is None:
        if len(items) == 1:
            item = items[0]
        elif "default" in items:
            item = "default"
        else:
            raise AnalysisError(
                f"The checkpoint step '{root}' holds several items ({', '.join(items)}); choose one with "
                "--item NAME."
            )
    elif item not in items:
        raise AnalysisError(
            f"The checkpoint step '{root}' has no item {item!r}; items: {', '.join(items)}."
        )
    return root / item, found_step, item


@contextlib.contextmanager
def _quiet_absl():
    loggers = [logging.getLogger("absl"), logging.getLogger("orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def read_checkpoint(path, *, step: int | None = None, item: str | None = None) -> Checkpoint:
    """Read every array of an Orbax checkpoint into host memory, read-only.

    Raises:
      AnalysisError: see :func:`resolve_checkpoint`; the metadata or an array
        file cannot be read (a truncated, corrupted or unreadable file).

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import flax.linen as nn
        >>> import orbax.checkpoint as ocp
        >>> import hvp
        >>> def tiny():  # a model factory: ((Linen module, variables), loss)
        ...     net = nn.Dense(2)
        ...     return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse"
        >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> checkpointer = ocp.StandardCheckpointer()
        >>> checkpointer.save(ckpt, tiny()[0][1])
        >>> checkpointer.wait_until_finished(); checkpointer.close()
        >>> ck = hvp.analysis.read_checkpoint(ckpt)  # read-only: the checkpoint is not modified
        >>> sorted(ck.tree["params"])
        ['bias', 'kernel']
    """
    import orbax.checkpoint as ocp

    item_dir, found_step, found_item = resolve_checkpoint(path, step=step, item=item)
    ckptr = ocp.PyTreeCheckpointer()
    try:
        with _quiet_absl():
            try:
                meta = ckptr.metadata(item_dir)
                tree_meta = getattr(getattr(meta, "item_metadata", meta), "tree", None)
                if tree_meta is None:
                    tree_meta = getattr(meta, "tree", meta)
            except Exception as e:
                raise AnalysisError(
                    f"Cannot read the checkpoint metadata in '{item_dir}': {_first_line(e)}"
                ) from e
            try:
                cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
                leaves = jax.tree_util.tree_leaves(tree_meta)
                if not leaves:
                    raise AnalysisError(f"The checkpoint in '{item_dir}' holds no arrays.")
                restore_args = jax.tree_util.tree_map(
                    lambda m: ocp.ArrayRestoreArgs(
                        sharding=cpu, global_shape=tuple(m.shape), dtype=m.dtype
                    ),
                    tree_meta,
                )
                tree = ckptr.restore(
                    item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args)
                )
            except AnalysisError:
                raise
            except Exception as e:
                raise AnalysisError(
                    f"Cannot read the checkpoint arrays in '{item_dir}': {_first_line(e)}"
                ) from e
    finally:
        ckptr.close()  # stop orbax's background threads (nothing is written)
    tree = jax.tree_util.tree_map(_to_numpy, tree)
    return Checkpoint(
        path=str(item_dir), requested=str(path), step=found_step, item=found_item, tree=tree
    )


def _to_numpy(x):
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)  # RNG state saved by NNX: keep the raw key bits
    return np.asarray(x)


def _flat(tree) -> dict[str, Any]:
    return {tu.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _strip_value(flat: dict[str, Any]) -> dict[str, Any]:
    """``layer/kernel/value`` -> ``layer/kernel`` (an ``nnx.State`` saved without ``to_pure_dict``)."""
    if flat and all(k == "value" or k.endswith("/value") for k in flat):
        return {k[: -len("/value")] if k.endswith("/value") else "": v for k, v in flat.items()}
    return flat


def _cast(x, dtype):
    x = np.asarray(x)
    if dtype is not None and np.issubdtype(x.dtype, np.floating):
        return jnp.asarray(x, dtype=dtype)
    return jnp.asarray(x)


def _match(
    model_flat: dict[str, Any], ckpt_flat: dict[str, Any], *, ignore=(), what: str, where: str
):
    """Compare path -> array maps; raise a StructureMismatchError listing every difference."""
    missing = [k for k in model_flat if k not in ckpt_flat]
    unexpected = [
        k for k in ckpt_flat if k not in model_flat and not any(k.startswith(i) for i in ignore)
    ]
    mismatched = [
        (k, tuple(np.shape(ckpt_flat[k])), tuple(np.shape(model_flat[k])))
        for k in model_flat
        if k in ckpt_flat and tuple(np.shape(ckpt_flat[k])) != tuple(np.shape(model_flat[k]))
    ]
    if missing or unexpected or mismatched:
        lines = [f"The checkpoint '{where}' does not match the {what}:"]

        def show(title, items):
            if items:
                head = ", ".join(items[:20]) + (
                    f" ... ({len(items) - 20} more)" if len(items) > 20 else ""
                )
                lines.append(f"  {title} ({len(items)}): {head}")

        show("missing keys (in the model, not in the checkpoint)", missing)
        show("unexpected keys (in the checkpoint, not in the model)", unexpected)
        show("shape mismatches", [f"{k} checkpoint {c} vs model {m}" for k, c, m in mismatched])
        lines.append(
            "  Check that --model builds the same architecture the checkpoint was saved from."
        )
        raise StructureMismatchError(
            "\n".join(lines), missing=missing, unexpected=unexpected, mismatched=mismatched
        )


def _check_finite(flat: dict[str, Any], where: str) -> None:
    bad = [
        k
        for k, v in flat.items()
        if jnp.issubdtype(v.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(v)))
    ]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise AnalysisError(
            f"The checkpoint '{where}' holds NaN or Inf in {shown}; curvature at such a point is "
            "meaningless. Analyse an earlier checkpoint of the run."
        )


@dataclasses.dataclass(frozen=True)
class RestoredModel:
    """A model with the checkpoint's variables in place.

    Attributes:
      kind: ``"nnx"`` or ``"linen"``.
      model: the NNX module (updated in place: it is the factory's fresh module)
        or the Linen module.
      variables: the Linen variables (``None`` for NNX).
      restored: paths read from the checkpoint.
      ignored: checkpoint paths not used (RNG state, non-collection entries).
    """

    kind: str
    model: Any
    variables: Any
    restored: tuple
    ignored: tuple


def restore_into(model_spec, ckpt: Checkpoint, *, dtype=None) -> RestoredModel:
    """Put the checkpoint's arrays into the model built from the spec, after the structure check.

    Floating arrays are cast to ``dtype`` (when given).

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import flax.linen as nn
        >>> import orbax.checkpoint as ocp
        >>> import hvp
        >>> def tiny():  # a model factory: ((Linen module, variables), loss)
        ...     net = nn.Dense(2)
        ...     return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse"
        >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> checkpointer = ocp.StandardCheckpointer()
        >>> checkpointer.save(ckpt, tiny()[0][1])
        >>> checkpointer.wait_until_finished(); checkpointer.close()
        >>> ck = hvp.analysis.read_checkpoint(ckpt)
        >>> restored = hvp.analysis.restore_into(hvp.analysis.load_model(tiny), ck)
        >>> restored.kind, restored.restored
        ('linen', ('params/bias', 'params/kernel'))
    """
    if model_spec.kind == "nnx":
        return _restore_nnx(model_spec.model, ckpt, dtype=dtype)
    return _restore_linen(model_spec.model, model_spec.variables, ckpt, dtype=dtype)


def _restore_nnx(model, ckpt: Checkpoint, *, dtype) -> RestoredModel:
    from flax import nnx

    graphdef, rng_state, rest = nnx.split(model, nnx.RngState, ...)
    model_flat = _flat(nnx.to_pure_dict(rest))
    rng_flat = _flat(nnx.to_pure_dict(rng_state))
    ckpt_flat = _strip_value(_flat(ckpt.tree))
    rng_paths = set(rng_flat)
    # RNG keys are saved as raw key data: a checkpoint path `.../key` or `.../count` of the model's RNG state.
    ignored = [k for k in ckpt_flat if k in rng_paths]
    ckpt_flat = {k: v for k, v in ckpt_flat.items() if k not in rng_paths}
    _match(
        model_flat, ckpt_flat, what="NNX model's state (RNG state excluded)", where=ckpt.requested
    )
    new_flat = {k: _cast(ckpt_flat[k], dtype) for k in model_flat}
    _check_finite(new_flat, ckpt.requested)
    pure = nnx.to_pure_dict(rest)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
    new_pure = jax.tree_util.tree_unflatten(
        treedef, [new_flat[tu.path_str(p)] for p, _ in leaves_with_paths]
    )
    nnx.replace_by_pure_dict(rest, new_pure)
    nnx.update(model, rest)
    return RestoredModel(
        kind="nnx", model=model, variables=None, restored=tuple(model_flat), ignored=tuple(ignored)
    )


def _restore_linen(module, variables, ckpt: Checkpoint, *, dtype) -> RestoredModel:
    tree = ckpt.tree
    ignored: list[str] = []
    if isinstance(tree, dict) and "params" in tree:
        source = {c: tree[c] for c in variables if c in tree}
        ignored = [str(k) for k in tree if k not in variables]
    else:
        source = {"params": tree}
    model_flat = _flat(variables)
    ckpt_flat = _flat(source)
    _match(model_flat, ckpt_flat, what="Linen model's variables", where=ckpt.requested)
    new_flat = {k: _cast(ckpt_flat[k], dtype) for k in model_flat}
    _check_finite(new_flat, ckpt.requested)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(variables)
    new_vars = jax.tree_util.tree_unflatten(
        treedef, [new_flat[tu.path_str(p)] for p, _ in leaves_with_paths]
    )
    return RestoredModel(
        kind="linen",
        model=module,
        variables=new_vars,
        restored=tuple(model_flat),
        ignored=tuple(ignored),
    )
