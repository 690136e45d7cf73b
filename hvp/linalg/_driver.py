r"""Algorithms as resumable state machines, and the two drivers that run them.

Every iterative algorithm of :mod:`hvp.linalg` is written once as a :class:`StateMachine`:
a hashable configuration (a frozen dataclass of Python scalars) and four pure functions of an
explicit state pytree (a ``dict`` of arrays):

* the public function builds the initial state (start vectors from the key, zero counters);
* ``prepare(op, state, phase)`` returns the block of vectors (leading axis ``b``, the phase's
  static block size) whose products the next step needs;
* ``update(op, state, phase, vs, avs)`` takes the products ``avs = A vs`` and does the step's
  linear algebra (a Lanczos step, a running mean, a restart), returning the next state;
* ``finalize(op, state)`` turns the last state into the result's arrays.

The state always holds ``"phase"`` (int32: which of ``block_sizes`` the next step uses),
``"done"`` (bool) and ``"matvecs"`` (int32: products so far). An algorithm with several kinds
of steps (Lanczos steps of one vector, then a residual check of ``k`` vectors) uses one phase
per kind; most have one.

Two drivers run a machine, with the same functions and therefore the same numbers:

* **compiled** (:func:`run` with ``driver="compiled"``): the whole run is one
  ``lax.while_loop`` in one XLA program, with the operator's product inlined. It is traceable:
  algorithms work inside a user's ``jax.jit`` / ``jax.vmap`` (e.g. a curvature monitor inside a
  jitted training step). It cannot show progress nor be resumed.
* **host**: a Python loop that calls the operator's one compiled block product
  (:meth:`hvp.LinearOperator.matmat`, compiled once per operator and block size and shared by
  every algorithm and every setting) and small compiled ``prepare``/``update`` steps, which
  never trace the user's model. It shows progress (products, the algorithm's own figure of
  merit, time left when the budget is known), saves its state to a file every
  ``Checkpoint.every`` steps and on ``KeyboardInterrupt``/``SIGTERM``, and resumes from that
  file bit for bit.

``driver="auto"`` (the default of every algorithm) picks **compiled when called inside a JAX
transformation** (the operator, the state or the key is a tracer: the host loop cannot run there)
**and host otherwise**: outside ``jit`` the host driver compiles the model's product once instead
of once per algorithm and setting, which is what dominates a one-off analysis (issue 11 measured
10-17 s of compilation for 20-25 products), while its per-step overhead (three dispatches, the
operator's input checks and one transfer of two integers) is small next to a product of a real
model. Measured on 2 CPU cores: about 70 us of CPU per step on a tiny dense operator (2 us in
the compiled loop); 0.36 ms per power-iteration step on the 334-parameter test MLP Hessian
(0.51 ms with the operator's default ``check_finite=True``), where the compiled loop takes
0.07 ms per step including the product; its cold start (compilation included) took 1.5 s of
CPU against 3.6 s for the compiled driver.

Progress (``progress=True``, or ``None``: when stderr is a terminal and ``CI`` is unset) is a
rich bar on a terminal and a plain line every ``_PLAIN_INTERVAL`` (2) seconds otherwise (logs
of batch jobs). Only the state entries the algorithm's ``progress`` reads
(``StateMachine.progress_keys``, by default the scalar entries) are copied to the host, at most
every 0.1 s.

The checkpoint file is an ``.npz`` written atomically (temporary file, fsync, rename): an
interrupt during a save leaves the previous complete file. It holds the state (bfloat16,
weak types and PRNG keys kept; each leaf is restored with the sharding of the initial state's
leaf) and a fingerprint of the run: the algorithm and its settings, the state's layout, exact
checksums of the operator's arrays (computed on the devices: wrapping integer sums of the bit
patterns, independent of sharding), the key, and each entry of the initial state. A file of a
different run is refused with :class:`CheckpointMismatchError` naming what differs; a truncated
or foreign file too. A finished run removes its file. ``SIGTERM`` (main thread, no handler of
the caller installed) saves the state and exits with status 143 (``SIGTERM_EXIT_CODE``); after
``SIGKILL`` the last periodic save is resumed. Multi-process (multi-host) states are not
supported: every leaf must be addressable from this process. With several processes only
process 0 shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hvp import tree as tu
from hvp._io import atomic_open
from hvp.operators import LinearOperator

__all__ = [
    "DRIVERS",
    "Checkpoint",
    "CheckpointMismatchError",
    "Progress",
    "StateMachine",
    "as_checkpoint",
    "block_product",
    "check_checkpoint_path",
    "fingerprint",
    "load_state",
    "read_checkpoint_meta",
    "remove_checkpoint",
    "resolve_driver",
    "run",
    "save_state",
]

DRIVERS = ("auto", "compiled", "host")
_FORMAT = "hvp-state/1"


class CheckpointMismatchError(ValueError):
    """A checkpoint file belongs to a different run (algorithm, settings, key or operator).

    Examples:
        >>> from hvp.linalg import CheckpointMismatchError
        >>> issubclass(CheckpointMismatchError, ValueError)
        True
    """


@dataclasses.dataclass(frozen=True)
class Progress:
    """What the host driver shows about a running algorithm (computed on the host).

    Attributes:
      matvecs: operator products so far.
      total: the most products the run will use when known in advance (a trace's fixed
        budget, or a cap such as ``num_iters``), else ``None`` (then no time left is shown).
      text: the algorithm's figure of merit, e.g. ``"worst wanted residual / tol 3.2e+01"``.

    Examples:
        >>> from hvp.linalg import Progress
        >>> Progress(matvecs=10, total=100, text="").total
        100
    """

    matvecs: int
    total: int | None = None
    text: str = ""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where and how often the host driver saves an algorithm's state, to resume it later.

    Pass it (or just a path) as ``checkpoint=`` to any algorithm. When the file exists and
    belongs to the same run (same algorithm, settings, key or start vector, and operator
    arrays), the run resumes from it and gives the same result, bit for bit, as an
    uninterrupted run; a file of another run raises :class:`CheckpointMismatchError`.
    The state is saved every ``every`` steps (a step is one block product and its linear
    algebra), on ``KeyboardInterrupt`` and on ``SIGTERM`` (the process then exits with status
    143 unless the caller handles SIGTERM); after ``SIGKILL`` the last periodic save is used.
    Files are written atomically (never a partial file), and a finished run deletes its file.
    See ``docs/drivers.md``.

    Attributes:
      path: the ``.npz`` file (its directory must exist).
      every: save every this many steps (``>= 1``).

    Examples:
        >>> import jax, jax.numpy as jnp, hvp, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "eig.npz")
        >>> op = hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0, 4.0])))
        >>> ckpt = hvp.linalg.Checkpoint(path, every=5)
        >>> r = hvp.power_iteration(op, key=jax.random.key(0), tol=1e-8, checkpoint=ckpt)
        >>> round(float(r.eigenvalue), 6), os.path.exists(path)  # the file is removed when done
        (4.0, False)
    """

    path: str | os.PathLike
    every: int = 10

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, (int, np.integer)):
            raise TypeError(f"`Checkpoint.every` must be an int, got {type(self.every).__name__}.")
        if int(self.every) < 1:
            raise ValueError(f"`Checkpoint.every` must be at least 1, got {self.every}.")
        if not isinstance(self.path, (str, os.PathLike)):
            raise TypeError(
                f"`Checkpoint.path` must be a file path, got {type(self.path).__name__}."
            )


class StateMachine:
    """Base of the algorithms' configurations (subclasses are frozen, hashable dataclasses).

    Subclasses set ``name`` and ``block_sizes`` (one static block size per phase; 0 means the
    phase needs no product) and implement :meth:`prepare`, :meth:`update`, :meth:`finalize`
    and optionally :meth:`progress` (with ``progress_keys``, the state entries it reads). Their
    fields must be plain Python values (ints, floats, strings, dtypes), since the configuration
    is hashed by ``jax.jit`` and its ``repr`` is part of a checkpoint's fingerprint. Every input
    that is an array (the key, ``tol``, start vectors) belongs in the state.

    Examples:
        >>> import dataclasses, jax, jax.numpy as jnp, hvp
        >>> from hvp.linalg._driver import StateMachine, run
        >>> @dataclasses.dataclass(frozen=True)
        ... class Krylov(StateMachine):  # the vectors v, A v, A^2 v, ... (3 products)
        ...     block_sizes = (1,)
        ...     def prepare(self, op, state, phase):
        ...         return state["v"][None]
        ...     def update(self, op, state, phase, vs, avs):
        ...         m = state["matvecs"] + 1
        ...         return dict(state, v=avs[0], matvecs=m, done=m >= 3)
        ...     def finalize(self, op, state):
        ...         return state["v"]
        >>> op = hvp.from_dense(jnp.diag(jnp.array([1.0, 2.0])))
        >>> state = dict(v=jnp.ones(2), phase=jnp.int32(0), done=jnp.array(False),
        ...              matvecs=jnp.int32(0))
        >>> out, driver = run(Krylov(), op, state, driver="host", progress=False)
        >>> out.tolist(), driver
        ([1.0, 8.0], 'host')
    """

    name: ClassVar[str] = "algorithm"
    #: ``True``: the host driver calls :meth:`prepare`, :meth:`update` and :meth:`finalize`
    #: directly instead of compiling them (they run their own compiled pieces and keep part of
    #: the state in host memory, e.g. ``eigsh(basis="host")``); such a machine owns its state
    #: (it may donate it) and runs on the host driver only.
    host_steps: ClassVar[bool] = False
    #: State entries that :meth:`progress` reads (copied to the host for the display only);
    #: ``None``: every scalar entry.
    progress_keys: ClassVar[tuple[str, ...] | None] = None

    @property
    def block_sizes(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def chunk_size(self) -> int | None:
        """At most this many products at once (``None``: the whole block)."""
        return None

    def prepare(self, op: LinearOperator, state: dict, phase: int):  # pragma: no cover
        raise NotImplementedError

    def update(
        self, op: LinearOperator, state: dict, phase: int, vs, avs
    ) -> dict:  # pragma: no cover
        raise NotImplementedError

    def finalize(self, op: LinearOperator, state: dict):  # pragma: no cover
        raise NotImplementedError

    def progress(self, state: dict) -> Progress:
        """Host-side progress from the state (concrete arrays); the default shows products."""
        return Progress(matvecs=int(state["matvecs"]))


# ------------------------------------------------------------------------------------------------
# the block product shared by both drivers
# ------------------------------------------------------------------------------------------------
def block_product(op: LinearOperator, vs, chunk_size: int | None = None):
    """``A v`` for every row of the block ``vs`` through the operator's public :meth:`matmat`.

    ``vs`` is cast to the operator's dtypes first (products run in the parameters' dtype).
    With ``chunk_size`` smaller than the block, at most ``chunk_size`` products run at once:
    a ``lax.map`` under a trace, a loop over the chunks on the host (one compiled product per
    chunk size, shared with every other caller).
    """
    vs = _cast_like(vs, op.like)
    b = tu.leading_dim(vs)
    if chunk_size is None or chunk_size >= b:
        return op.matmat(vs)
    if tu.is_traced(vs, op):
        return lax.map(op.matvec, vs, batch_size=chunk_size)
    outs = []
    for start in range(0, b, chunk_size):
        part = jax.tree_util.tree_map(lambda x, s=start: x[s : s + chunk_size], vs)
        outs.append(op.matmat(part))
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)


def _cast_like(vs, like):
    """``vs`` with each leaf in ``like``'s dtype (no dispatch when the dtypes already agree)."""
    leaves, like_leaves = jax.tree_util.tree_leaves(vs), jax.tree_util.tree_leaves(like)
    if len(leaves) == len(like_leaves) and all(
        getattr(x, "dtype", None) == getattr(lk, "dtype", None)
        for x, lk in zip(leaves, like_leaves, strict=True)
    ):
        return vs
    return jax.tree_util.tree_map(lambda x, lk: x.astype(jnp.result_type(lk)), vs, like)


def _step(alg: StateMachine, op: LinearOperator, state: dict, phase: int) -> dict:
    """One step of ``phase`` with the product inlined (the compiled driver)."""
    vs = alg.prepare(op, state, phase)
    avs = block_product(op, vs, alg.chunk_size) if alg.block_sizes[phase] else None
    return alg.update(op, state, phase, vs, avs)


def _run_compiled_impl(alg: StateMachine, op: LinearOperator, state: dict):
    phases = len(alg.block_sizes)

    def body(s):
        if phases == 1:
            return _step(alg, op, s, 0)
        branches = [lambda s, p=p: _step(alg, op, s, p) for p in range(phases)]
        return lax.switch(s["phase"], branches, s)

    state = lax.while_loop(lambda s: ~s["done"], body, state)
    return alg.finalize(op, state)


def _own(state, *, keep_private: bool = False):
    """``state`` with a copy of its array leaves: the loop donates its state, never a caller's array.

    With ``keep_private`` (the caller handed the state over: ``run(consume=True)``) a leaf held
    only by the state's containers is donated as it is: copying it would keep two initial
    states alive for the whole run (measured on a 54.6M-parameter MLP: the lean ``eigsh`` peak
    fell from 10.5 to 8.2 ``n``, Hutch++ from 25 to 16 ``n``). Ownership is read from the
    reference count, calibrated on a fresh object held the same way
    (:func:`_private_refcount`); a leaf held elsewhere too (a NumPy view of a CPU array's buffer
    holds the array), appearing twice, or with a cached host copy is copied. One compiled
    program copies them all (an eager copy per leaf compiled one program per leaf shape: 19 of
    the 94 compilations of a cold ``eigsh(k=1)``).
    """
    leaves, treedef = jax.tree_util.tree_flatten(state)
    private = _private_refcount()
    idx, i = [], -1
    for x in leaves:  # (as in _private_refcount: `enumerate` would hold one more reference)
        i += 1
        if isinstance(x, jax.Array) and (
            not keep_private
            or sys.getrefcount(x) > private
            or getattr(x, "_npy_value", None) is not None
        ):
            idx.append(i)
    if idx:
        copies = _copy_arrays([leaves[i] for i in idx])
        for i, c in zip(idx, copies, strict=True):
            leaves[i] = c
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _private_refcount() -> int:
    """The reference count :func:`_own` sees for a leaf that only the state's container holds.

    Measured the same way (one container, the flattened list, the loop variable), so that it
    follows the interpreter's counting rules instead of assuming them.
    """
    holder = [object()]
    leaves = list(holder)
    for x in leaves:
        return sys.getrefcount(x)
    raise AssertionError  # pragma: no cover


@jax.jit
def _copy_arrays(xs):
    return [jnp.array(x, copy=True) for x in xs]


def _unalias(vs, state):
    """``vs`` with a copy of any leaf that is also a leaf of ``state`` (any pytree).

    ``prepare`` may return a state entry or an operator's array as is, and a product may return
    its input (an identity): a buffer cannot be donated twice in one call, and the operator's
    arrays are never donated.
    """
    if vs is None:
        return vs
    ids = {id(x) for x in jax.tree_util.tree_leaves(state)}
    if not any(id(x) in ids for x in jax.tree_util.tree_leaves(vs)):
        return vs
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True) if id(x) in ids else x, vs)


def _deleted(state) -> bool:
    return any(
        isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree_util.tree_leaves(state)
    )


def _flags(state):
    """``[phase, done]`` as one int32 array: the host reads both in one transfer."""
    return jnp.stack(
        [jnp.asarray(state["phase"], jnp.int32), jnp.asarray(state["done"], jnp.int32)]
    )


def _update_impl(alg, op, state, phase, vs, avs):
    state = alg.update(op, state, phase, vs, avs)
    return state, _flags(state)


_run_compiled = jax.jit(_run_compiled_impl, static_argnums=0)
# The host driver's step programs are small (a few vector updates and a small factorisation)
# and compiled once per algorithm and setting, so on CPU a cold run waits for their compilation
# more than for their run. LLVM optimisation level 0 for them only (the operator's product keeps
# XLA's defaults): measured on 2 CPU cores, eigsh(k=5) + Hutch++ + XTrace + SLQ cold in a fresh
# process took 21-26% less CPU (21.9 -> 17.3 s at n = 301k, 16.3 -> 12.0 s at 26k); warm within
# noise (11.6 vs 12.4 s and 1.29 vs 1.20 s for three repeats). Results change only by round-off
# (vectorised and scalar loops round differently); LLVM's `disable_expensive_passes` alone
# measured no gain.
_STEP_OPTIONS = {"xla_backend_optimization_level": 0}
_prepare = jax.jit(
    lambda alg, op, s, p: alg.prepare(op, s, p),
    static_argnums=(0, 3),
    compiler_options=_STEP_OPTIONS,
)
# The host driver donates the state to each update, so that XLA updates it in place as the
# compiled while_loop does (a Lanczos basis is not copied at every step: measured 323 ms against
# 1 ms per step for a 50 x 1e6 float32 basis on CPU). The loop owns every buffer it donates:
# see _own and _unalias.
# The block and its products are donated too: the update may write its new vectors into them,
# and the loop does not keep them alive through the next product (2 ``n`` per block row).
_update = jax.jit(
    _update_impl, static_argnums=(0, 3), donate_argnums=(2, 4, 5), compiler_options=_STEP_OPTIONS
)
_update_noprod = jax.jit(
    lambda alg, op, s, p, vs: _update_impl(alg, op, s, p, vs, None),
    static_argnums=(0, 3),
    donate_argnums=(2, 4),
    compiler_options=_STEP_OPTIONS,
)


def _donating(step, *args):
    """``step(*args)`` without JAX's "Some donated buffers were not usable" warning.

    The block and its products are donated whether or not the update can reuse them (it can
    when it writes vectors of their shape); when it cannot, they are simply freed, which is
    what the donation is for. The warning would only alarm users at the first step.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        return step(*args)


_finalize = jax.jit(
    lambda alg, op, s: alg.finalize(op, s), static_argnums=0, compiler_options=_STEP_OPTIONS
)
_flags_jit = jax.jit(_flags)


def _read_flags(state):
    """``[phase, done]`` of ``state`` (only those two entries enter the compiled call)."""
    return _flags_jit({"phase": state["phase"], "done": state["done"]})


# ------------------------------------------------------------------------------------------------
# choosing a driver
# ------------------------------------------------------------------------------------------------
def resolve_driver(driver: str, *traced: Any, progress=None, checkpoint=None) -> str:
    """``"compiled"`` or ``"host"`` for ``driver`` (see the module docstring for ``"auto"``).

    A streamed operator (``op.streaming``, among ``traced``) always gets the host driver.

    Raises:
      ValueError: an unknown driver; ``"host"`` (or progress / a checkpoint) inside a JAX
        transformation; a streamed operator inside a transformation or with ``"compiled"``.
    """
    if driver not in DRIVERS:
        raise ValueError(f"`driver` must be one of {DRIVERS}, got {driver!r}.")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"`progress` must be True, False or None, got {progress!r}.")
    inside = tu.is_traced(*traced)
    if any(getattr(x, "streaming", False) is True for x in traced):
        # a streamed operator: the host reads the data on every product (no compiled loop)
        if inside or driver == "compiled":
            where = "inside jax.jit/jax.vmap" if inside else "with driver='compiled'"
            raise ValueError(
                f"A streamed operator (built with stream=True, or stream='auto' for data larger "
                f"than the budget) cannot run {where}: the host reads its batches on every "
                "product. Use driver='host' (driver='auto' picks it) outside jax.jit, or build the "
                "operator with stream=False if the data fit on the device."
            )
        driver = "host"
    if driver == "auto":
        driver = "compiled" if inside else "host"
    if inside and driver == "host":
        raise ValueError(
            "driver='host' cannot run inside jax.jit/jax.vmap (its loop runs in Python on "
            "concrete arrays); use driver='compiled' or 'auto' there, or call the algorithm "
            "outside the transformation."
        )
    where = "inside jax.jit/jax.vmap" if inside else "with driver='compiled'"
    if driver == "compiled" and checkpoint is not None:
        raise ValueError(
            f"`checkpoint=` cannot be used {where}: it needs the host driver (a compiled loop cannot "
            "save its state). Call the algorithm outside the transformation with driver='host' "
            "(or 'auto')."
        )
    if driver == "compiled" and progress:
        raise ValueError(
            f"`progress=True` cannot be used {where}: it needs the host driver (a compiled loop "
            "cannot report). Call the algorithm outside the transformation with driver='host' "
            "(or 'auto')."
        )
    return driver


def _as_checkpoint(checkpoint) -> Checkpoint | None:
    if checkpoint is None or isinstance(checkpoint, Checkpoint):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        return Checkpoint(checkpoint)
    raise TypeError(
        "`checkpoint` must be a file path or hvp.linalg.Checkpoint(path, every=...), got "
        f"{type(checkpoint).__name__}."
    )


def _check_checkpoint_path(path) -> None:
    """Fail before any work when the checkpoint could never be written."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"The checkpoint path {os.fspath(path)!r} is a directory: pass a file name, e.g. "
            f"{os.fspath(path / 'state.npz')!r}."
        )
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"The directory of the checkpoint {os.fspath(path)!r} does not exist: create "
            f"{os.fspath(parent)!r} first or pass another path."
        )


# ------------------------------------------------------------------------------------------------
# the drivers
# ------------------------------------------------------------------------------------------------
def run(
    alg: StateMachine,
    op: LinearOperator,
    state: dict,
    *,
    driver: str = "auto",
    progress: bool | None = None,
    checkpoint: Checkpoint | str | os.PathLike | None = None,
    traced: tuple = (),
    consume: bool = False,
):
    """Run ``alg`` from ``state`` on ``op`` to the end and return ``alg.finalize``'s output.

    Args:
      alg: the algorithm's configuration.
      op: the operator.
      state: the initial state (must hold ``"phase"``, ``"done"`` and ``"matvecs"``).
      driver: ``"auto"``, ``"compiled"`` or ``"host"`` (see the module docstring).
      progress: host driver only: show a progress display on stderr (``None``: when stderr is
        a terminal and ``CI`` is not set). A rich bar on a terminal, else a plain line every
        few seconds (logs of batch jobs).
      checkpoint: host driver only: a path or a :class:`Checkpoint` to save and resume from.
      traced: further pytrees (e.g. the key) whose being traced selects the compiled driver;
        a checkpoint whose initial state differs and whose ``traced`` differ is reported as
        "another key".
      consume: the caller hands ``state`` over and will not use it again (the algorithms'
        entry points, which build it for this run): the host driver then donates the arrays
        that nothing but the state holds instead of copying them (one initial state less in
        memory for the whole run). Arrays held elsewhere (a user's start vector, the
        operator's) are copied either way. ``False``: every array of ``state`` is copied.

    Returns:
      ``(output, driver)``: the finalized output and the driver that ran.

    Raises:
      ValueError: see :func:`resolve_driver`; a state without ``phase``/``done``/``matvecs``.
      TypeError: ``checkpoint`` or ``progress`` of the wrong type.
      FileNotFoundError, IsADirectoryError: the checkpoint's directory is missing, or the path
        is a directory (raised before any product).
      CheckpointMismatchError: the checkpoint file is of another run, or unreadable.
    """
    checkpoint = _as_checkpoint(checkpoint)
    missing = [k for k in ("phase", "done", "matvecs") if k not in state]
    if missing:
        raise ValueError(f"The state of {alg.name} lacks the entries {missing} the drivers need.")
    chosen = resolve_driver(driver, op, state, *traced, progress=progress, checkpoint=checkpoint)
    if chosen == "compiled" and alg.host_steps:
        raise ValueError(
            f"{alg.name} runs its steps from the host (part of its state is in host memory), so "
            "it cannot run with driver='compiled' nor inside jax.jit/jax.vmap; use "
            "driver='host' (or 'auto') outside the transformation."
        )
    if chosen == "compiled":
        return _run_compiled(alg, op, state), chosen
    if checkpoint is not None:
        _check_checkpoint_path(checkpoint.path)
        # Several processes: the state becomes global arrays after the first step (even when the
        # initial one is local), which one file per process cannot hold.
        if jax.process_count() > 1 or not all(
            getattr(x, "is_fully_addressable", True) for x in jax.tree_util.tree_leaves((state, op))
        ):
            raise ValueError(
                "`checkpoint=` needs every array of the state on this process's devices; a "
                "state spanning several processes (multi-host) cannot be saved to one file. "
                "Run without `checkpoint=` there."
            )
    out = _run_host(
        alg, op, state, progress=progress, checkpoint=checkpoint, traced=traced, consume=consume
    )
    return out, chosen


def _run_host(alg, op, state, *, progress, checkpoint: Checkpoint | None, traced=(), consume=False):
    fingerprint = _fingerprint(alg, op, state, traced) if checkpoint is not None else None
    steps = 0
    if checkpoint is not None and Path(checkpoint.path).exists():
        state, steps = _load(checkpoint.path, state, fingerprint)
    if not alg.host_steps:  # (a host-steps machine owns its state: see StateMachine)
        state = _own(state, keep_private=consume)
    display = _Display(alg, state, mode=_progress_mode(progress))
    last_saved = steps
    restore_sigterm = _catch_sigterm() if checkpoint is not None else None
    try:
        with display:
            phase, done = (int(x) for x in np.asarray(_read_flags(state)))
            while not done:
                display.update(state)
                if alg.host_steps:
                    vs = alg.prepare(op, state, phase)
                    avs = block_product(op, vs, alg.chunk_size) if alg.block_sizes[phase] else None
                    state = alg.update(op, state, phase, vs, avs)
                    flags = _read_flags(state)
                else:
                    vs = _unalias(_prepare(alg, op, state, phase), (state, op))
                    if alg.block_sizes[phase]:
                        avs = _unalias(block_product(op, vs, alg.chunk_size), (state, vs, op))
                        state, flags = _donating(_update, alg, op, state, phase, vs, avs)
                    else:
                        state, flags = _donating(_update_noprod, alg, op, state, phase, vs)
                    vs = avs = None  # donated
                steps += 1
                phase, done = (int(x) for x in np.asarray(flags))
                if checkpoint is not None and steps - last_saved >= checkpoint.every:
                    _save(checkpoint.path, state, fingerprint, steps)
                    last_saved = steps
            display.update(state, final=True)
    except BaseException as err:
        # (interrupted inside an update, after its state was donated: keep the last save)
        if checkpoint is not None and steps > last_saved and not _deleted(state):
            _save(checkpoint.path, state, fingerprint, steps)
            last_saved = steps
        if checkpoint is not None and last_saved > 0:
            why = (
                "was interrupted"
                if isinstance(err, (KeyboardInterrupt, SystemExit))
                else f"stopped on {type(err).__name__}"
            )
            print(
                f"hvp: {alg.name} {why} after {last_saved} steps; its state is saved in "
                f"{os.fspath(checkpoint.path)!r}: call it again with the same arguments to resume.",
                file=sys.stderr,
            )
        raise
    finally:
        if restore_sigterm is not None:
            restore_sigterm()
    out = alg.finalize(op, state) if alg.host_steps else _finalize(alg, op, state)
    if checkpoint is not None:
        _remove(checkpoint.path)
    return out


def _remove(path) -> None:
    """Delete a finished run's file, and temporary files a killed save left beside it."""
    path = Path(path)
    path.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def as_checkpoint(checkpoint) -> Checkpoint | None:
    """``checkpoint`` (``None``, a path or a :class:`Checkpoint`) as a :class:`Checkpoint`."""
    return _as_checkpoint(checkpoint)


def check_checkpoint_path(path) -> None:
    """Raise before any work when a checkpoint at ``path`` could never be written."""
    _check_checkpoint_path(path)


def remove_checkpoint(path) -> None:
    """Delete a finished run's checkpoint file (and temporary files a killed save left)."""
    _remove(path)


class _Terminated(SystemExit):
    """SIGTERM turned into an exception so that the host driver can save its state."""


#: Exit status of a process stopped by SIGTERM during a checkpointed run (128 + 15, as a shell
#: reports a process killed by SIGTERM).
SIGTERM_EXIT_CODE = 143


def _catch_sigterm() -> Callable[[], None] | None:
    """Turn SIGTERM into ``SystemExit(143)`` while a checkpointed run is in the main thread.

    Only when no handler is installed (a handler of the caller, e.g. ``hvp analyze``'s, wins).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platform without SIGTERM
        return None
    if previous not in (signal.SIG_DFL, None):
        return None

    def handler(signum, frame):  # noqa: ARG001
        raise _Terminated(SIGTERM_EXIT_CODE)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------
# checkpoint files
# ------------------------------------------------------------------------------------------------
def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _leaf_to_numpy(x):
    if _is_key(x):
        return np.asarray(jax.device_get(jax.random.key_data(x)))
    return np.asarray(jax.device_get(x))


_MIX = np.uint32(0x9E3779B1)  # odd multipliers: position weights of the checksums


def _bit_parts(x) -> list:
    """The bit pattern of ``x`` as uint32 arrays (exact for every dtype).

    No reshape, so that explicitly sharded arrays keep their sharding.
    """
    if _is_key(x):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return _bit_parts(jnp.real(x)) + _bit_parts(jnp.imag(x))
    if x.dtype == jnp.bool_:
        return [x.astype(jnp.uint32)]
    size = jnp.dtype(x.dtype).itemsize
    if size >= 4:  # 8-byte types become (..., 2) uint32
        return [lax.bitcast_convert_type(x, jnp.uint32)]
    small = {1: jnp.uint8, 2: jnp.uint16}[size]
    return [lax.bitcast_convert_type(x, small).astype(jnp.uint32)]


def _position(shape) -> jax.Array:
    """The row-major position of every element (uint32, wrapping), built from iotas."""
    pos = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        pos = pos + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
        stride *= shape[d]
    return pos


@jax.jit
def _checksums(leaves):
    """Three wrapping uint32 sums of each leaf's bits.

    Exact, and independent of the order of the reduction (integer addition modulo 2^32), hence
    of the devices and the sharding.
    """
    out = []
    for x in leaves:
        sums = []
        for u in _bit_parts(x):
            i = _position(u.shape)
            sums += [
                jnp.sum(u, dtype=jnp.uint32),
                jnp.sum(u * (i * _MIX + jnp.uint32(1)), dtype=jnp.uint32),
                jnp.sum((u ^ (u >> 13)) * (i * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32),
            ]
        out.append(jnp.stack(sums))
    return out


def _all_checksums(flat: list) -> list:
    """:func:`_checksums` of every array of ``flat``, copied to the host.

    One compiled call when the arrays can meet in one computation (the usual case); arrays
    committed to different devices (a state kept partly in host memory, on the CPU device, next
    to parameters on an accelerator) are checksummed by one call per device set.
    """
    if not flat:
        return []
    places: dict = {}
    for i, x in enumerate(flat):
        committed = getattr(x, "committed", False)
        place = frozenset(x.sharding.device_set) if committed else None
        places.setdefault(place, []).append(i)
    if len([p for p in places if p is not None]) <= 1:
        return jax.device_get(_checksums(flat))
    loose = places.pop(None, [])
    out: list = [None] * len(flat)
    for n, idx in enumerate(places.values()):
        idx = idx + loose if n == 0 else idx  # uncommitted arrays join the first device set
        for i, c in zip(idx, jax.device_get(_checksums([flat[i] for i in idx])), strict=True):
            out[i] = c
    return out


def _digests(groups: list) -> list[str]:
    """One hex digest per group of pytree leaves (shapes, dtypes and exact checksums).

    Computed on the devices in one call: nothing but a few integers is copied to the host.
    """
    flat = [x if isinstance(x, jax.Array) else jnp.asarray(x) for g in groups for x in g]
    sums = _all_checksums(flat)
    out, i = [], 0
    for g in groups:
        h = hashlib.sha256()
        for x in g:
            h.update(str((tuple(np.shape(x)), str(jnp.result_type(x)))).encode())
            h.update(np.ascontiguousarray(sums[i]).tobytes())
            i += 1
        out.append(h.hexdigest())
    return out


def _fingerprint(alg, op, state, traced=()) -> dict:
    """What identifies a run.

    The algorithm and its settings, the state's layout, the operator (type, name and exact
    checksums of its arrays), the key and each initial state entry.
    """
    leaves, treedef = jax.tree_util.tree_flatten(state)
    layout = [(tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves]
    names = [str(k) for k in state] if isinstance(state, dict) else ["state"]
    entries = list(state.values()) if isinstance(state, dict) else [state]
    groups = [jax.tree_util.tree_leaves(op), jax.tree_util.tree_leaves(traced)]
    groups += [jax.tree_util.tree_leaves(v) for v in entries]
    digests = _digests(groups)
    static = str((type(op).__name__, op.name)).encode()
    return {
        "format": _FORMAT,
        "algorithm": alg.name,
        "settings": repr(alg),
        "structure": hashlib.sha256(str((treedef, layout)).encode()).hexdigest(),
        "operator": hashlib.sha256(static + digests[0].encode()).hexdigest(),
        "key": digests[1],
        "initial_state": dict(zip(names, digests[2:], strict=True)),
    }


def _save(path, state, fingerprint: dict, steps: int) -> None:
    """Write the state and the fingerprint to ``path`` atomically (never a partial file)."""
    leaves = jax.tree_util.tree_leaves(state)
    arrays, dtypes, weak = {}, [], []
    for i, x in enumerate(leaves):
        a = _leaf_to_numpy(x)
        dtypes.append(a.dtype.name)
        weak.append(bool(getattr(x, "weak_type", False)))
        if a.dtype.isbuiltin != 1:  # bfloat16, float8 (ml_dtypes): np.save would lose the type
            a = a.view(f"u{a.dtype.itemsize}")
        arrays[f"leaf_{i}"] = a
    meta = dict(fingerprint, steps=steps, dtypes=dtypes, weak_types=weak)
    with atomic_open(path, "wb") as f:  # written straight to the file: no second copy in memory
        np.savez(f, __meta__=np.asarray(json.dumps(meta)), **arrays)


def read_checkpoint_meta(path) -> dict:
    """The metadata of a checkpoint file (what :func:`save_state` stored beside the state).

    For algorithms whose state layout depends on earlier decisions (adaptive rounds): read
    the decisions first, build a template state, then :func:`load_state`.

    Raises:
      CheckpointMismatchError: the file is truncated, corrupt or not an hvp checkpoint.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
        if not isinstance(meta, dict):
            raise ValueError("its metadata is not a JSON object")
    except Exception as err:
        raise CheckpointMismatchError(
            f"Cannot read the checkpoint {os.fspath(path)!r} ({type(err).__name__}: {err}): the "
            "file is truncated, corrupt or not an hvp checkpoint. Delete it to start afresh."
        ) from err
    return meta


def fingerprint(alg, op, state, traced=()) -> dict:
    """What identifies a run of ``alg`` on ``op`` from ``state`` (see :func:`save_state`)."""
    return _fingerprint(alg, op, state, traced)


def save_state(path, state, fingerprint: dict, **extra) -> None:
    """Save ``state`` atomically with ``fingerprint`` and JSON-serialisable ``extra`` metadata.

    The building block of checkpoints that span several :func:`run` calls (adaptive rounds).
    """
    _save(path, state, dict(fingerprint, **extra), 0)


def load_state(path, template, fingerprint: dict):
    """The state saved by :func:`save_state`, typed and placed like ``template``.

    Raises:
      CheckpointMismatchError: the file is of another run (``fingerprint`` differs), holds
        another layout than ``template``, or is unreadable.
    """
    return _load(path, template, fingerprint)[0]


_CAUSES = {
    "format": "was written by another version of hvp's checkpoint format",
    "settings": "has other settings ({saved} here, {now} now)",
    "structure": "has a state of another structure (other settings, e.g. k or the block size)",
    "operator": "is of another operator (its parameters or data changed)",
}


def _mismatch(path, what: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"The checkpoint {os.fspath(path)!r} {what}, so it cannot resume this run. Delete it (or "
        "pass another path) to start afresh."
    )


def _load(path, init_state, fingerprint: dict):
    """The saved state and step count, checked against this run's fingerprint.

    Each leaf is placed like the initial state's leaf (same sharding, e.g. over a mesh).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            if not isinstance(meta, dict):
                raise ValueError("its metadata is not a JSON object")
            arrays = [data[f"leaf_{i}"] for i in range(len(data.files) - 1)]
    except Exception as err:
        raise CheckpointMismatchError(
            f"Cannot read the checkpoint {os.fspath(path)!r} ({type(err).__name__}: {err}): the "
            "file is truncated, corrupt or not an hvp checkpoint. Delete it to start afresh."
        ) from err
    if meta.get("algorithm") != fingerprint["algorithm"]:
        raise _mismatch(path, f"is of {meta.get('algorithm')!r}, not {fingerprint['algorithm']!r}")
    for field in ("format", "settings", "structure", "operator"):
        if meta.get(field) != fingerprint[field]:
            raise _mismatch(
                path,
                _CAUSES[field].format(saved=meta.get(field), now=fingerprint[field]),
            )
    saved_entries = meta.get("initial_state")
    if saved_entries != fingerprint["initial_state"]:
        if not isinstance(saved_entries, dict):
            raise _mismatch(path, "has no valid fingerprint of its initial state")
        if meta.get("key") != fingerprint["key"]:
            raise _mismatch(path, "was started with another key (or start vector)")
        differ = sorted(
            k for k, h in fingerprint["initial_state"].items() if saved_entries.get(k) != h
        )
        raise _mismatch(
            path,
            f"started from another initial state: its {', '.join(map(repr, differ))} differ "
            "(a setting held in the state, such as tol or num_iters, or the start vector v0)",
        )
    leaves, treedef = jax.tree_util.tree_flatten(init_state)
    dtypes, weak = meta.get("dtypes"), meta.get("weak_types")
    if (
        len(arrays) != len(leaves)
        or not isinstance(dtypes, list)
        or not isinstance(weak, list)
        or len(dtypes) != len(leaves)
        or len(weak) != len(leaves)
    ):
        raise _mismatch(path, "holds another number of arrays than this run's state")
    restored = []
    for i, (a, ref) in enumerate(zip(arrays, leaves, strict=True)):
        a = a.view(jnp.dtype(dtypes[i])) if a.dtype.name != dtypes[i] else a
        want = np.shape(jax.random.key_data(ref)) if _is_key(ref) else np.shape(ref)
        if a.shape != tuple(want):
            raise _mismatch(path, f"holds an array of shape {a.shape} where {want} is expected")
        restored.append(_restore_leaf(a, ref, bool(weak[i])))
    steps = meta.get("steps", 0)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise _mismatch(path, f"has an invalid step count {steps!r}")
    return jax.tree_util.tree_unflatten(treedef, restored), steps


def _restore_leaf(a: np.ndarray, ref, weak: bool):
    """``a`` as a device array typed and placed like ``ref`` (dtype, PRNG key impl, sharding).

    A leaf of ``ref`` that is not committed to its devices (built without ``device_put``) is
    restored uncommitted, so that it can still meet arrays of a mesh in a computation.
    """
    committed = isinstance(ref, jax.Array) and getattr(ref, "committed", True)
    sharding = ref.sharding if committed else None
    if _is_key(ref):
        x = jax.random.wrap_key_data(
            jax.device_put(a, sharding) if sharding is not None else jnp.asarray(a),
            impl=jax.random.key_impl(ref),
        )
        return x
    a = a.astype(jnp.result_type(ref), copy=False)
    x = jax.device_put(a, sharding) if sharding is not None else jnp.asarray(a)
    if weak:
        x = _weak(x)
    return x


def _weak(x):
    try:
        from jax._src.lax.lax import _convert_element_type
    except ImportError:  # pragma: no cover - a JAX without it: strongly typed (same values)
        return x
    return _convert_element_type(x, weak_type=True)


# ------------------------------------------------------------------------------------------------
# progress display
# ------------------------------------------------------------------------------------------------
_TTY_INTERVAL = 0.1  # seconds between updates of the rich bar
_PLAIN_INTERVAL = 2.0  # seconds between plain lines (stderr not a terminal: logs of batch jobs)


def _progress_mode(progress) -> str:
    """``"off"``, ``"rich"`` (a live bar on a terminal) or ``"plain"`` (periodic lines)."""
    tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if progress is None:
        progress = tty and not os.environ.get("CI")
    if not isinstance(progress, bool):
        raise TypeError(f"`progress` must be True, False or None, got {progress!r}.")
    if not progress or jax.process_index() != 0:  # several processes: process 0 reports
        return "off"
    return "rich" if tty else "plain"


def _progress_keys(alg: StateMachine, state) -> list | None:
    keys = alg.progress_keys
    if keys is not None:
        return list(keys)
    if not isinstance(state, dict):
        return None
    return [
        k
        for k, v in state.items()
        if all(np.ndim(x) == 0 and not _is_key(x) for x in jax.tree_util.tree_leaves(v))
    ]


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Display:
    """The host driver's progress display.

    Products, the algorithm's figure of merit, elapsed time and time left. Only the state
    entries the algorithm's ``progress`` reads are copied to the host, at most every
    ``_TTY_INTERVAL`` (rich bar) or ``_PLAIN_INTERVAL`` seconds.
    """

    def __init__(self, alg: StateMachine, state, *, mode: str):
        self.alg = alg
        self.mode = mode
        self._keys = _progress_keys(alg, state) if mode != "off" else None
        self._rich = None
        self._task = None
        self._t0 = time.perf_counter()
        self._last = -float("inf")
        self._start_matvecs = None

    def __enter__(self):
        self._t0 = time.perf_counter()
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("products"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[text]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.alg.name, total=None, text="")
        return self

    def update(self, state, *, final: bool = False) -> None:
        if self.mode == "off":
            return
        now = time.perf_counter()
        interval = _TTY_INTERVAL if self.mode == "rich" else _PLAIN_INTERVAL
        first = self._start_matvecs is None
        if not (final or first or now - self._last >= interval):
            return
        self._last = now
        host = jax.device_get(state if self._keys is None else {k: state[k] for k in self._keys})
        try:
            info = self.alg.progress(host)
        except KeyError:
            if self._keys is None:
                raise
            # ``progress`` reads an entry outside ``progress_keys`` (or, by default, a
            # non-scalar one): copy the whole state from now on rather than fail the run
            self._keys = None
            info = self.alg.progress(jax.device_get(state))
        if first:
            self._start_matvecs = info.matvecs
        if self._rich is not None:
            self._rich.update(self._task, completed=info.matvecs, total=info.total, text=info.text)
            return
        elapsed = now - self._t0
        done_here = info.matvecs - self._start_matvecs
        parts = [f"{info.matvecs}/{info.total}" if info.total else f"{info.matvecs}"]
        parts[0] += " products"
        parts.append(f"{_fmt_time(elapsed)} elapsed")
        if info.total and done_here > 0 and not final:
            left = elapsed / done_here * max(info.total - info.matvecs, 0)
            parts.append(f"at most {_fmt_time(left)} left")
        if info.text:
            parts.append(info.text)
        label = f"hvp {self.alg.name}" + (" done" if final else "")
        print(f"{label}: " + ", ".join(parts), file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._rich is not None:
            self._rich.__exit__(*exc)
        return False
