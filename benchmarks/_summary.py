"""Headline table from the groups' JSON files: ``python -m benchmarks._summary [DIR]``.

Writes ``DIR/SUMMARY.md`` (default ``benchmarks/results/<device>/``) and prints it; the
benchmarks README quotes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import _common as C


def _load(d: Path, name: str):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def summary(d: Path) -> str:
    lines = []
    modes = _load(d, "hvp_modes")
    if modes:
        lines += [
            "### HVP cost vs one gradient (`modes`)",
            "",
            "| model | n | gradient | fwd-over-rev | rev-over-rev | rev-over-fwd | linearize-once | "
            "`hvp.hessian @ v` | `linearize=True` | matmat 8 / 32 speed-up per probe |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in modes["models"]:
            r = m["ratios"]

            def f(k, r=r):
                return f"{r[k]:.2f}x" if k in r else "-"

            b = m.get("batched", {})
            bs = " / ".join(f"{b[k]['speedup']:.2f}x" for k in sorted(b, key=int)) if b else "-"
            lines.append(
                f"| {m['model']} | {m['n']:,} | {C.fmt_s(m['times']['gradient']['median_s'])} | "
                f"{f('forward-over-reverse')} | {f('reverse-over-reverse')} | {f('reverse-over-forward')} | "
                f"{f('linearize-once')} | {f('hvp.hessian @ v')} | {f('hvp.hessian(linearize=True) @ v')} | {bs} |"
            )
        s = modes.get("summary", {})
        lines += [
            "",
            f"Median over models: default `hvp.hessian @ v` **{s.get('median_default_ratio', 0):.2f}x** a "
            f"gradient (target 2.0x: {'met' if s.get('target_met') else 'missed'}); the faster of default "
            f"and `linearize=True`: **{s.get('median_best_ratio', 0):.2f}x**; median `matmat` speed-up per "
            f"probe **{s.get('median_matmat_speedup', 0):.2f}x**.",
            "",
        ]
    dense = _load(d, "dense_vs_hvp")
    if dense:
        s = dense["summary"]
        lines += ["### Matrix-free vs dense (`dense`)", ""]
        lines += [
            "| n | one HVP | top-5 `hvp.eigsh` | dense `jax.hessian` + `eigh` |",
            "|---|---|---|---|",
        ]
        for r in dense["rows"]:
            dd = r["dense"]
            reason = dd.get("reason", "")
            dcell = (
                C.fmt_s(dd["total_median_s"])
                if dd.get("status") == "ok"
                else reason
                if reason.startswith(str(dd.get("status")))
                else f"{dd.get('status')}: {reason}"
            )
            e = r["eigsh"]
            ecell = (
                f"{C.fmt_s(e.get('median_s'))} ({e.get('num_matvecs')} mv)"
                if e.get("status") == "ok"
                else e.get("status")
            )
            lines.append(
                f"| {r['n']:,} | {C.fmt_s(r['hvp'].get('median_s'))} | {ecell} | {dcell} |"
            )
        lines += [
            "",
            f"Crossover (eigsh faster than dense from): n = {s['crossover_n']:,}"
            if s["crossover_n"]
            else "Crossover: none measured",
            "",
        ]
        lines += [
            f"Largest n: dense {s['largest_n_dense']:,}; `hvp.eigsh` {s['largest_n_eigsh']:,}. "
            f"Top-5 agreement where both ran: {s['max_eig_rel_err']:.1e}."
            if s.get("largest_n_dense") and s.get("max_eig_rel_err") is not None
            else "",
            "",
        ]
    peers = _load(d, "peers")
    if peers:
        lines += [
            "### Peers at matched accuracy (`peers`): peer time / hvp time (> 1: hvp faster)",
            "",
        ]
        tasks = ["top1", "top5", "trace", "density"]
        ns = sorted({x["n"] for x in peers.get("ratios", [])})
        lines += [
            "| peer | task | " + " | ".join(f"n = {n:,}" for n in ns) + " |",
            "|---|---|" + "---|" * len(ns),
        ]
        for peer in ("PyHessian", "hessian-eigenthings", "matfree"):
            for task in tasks:
                vals = {
                    x["n"]: x["ratio_peer_over_hvp"]
                    for x in peers.get("ratios", [])
                    if x["peer"] == peer and x["task"] == task
                }
                if vals:
                    lines.append(
                        f"| {peer} | {task} | "
                        + " | ".join(f"{vals[n]:.1f}x" if n in vals else "-" for n in ns)
                        + " |"
                    )
        for note in peers.get("notes", []):
            lines += ["", note]
        lines.append("")
    cw = _load(d, "cold_warm")
    if cw:
        lines += [
            "### Cold and warm (`coldwarm`): peer time / hvp time (> 1: hvp faster)",
            "",
            "| kind | problem | task | peer | ratio | target |",
            "|---|---|---|---|---|---|",
        ]
        for t in cw.get("targets", []):
            if t["kind"] == "cold":
                ratio = f"{t['ratio_answer']:.2f}x / {t['ratio_total']:.2f}x (with imports)"
            else:
                ratio = f"{t['ratio']:.2f}x"
            verdict = t.get("verdict") or (
                ("met" if t["met"] else "missed") + f" ({t['target']})" if "met" in t else "-"
            )
            lines.append(
                f"| {t['kind']} | {t['problem']} | {t['task']} | {t['peer']} | {ratio} | {verdict} |"
            )
        for label, rec in cw.get("demo", {}).get("runs", {}).items():
            if rec.get("analysis_s") is not None:
                lines += [
                    "",
                    f"`hvp demo` analysis, {label}: {C.fmt_s(rec['analysis_s'])} (target < 5 s)",
                ]
        lines.append("")
    est = _load(d, "estimators")
    if est:
        lines += [
            "### Estimators (`estimators`): matvecs for 1% mean relative trace error, n = 1,000",
            "",
            "| spectrum | Hutchinson | Hutch++ | XTrace |",
            "|---|---|---|---|",
        ]
        for name, v in est.get("matvecs_for_1pct", {}).items():
            lines.append(f"| {name} | {v['hutchinson']} | {v['hutch++']} | {v['xtrace']} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    d = Path(argv[0]) if argv else C.RESULTS / C.device_name()
    text = summary(d)
    (d / "SUMMARY.md").write_text("# Benchmark summary\n\n" + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
