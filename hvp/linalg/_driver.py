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
transformation** (the operator or the key is a tracer: the host loop cannot run there) **and
host otherwise**: outside ``jit`` the host driver compiles the model's product once instead of
once per algorithm and setting, which is what dominates a one-off analysis (issue 11 measured
10-17 s of compilation for 20-25 products), while its per-step overhead (three dispatches and one
scalar read, about 0.1-1 ms) is small next to a product of any real model.

The checkpoint file is an ``.npz`` written atomically (temporary file, then rename). It holds
the state and a fingerprint of the run (algorithm and settings, the initial state, which
depends on the key and start vector, and a checksum of the operator's arrays): a file from a
different run is refused with a message rather than resumed. A finished run removes its file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
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
    "block_product",
    "resolve_driver",
    "run",
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
      total: products the run will use when known in advance (a trace with a fixed budget),
        else ``None`` (then no time estimate is shown, or a bound when ``bound`` is set).
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
    algebra), on ``KeyboardInterrupt`` and on ``SIGTERM``; a finished run deletes the file.

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
    and optionally :meth:`progress`. Their fields must be plain Python values (ints, floats,
    strings, dtypes), since the configuration is hashed by ``jax.jit`` and its ``repr`` is
    part of a checkpoint's fingerprint.
    """

    name: ClassVar[str] = "algorithm"

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
    vs = jax.tree_util.tree_map(lambda x, lk: x.astype(jnp.result_type(lk)), vs, op.like)
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


_run_compiled = jax.jit(_run_compiled_impl, static_argnums=0)
_prepare = jax.jit(lambda alg, op, s, p: alg.prepare(op, s, p), static_argnums=(0, 3))
_update = jax.jit(
    lambda alg, op, s, p, vs, avs: alg.update(op, s, p, vs, avs), static_argnums=(0, 3)
)
_finalize = jax.jit(lambda alg, op, s: alg.finalize(op, s), static_argnums=0)
_update_noprod = jax.jit(
    lambda alg, op, s, p, vs: alg.update(op, s, p, vs, None), static_argnums=(0, 3)
)


# ------------------------------------------------------------------------------------------------
# choosing a driver
# ------------------------------------------------------------------------------------------------
def resolve_driver(driver: str, *traced: Any, progress=None, checkpoint=None) -> str:
    """``"compiled"`` or ``"host"`` for ``driver`` (see the module docstring for ``"auto"``).

    Raises:
      ValueError: an unknown driver; ``"host"`` (or progress / a checkpoint) inside a JAX
        transformation.
    """
    if driver not in DRIVERS:
        raise ValueError(f"`driver` must be one of {DRIVERS}, got {driver!r}.")
    inside = tu.is_traced(*traced)
    if driver == "auto":
        driver = "compiled" if inside else "host"
    if inside and driver == "host":
        raise ValueError(
            "driver='host' cannot run inside jax.jit/jax.vmap (its loop runs in Python on "
            "concrete arrays); use driver='compiled' or 'auto' there, or call the algorithm "
            "outside the transformation."
        )
    if driver == "compiled" and checkpoint is not None:
        raise ValueError(
            "`checkpoint=` needs the host driver (a compiled loop cannot save its state); pass "
            "driver='host' (or 'auto' outside jax.jit)."
        )
    if driver == "compiled" and progress:
        raise ValueError(
            "`progress=True` needs the host driver (a compiled loop cannot report); pass "
            "driver='host' (or 'auto' outside jax.jit)."
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
):
    """Run ``alg`` from ``state`` on ``op`` to the end and return ``alg.finalize``'s output.

    Args:
      alg: the algorithm's configuration.
      op: the operator.
      state: the initial state (must hold ``"phase"``, ``"done"`` and ``"matvecs"``).
      driver: ``"auto"``, ``"compiled"`` or ``"host"`` (see the module docstring).
      progress: host driver only: show a progress display on stderr (``None``: when stderr is
        a terminal).
      checkpoint: host driver only: a path or a :class:`Checkpoint` to save and resume from.
      traced: further pytrees (e.g. the key) whose being traced selects the compiled driver.

    Returns:
      ``(output, driver)``: the finalized output and the driver that ran.
    """
    checkpoint = _as_checkpoint(checkpoint)
    chosen = resolve_driver(driver, op, state, *traced, progress=progress, checkpoint=checkpoint)
    if chosen == "compiled":
        return _run_compiled(alg, op, state), chosen
    return _run_host(alg, op, state, progress=progress, checkpoint=checkpoint), chosen


def _run_host(alg, op, state, *, progress, checkpoint: Checkpoint | None):
    fingerprint = _fingerprint(alg, op, state) if checkpoint is not None else None
    steps = 0
    if checkpoint is not None and Path(checkpoint.path).exists():
        state, steps = _load(checkpoint.path, state, fingerprint)
    show = _want_progress(progress)
    display = _Display(alg, enabled=show)
    last_saved = steps
    restore_sigterm = _catch_sigterm() if checkpoint is not None else None
    try:
        with display:
            while True:
                phase, done = (int(x) for x in jax.device_get((state["phase"], state["done"])))
                if done:
                    break
                if show:
                    display.update(jax.device_get(state))
                vs = _prepare(alg, op, state, phase)
                if alg.block_sizes[phase]:
                    avs = block_product(op, vs, alg.chunk_size)
                    state = _update(alg, op, state, phase, vs, avs)
                else:
                    state = _update_noprod(alg, op, state, phase, vs)
                steps += 1
                if checkpoint is not None and steps - last_saved >= checkpoint.every:
                    _save(checkpoint.path, state, fingerprint, steps)
                    last_saved = steps
            if show:
                display.update(jax.device_get(state))
    except BaseException:
        if checkpoint is not None and steps > last_saved:
            _save(checkpoint.path, state, fingerprint, steps)
            print(
                f"hvp: {alg.name} interrupted after {steps} steps; its state is saved in "
                f"{os.fspath(checkpoint.path)!r}: call it again with the same arguments to resume.",
                file=sys.stderr,
            )
        raise
    finally:
        if restore_sigterm is not None:
            restore_sigterm()
    out = _finalize(alg, op, state)
    if checkpoint is not None:
        Path(checkpoint.path).unlink(missing_ok=True)
    return out


class _Terminated(SystemExit):
    """SIGTERM turned into an exception so that the host driver can save its state."""


def _catch_sigterm() -> Callable[[], None] | None:
    """Turn SIGTERM into ``SystemExit(143)`` while a checkpointed run is in the main thread.

    Only when no handler is installed (a handler of the caller, e.g. ``hvp analyze``'s, wins).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):  # pragma: no cover - platform without SIGTERM
        return None
    if previous not in (signal.SIG_DFL, None):
        return None

    def handler(signum, frame):  # noqa: ARG001
        raise _Terminated(143)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------
# checkpoint files
# ------------------------------------------------------------------------------------------------
def _leaf_to_numpy(x):
    if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def _state_bytes_hash(state) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(state):
        a = _leaf_to_numpy(jax.device_get(leaf))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@jax.jit
def _checksums(children):
    return [
        jnp.stack([jnp.sum(x.astype(jnp.float32)), jnp.sum(jnp.abs(x).astype(jnp.float32))])
        if jnp.issubdtype(x.dtype, jnp.number)
        else jnp.zeros(2, jnp.float32)
        for x in jax.tree_util.tree_leaves(children)
    ]


def _operator_fingerprint(op: LinearOperator) -> str:
    leaves, treedef = jax.tree_util.tree_flatten(op)
    shapes = [(tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves]
    sums = np.asarray(jax.device_get(_checksums(leaves)) if leaves else [])
    h = hashlib.sha256(str((type(op).__name__, op.name, shapes)).encode())
    h.update(np.round(sums.astype(np.float64), 4).tobytes())
    return h.hexdigest()


def _fingerprint(alg, op, state) -> dict:
    return {
        "format": _FORMAT,
        "algorithm": alg.name,
        "settings": repr(alg),
        "initial_state": _state_bytes_hash(state),
        "operator": _operator_fingerprint(op),
    }


def _save(path, state, fingerprint: dict, steps: int) -> None:
    leaves = jax.tree_util.tree_leaves(jax.device_get(state))
    arrays = {f"leaf_{i}": _leaf_to_numpy(x) for i, x in enumerate(leaves)}
    meta = dict(fingerprint, steps=steps)
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.asarray(json.dumps(meta)), **arrays)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def _load(path, init_state, fingerprint: dict):
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            arrays = [data[f"leaf_{i}"] for i in range(len(data.files) - 1)]
    except Exception as err:
        raise CheckpointMismatchError(
            f"Cannot read the checkpoint {os.fspath(path)!r} ({type(err).__name__}: {err}); "
            "delete it to start afresh."
        ) from err
    for field in ("format", "algorithm", "settings", "initial_state", "operator"):
        if meta.get(field) != fingerprint[field]:
            what = {
                "format": "was written by another version of the file format",
                "algorithm": f"is of {meta.get('algorithm')!r}, not {fingerprint['algorithm']!r}",
                "settings": "has other settings (k, tol, num_iters, ...)",
                "initial_state": "started from another key or start vector",
                "operator": "is of another operator (its parameters or data changed)",
            }[field]
            raise CheckpointMismatchError(
                f"The checkpoint {os.fspath(path)!r} {what}, so it cannot resume this run. "
                "Delete it (or pass another path) to start afresh."
            )
    leaves, treedef = jax.tree_util.tree_flatten(init_state)
    if len(arrays) != len(leaves):  # pragma: no cover - guarded by the fingerprint
        raise CheckpointMismatchError(f"The checkpoint {os.fspath(path)!r} has another state.")
    restored = []
    for a, ref in zip(arrays, leaves, strict=True):
        if jax.dtypes.issubdtype(jnp.result_type(ref), jax.dtypes.prng_key):
            x = jax.random.wrap_key_data(a, impl=jax.random.key_impl(ref))
        else:
            x = jnp.asarray(a, dtype=ref.dtype)
        sharding = getattr(ref, "sharding", None)
        restored.append(jax.device_put(x, sharding) if sharding is not None else x)
    return jax.tree_util.tree_unflatten(treedef, restored), int(meta.get("steps", 0))


# ------------------------------------------------------------------------------------------------
# progress display (rich)
# ------------------------------------------------------------------------------------------------
def _want_progress(progress) -> bool:
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)()) and not os.environ.get("CI")
    if not isinstance(progress, bool):
        raise TypeError(f"`progress` must be True, False or None, got {progress!r}.")
    return progress


class _Display:
    """A one-line rich progress bar: products, the algorithm's text, elapsed and time left."""

    def __init__(self, alg: StateMachine, *, enabled: bool):
        self.alg = alg
        self.enabled = enabled
        self._progress = None
        self._task = None
        self._t0 = time.perf_counter()

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._progress = RichProgress(
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
            self._progress.__enter__()
            self._task = self._progress.add_task(self.alg.name, total=None, text="")
        return self

    def update(self, host_state) -> None:
        if self._progress is None:
            return
        info = self.alg.progress(host_state)
        self._progress.update(self._task, completed=info.matvecs, total=info.total, text=info.text)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False
