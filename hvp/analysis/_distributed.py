"""``hvp analyze`` on several hosts: the distributed runtime, global arrays, one writer.

The same command runs on every host (process). :func:`initialize` starts JAX's distributed
runtime (``jax.distributed.initialize``) from the standard environment before any JAX
computation; the analysis then runs the same SPMD programs on every process:

* every process reads the whole checkpoint (read-only) into host memory and places the model's
  variables **replicated** over the global mesh (:func:`replicate`: each device holds a copy of
  the parameters, as in data-parallel training);
* every process loads the data spec and keeps only **its own rows** of each batch
  (:func:`shard_batches`): rows ``[i b / P, (i + 1) b / P)`` of a batch of ``b`` examples on
  process ``i`` of ``P``, made a global array over the 1-D mesh ``("data",)`` of all devices with
  ``jax.make_array_from_process_local_data``; every batch needs a multiple of the global device
  count of examples;
* the algorithms' host drivers run the same Python loop around the same compiled programs on
  every process (JAX's runtime moves the data; there is no hand-written communication);
* process 0 alone shows progress and writes the report and the plots (atomically); the others
  write nothing.

Steps that read files or check settings on one process at a time run inside :func:`agreed`: when
any process fails there, every process stops with an error (the failing one with its own, the
others naming it) instead of waiting forever in the next collective program.

Examples:
  >>> from hvp.analysis._distributed import wanted
  >>> wanted(None, environ={})  # auto: only when the launch variables are set
  False
  >>> wanted(None, environ={"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "2",
  ...                       "JAX_PROCESS_ID": "0"})
  True
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from hvp.analysis._errors import AnalysisError

__all__ = [
    "ENV_VARS",
    "wanted",
    "launch_settings",
    "initialize",
    "is_multiprocess",
    "is_writer",
    "agreed",
    "data_mesh",
    "replicate",
    "shard_batches",
    "replicate_restored",
]

#: The launch variables: the coordinator's ``host:port``, the number of processes, this one's id.
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

_HOW = (
    "set all three on every host (the same JAX_COORDINATOR_ADDRESS=host0:port and "
    "JAX_NUM_PROCESSES=N everywhere, JAX_PROCESS_ID=0..N-1, one per host), or none of them and "
    "pass --distributed on a cluster JAX detects (SLURM, Open MPI, Cloud TPU)"
)


def wanted(flag: bool | None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Whether to start the distributed runtime (``hvp analyze --distributed``).

    ``flag`` (``--distributed`` / ``--no-distributed``) decides; when it is ``None`` (the
    default), the runtime starts when any of :data:`ENV_VARS` is set.

    Examples:
      >>> from hvp.analysis._distributed import wanted
      >>> wanted(True, environ={}), wanted(False, environ={"JAX_NUM_PROCESSES": "2"})
      (True, False)
    """
    if flag is not None:
        return bool(flag)
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in ENV_VARS)


def launch_settings(environ: Mapping[str, str] | None = None) -> dict:
    """The keywords of ``jax.distributed.initialize`` from :data:`ENV_VARS` (``{}`` if none is set).

    Raises:
      AnalysisError: some but not all of the variables are set, or a number is not a valid
        process count / id.

    Examples:
      >>> from hvp.analysis._distributed import launch_settings
      >>> launch_settings({"JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "2",
      ...                  "JAX_PROCESS_ID": "1"})
      {'coordinator_address': 'host0:1234', 'num_processes': 2, 'process_id': 1}
      >>> launch_settings({"JAX_NUM_PROCESSES": "2"})
      Traceback (most recent call last):
      ...
      hvp.analysis._errors.AnalysisError: Several hosts: JAX_NUM_PROCESSES is set but JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID are not; set all three on every host (the same JAX_COORDINATOR_ADDRESS=host0:port and JAX_NUM_PROCESSES=N everywhere, JAX_PROCESS_ID=0..N-1, one per host), or none of them and pass --distributed on a cluster JAX detects (SLURM, Open MPI, Cloud TPU).
    """
    env = os.environ if environ is None else environ
    given = [name for name in ENV_VARS if env.get(name)]
    if not given:
        return {}
    missing = [name for name in ENV_VARS if name not in given]
    if missing:
        raise AnalysisError(
            f"Several hosts: {', '.join(given)} {'is' if len(given) == 1 else 'are'} set but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; {_HOW}."
        )
    address = env["JAX_COORDINATOR_ADDRESS"]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise AnalysisError(
            f"Several hosts: JAX_COORDINATOR_ADDRESS={address!r} must be 'host:port' (the address "
            "of process 0 and a free port, the same on every host)."
        )
    try:
        count = int(env["JAX_NUM_PROCESSES"])
        pid = int(env["JAX_PROCESS_ID"])
    except ValueError:
        raise AnalysisError(
            f"Several hosts: JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and "
            f"JAX_PROCESS_ID={env['JAX_PROCESS_ID']!r} must be integers."
        ) from None
    if count < 1 or not 0 <= pid < count:
        raise AnalysisError(
            f"Several hosts: JAX_PROCESS_ID={pid} must be in 0..{count - 1} "
            f"(JAX_NUM_PROCESSES={count}), one id per host."
        )
    return {"coordinator_address": address, "num_processes": count, "process_id": pid}


def initialize(flag: bool | None = None, *, environ: Mapping[str, str] | None = None) -> bool:
    """Start JAX's distributed runtime for ``hvp analyze`` when :func:`wanted`; return whether it runs.

    Call it before any JAX computation. The launch variables (:data:`ENV_VARS`) give the
    coordinator, the process count and this process's id; without them JAX detects the cluster
    (``jax.distributed.initialize()``'s auto-detection). CPU collectives use gloo unless another
    implementation was configured. A runtime already started (by the caller) is kept.

    Raises:
      AnalysisError: half-set or invalid variables (:func:`launch_settings`), no cluster found,
        JAX already computing in this process, or the runtime failing to start (for example the
        coordinator unreachable within ``JAX_DISTRIBUTED_TIMEOUT`` seconds, default 300).

    Examples:
      >>> from hvp.analysis._distributed import initialize
      >>> initialize(False)  # --no-distributed: nothing starts
      False
    """
    env = os.environ if environ is None else environ
    if not wanted(flag, environ=env):
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    kwargs = launch_settings(env)
    timeout = env.get("JAX_DISTRIBUTED_TIMEOUT", "")
    if timeout:
        if not timeout.isdigit() or int(timeout) < 1:
            raise AnalysisError(
                f"JAX_DISTRIBUTED_TIMEOUT={timeout!r} must be a positive number of seconds."
            )
        kwargs["initialization_timeout"] = int(timeout)
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):  # type: ignore[attr-defined]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:
        text = str(e).strip().splitlines()
        line = text[0] if text else type(e).__name__
        if not kwargs or set(kwargs) == {"initialization_timeout"}:
            raise AnalysisError(
                f"--distributed: JAX found no cluster to join ({type(e).__name__}: {line}); {_HOW}."
            ) from e
        raise AnalysisError(
            f"Several hosts: the distributed runtime did not start ({type(e).__name__}: {line}). "
            f"Check that process 0 runs and that {kwargs['coordinator_address']} is reachable "
            "from every host with the same JAX_NUM_PROCESSES; JAX computations must not run "
            "before it starts."
        ) from e
    return True


def is_multiprocess() -> bool:
    """Whether this JAX program spans several processes (``jax.process_count() > 1``).

    Examples:
      >>> from hvp.analysis._distributed import is_multiprocess
      >>> is_multiprocess()
      False
    """
    import jax

    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process shows progress and writes the outputs (process 0).

    Examples:
      >>> from hvp.analysis._distributed import is_writer
      >>> is_writer()
      True
    """
    import jax

    return jax.process_index() == 0


@contextlib.contextmanager
def agreed(what: str) -> Iterator[None]:
    """Run the block on every process; if it raises on any, raise on every one.

    The block must not run collective programs (it reads files, checks settings). With one
    process it is a plain block. With several, each process reports success or failure to all
    (one small all-gather) after the block: a process whose block failed raises its own error,
    the others an :class:`AnalysisError` naming the failed processes, so that none waits in a
    later collective for a process that has stopped. ``KeyboardInterrupt`` is not held back.

    Examples:
      >>> from hvp.analysis._distributed import agreed
      >>> with agreed("reading the data"):  # one process: the block as it is
      ...     x = 1 + 1
      >>> x
      2
    """
    if not is_multiprocess():
        yield
        return
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    error: Exception | None = None
    try:
        yield
    except Exception as e:  # reported to the others below, then raised
        error = e
    flags = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
    if error is not None:
        raise error
    failed = [int(i) for i in np.flatnonzero(flags.reshape(-1))]
    if failed:
        names = ", ".join(map(str, failed))
        raise AnalysisError(
            f"Process{'es' if len(failed) > 1 else ''} {names} of {jax.process_count()} failed "
            f"while {what} (see {'their' if len(failed) > 1 else 'its'} error); process "
            f"{jax.process_index()} stops too."
        )


def data_mesh():
    """The 1-D mesh ``("data",)`` of every device of every process (JAX chooses the layouts).

    Examples:
      >>> from hvp.analysis._distributed import data_mesh
      >>> data_mesh().axis_names
      ('data',)
    """
    import jax
    from jax.sharding import AxisType

    return jax.make_mesh(
        (jax.device_count(),), ("data",), devices=jax.devices(), axis_types=(AxisType.Auto,)
    )


def replicate(tree, mesh):
    """Every array leaf of ``tree`` as a global array replicated over ``mesh``.

    Each process passes the same host values (every process read the same checkpoint).

    Examples:
      >>> import jax.numpy as jnp
      >>> from hvp.analysis._distributed import data_mesh, replicate
      >>> replicate({"w": jnp.ones(2)}, data_mesh())["w"].sharding.is_fully_replicated
      True
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P())

    def put(x):
        return jax.device_put(x, sharding) if isinstance(x, jax.Array | np.ndarray) else x

    return jax.tree_util.tree_map(put, tree)


def shard_batches(batches: list, mesh) -> list:
    """Each batch as global arrays over ``mesh``'s ``"data"`` axis, from this process's own rows.

    Every process holds the same batches (it loaded the same data spec); process ``i`` of ``P``
    passes rows ``[i b / P, (i + 1) b / P)`` of a batch of ``b`` examples to
    ``jax.make_array_from_process_local_data``, so the global batch is the original one.

    Raises:
      AnalysisError: a batch whose number of examples is not a multiple of the global device
        count (the examples cannot be split evenly over the devices), naming the fix.

    Examples:
      >>> import numpy as np
      >>> from hvp.analysis._distributed import data_mesh, shard_batches
      >>> (x,) = shard_batches([np.arange(4.0)], data_mesh())
      >>> x.shape, tuple(x.sharding.spec)
      ((4,), ('data',))
    """
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = mesh.devices.size
    nproc, pid = jax.process_count(), jax.process_index()
    out = []
    for i, batch in enumerate(batches):
        leaves = jax.tree_util.tree_leaves(batch)
        size = int(np.shape(leaves[0])[0])
        if size % devices:
            raise AnalysisError(
                f"Batch {i} has {size} examples, which cannot be split evenly over the "
                f"{devices} devices of the {nproc} process{'es' if nproc > 1 else ''}: choose a "
                f"--batch-size that is a multiple of {devices}, and --num-batches to leave out a "
                "smaller last batch (or a data set whose size is such a multiple)."
            )
        per = size // nproc
        rows = slice(pid * per, (pid + 1) * per)

        def place(a, rows=rows):
            a = np.asarray(a)
            spec = P("data", *([None] * (a.ndim - 1)))
            return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), a[rows])

        out.append(jax.tree_util.tree_map(place, batch))
    return out


def replicate_restored(restored, mesh):
    """A :class:`~hvp.analysis._checkpoint.RestoredModel` with its variables :func:`replicate`\\ d.

    NNX: the module's whole state (parameters, statistics, RNG state) is replaced in place by
    global copies; Linen: the variables dict.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from hvp.analysis._checkpoint import RestoredModel
      >>> from hvp.analysis._distributed import data_mesh, replicate_restored
      >>> r = RestoredModel(kind="nnx", model=nnx.Linear(2, 1, rngs=nnx.Rngs(0)), variables=None,
      ...                   restored=(), ignored=())
      >>> replicate_restored(r, data_mesh()).model.kernel[...].sharding.is_fully_replicated
      True
    """
    import dataclasses

    if restored.kind == "nnx":
        from flax import nnx

        nnx.update(restored.model, replicate(nnx.state(restored.model), mesh))
        return restored
    return dataclasses.replace(restored, variables=replicate(restored.variables, mesh))
