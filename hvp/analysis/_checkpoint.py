"""Reading Orbax checkpoints (read-only) into Flax models, with a structure check.

Accepted layouts of the checkpoint directory:

* an *item* directory, as written by ``ocp.StandardCheckpointer().save(path, tree)``
  or ``ocp.PyTreeCheckpointer`` (it holds a ``_METADATA`` file);
* a ``CheckpointManager`` *step* directory (``root/<step>``) holding one or more
  item directories (``default`` for ``manager.save(step, args=StandardSave(...))``,
  the item names otherwise): the only item, or ``--item NAME``;
* a directory of *steps*: a ``CheckpointManager`` root (``root/120``, with or
  without a ``step_prefix``) or a Flax workdir written by
  ``flax.training.checkpoints.save_checkpoint`` (``workdir/checkpoint_120``):
  the latest step, or ``--step N``. Steps are found with Orbax's own step
  discovery (``ocp.step.checkpoint_steps_paths``, ``ocp.step.step_from_checkpoint_name``);
  unfinished (temporary) steps are skipped.

The saved tree is an NNX state (``nnx.state(model)`` or ``nnx.state(model,
nnx.Param)``, with or without ``nnx.to_pure_dict``) or Linen variables
(``{"params": ..., "batch_stats": ...}``, a bare params tree, or a dict such as a
``TrainState`` holding ``"params"``), possibly with logically partitioned
(boxed) parameters, which are unboxed as :func:`hvp.flax.from_linen` does. It
may also sit under a top-level key of a larger tree, such as the
``{"model": nnx.state(model), "optimizer": ..., "step": ...}`` of the NNX
checkpointing guide: when the whole tree does not match the model, the
top-level keys are tried (``model``, ``params``, ``state`` first) and the first
that matches is used; ``--item KEY`` selects one explicitly. The key used is
recorded (``RestoredModel.key``, ``report.json``'s ``checkpoint.key``).

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
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp.analysis._errors import AnalysisError, StructureMismatchError

__all__ = [
    "LoadedCheckpoint",
    "resolve_checkpoint",
    "read_checkpoint",
    "restore_into",
    "RestoredModel",
]

#: Top-level keys tried first when the model state sits inside a larger saved tree.
PREFERRED_KEYS = ("model", "params", "state", "model_state", "module", "net", "network")


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read into memory (what :func:`read_checkpoint` returns).

    (Named ``Checkpoint`` before; renamed so as not to be confused with
    :class:`hvp.linalg.Checkpoint`, where an algorithm saves its state to resume from.)

    Attributes:
      path: the item directory the arrays were read from.
      requested: the directory the user named.
      step: the step number when read from a ``CheckpointManager`` layout.
      item: the item name when read from a step directory.
      tree: the arrays, as a nested dict of NumPy arrays.
      key: the top-level key of ``tree`` asked for (``--item KEY`` naming no
        item directory); ``None``: found by :func:`restore_into`.

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
      >>> isinstance(ck, hvp.analysis.LoadedCheckpoint), ck.tree["params"]["kernel"].shape, ck.key
      (True, (3, 2), None)
    """

    path: str
    requested: str
    step: int | None
    item: str | None
    tree: Any
    key: str | None = None


def _is_item_dir(p: Path) -> bool:
    return (p / "_METADATA").is_file()


def _step_dirs(root: Path) -> dict[int, Path]:
    """Finished step directories of a CheckpointManager root or Flax workdir, by Orbax's rules."""
    import orbax.checkpoint as ocp

    out = {}
    for child in ocp.step.checkpoint_steps_paths(root):
        try:
            step = ocp.step.step_from_checkpoint_name(child.name)
        except ValueError:  # an item directory ("default", "model") or another folder
            continue
        if not ocp.step.is_path_temporary(child):
            out[int(step)] = Path(str(child))
    return out


def _item_dirs(root: Path) -> list[str]:
    return sorted(c.name for c in root.iterdir() if c.is_dir() and _is_item_dir(c))


def resolve_checkpoint(
    path, *, step: int | None = None, item: str | None = None
) -> tuple[Path, int | None, str | None]:
    """Find the Orbax item directory under ``path`` (see the module docstring).

    Returns ``(item_dir, step, item)``. An ``item`` that names no item directory
    while the step holds a single (or a ``default``) item is left to
    :func:`read_checkpoint` as a top-level key of the saved tree (the returned
    item is then that item directory's name, or ``None`` for a bare item).

    Raises:
      AnalysisError: the directory does not exist, is a file, or holds no
        Orbax checkpoint; the step or item asked for does not exist.

    Examples:
      >>> from hvp.analysis import resolve_checkpoint
      >>> resolve_checkpoint("no/such/dir")
      Traceback (most recent call last):
      ...
      hvp.analysis._errors.AnalysisError: The checkpoint directory 'no/such/dir' does not exist.
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
        step_names = {p.name for p in steps.values()}
        has_items = any(name not in step_names for name in _item_dirs(root))
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
                f"--step {step} was given but '{root}' is not a CheckpointManager root or Flax "
                "workdir (it has no step directories such as '120' or 'checkpoint_120')."
            )
    elif step is not None:
        raise AnalysisError(
            f"--step {step} was given but '{root}' is already a single checkpoint item."
        )

    if _is_item_dir(root):  # an --item here is a top-level key of the saved tree
        return root, found_step, None
    items = _item_dirs(root)
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
        if len(items) == 1 or "default" in items:  # --item names a key inside the only item
            only = items[0] if len(items) == 1 else "default"
            return root / only, found_step, only
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
    line = text[0] if text else ""
    line = line.split(" See full TensorStore details")[0]  # a multi-kilobyte spec follows
    return f"{type(e).__name__}: {line}"[:300]


@contextlib.contextmanager
def _stray_output_captured():
    """Keep Orbax's background-thread noise off stderr while a checkpoint is read.

    When one array of a checkpoint cannot be read, Orbax's restore fails while its other reads are
    still in flight; their callbacks then print "Event loop is closed" tracebacks and "Exception
    ignored in <coroutine ...>" messages (dozens to hundreds of lines) after the one-line error.
    Inside this block ``sys.stderr`` and ``sys.unraisablehook`` are redirected into a buffer; on a
    failure the block waits for the stray reads to settle (at most about one second) so that their
    output lands in the buffer too. The buffer is attached to the error as ``details`` (the
    ``hvp`` command shows it with ``--debug``). After a successful read the Python warnings
    raised meanwhile are re-issued and the rest is dropped (it can only be such noise, or a
    progress display's frames).
    """
    import gc
    import io
    import sys
    import time
    import warnings

    buf = io.StringIO()
    old_err, old_hook = sys.stderr, sys.unraisablehook

    def hook(u):
        buf.write(f"Exception ignored in: {u.object!r}: {u.exc_type.__name__}: {u.exc_value}\n")

    sys.stderr, sys.unraisablehook = buf, hook
    caught = warnings.catch_warnings(record=True)
    recorded = caught.__enter__()
    warnings.simplefilter("default")
    try:
        yield buf
    except BaseException as e:
        # Let the in-flight reads finish and their coroutines be collected while still captured.
        size, deadline = -1, time.monotonic() + 1.0
        while time.monotonic() < deadline and size != buf.tell():
            size = buf.tell()
            gc.collect()
            time.sleep(0.1)
        if isinstance(e, AnalysisError):
            e.details = buf.getvalue() + "".join(
                f"{w.category.__name__}: {w.message}\n" for w in recorded
            )
        raise
    finally:
        caught.__exit__(None, None, None)
        sys.stderr, sys.unraisablehook = old_err, old_hook
    for w in recorded:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def read_checkpoint(path, *, step: int | None = None, item: str | None = None) -> LoadedCheckpoint:
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
    # Orbax is given the absolute directory: for a relative one (`demo/checkpoint`, `./ck`, `ck/`)
    # its metadata() finds no item metadata. Messages and the report keep the path as given.
    abs_dir = Path(os.path.abspath(os.path.expanduser(item_dir)))
    ckptr = ocp.PyTreeCheckpointer()
    try:
        with _quiet_absl(), _stray_output_captured():
            try:
                tree_meta = _tree_metadata(ckptr.metadata(abs_dir))
            except Exception as e:
                raise AnalysisError(
                    f"Cannot read the checkpoint metadata in '{item_dir}': {_first_line(e)}"
                ) from e
            try:
                if tree_meta is None:
                    # The checkpointer's metadata() logs and swallows the error of reading the
                    # array metadata (stored with the arrays): the handler raises it.
                    tree_meta = _tree_metadata(_handler_metadata(ocp, abs_dir))
                    if tree_meta is None:
                        raise ValueError("Orbax found no tree metadata in the directory")
                cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
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
                    abs_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args)
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
    key = item if item is not None and item != found_item else None
    if key is not None and not (isinstance(tree, dict) and key in tree):
        keys = ", ".join(map(str, tree)) if isinstance(tree, dict) else "none"
        raise AnalysisError(
            f"--item {key!r} names neither an item directory nor a top-level key of the tree "
            f"saved in '{item_dir}' (its top-level keys: {keys})."
        )
    return LoadedCheckpoint(
        path=str(item_dir),
        requested=str(path),
        step=found_step,
        item=found_item,
        tree=tree,
        key=key,
    )


def _tree_metadata(meta):
    """The tree of array metadata (``.shape``, ``.dtype`` leaves) in what ``metadata()`` returned.

    Orbax >= 0.11 returns a ``StepMetadata`` whose ``item_metadata`` holds the tree (directly, or
    as its ``.tree``), and ``None`` when it could not read it; older versions return the tree
    itself. ``None`` when there is no tree; a ``ValueError`` when the leaves are not array metadata.
    """
    if hasattr(meta, "item_metadata"):  # a StepMetadata, never the tree itself
        meta = meta.item_metadata
    tree = getattr(meta, "tree", meta)
    if tree is None:
        return None
    for leaf in jax.tree_util.tree_leaves(tree):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise ValueError(
                f"the metadata holds a {type(leaf).__name__} where array metadata was expected"
            )
    return tree


def _handler_metadata(ocp, directory: Path):
    """``PyTreeCheckpointHandler.metadata`` of an (absolute) item directory: raises what it meets."""
    from etils import epath

    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(epath.Path(directory))
    finally:
        handler.close()


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
      ignored: checkpoint paths not used (RNG state, non-collection entries,
        the other top-level keys when the state sits under ``key``).
      key: the top-level key of the saved tree that held the model state
        (``None``: the whole tree).
    """

    kind: str
    model: Any
    variables: Any
    restored: tuple
    ignored: tuple
    key: str | None = None


def restore_into(model_spec, ckpt: LoadedCheckpoint, *, dtype=None) -> RestoredModel:
    """Put the checkpoint's arrays into the model built from the spec, after the structure check.

    Floating arrays are cast to ``dtype`` (when given). The model state is the
    whole saved tree, or the subtree under ``ckpt.key``; when neither is given
    and the whole tree does not match, each top-level key is tried
    (:data:`PREFERRED_KEYS` first) and the first that matches is used.

    Raises:
      StructureMismatchError: no candidate matches (the message is the whole
        tree's mismatch, followed by the top-level keys tried).
      AnalysisError: NaN or Inf in a restored array.

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
      >>> restored.kind, sorted(restored.restored)
      ('linen', ['params/bias', 'params/kernel'])
    """

    def restore(tree):
        part = dataclasses.replace(ckpt, tree=tree)
        if model_spec.kind == "nnx":
            return _restore_nnx(model_spec.model, part, dtype=dtype)
        return _restore_linen(model_spec.model, model_spec.variables, part, dtype=dtype)

    tree = ckpt.tree
    if ckpt.key is not None:
        return _under_key(restore(tree[ckpt.key]), tree, ckpt.key)
    try:
        return restore(tree)
    except StructureMismatchError as whole:
        if not isinstance(tree, dict) or len(tree) < 2:
            raise
        keys = [str(k) for k in tree]
        order = [k for k in PREFERRED_KEYS if k in tree] + [
            k for k in keys if k not in PREFERRED_KEYS
        ]
        for key in order:
            if not isinstance(tree[key], dict):
                continue
            try:
                return _under_key(restore(tree[key]), tree, key)
            except StructureMismatchError:
                continue
        raise StructureMismatchError(
            f"{whole}\n  Nor does any top-level key of the saved tree ({', '.join(keys)}) hold the "
            "model's state; select one with --item KEY.",
            missing=whole.missing,
            unexpected=whole.unexpected,
            mismatched=whole.mismatched,
        ) from None


def _under_key(restored: RestoredModel, tree: dict, key: str) -> RestoredModel:
    others = [str(k) for k in tree if k != key]
    return dataclasses.replace(
        restored,
        restored=tuple(f"{key}/{p}" for p in restored.restored),
        ignored=tuple(f"{key}/{p}" for p in restored.ignored) + tuple(others),
        key=key,
    )


def _restore_nnx(model, ckpt: LoadedCheckpoint, *, dtype) -> RestoredModel:
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


def _unboxed(flat: dict[str, Any], model_flat: dict[str, Any]) -> dict[str, Any]:
    """``kernel/value`` -> ``kernel`` where the model has ``kernel``: a saved boxed parameter."""
    out = {}
    for k, v in flat.items():
        if k not in model_flat and k.endswith("/value") and k[: -len("/value")] in model_flat:
            k = k[: -len("/value")]
        out[k] = v
    return out


def _restore_linen(module, variables, ckpt: LoadedCheckpoint, *, dtype) -> RestoredModel:
    from flax.linen import meta

    # Logically partitioned (boxed) parameters: compare and restore the plain arrays, as
    # hvp.flax.from_linen does with meta.unbox.
    variables = meta.unbox(variables)
    tree = ckpt.tree
    ignored: list[str] = []
    if isinstance(tree, dict) and "params" in tree:
        source = {c: tree[c] for c in variables if c in tree}
        ignored = [str(k) for k in tree if k not in variables]
    else:
        source = {"params": tree}
    model_flat = _flat(variables)
    ckpt_flat = _unboxed(_flat(source), model_flat)
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
