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

Usage with optax::

    monitor = hvp.CurvatureMonitor.from_loss(loss_fn, probe_batch, every=10,
                                             learning_rate=lr, output_dir="runs/curv")
    for step in range(num_steps):
        params, opt_state = train_step(params, opt_state, batch)   # jitted
        monitor(step, params)
    monitor.plot("runs/curv/sharpness.png")
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import linalg as _linalg
from hvp import operators as _ops
from hvp import tree as tu

__all__ = ["CurvatureMonitor", "MonitorRecord", "MonitorSummary", "extract_params"]


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


def _after_first(seconds, first, total):
    rest = float(total) - (first or 0.0)
    return (seconds - (first or 0.0)) / rest if rest > 0 else None


def _lr_at(learning_rate, step):
    if learning_rate is None:
        return None
    lr = float(learning_rate(step)) if callable(learning_rate) else float(learning_rate)
    return 2.0 / lr if lr > 0 else None


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
      tol: Lanczos residual tolerance relative to ``|lambda_max|`` (``1e-4``:
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
      key: PRNG key; each evaluation uses ``fold_in(key, step)`` (deterministic).
      output_dir: if given, ``history.jsonl`` and ``history.csv`` are written
        there (overwritten by a new monitor), one line per evaluation,
        flushed immediately; densities go to ``density_step<N>.json``.
      callback: ``callback(record)`` after each evaluation (for a logger).
      learning_rate: float or schedule ``step -> lr``; records and plots the
        edge-of-stability threshold ``2 / lr``.
      verbose: print one line per evaluation.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> def loss_fn(params, batch):  # least squares: the Hessian is diag(1, 4)
        ...     x, y = batch
        ...     return jnp.mean((x @ params["w"] - y) ** 2)
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
        >>> monitor = hvp.CurvatureMonitor.from_loss(loss_fn, batch, every=10, trace=False, key=jax.random.PRNGKey(0))
        >>> params = {"w": jnp.zeros(2)}
        >>> for step in range(20):  # a training loop: params = train_step(params, batch)
        ...     record = monitor(step, params)  # evaluates at steps 0 and 10, None elsewhere
        >>> monitor.steps_recorded(), monitor.sharpness().round(4)
        (array([ 0, 10]), array([4., 4.]))
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
        key=None,
        output_dir: str | os.PathLike | None = None,
        callback: Callable | None = None,
        learning_rate=None,
        verbose: bool = False,
        like=None,
    ):
        if not callable(operator_fn):
            raise TypeError(
                "`operator_fn` must be a callable params -> LinearOperator; use "
                "CurvatureMonitor.from_loss(loss_fn, probe_data) for a loss function."
            )
        if every is None and steps is None:
            every = 100
        if every is not None and (
            isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1
        ):
            raise ValueError(f"`every` must be a positive int, got {every!r}.")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        if trace and (not isinstance(trace_matvecs, (int, np.integer)) or trace_matvecs < 2):
            raise ValueError(
                f"`trace_matvecs` must be an int >= 2 (for a standard error), got {trace_matvecs!r}."
            )
        if callback is not None and not callable(callback):
            raise TypeError("`callback` must be a callable record -> None.")
        if learning_rate is not None and not callable(learning_rate):
            if not float(learning_rate) > 0:
                raise ValueError(f"`learning_rate` must be positive, got {learning_rate!r}.")
        self.operator_fn = operator_fn
        self.every = None if every is None else int(every)
        self.steps = None if steps is None else frozenset(int(s) for s in steps)
        self.density_steps = frozenset(int(s) for s in density_steps)
        self.k = int(k)
        self.tol = float(tol)
        self.num_iters = num_iters
        self.max_restarts = int(max_restarts)
        self.warm_start = bool(warm_start)
        self.measure_cold_start = bool(measure_cold_start)
        self.trace = bool(trace)
        self.trace_matvecs = int(trace_matvecs)
        self.trace_method = trace_method
        self.density_probes = int(density_probes)
        self.density_iters = int(density_iters)
        self.key = jax.random.key(0) if key is None else key
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.callback = callback
        self.learning_rate = learning_rate
        self.verbose = bool(verbose)
        self.like = like
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

        Non-parameter state (BatchNorm statistics, ...) stays as it was when the
        problem was built; call ``monitor(step, model)`` / ``monitor(step,
        state.params)`` with the current parameters.
        """
        if not hasattr(problem, "operator") or not hasattr(problem, "params"):
            raise TypeError(
                "from_flax expects a problem from hvp.flax.from_nnx / from_linen; for a plain "
                "loss use CurvatureMonitor.from_loss(loss_fn, probe_data)."
            )
        dataset = _ops.as_dataset(probe_data)
        okw = dict(operator_kwargs or {})
        problem.operator(
            kind, dataset, **okw
        )  # validate kind and shapes now, not at the first step

        def operator_fn(params):
            return problem.operator(kind, dataset, params=params, **okw)

        kwargs.setdefault("like", problem.params)
        return cls(operator_fn, **kwargs)

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
    def update(self, step: int, params) -> MonitorRecord:
        """Evaluate now at ``params`` (whatever the schedule) and record the result."""
        step = int(step)
        params = extract_params(params)
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
        start = time.perf_counter()
        key = jax.random.fold_in(self.key, step)
        k_eig, k_trace, k_density = jax.random.split(key, 3)
        op = self.operator_fn(params)
        self.operator_name = getattr(op, "name", "operator")
        v0 = self._vectors if (self.warm_start and self._vectors is not None) else None
        eig = _linalg.eigsh(
            op,
            self.k,
            which="largest",
            key=k_eig,
            num_iters=self.num_iters,
            tol=self.tol,
            max_restarts=self.max_restarts,
            v0=v0,
        )
        lam = np.asarray(eig.eigenvalues)[::-1]
        res = np.asarray(eig.residuals)[::-1]
        conv = np.asarray(eig.converged)[::-1]
        eig_mv = int(eig.num_matvecs)
        self._vectors = eig.eigenvectors
        tr = tr_se = None
        tr_mv = 0
        if self.trace:
            t = _linalg.trace(
                op, key=k_trace, num_matvecs=self.trace_matvecs, method=self.trace_method
            )
            tr, tr_se, tr_mv = float(t.estimate), float(t.std_error), int(t.num_matvecs)
        neg = None
        den_mv = 0
        if step in self.density_steps:
            dens = _linalg.spectral_density(
                op, key=k_density, num_probes=self.density_probes, num_iters=self.density_iters
            )
            self.densities[step] = dens
            neg = float(dens.negative_mass())
            den_mv = int(dens.num_matvecs)
        seconds = time.perf_counter() - start
        cold = None
        if self.measure_cold_start:  # diagnostics, not counted in `seconds`
            cold = int(
                _linalg.eigsh(
                    op,
                    self.k,
                    which="largest",
                    key=k_eig,
                    num_iters=self.num_iters,
                    tol=self.tol,
                    max_restarts=self.max_restarts,
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
            lr_threshold=_lr_at(self.learning_rate, step),
            seconds=seconds,
        )
        self.seconds += seconds
        self.history.append(record)
        self._write(record)
        if self.verbose:
            self._print(record)
        if self.callback is not None:
            self.callback(record)
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
            with open(path, "w") as f:
                f.write(self.densities[record.step].to_json())

    def _print(self, r: MonitorRecord) -> None:
        from rich.console import Console

        msg = f"[bold]step {r.step}[/]: sharpness {r.sharpness:.4g}"
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
