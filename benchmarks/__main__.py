"""Run the benchmark groups: ``python -m benchmarks [--quick] [--only GROUP ...] [--out DIR]``.

``python -m benchmarks --profile gpu [--time-budget S] [--quick] [--out DIR]`` runs the GPU profile
instead (:func:`benchmarks.bench_lm_scale.run_profile`): the transformer LM suite and the MLP
scale suite in bfloat16 on the first accelerator, sized to its memory, within ``S`` seconds
(default 480), results in ``benchmarks/results/<device-name>/``.

Each group writes ``<group>.json``, ``<group>.md`` and PNG plots into the output
directory (default ``benchmarks/results/<device>/``; with ``--quick`` a fresh
temporary directory unless ``--out`` is given, so quick runs never overwrite the
committed results) and prints its tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

GROUPS = {
    "dense": "benchmarks.bench_dense_vs_hvp",
    "modes": "benchmarks.bench_hvp_modes",
    "estimators": "benchmarks.bench_estimators",
    "peers": "benchmarks.bench_peers",
    "analysis": "benchmarks.bench_analysis",
    "coldwarm": "benchmarks.bench_cold_warm",
    "solve": "benchmarks.bench_solve",
    "hessian_free": "benchmarks.bench_hessian_free",
    "influence": "benchmarks.bench_influence",
    "stream": "benchmarks.bench_stream",
    "lm_scale": "benchmarks.bench_lm_scale",
}
ALIASES = {
    "1": "dense",
    "2": "modes",
    "3": "estimators",
    "4": "peers",
    "5": "analysis",
    "6": "coldwarm",
    "7": "solve",
    "8": "hessian_free",
    "hf": "hessian_free",
    "9": "influence",
    "cold": "coldwarm",
    "warm": "coldwarm",
    "cold_warm": "coldwarm",
    "dense_vs_hvp": "dense",
    "hvp_modes": "modes",
    "estimator": "estimators",
    "peer": "peers",
    "analyze": "analysis",
    "10": "lm_scale",
    "lm": "lm_scale",
}


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few repeats (what CI runs so the scripts never rot)",
    )
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="GROUP",
        help=f"run only these groups (repeatable or comma-separated): {', '.join(GROUPS)} (or 1-10)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: benchmarks/results/<device>/, or a temporary "
        "directory with --quick)",
    )
    p.add_argument(
        "--profile",
        choices=("gpu",),
        default=None,
        help="gpu: the GPU profile (transformer LM and MLP scale suites in bfloat16, sized to the "
        "device memory, within --time-budget seconds; writes benchmarks/results/<device-name>/ "
        "after every measurement); the groups are not run",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=480.0,
        metavar="S",
        help="wall-time budget of --profile gpu in seconds (default 480)",
    )
    return p.parse_args(argv)


#: Groups run only when named with ``--only`` (an hour of CPU: not part of a plain full run).
OPT_IN = ("lm_scale",)


def _groups(only):
    if not only:
        return [g for g in GROUPS if g not in OPT_IN]
    names = []
    for item in only:
        for name in item.split(","):
            name = name.strip().lower()
            name = ALIASES.get(name, name)
            if name not in GROUPS:
                raise SystemExit(
                    f"Unknown benchmark group {name!r}; choose from {', '.join(GROUPS)} (or 1-10)."
                )
            if name not in names:
                names.append(name)
    return names


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.profile == "gpu":
        return _gpu_profile(args)
    groups = _groups(args.only)
    from benchmarks import _common as C

    if args.out is not None:
        out = args.out
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="hvp-bench-quick-"))
    else:
        out = C.RESULTS / C.device_name()
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"hvp benchmarks: groups {', '.join(groups)}; {'QUICK mode; ' if args.quick else ''}"
        f"device {C.device_name()}; writing to {out}",
        flush=True,
    )
    index = {"device": C.device_name(), "quick": args.quick, "groups": {}}
    index_path = out / "index.json"
    if index_path.exists():
        try:
            old = json.loads(index_path.read_text())
            if old.get("quick") == args.quick:
                index["groups"].update(old.get("groups", {}))
        except (ValueError, OSError):
            pass
    for name in groups:
        t0 = time.perf_counter()
        module = importlib.import_module(GROUPS[name])
        rep = module.run(out, quick=args.quick)
        rep.data.setdefault("wall_s", time.perf_counter() - t0)
        rep.write()
        C.print_markdown(rep.markdown())
        index["groups"][name] = {
            "json": f"{rep.group}.json",
            "markdown": f"{rep.group}.md",
            "figures": rep.figures,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        print(
            f"[{name}] done in {time.perf_counter() - t0:.1f} s -> {out / (rep.group + '.md')}",
            flush=True,
        )
    return 0


def _gpu_profile(args) -> int:
    if args.only:
        raise SystemExit("--profile gpu runs its own suite; leave out --only.")
    # measurements run in child processes: the parent must not reserve the device's memory
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from benchmarks import _common as C
    from benchmarks import bench_lm_scale

    out = args.out
    if out is None and args.quick:
        out = Path(tempfile.mkdtemp(prefix="hvp-bench-quick-"))
    t0 = time.perf_counter()
    rep = bench_lm_scale.run_profile(out, quick=args.quick, time_budget=args.time_budget)
    C.print_markdown(rep.markdown())
    print(
        f"[profile gpu] done in {time.perf_counter() - t0:.1f} s -> "
        f"{rep.out_dir / (rep.group + '.md')}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
