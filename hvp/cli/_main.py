"""Entry point of the ``hvp`` console script.

Subcommands (each has ``--help``):

* ``hvp analyze CHECKPOINT --model SPEC [--data SPEC] ...``: curvature report
  of an Orbax checkpoint (``report.json``, ``density.png``, ``layers.png`` and
  a summary table);
* ``hvp demo [--out DIR]``: train a small NNX model on the bundled digits,
  checkpoint it and analyse it with the same code path.

Exit status: 0 on success, 1 on an error in the inputs or the run (one line on
stderr, no traceback unless ``--debug``), 2 on a command-line usage error,
130 on SIGINT (Ctrl-C) and 143 on SIGTERM (``128 +`` the signal number).

Signals (:mod:`hvp.analysis._interrupt`): the command runs in a worker thread
while the main thread waits and handles SIGINT and SIGTERM, so an interrupt is
answered within a fraction of a second even during a long XLA compilation, and
one swallowed by a callback is not lost. Outputs are written atomically, a write
in progress is completed and none starts after a signal, so no file is ever
left half-written; the checkpoint is only read. Run as a program (the ``hvp``
script, ``python -m hvp``), the command keeps its handlers to the end and ends
the process with :func:`os._exit` after flushing its output: interpreter
teardown would race XLA's and Orbax's threads (a segmentation fault, or pages of
background-thread tracebacks after the one-line error), and a signal arriving
during it would meet Python's default handlers. A signal that arrives after the
outputs are complete still gives 130/143. Called from Python with a list of
arguments, :func:`main` returns the status after the worker has stopped.

New subcommands register in :data:`COMMANDS` (``name -> (add_arguments, run)``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable

from hvp._version import __version__

__all__ = ["main", "build_parser", "COMMANDS"]


def _number(cast, ok, what: str):
    """An argparse type: ``cast`` the text, then require ``ok(value)`` ("expected {what}")."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: v > 0, "a positive number")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars, no summary table and nothing on stderr unless the run fails",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable summary (one JSON object) on stdout instead of the table",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the outputs of an earlier run in --out as a whole set (report.json, and the "
        "PNGs, which --no-plots removes); without it an --out that holds any of them is "
        "refused before any work",
    )


def _add_analysis_flags(p: argparse.ArgumentParser) -> None:
    from hvp.analysis._analyze import DEFAULTS, OPERATORS, TRACE_METHODS

    g = p.add_argument_group("analysis")
    g.add_argument(
        "--operator",
        choices=OPERATORS,
        default=DEFAULTS["operator"],
        help="curvature operator: the Hessian or the generalised Gauss-Newton matrix "
        "(default: %(default)s)",
    )
    g.add_argument(
        "-k",
        "--k",
        dest="k",
        type=_positive_int,
        default=DEFAULTS["k"],
        help="number of largest and of smallest eigenvalues (default: %(default)s)",
    )
    g.add_argument(
        "--probes",
        dest="num_probes",
        type=_positive_int,
        default=DEFAULTS["num_probes"],
        help="random probes of the spectral density (SLQ) (default: %(default)s)",
    )
    g.add_argument(
        "--iters",
        dest="num_iters",
        type=_positive_int,
        default=DEFAULTS["num_iters"],
        help="Lanczos steps per probe of the spectral density (default: %(default)s)",
    )
    g.add_argument(
        "--eig-iters",
        dest="eig_iters",
        type=_positive_int,
        default=DEFAULTS["eig_iters"],
        help="Lanczos basis size for the eigenvalues (default: automatic)",
    )
    g.add_argument(
        "--tol",
        type=_positive_float,
        default=DEFAULTS["tol"],
        help="eigenpair residual tolerance relative to each eigenvalue: ||r_i|| <= TOL*|λ_i|, "
        "floored at round-off (default: 1e-6 with --x64, 1e-4 otherwise)",
    )
    g.add_argument(
        "--trace-method",
        choices=TRACE_METHODS,
        default=DEFAULTS["trace_method"],
        help="trace estimator (default: %(default)s)",
    )
    g.add_argument(
        "--trace-matvecs",
        type=_positive_int,
        default=DEFAULTS["trace_matvecs"],
        help="matvecs of the trace estimate (default: %(default)s)",
    )
    g.add_argument(
        "--layer-matvecs",
        type=_positive_int,
        default=DEFAULTS["layer_matvecs"],
        help="probes of the per-layer traces (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULTS["batch_size"],
        help="examples per batch when cutting arrays (default: %(default)s)",
    )
    g.add_argument(
        "--num-batches",
        type=_positive_int,
        default=DEFAULTS["num_batches"],
        help="use only the first N batches (default: all)",
    )
    g.add_argument(
        "--seed",
        type=_nonneg_int,
        default=DEFAULTS["seed"],
        help="seed of every random choice (default: %(default)s)",
    )
    g.add_argument(
        "--layers",
        dest="layer_view",
        choices=("grouped", "all"),
        default=DEFAULTS["layer_view"],
        help="per-layer table and layers.png: one row per block of layers (e.g. a transformer "
        "block) or one per layer; report.json has both (default: %(default)s)",
    )
    g.add_argument(
        "--top-layers",
        type=_positive_int,
        default=DEFAULTS["top_layers"],
        help="rows of the per-layer table on the terminal, largest |trace| first "
        "(default: %(default)s)",
    )
    g.add_argument("--x64", action="store_true", help="compute in float64 (default: float32)")
    g.add_argument(
        "--compression",
        action="store_true",
        help="add the compression section: HAWQ per-layer quantisation sensitivity (2/4/8 bits), "
        "a bit allocation and OBD pruning saliency, with compression.png; costs --layer-matvecs "
        "products plus one Lanczos run per layer (default: off)",
    )
    g.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULTS["chunk_size"],
        help="probes run at once by the trace, density and per-layer estimates: bounds their "
        "memory to about CHUNK_SIZE parameter copies per product (default: automatic, at most 8)",
    )
    g.add_argument(
        "--no-plots", dest="plots", action="store_false", help="do not write the PNG figures"
    )


def _analysis_kwargs(args) -> dict:
    return dict(
        operator=args.operator,
        k=args.k,
        num_probes=args.num_probes,
        num_iters=args.num_iters,
        eig_iters=args.eig_iters,
        tol=args.tol,
        trace_method=args.trace_method,
        trace_matvecs=args.trace_matvecs,
        layer_matvecs=args.layer_matvecs,
        batch_size=args.batch_size,
        num_batches=args.num_batches,
        x64=args.x64,
        chunk_size=args.chunk_size,
        plots=args.plots,
        layer_view=args.layer_view,
        top_layers=args.top_layers,
        compression=args.compression,
        overwrite=args.overwrite,
        **_landscape_kwargs(args),
        **_influence_kwargs(args),
    )


def _landscape_kwargs(args) -> dict:
    # `hvp demo` shares _analysis_kwargs but has no --landscape flag
    return {"landscape": True} if getattr(args, "landscape", False) else {}


# --- analyze ------------------------------------------------------------------------------------------


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="Orbax checkpoint directory, opened read-only: a StandardCheckpointer item, a "
        "CheckpointManager step or root, or a Flax workdir of checkpoint_<step> directories",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="model factory 'module.path:function' or 'path/to/file.py:function' returning "
        "(model, loss): model an nnx.Module or (linen_module, example_variables), loss a "
        "callable on outputs or 'cross_entropy'/'mse'",
    )
    p.add_argument(
        "--data",
        default="digits",
        metavar="SPEC",
        help="'digits', 'digits:images', a .npz file with x/y (or inputs/targets), or "
        "'module:function' returning batches (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        default="hvp-analysis-output",
        metavar="DIR",
        help="output directory for report.json and the plots (default: %(default)s)",
    )
    p.add_argument(
        "--step",
        type=_nonneg_int,
        default=None,
        help="step of a CheckpointManager root or Flax workdir (default: the latest)",
    )
    p.add_argument(
        "--item",
        default=None,
        metavar="NAME",
        help="item of a CheckpointManager step, or the top-level key of the saved tree that holds "
        "the model state, e.g. 'model' for {'model': ..., 'optimizer': ...} (default: the only "
        "item; the whole tree, else the first top-level key that matches the model)",
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="keep each finished stage (eigenpairs, trace, density, per-layer traces) in DIR as "
        "soon as it ends; run the same command again after an interruption to skip the finished "
        "stages (same numbers as an uninterrupted run). DIR is emptied when the report is done",
    )
    _add_analysis_flags(p)
    _add_landscape_flag(p)
    _add_distributed_flag(p)
    _add_influence_flags(p)
    _add_common(p)


def _add_landscape_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--landscape",
        action="store_true",
        help="add loss landscapes to the report: the 1-D slice along the top eigenvector with its "
        "second-order model, and a 2-D slice on two filter-normalised random directions "
        "(landscape_eigen.png, landscape_random.png, landscape_surface.png; 142 loss evaluations)",
    )


def _add_distributed_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--distributed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run on several hosts: the same command on every host, started with "
        "JAX_COORDINATOR_ADDRESS=host0:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=0..N-1 "
        "(or on a cluster JAX detects: SLURM, Open MPI, Cloud TPU); each host reads its share "
        "of every batch and process 0 writes the outputs (default: on when those variables are "
        "set; see docs/scaling.md)",
    )


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool):
    """Send what native code writes on stdout (file descriptor 1) to stderr inside the block.

    On several processes gloo, the CPU collectives library, prints ``[Gloo] Rank 0 is
    connected ...`` lines on the C++ standard output when it connects; stdout is kept for the
    summary (one JSON object with ``--json``), printed after the block.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


#: Texts of a collective's error when another process of the run has stopped (gloo over TCP).
_PEER_LOST = ("closed by peer", "Connection reset by peer", "Broken pipe")


@contextlib.contextmanager
def _peer_lost_is_one_line(enabled: bool):
    """Several processes: a collective that failed because another process stopped is reported.

    The error becomes an :class:`~hvp.analysis.AnalysisError` saying so (one line, exit status
    1) instead of gloo's runtime error.
    """
    try:
        yield
    except Exception as e:
        from hvp.analysis._errors import AnalysisError

        text = str(e)
        if enabled and not isinstance(e, AnalysisError) and any(t in text for t in _PEER_LOST):
            raise AnalysisError(
                "Another process of the run stopped (a collective lost its connection: "
                f"{_first_line(e)[:200]}); this process stops too. See the other processes' output."
            ) from e
        raise


def _add_influence_flags(p: argparse.ArgumentParser) -> None:
    from hvp.analysis._analyze import DEFAULTS
    from hvp.analysis._influence_section import DENSE_MAX_PARAMS, INFLUENCE_METHODS

    g = p.add_argument_group("influence (--influence)")
    g.add_argument(
        "--influence",
        action="store_true",
        help="add the influence section (Koh & Liang 2017): for a few test examples the most "
        "helpful and most harmful training examples with their scores, the largest "
        "self-influences (outliers, mislabelled examples), and influence.png; costs n products "
        "(dense) or a CG solve per test example and one eigsh (solve, arnoldi), plus one "
        "per-example gradient per example",
    )
    g.add_argument(
        "--influence-test",
        default=None,
        metavar="SPEC",
        help="data spec of held-out test examples, in the layout of --data (default: the last "
        "--influence-num-test examples of --data, whose own scores are then left out)",
    )
    g.add_argument(
        "--influence-num-test",
        type=_positive_int,
        default=DEFAULTS["influence_num_test"],
        help="test examples (default: %(default)s)",
    )
    g.add_argument(
        "--influence-top",
        type=_positive_int,
        default=DEFAULTS["influence_top"],
        help="training examples per list (default: %(default)s)",
    )
    g.add_argument(
        "--influence-method",
        choices=INFLUENCE_METHODS,
        default=DEFAULTS["influence_method"],
        help=f"inverse of the curvature for the scores: auto = dense up to {DENSE_MAX_PARAMS} "
        "parameters (exact), else solve (CG per test example); arnoldi = the top "
        "--influence-rank eigenpairs (cheaper, approximate); the self-influence is dense or "
        "arnoldi (default: %(default)s)",
    )
    g.add_argument(
        "--influence-rank",
        type=_positive_int,
        default=DEFAULTS["influence_rank"],
        help="eigenpairs of the Arnoldi variant (arnoldi scores, and the self-influence unless "
        "dense); the report's top eigenpairs are reused when at most -k (default: %(default)s)",
    )
    g.add_argument(
        "--influence-damping",
        type=_number(float, lambda v: v >= 0, "a non-negative number"),
        default=None,
        help="damping added to the curvature (default: max(0, -λ_min) + 1e-3·λ_max of the "
        "report, which makes the damped curvature positive definite)",
    )


def _influence_kwargs(args) -> dict:
    # `hvp demo` shares _analysis_kwargs but has no --influence flags
    if not hasattr(args, "influence"):
        return {}
    from hvp.analysis._analyze import INFLUENCE_OPTIONS

    return {name: getattr(args, name) for name in ("influence", *INFLUENCE_OPTIONS)}


def _json_summary(report, out, files, args, **extra) -> dict:
    """The ``--json`` summary: the headline figures, their cost and the files written."""
    d = report.to_dict()
    return {
        "command": args.command,
        "out": os.path.abspath(out),
        "files": [os.path.join(os.path.abspath(out), f) for f in files],
        "checkpoint": d["checkpoint"]["item_dir"],
        "step": d["checkpoint"]["step"],
        "key": d["checkpoint"].get("key"),
        "model": {
            k: d["model"][k] for k in ("spec", "framework", "num_params", "operator", "dtype")
        },
        "data": {k: d["data"][k] for k in ("spec", "num_examples", "num_batches")},
        "top_eigenvalues": d["top"]["eigenvalues"],
        "bottom_eigenvalues": d["bottom"]["eigenvalues"],
        "converged": bool(all(d["top"]["converged"]) and all(d["bottom"]["converged"])),
        "trace": {"estimate": d["trace"]["estimate"], "std_error": d["trace"]["std_error"]},
        **{
            k: d["derived"][k]
            for k in (
                "lambda_max",
                "lambda_min",
                "condition_estimate",
                "negative_ratio",
                "negative_mass",
            )
        },
        # whether the pairs behind lambda_max / lambda_min converged (None: an older report)
        **{k: d["derived"].get(k) for k in ("lambda_max_converged", "lambda_min_converged")},
        "critical_point": (d.get("critical") or {}).get("verdict"),
        **_influence_summary(d),
        "num_matvecs": d["num_matvecs"],
        "seconds": d["timings"]["total"],
        "reproduce": d["command"],
        **extra,
    }


def _influence_summary(d: dict) -> dict:
    sec = d.get("influence")
    if not sec:
        return {}
    keys = ("method", "damping", "rank", "test_indices", "helpful_indices", "harmful_indices")
    return {"influence": {k: sec[k] for k in (*keys, "self_influence_indices")}}


def _report_done(report, out, args, **extra) -> None:
    files = ["report.json"] + (["density.png", "layers.png"] if args.plots else [])
    if args.plots and getattr(report, "compression", None) is not None:
        files.append("compression.png")
    if args.plots and getattr(report, "influence", None) is not None:
        files.append("influence.png")
    if args.plots and getattr(args, "landscape", False):
        from hvp.analysis._report import LANDSCAPE_FILES

        files += list(LANDSCAPE_FILES)
    if args.json:
        import json

        print(json.dumps(_json_summary(report, out, files, args, **extra)))
        return
    if not args.quiet:
        from rich.console import Console

        from hvp.analysis._report import print_summary

        print_summary(report, Console())
    print(f"Wrote {', '.join(files)} to {out}")


def _run_analyze(args) -> int:
    from hvp.analysis._analyze import analyze
    from hvp.analysis._distributed import initialize, is_writer

    # before any JAX computation; a no-op on one host
    distributed = initialize(args.distributed)
    with (
        _stdout_to_stderr(distributed),  # gloo's C++ log lines must not mix into --json
        _peer_lost_is_one_line(distributed),
    ):
        report = analyze(
            args.checkpoint,
            model=args.model,
            data=args.data,
            seed=args.seed,
            step=args.step,
            item=args.item,
            out_dir=args.out,
            progress=not args.quiet,
            resume_dir=args.resume,
            **_analysis_kwargs(args),
        )
    if not is_writer():  # several processes: process 0 prints the summary and writes the files
        return 0
    resumed = report.extra.get("resumed_stages")
    _report_done(report, args.out, args, **({"resumed_stages": resumed} if resumed else {}))
    return 0


# --- demo ---------------------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        default="hvp-demo-output",
        metavar="DIR",
        help="output directory: checkpoint/, report.json, density.png, layers.png "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=300, help="training steps (default: %(default)s)"
    )
    _add_analysis_flags(p)
    _add_common(p)


def _run_demo(args) -> int:
    from hvp.analysis._demo import run_demo

    report = run_demo(
        out=args.out,
        steps=args.steps,
        seed=args.seed,
        progress=not args.quiet,
        **_analysis_kwargs(args),
    )
    demo = report.extra.get("demo", {})
    if args.json:
        _report_done(report, args.out, args, demo=demo)
        return 0
    if not args.quiet:
        print(
            f"Trained {args.steps} steps: loss {demo.get('train_loss', float('nan')):.4f}, accuracy "
            f"{demo.get('train_accuracy', float('nan')):.1%} ({demo.get('train_seconds', 0):.1f} s)"
        )
    _report_done(report, args.out, args)
    print(f"Reproduce with: {report.command}")
    return 0


#: name -> (help, add_arguments(parser), run(args) -> exit status). Room for `bench`.
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "analyze": (
        "curvature report of an Orbax checkpoint of a Flax model",
        _analyze_args,
        _run_analyze,
    ),
    "demo": (
        "train a small model on digits, checkpoint it and analyse it (offline, < 1 min on CPU)",
        _demo_args,
        _run_demo,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hvp",
        description="Hessian-vector products and curvature analysis for JAX models.",
    )
    parser.add_argument("--version", action="version", version=f"hvp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_[0].upper() + help_[1:] + ".")
        add(p)
    return parser


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def main(argv: list[str] | None = None) -> int:
    """Run the ``hvp`` command with ``argv``; return the exit status.

    With ``argv=None`` (the ``hvp`` script, ``python -m hvp``) the arguments are
    ``sys.argv[1:]`` and the call is the program: it ends the process with
    :func:`os._exit` after flushing stdout and stderr (see the module
    docstring). Called with a list, it always returns.

    Example:
      >>> from hvp.cli import main
      >>> main(["--version"])  # doctest: +ELLIPSIS
      hvp ...
      0
    """
    program = argv is None
    rc = _main(argv, program=program)
    if program:
        from hvp.analysis import _interrupt

        signum = _interrupt.pending()
        if rc == 0 and signum is not None:  # the signal came as the run ended: outputs complete
            _say_interrupted(f"hvp {sys.argv[1]}" if len(sys.argv) > 1 else "hvp", signum)
            rc = _interrupt.exit_status(signum)
        _hard_exit(rc)
    return rc


def _hard_exit(rc: int) -> None:
    """End the process now: flush stdio, skip interpreter teardown (XLA/Orbax threads may run)."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: S110 - a closed pipe must not change the exit status
            pass
    os._exit(rc)


def _main(argv: list[str] | None, *, program: bool) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    if args.command is None:
        parser.print_help()
        return 0
    run = COMMANDS[args.command][2]
    prog = f"hvp {args.command}"
    from hvp.analysis import _interrupt
    from hvp.analysis._errors import AnalysisError

    # A program keeps its handlers to the end: it leaves through os._exit, never meeting Python's
    # default handlers (a traceback, or death by SIGTERM) on the way out.
    with (
        _interrupt.handle_signals(restore=not program),
        _quiet_stderr(args.quiet and not args.debug),
    ):
        try:
            _enable_compilation_cache()
            # The program ends the process at once on a signal; from Python, wait for the worker.
            rc = int(_interrupt.call(lambda: run(args), wait=not program) or 0)
            _interrupt.check()  # a signal that came as the run ended still ends it as one
            return rc
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", None) or _interrupt.pending() or 2
            _interrupt.finish()
            _say_interrupted(prog, signum)
            return _interrupt.exit_status(signum)
        except AnalysisError as e:
            _interrupt.finish()
            if args.debug:
                traceback.print_exc()
                if getattr(e, "details", ""):
                    print(e.details, file=sys.stderr, end="")
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        except Exception as e:  # an unexpected failure: one line, the traceback with --debug
            _interrupt.finish()
            if args.debug:
                traceback.print_exc()
                print(f"{prog}: error: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
            else:
                print(
                    f"{prog}: error: {type(e).__name__}: {_first_line(e)} (rerun with --debug for "
                    "the traceback)",
                    file=sys.stderr,
                )
            return 1
        finally:
            _interrupt.finish()


def _say_interrupted(prog: str, signum: int) -> None:
    import signal

    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = str(signum)
    print(f"{prog}: interrupted{'' if signum == signal.SIGINT else f' ({name})'}", file=sys.stderr)


class _quiet_stderr:
    """``--quiet``: no warnings or library log lines on stderr (errors still print)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            return self
        import logging
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        names = ("absl", "jax", "orbax", "flax", "tensorstore")
        self._levels = {n: logging.getLogger(n).level for n in names}
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        self._absl = None
        try:
            from absl import logging as absl_logging

            self._absl = (absl_logging, absl_logging.get_verbosity())
            absl_logging.set_verbosity(absl_logging.ERROR)
        except ImportError:  # pragma: no cover - absl comes with jax
            pass
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ warnings
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        import logging

        for n, lv in self._levels.items():
            logging.getLogger(n).setLevel(lv)
        if self._absl is not None:
            self._absl[0].set_verbosity(self._absl[1])
        self._warnings.__exit__(*exc)
        return False


def _enable_compilation_cache() -> None:
    """Reuse compiled XLA programs across runs (JAX's persistent compilation cache).

    Compiling the algorithms is most of a small analysis's time on CPU (about 30 s of the demo);
    with the cache a second run of the same model takes a few seconds. The cache lives in
    ``$HVP_CACHE_DIR`` (default ``~/.cache/hvp/jax``); set ``HVP_CACHE_DIR=off`` to disable it. A
    cache the user configured for JAX (``JAX_COMPILATION_CACHE_DIR``) is left alone. Results are
    identical with and without it.
    """
    import os

    where = os.environ.get(
        "HVP_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "hvp", "jax")
    )
    if where.lower() in ("off", "0", "none", "") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    try:
        import jax

        if jax.config.jax_compilation_cache_dir:
            return
        os.makedirs(where, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", where)
        # JAX caches only programs that took >= 1 s to compile by default; an analysis's are
        # mostly small (the algorithms' steps), so that default left most of them uncached.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    except Exception:  # an unwritable home directory must not stop the analysis
        return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
