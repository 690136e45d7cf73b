"""Entry point of the ``hvp`` console script.

Subcommands (each has ``--help``):

* ``hvp analyze CHECKPOINT --model SPEC [--data SPEC] ...``: curvature report
  of an Orbax checkpoint (``report.json``, ``density.png``, ``layers.png`` and
  a summary table);
* ``hvp demo [--out DIR]``: train a small NNX model on the bundled digits,
  checkpoint it and analyse it with the same code path.

Exit status: 0 on success, 1 on an error in the inputs or the run (one line on
stderr, no traceback unless ``--debug``), 2 on a command-line usage error,
130 when interrupted.

New subcommands register in :data:`COMMANDS` (``name -> (add_arguments, run)``).
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary table")


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
        help="eigenvalue residual tolerance relative to max|λ| (default: 1e-6 with --x64, "
        "1e-4 otherwise)",
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
        plots=args.plots,
        layer_view=args.layer_view,
        top_layers=args.top_layers,
    )


# --- analyze ------------------------------------------------------------------------------------------


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        help="Orbax checkpoint directory (StandardCheckpointer item, or a "
        "CheckpointManager step or root); opened read-only",
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
        "--step", type=_nonneg_int, default=None, help="CheckpointManager step (default: latest)"
    )
    p.add_argument(
        "--item", default=None, help="item of a CheckpointManager step (default: the only one)"
    )
    _add_analysis_flags(p)
    _add_common(p)


def _report_done(report, out, args) -> None:
    from rich.console import Console

    from hvp.analysis._report import print_summary

    if not args.quiet:
        print_summary(report, Console())
    files = ["report.json"] + (["density.png", "layers.png"] if args.plots else [])
    print(f"Wrote {', '.join(files)} to {out}")


def _run_analyze(args) -> int:
    from hvp.analysis._analyze import analyze

    report = analyze(
        args.checkpoint,
        model=args.model,
        data=args.data,
        seed=args.seed,
        step=args.step,
        item=args.item,
        out_dir=args.out,
        progress=not args.quiet,
        **_analysis_kwargs(args),
    )
    _report_done(report, args.out, args)
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
    """Run the ``hvp`` command with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
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
    _enable_compilation_cache()
    from hvp.analysis._errors import AnalysisError

    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except AnalysisError as e:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # an unexpected failure: one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
            print(f"{prog}: error: {type(e).__name__}: {_first_line(e)}", file=sys.stderr)
        else:
            print(
                f"{prog}: error: {type(e).__name__}: {_first_line(e)} (rerun with --debug for the "
                "traceback)",
                file=sys.stderr,
            )
        return 1


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
    except Exception:  # an unwritable home directory must not stop the analysis
        return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
