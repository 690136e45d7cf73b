r"""A curvature monitor for training loops: sharpness and trace every few steps.

Edge-of-stability theory (Cohen et al., 2021, *Gradient Descent on Neural
Networks Typically Occurs at the Edge of Stability*) says that full-batch
gradient descent with learning rate :math:`\eta` drives the sharpness (the top
Hessian eigenvalue :math:`\lambda_1`) up to about :math:`2/\eta`, where the
quadratic model of the loss stops being stable along the top eigenvector; the
trace :math:`\operatorname{tr} H` tracks the overall curvature (Jastrzebski et
al., 2020). :class:`CurvatureMonitor` measures both on a fixed probe data set
at scheduled steps of an existing training loop:

* top-``k`` eigenvalues by thick-restart Lanczos (:func:`hvp.linalg.eigsh`),
  warm-started from the previous evaluation's eigenvectors (the top
  eigenvectors change slowly between nearby steps, so Lanczos reaches the
  tolerance in fewer products);
* the trace by Hutchinson's estimator (:func:`hvp.linalg.trace`) with its
  standard error;
* optionally the spectral density (:func:`hvp.linalg.spectral_density`) at
  chosen steps.

Records go to ``history.jsonl`` (one JSON object per line, flushed as written,
so an interrupted run keeps every finished evaluation) and ``history.csv``.
Lines are appended: a crash in the middle of a write can at worst leave a
partial last line, which :func:`read_history` skips. Plots and density files
are written atomically (temporary file + rename).

Model state: with :meth:`CurvatureMonitor.from_flax`, every call
``monitor(step, model_or_train_state)`` takes the parameters *and* the
non-parameter state (BatchNorm statistics, other NNX variables, Linen
collections other than ``params``) from what it is given, so the curvature is
that of the model as it is at that step. Given only parameters for a model
with such state, the monitor warns once (:class:`hvp.flax.StaleStateWarning`).

Errors: an evaluation that fails raises :class:`MonitorError` saying at which
step and in which part (``on_error="raise"``, the default), or, with
``on_error="warn"``, emits a :class:`MonitorWarning`, is listed in
:attr:`CurvatureMonitor.failures` and lets training continue.

Usage with optax::

    monitor = hvp.CurvatureMonitor.from_loss(loss_fn, probe_batch, every=10, key=jax.random.key(0),
                                             learning_rate=lr, output_dir="runs/curv")
    for step in range(num_steps):
        params, opt_state = train_step(params, opt_state, batch)   # jitted
        monitor(step, params)
    monitor.plot("runs/curv/sharpness.png")
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import linalg as _linalg
from hvp import operators as _ops
from hvp import tree as tu
from hvp._io import atomic_write_text, check_writable_dir
from hvp.linalg import resolve_trace_method
from hvp.linalg._checks import check_finite_float, check_int, check_key
from hvp.typing import PRNGKey

__all__ = [
    "CurvatureMonitor",
    "MonitorError",
    "MonitorRecord",
    "MonitorSummary",
    "MonitorWarning",
    "extract_params",
    "read_history",
]

_ON_ERROR = ("raise", "warn")


class MonitorError(RuntimeError):
    """An evaluation of :class:`CurvatureMonitor` failed; the message says at which step and where.

    The original exception is chained (``__cause__``).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.monitor import MonitorError
      >>> def loss(w, x):
      ...     return jnp.mean((x @ w) ** 2)
      >>> monitor = hvp.CurvatureMonitor.from_loss(loss, jnp.eye(2), trace=False, key=jax.random.key(0))
      >>> try:
      ...     monitor.update(0, jnp.array([jnp.nan, 1.0]))  # a diverged run
      ... except MonitorError as err:
      ...     print(str(err)[:71])
      CurvatureMonitor: the evaluation at step 0 failed while building the cu
    """


class MonitorWarning(RuntimeWarning):
    """An evaluation of :class:`CurvatureMonitor` failed and ``on_error="warn"`` let training go on.

    Examples:
      >>> import warnings, jax, jax.numpy as jnp, hvp
      >>> def loss(w, x):
      ...     return jnp.mean((x @ w) ** 2)
      >>> monitor = hvp.CurvatureMonitor.from_loss(loss, jnp.eye(2), trace=False, on_error="warn",
      ...                                          key=jax.random.key(0))
      >>> with warnings.catch_warnings():
      ...     warnings.simplefilter("ignore")
      ...     monitor.update(3, jnp.array([jnp.nan, 1.0])) is None
      True
      >>> [step for step, message in monitor.failures]
      [3]
    """


def read_history(path) -> list[dict]:
    """The records of a monitor's ``history.jsonl``, as dicts, skipping a partial last line.

    Lines are appended one per evaluation; a run killed while writing can leave
    an incomplete last line, which is skipped. A malformed line elsewhere is an
    error (the file is not a monitor history).

    Raises:
      ValueError: a line other than the last is not valid JSON (naming the line).

    Examples:
      >>> import os, tempfile
      >>> from hvp.monitor import read_history
      >>> path = os.path.join(tempfile.mkdtemp(), "history.jsonl")
      >>> _ = open(path, "w").write('{"step": 0}\\n{"step": 10}\\n{"step": 2')  # cut mid-write
      >>> [r["step"] for r in read_history(path)]
      [0, 10]
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # no newline after it: a partial last line
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({err}).") from None
    return out


@tu.result
class MonitorRecord:
    """One evaluation of the monitor.

    Attributes:
      step: training step.
      eigenvalues: top-``k`` eigenvalues, descending (``eigenvalues[0]`` is the sharpness).
      residuals: ``||A v - lambda v||`` of each pair, same order.
      converged: whether each pair met the tolerance.
      trace: Hutchinson estimate of the trace (``None`` when ``trace=False``).
      trace_std_error: its standard error (``None`` when ``trace=False``).
      eig_matvecs: operator products used by Lanczos.
      trace_matvecs: products used by the trace estimate.
      density_matvecs: products used by the spectral density (0 if not computed).
      num_matvecs: total products of this evaluation.
      cold_matvecs: products a cold-started Lanczos needed at the same point
        (only with ``measure_cold_start=True``; else ``None``).
      negative_mass: fraction of spectral mass below zero (only at density steps).
      lr_threshold: ``2 / learning_rate`` at this step (``None`` without a learning rate).
      seconds: wall-clock seconds spent in this evaluation.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> def loss_fn(params, batch):  # least squares: the Hessian is diag(1, 4)
        ...     x, y = batch
        ...     return jnp.mean((x @ params["w"] - y) ** 2)
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
        >>> monitor = hvp.CurvatureMonitor.from_loss(loss_fn, batch, every=10, trace=False, key=jax.random.PRNGKey(0))
        >>> record = monitor(0, {"w": jnp.zeros(2)})
        >>> record.step, record.eigenvalues.round(4), bool(record.converged.all())
        (0, array([4.]), True)
    """

    step: int
    eigenvalues: Any
    residuals: Any
    converged: Any
    trace: Any
    trace_std_error: Any
    eig_matvecs: int
    trace_matvecs: int
    density_matvecs: int
    num_matvecs: int
    cold_matvecs: Any
    negative_mass: Any
    lr_threshold: Any
    seconds: float

    @property
    def sharpness(self) -> float:
        """The top eigenvalue."""
        return float(np.asarray(self.eigenvalues)[0])


@tu.result
class MonitorSummary:
    """Cost and warm-start accounting of a monitored run (:meth:`CurvatureMonitor.summary`).

    Attributes:
      num_evaluations: evaluations recorded.
      seconds: wall-clock seconds spent in the monitor.
      first_seconds: seconds of the first evaluation, which includes compiling
        the matvec, Lanczos and the estimators (later ones reuse the compiled code).
      train_seconds: the total training time given to :meth:`~CurvatureMonitor.summary` (or ``None``).
      overhead: ``seconds / train_seconds`` (or ``None``).
      overhead_after_first: ``(seconds - first_seconds) / (train_seconds - first_seconds)``,
        the steady-state fraction once the monitor is compiled (or ``None``).
      num_matvecs: products used by all evaluations.
      eig_matvecs: products used by Lanczos (warm-started after the first evaluation).
      cold_eig_matvecs: products cold-started Lanczos needed at the same points
        (``None`` unless ``measure_cold_start=True``).
      warm_start_savings: ``1 - eig_matvecs / cold_eig_matvecs`` (``None`` unless measured).
      max_sharpness: largest top eigenvalue seen.
      final_sharpness: top eigenvalue of the last evaluation.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> def loss_fn(params, batch):  # least squares: the Hessian is diag(1, 4)
        ...     x, y = batch
        ...     return jnp.mean((x @ params["w"] - y) ** 2)
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
        >>> monitor = hvp.CurvatureMonitor.from_loss(loss_fn, batch, every=10, trace=False, key=jax.random.PRNGKey(0))
        >>> _ = monitor(0, {"w": jnp.zeros(2)})
        >>> s = monitor.summary()
        >>> s.num_evaluations, round(s.max_sharpness, 4)
        (1, 4.0)
    """

    num_evaluations: int
    seconds: float
    first_seconds: Any
    train_seconds: Any
    overhead: Any
    overhead_after_first: Any
    num_matvecs: int
    eig_matvecs: int
    cold_eig_matvecs: Any
    warm_start_savings: Any
    max_sharpness: Any
    final_sharpness: Any


def extract_params(obj):
    """The parameter pytree of whatever a training loop holds.

    Accepts a plain pytree of arrays, an ``nnx.Module`` (its ``nnx.Param``
    state as a plain dict), an ``nnx.State`` (e.g. ``nnx.state(model,
    nnx.Param)``), or any object with a ``params`` attribute (a Linen /
    ``flax.training`` ``TrainState``, ``nnx.Optimizer``-like wrappers);
    ``FrozenDict`` becomes ``dict``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from hvp.monitor import extract_params
        >>> sorted(extract_params(nnx.Linear(2, 1, rngs=nnx.Rngs(0))))  # an NNX module's nnx.Param state
        ['bias', 'kernel']
        >>> extract_params({"w": jnp.ones(2)})  # a plain pytree passes through
        {'w': Array([1., 1.], dtype=float64)}
    """
    try:  # optional dependency
        from flax import nnx
    except ImportError:  # pragma: no cover
        nnx = None
    if nnx is not None and isinstance(obj, (nnx.Module, nnx.State)):
        from hvp.flax import nnx_params

        return nnx_params(obj)
    if not isinstance(obj, (dict, list, tuple)) and hasattr(obj, "params"):
        obj = obj.params
        if nnx is not None and isinstance(obj, (nnx.Module, nnx.State)):
            from hvp.flax import nnx_params

            return nnx_params(obj)
    try:
        from flax.core import FrozenDict, unfreeze

        if isinstance(obj, FrozenDict):
            obj = unfreeze(obj)
    except ImportError:  # pragma: no cover
        pass
    return obj


def _ignored_state(obj) -> list[str]:
    """Non-parameter state that ``obj`` carries and a loss of the parameters alone cannot see.

    NNX modules: variables that are neither ``nnx.Param`` nor RNG state (BatchNorm
    statistics, custom variables); ``TrainState``-like dataclasses: fields holding
    arrays other than the standard ``step``, ``params``, ``opt_state`` (e.g.
    ``batch_stats``).
    """
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return []
    if isinstance(obj, nnx.Module):
        other = nnx.state(obj, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))
        return ["/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(other)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type) and hasattr(obj, "params"):
        standard = {"step", "apply_fn", "params", "tx", "opt_state"}
        return [
            f.name
            for f in dataclasses.fields(obj)
            if f.name not in standard
            and any(
                isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(getattr(obj, f.name))
            )
        ]
    return []


def _after_first(seconds, first, total):
    rest = float(total) - (first or 0.0)
    return (seconds - (first or 0.0)) / rest if rest > 0 else None


def _lr_at(learning_rate, step):
    """``2 / lr`` at ``step`` (``None`` without a learning rate or where ``lr <= 0``).

    A schedule is called as optax calls it, with the step count as a ``jnp``
    int32 array (``optax.join_schedules`` and rsqrt schedules evaluate every
    branch, e.g. ``0 ** -0.5``, which a Python int turns into ZeroDivisionError).
    """
    if learning_rate is None:
        return None
    if callable(learning_rate):
        lr = float(learning_rate(jnp.asarray(step, dtype=jnp.int32)))
    else:
        lr = float(learning_rate)
    return 2.0 / lr if lr > 0 and np.isfinite(lr) else None


class CurvatureMonitor:
    r"""Tracks the top Hessian (or GGN / Fisher) eigenvalues and trace during training.

    Build it with :meth:`from_loss` (a loss ``loss_fn(params, batch)`` and a
    probe batch), :meth:`from_flax` (a :class:`hvp.flax.FlaxProblem`), or
    directly from ``operator_fn(params) -> LinearOperator``. Then call
    ``monitor(step, params)`` after each training step: it evaluates at the
    scheduled steps and returns a :class:`MonitorRecord` there, ``None``
    elsewhere (a cheap integer check).

    ``params`` may be a pytree, an NNX module, ``nnx.state(model, nnx.Param)``
    or a ``TrainState`` (see :func:`extract_params`). Parameters returned by a
    ``jax.jit``-compiled train step are concrete arrays and can be passed as
    they are. The operator's matvec and Lanczos are compiled once and reused at
    every evaluation (the parameters are arguments, not constants).

    Args:
      operator_fn: ``params -> LinearOperator`` (e.g.
        ``lambda p: hvp.hessian(loss_fn, p, probe_data)``).
      every: evaluate when ``step % every == 0`` (default 100 unless ``steps``
        is given).
      steps: explicit steps to evaluate at (instead of or with ``every``).
      k: number of top eigenvalues.
      tol: Lanczos residual tolerance relative to each eigenvalue
        (``||r_i|| <= tol * |lambda_i|``, floored at round-off; ``1e-4``:
        eigenvalue error about ``tol^2 * lambda / gap``, far below what a plot
        shows; reachable in float32).
      num_iters: passed to :func:`hvp.linalg.eigsh`.
      max_restarts: passed to :func:`hvp.linalg.eigsh`.
      warm_start: start Lanczos from the previous evaluation's eigenvectors.
      measure_cold_start: also run a cold-started Lanczos at every evaluation
        (not counted in :attr:`seconds`) to measure the warm-start savings
        (diagnostics; doubles the Lanczos cost).
      trace: also estimate the trace (Hutchinson, ``trace_matvecs`` probes).
      trace_matvecs: passed to :func:`hvp.linalg.trace`.
      trace_method: passed to :func:`hvp.linalg.trace`.
      density_steps: steps at which to also compute the spectral density
        (stored in :attr:`densities`, its negative mass in the record).
      density_probes: passed to :func:`hvp.linalg.spectral_density`.
      density_iters: passed to :func:`hvp.linalg.spectral_density`.
      key: a JAX PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``), required
        as by every algorithm; each evaluation uses ``fold_in(key, step)`` (deterministic).
      output_dir: if given, ``history.jsonl`` and ``history.csv`` are written
        there (overwritten by a new monitor), one line per evaluation,
        flushed immediately; densities go to ``density_step<N>.json``.
      callback: ``callback(record)`` after each evaluation (for a logger).
      learning_rate: float or schedule ``step -> lr`` (an optax schedule: it
        is called with a ``jnp`` int32 step, as optax does); records and plots
        the edge-of-stability threshold ``2 / lr`` of (full-batch) gradient
        descent. With adaptive optimisers (Adam) that line is not the stability
        limit of the raw Hessian and is usually far above it: the plot scales to
        the measured eigenvalues and draws the line only where it is in range.
      verbose: print one line per evaluation.
      on_error: ``"raise"`` (default): a failed evaluation raises
        :class:`MonitorError` naming the step and what failed (the eigenvalue
        solver, the trace, the schedule, writing files, the callback, ...), with
        the original exception chained. ``"warn"``: it emits a
        :class:`MonitorWarning` with the same message, appends ``(step,
        message)`` to :attr:`failures` and returns ``None``, so the training
        loop goes on.

    Raises:
      ValueError, TypeError: invalid options (at construction).
      MonitorError: an evaluation failed (``on_error="raise"``).

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> def loss(p, batch):
      ...     return jnp.mean((batch[0] @ p["w"] - batch[1]) ** 2)
      >>> batch = (jnp.eye(3), jnp.ones(3))
      >>> monitor = hvp.CurvatureMonitor.from_loss(loss, batch, every=10, trace=False, key=jax.random.key(0))
      >>> record = monitor(0, {"w": jnp.zeros(3)})
      >>> round(record.sharpness, 4), monitor(5, {"w": jnp.zeros(3)}) is None
      (0.6667, True)
    """

    def __init__(
        self,
        operator_fn: Callable,
        *,
        every: int | None = None,
        steps: Iterable[int] | None = None,
        k: int = 1,
        tol: float = 1e-4,
        num_iters: int | None = None,
        max_restarts: int = 30,
        warm_start: bool = True,
        measure_cold_start: bool = False,
        trace: bool = True,
        trace_matvecs: int = 30,
        trace_method: str = "hutchinson",
        density_steps: Iterable[int] = (),
        density_probes: int = 4,
        density_iters: int = 40,
        key: PRNGKey,
        output_dir: str | os.PathLike | None = None,
        callback: Callable | None = None,
        learning_rate=None,
        verbose: bool = False,
        on_error: str = "raise",
        like=None,
    ):
        if not callable(operator_fn):
            raise TypeError(
                "`operator_fn` must be a callable params -> LinearOperator; use "
                "CurvatureMonitor.from_loss(loss_fn, probe_data) for a loss function."
            )
        if every is None and steps is None:
            every = 100
        # Every option is checked here, not at the first evaluation (from_loss and from_flax
        # pass theirs through this constructor).
        if every is not None:
            every = check_int("every", every, minimum=1)
        steps = None if steps is None else [check_int("steps", s, minimum=0) for s in steps]
        density_steps = [check_int("density_steps", s, minimum=0) for s in density_steps]
        k = check_int("k", k, minimum=1)
        tol = check_finite_float(
            "tol", tol, hint="It is the Lanczos residual tolerance per eigenvalue (e.g. 1e-4)."
        )
        if num_iters is not None:
            num_iters = check_int(
                "num_iters", num_iters, minimum=k, hint="It must be at least `k` (or None)."
            )
        max_restarts = check_int("max_restarts", max_restarts, minimum=0)
        if trace:
            method, least = resolve_trace_method(trace_method, argument="trace_method")
            trace_matvecs = check_int(
                "trace_matvecs",
                trace_matvecs,
                minimum=max(2, least),
                hint="At least 2 probes give a standard error.",
            )
        density_probes = check_int("density_probes", density_probes, minimum=1)
        density_iters = check_int("density_iters", density_iters, minimum=1)
        check_key(key)
        if on_error not in _ON_ERROR:
            raise ValueError(f"`on_error` must be 'raise' or 'warn', got {on_error!r}.")
        if callback is not None and not callable(callback):
            raise TypeError("`callback` must be a callable record -> None.")
        if learning_rate is not None and not callable(learning_rate):
            learning_rate = check_finite_float(
                "learning_rate",
                learning_rate,
                positive=True,
                hint="Give a float or a schedule step -> lr.",
            )
        self.operator_fn = operator_fn
        self.every = None if every is None else int(every)
        self.steps = None if steps is None else frozenset(steps)
        self.density_steps = frozenset(density_steps)
        self.k = k
        self.tol = tol
        self.num_iters = num_iters
        self.max_restarts = int(max_restarts)
        self.warm_start = bool(warm_start)
        self.measure_cold_start = bool(measure_cold_start)
        self.trace = bool(trace)
        self.trace_matvecs = int(trace_matvecs)
        self.trace_method = trace_method
        self.density_probes = int(density_probes)
        self.density_iters = int(density_iters)
        self.key = key
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        if self.output_dir is not None:  # fail now, not after the first evaluation
            check_writable_dir(self.output_dir, what="monitor output_dir")
        self.callback = callback
        self.learning_rate = learning_rate
        self.verbose = bool(verbose)
        self.on_error = on_error
        self.like = like
        #: ``(step, message)`` of every evaluation that failed with ``on_error="warn"``.
        self.failures: list[tuple[int, str]] = []
        self._problem = None  # a FlaxProblem (from_flax): parameters and state from each call
        self._state = None  # its non-parameter state at the current evaluation
        self._warned_state = False
        self.history: list[MonitorRecord] = []
        #: spectral densities computed at ``density_steps``: ``{step: SpectralDensity}``.
        self.densities: dict[int, Any] = {}
        #: wall-clock seconds spent in the monitor so far.
        self.seconds = 0.0
        self._vectors = None  # previous eigenvectors (warm start)
        self.operator_name = "operator"
        self._files_open = False

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_loss(
        cls, loss_fn: Callable, probe_data, *, kind: str = "hessian", operator_kwargs=None, **kwargs
    ) -> CurvatureMonitor:
        """Monitor the Hessian (``kind="hessian"``) or empirical Fisher of ``loss_fn(params, batch)``.

        ``probe_data`` is a fixed batch or list of batches (a few hundred
        examples usually suffice for the top eigenvalues); it is validated and
        stacked once. ``operator_kwargs`` go to :func:`hvp.hessian` /
        :func:`hvp.empirical_fisher` (e.g. ``{"wrt": "Dense_2"}``). Other
        keyword arguments are those of :class:`CurvatureMonitor`.
        """
        builders = {"hessian": _ops.hessian, "empirical_fisher": _ops.empirical_fisher}
        if kind not in builders:
            raise ValueError(
                f"from_loss supports kind='hessian' or 'empirical_fisher', got {kind!r}; for "
                "the GGN use from_flax(problem, ..., kind='ggn') or pass `operator_fn`."
            )
        if not callable(loss_fn):
            raise TypeError(
                f"`loss_fn` must be a callable loss_fn(params, batch), got {type(loss_fn).__name__}."
            )
        dataset = _ops.as_dataset(probe_data)
        build, okw = builders[kind], dict(operator_kwargs or {})

        def operator_fn(params):
            return build(loss_fn, params, dataset, **okw)

        return cls(operator_fn, **kwargs)

    @classmethod
    def from_flax(
        cls, problem, probe_data, *, kind: str = "hessian", operator_kwargs=None, **kwargs
    ) -> CurvatureMonitor:
        """Monitor a :class:`hvp.flax.FlaxProblem` (``kind`` = ``"hessian"``, ``"ggn"`` or ``"empirical_fisher"``).

        Call ``monitor(step, model)`` (NNX) or ``monitor(step, train_state)``
        (Linen ``TrainState``, or a variables dict): each evaluation takes the
        parameters and the non-parameter state (BatchNorm statistics, other NNX
        variables, Linen collections such as ``batch_stats``) from it, so it
        measures the model as it is at that step (see
        :meth:`hvp.flax.FlaxProblem.at`). Given only parameters
        (``state.params``) for a model with such state, the monitor warns once
        (:class:`hvp.flax.StaleStateWarning`) and uses the state it holds. The
        parameters and the state are arguments of the compiled products: the
        first evaluation compiles, later ones with the same shapes compile
        nothing.
        """
        if not hasattr(problem, "operator") or not hasattr(problem, "params"):
            raise TypeError(
                "from_flax expects a problem from hvp.flax.from_nnx / from_linen; for a plain "
                "loss use CurvatureMonitor.from_loss(loss_fn, probe_data)."
            )
        if isinstance(probe_data, Iterator):
            probe_data = list(probe_data)  # read once, used at every evaluation
        probe_data = jax.tree_util.tree_map(jnp.asarray, probe_data)  # on the device once
        dataset = _ops.as_dataset(probe_data)
        okw = dict(operator_kwargs or {})
        problem.operator(
            kind, dataset, **okw
        )  # validate kind and shapes now, not at the first step
        monitor = None

        def operator_fn(params):
            if monitor is None or not problem.has_state:
                return problem.operator(kind, dataset, params=params, **okw)
            # the state of this call is an argument of the compiled products: one compilation
            return problem.operator(kind, probe_data, params=params, state=monitor._state, **okw)

        kwargs.setdefault("like", problem.params)
        monitor = cls(operator_fn, **kwargs)
        monitor._problem = problem
        monitor._state = problem.state
        return monitor

    # ------------------------------------------------------------------ schedule
    def should_run(self, step: int) -> bool:
        """Whether ``step`` is scheduled (and not evaluated yet)."""
        step = int(step)
        if self.history and self.history[-1].step == step:
            return False
        scheduled = (self.every is not None and step % self.every == 0) or (
            self.steps is not None and step in self.steps
        )
        return scheduled or step in self.density_steps

    def maybe_update(self, step: int, params) -> MonitorRecord | None:
        """Evaluate if ``step`` is scheduled; return the record, else ``None``."""
        if not self.should_run(step):
            return None
        return self.update(step, params)

    __call__ = maybe_update

    # ------------------------------------------------------------------ evaluation
    def update(self, step: int, params) -> MonitorRecord | None:
        """Evaluate now at ``params`` (whatever the schedule) and record the result.

        Returns the record, or ``None`` when the evaluation failed with
        ``on_error="warn"``. Raises :class:`MonitorError` when it failed with
        ``on_error="raise"``.
        """
        step = int(step)
        where = ["reading the parameters passed to monitor(step, ...)"]
        try:
            record = self._evaluate(step, params, where)
        except Exception as err:  # noqa: BLE001 - reported with its cause, see on_error
            return self._failed(step, where[0], err)
        for what, act in (
            (f"writing the history files in {self.output_dir}", self._write),
            ("printing the record", self._print if self.verbose else None),
            ("running the callback", self.callback),
        ):
            if act is None:
                continue
            try:
                act(record)
            except Exception as err:  # noqa: BLE001
                self._failed(step, what, err)
        return record

    def _failed(self, step: int, what: str, err: Exception) -> None:
        msg = (
            f"CurvatureMonitor: the evaluation at step {step} failed while {what}: "
            f"{type(err).__name__}: {err}"
        )
        if self.on_error == "raise":
            raise MonitorError(
                msg + " (pass on_error='warn' to CurvatureMonitor to log such failures and "
                "continue training)"
            ) from err
        self.failures.append((step, msg))
        warnings.warn(MonitorWarning(msg), stacklevel=4)
        return None

    def _load(self, obj, where: list):
        """Parameters (and, for a Flax problem, the model state) from what the user passed."""
        if self._problem is None:
            names = [] if self._warned_state else _ignored_state(obj)
            if names:
                self._warned_state = True
                from hvp.flax import StaleStateWarning

                shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
                warnings.warn(
                    StaleStateWarning(
                        f"monitor(step, ...) got a model with non-parameter state ({shown}), but "
                        "this monitor evaluates a function of the parameters alone, which cannot "
                        "see that state: if the model reads it (BatchNorm statistics), build the "
                        "monitor with CurvatureMonitor.from_flax(hvp.flax.from_nnx/from_linen(...)) "
                        "so that it is taken from each call."
                    ),
                    stacklevel=5,
                )
            return extract_params(obj)
        where[0] = "reading the parameters and model state passed to monitor(step, ...)"
        params, state, missing = self._problem.split(obj)
        if missing and not self._warned_state:
            self._warned_state = True
            from hvp.flax import StaleStateWarning

            warnings.warn(
                StaleStateWarning(self._problem.stale_state_message(missing)), stacklevel=5
            )
        if state is not None:
            self._state = state
        return extract_params(params)

    def _evaluate(self, step: int, params, where: list) -> MonitorRecord:
        params = self._load(params, where)
        if self.like is not None:
            tu.assert_same_structure(
                params,
                self.like,
                name="params",
                like_name="the monitored model's parameters",
                check_dtype=False,
            )
        else:  # shapes only: the user's step may donate (delete) these buffers later
            self.like = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params
            )
        where[0] = "evaluating the learning rate (schedule) for 2/lr"
        lr_threshold = _lr_at(self.learning_rate, step)
        start = time.perf_counter()
        where[0] = "deriving the evaluation's PRNG keys (fold_in(key, step))"
        key = jax.random.fold_in(self.key, step)
        k_eig, k_trace, k_density = jax.random.split(key, 3)
        where[0] = "building the curvature operator (operator_fn(params))"
        op = self.operator_fn(params)
        self.operator_name = getattr(op, "name", "operator")
        v0 = self._vectors if (self.warm_start and self._vectors is not None) else None
        where[0] = f"computing the top-{self.k} eigenvalues (hvp.linalg.eigsh)"
        eig = _linalg.eigsh(
            op,
            self.k,
            which="largest",
            key=k_eig,
            num_iters=self.num_iters,
            tol=self.tol,
            max_restarts=self.max_restarts,
            v0=v0,
            progress=False,
        )
        lam = np.asarray(eig.eigenvalues)[::-1]
        res = np.asarray(eig.residuals)[::-1]
        conv = np.asarray(eig.converged)[::-1]
        eig_mv = int(eig.num_matvecs)
        tr = tr_se = None
        tr_mv = 0
        if self.trace:
            where[0] = "estimating the trace (hvp.linalg.trace)"
            t = _linalg.trace(
                op,
                key=k_trace,
                num_matvecs=self.trace_matvecs,
                method=self.trace_method,
                progress=False,
            )
            tr, tr_se, tr_mv = float(t.estimate), float(t.std_error), int(t.num_matvecs)
        neg = None
        den_mv = 0
        dens = None
        if step in self.density_steps:
            where[0] = "estimating the spectral density (hvp.linalg.spectral_density)"
            dens = _linalg.spectral_density(
                op,
                key=k_density,
                num_probes=self.density_probes,
                num_iters=self.density_iters,
                progress=False,
            )
            neg = float(dens.negative_mass())
            den_mv = int(dens.num_matvecs)
        seconds = time.perf_counter() - start
        cold = None
        if self.measure_cold_start:  # diagnostics, not counted in `seconds`
            where[0] = "measuring the cold-start Lanczos (measure_cold_start=True)"
            cold = int(
                _linalg.eigsh(
                    op,
                    self.k,
                    which="largest",
                    key=k_eig,
                    num_iters=self.num_iters,
                    tol=self.tol,
                    max_restarts=self.max_restarts,
                    progress=False,
                ).num_matvecs
            )
        record = MonitorRecord(
            step=step,
            eigenvalues=lam,
            residuals=res,
            converged=conv,
            trace=tr,
            trace_std_error=tr_se,
            eig_matvecs=eig_mv,
            trace_matvecs=tr_mv,
            density_matvecs=den_mv,
            num_matvecs=eig_mv + tr_mv + den_mv,
            cold_matvecs=cold,
            negative_mass=neg,
            lr_threshold=lr_threshold,
            seconds=seconds,
        )
        # commit the state only once the evaluation has succeeded
        self._vectors = eig.eigenvectors
        if dens is not None:
            self.densities[step] = dens
        self.seconds += seconds
        self.history.append(record)
        return record

    # ------------------------------------------------------------------ output
    def _paths(self):
        return (
            os.path.join(self.output_dir, "history.jsonl"),
            os.path.join(self.output_dir, "history.csv"),
        )

    def _csv_row(self, r: MonitorRecord) -> list:
        def num(x):
            return "" if x is None else repr(float(x))

        return (
            [r.step]
            + [num(x) for x in np.asarray(r.eigenvalues)]
            + [num(x) for x in np.asarray(r.residuals)]
            + [str(bool(c)) for c in np.asarray(r.converged)]
            + [
                num(r.trace),
                num(r.trace_std_error),
                r.eig_matvecs,
                r.trace_matvecs,
                r.density_matvecs,
                r.num_matvecs,
                "" if r.cold_matvecs is None else r.cold_matvecs,
                num(r.negative_mass),
                num(r.lr_threshold),
                num(r.seconds),
            ]
        )

    def _csv_header(self) -> list:
        return (
            ["step"]
            + [f"eigenvalue_{i + 1}" for i in range(self.k)]
            + [f"residual_{i + 1}" for i in range(self.k)]
            + [f"converged_{i + 1}" for i in range(self.k)]
            + [
                "trace",
                "trace_std_error",
                "eig_matvecs",
                "trace_matvecs",
                "density_matvecs",
                "num_matvecs",
                "cold_matvecs",
                "negative_mass",
                "lr_threshold",
                "seconds",
            ]
        )

    def _write(self, record: MonitorRecord) -> None:
        if self.output_dir is None:
            return
        jsonl, csv_path = self._paths()
        if not self._files_open:
            os.makedirs(self.output_dir, exist_ok=True)
            mode = "w"
            self._files_open = True
        else:
            mode = "a"
        with open(jsonl, mode) as f:
            f.write(json.dumps(record.to_dict()) + "\n")
            f.flush()
        with open(csv_path, mode, newline="") as f:
            w = csv.writer(f)
            if mode == "w":
                w.writerow(self._csv_header())
            w.writerow(self._csv_row(record))
            f.flush()
        if record.step in self.densities:
            path = os.path.join(self.output_dir, f"density_step{record.step}.json")
            atomic_write_text(path, self.densities[record.step].to_json())

    def _print(self, r: MonitorRecord) -> None:
        from rich.console import Console

        msg = f"[bold]step {r.step}[/]: sharpness {r.sharpness:.4g}"
        if not bool(np.asarray(r.converged)[0]):  # the sharpness is eigenvalues[0]
            msg += " [red](not converged)[/]"
        if r.lr_threshold is not None:
            msg += f" (2/lr = {r.lr_threshold:.4g})"
        if r.trace is not None:
            msg += f", trace {r.trace:.4g} +- {r.trace_std_error:.2g}"
        msg += f", {r.num_matvecs} matvecs, {r.seconds:.2f} s"
        Console(stderr=True).print(msg)

    # ------------------------------------------------------------------ reporting
    def overhead(self, total_train_seconds: float) -> float:
        """Fraction of ``total_train_seconds`` (the wall time of the whole loop) spent in the monitor."""
        total = float(total_train_seconds)
        if not total > 0:
            raise ValueError(
                f"`total_train_seconds` must be positive, got {total_train_seconds!r}."
            )
        return self.seconds / total

    def summary(self, total_train_seconds: float | None = None) -> MonitorSummary:
        """Cost, warm-start savings and sharpness of the run so far (:class:`MonitorSummary`)."""
        h = self.history
        eig_mv = sum(r.eig_matvecs for r in h)
        cold = None
        savings = None
        if h and all(r.cold_matvecs is not None for r in h):
            cold = sum(r.cold_matvecs for r in h)
            savings = 1.0 - eig_mv / cold if cold else None
        first = h[0].seconds if h else None
        given = total_train_seconds is not None
        return MonitorSummary(
            num_evaluations=len(h),
            seconds=self.seconds,
            first_seconds=first,
            train_seconds=float(total_train_seconds) if given else None,
            overhead=self.overhead(total_train_seconds) if given else None,
            overhead_after_first=_after_first(self.seconds, first, total_train_seconds)
            if given
            else None,
            num_matvecs=sum(r.num_matvecs for r in h),
            eig_matvecs=eig_mv,
            cold_eig_matvecs=cold,
            warm_start_savings=savings,
            max_sharpness=max((r.sharpness for r in h), default=None),
            final_sharpness=h[-1].sharpness if h else None,
        )

    def steps_recorded(self) -> np.ndarray:
        return np.array([r.step for r in self.history])

    def sharpness(self) -> np.ndarray:
        """Top eigenvalue of every record, in order."""
        return np.array([r.sharpness for r in self.history])

    def plot(self, path: str | os.PathLike | None = None, *, title: str | None = None):
        """Write (and return the path of) a PNG: sharpness vs step with the ``2/lr`` line, trace vs step.

        Default path: ``<output_dir>/sharpness.png``. Needs matplotlib.
        """
        from hvp.monitor._plot import plot_history

        if path is None:
            if self.output_dir is None:
                raise ValueError(
                    "Pass a path: monitor.plot('curvature.png') (no output_dir was given)."
                )
            path = os.path.join(self.output_dir, "sharpness.png")
        return plot_history(
            self.history,
            path,
            densities=self.densities,
            title=title,
            operator_name=self.operator_name,
        )

    def __repr__(self) -> str:
        sched = f"every={self.every}" if self.every is not None else f"steps={sorted(self.steps)}"
        return f"CurvatureMonitor({sched}, k={self.k}, trace={self.trace}, evaluations={len(self.history)})"
