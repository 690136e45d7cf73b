"""Group 5 - time of each ``hvp analyze`` stage on Flax-example model shapes.

Models (:mod:`benchmarks._models`), each checkpointed with Orbax's
``StandardCheckpointer`` as the examples do, then analysed by
:func:`hvp.analysis.analyze` (the code path of ``hvp analyze``) with the progress
display recorded:

* ``resnet-bn``: a ResNet with BatchNorm in the style of the Flax ImageNet
  example (shrunk), Hessian of the softmax cross-entropy, ``train=False``;
* ``lm1b``: a decoder-only Transformer LM in the style of the Flax lm1b example
  (tiny), Hessian of its padding-masked token cross-entropy.

For each stage (top and bottom eigenvalues, trace, spectral density,
per-layer trace) the table gives the products, the wall time (cold: it includes
compiling the stage's program, as a user's first run does), the time per
product, and the time the progress display predicted before the stage started
from the measured cost of one product (:meth:`hvp.analysis._progress.Stages.estimate`),
with the ratio actual / expected.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import time

import numpy as np

from benchmarks import _common as C
from benchmarks import _models as M

GROUP = "analysis"
TITLE = "Time of each `hvp analyze` stage on Flax-example model shapes"

STAGES = ("top", "bottom", "trace", "density", "layers")
_UNITS = {"µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
_PLAN = re.compile(r"^\s+(\w+): ~([\d,]+) products, ~([\d.]+) (µs|ms|s|min|h) expected", re.M)
_ONE = re.compile(r"one product ([\d.]+) (µs|ms|s|min|h)")


def _models(quick: bool):
    if quick:
        return [
            ("resnet-bn", lambda: M.resnet_bn(stage_sizes=(1,), filters=4, image=8, batch=8)),
            ("lm1b", lambda: M.lm1b_like(num_layers=1, vocab=16, emb=8, mlp=16, seq_len=8)),
        ]
    return [
        (
            "resnet-bn",
            lambda: M.resnet_bn(stage_sizes=(2, 2), filters=16, image=32, batch=128),
        ),
        (
            "lm1b",
            lambda: M.lm1b_like(
                num_layers=6, vocab=256, emb=64, heads=4, mlp=256, seq_len=64, batch=32
            ),
        ),
    ]


def _settings(quick: bool) -> dict:
    if quick:
        return dict(k=2, num_probes=2, num_iters=8, trace_matvecs=6, layer_matvecs=4)
    from hvp.analysis import DEFAULTS

    return {
        k: DEFAULTS[k] for k in ("k", "num_probes", "num_iters", "trace_matvecs", "layer_matvecs")
    }


def parse_plan(text: str) -> dict:
    """``{stage: (products, seconds)}`` and the single-product seconds from the printed plan."""
    plan = {
        m.group(1): (int(m.group(2).replace(",", "")), float(m.group(3)) * _UNITS[m.group(4)])
        for m in _PLAN.finditer(text)
    }
    one = _ONE.search(text)
    return plan, (float(one.group(1)) * _UNITS[one.group(2)] if one else None)


def bench_model(name: str, build, settings: dict) -> dict:
    import jax
    import orbax.checkpoint as ocp
    from rich.console import Console

    from hvp.analysis import analyze

    factory, variables, batches = build()
    with tempfile.TemporaryDirectory(prefix="hvp-bench-analysis-") as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        ck = ocp.StandardCheckpointer()
        ck.save(ckpt, variables)
        ck.wait_until_finished()
        ck.close()
        buf = io.StringIO()
        t0 = time.perf_counter()
        report = analyze(
            ckpt,
            model=factory,
            data=batches,
            batch_size=None,
            progress=True,
            console=Console(file=buf, width=160, color_system=None),
            out_dir=os.path.join(tmp, "out"),
            **settings,
        )
        wall = time.perf_counter() - t0
        layers_png = os.path.getsize(os.path.join(tmp, "out", "layers.png"))
    text = buf.getvalue()
    plan, single = parse_plan(text)
    d = report.to_dict()
    stages = {}
    for s in STAGES:
        secs = float(d["timings"][s])
        mv = int(d[s]["num_matvecs"])
        exp = plan.get(s, (None, None))
        stages[s] = {
            "num_matvecs": mv,
            "seconds": secs,
            "seconds_per_matvec": secs / mv if mv else None,
            "expected_products": exp[0],
            "expected_seconds": exp[1],
            "actual_over_expected": secs / exp[1] if exp[1] else None,
        }
    return {
        "model": name,
        "n": int(d["model"]["num_params"]),
        "num_layers": len(d["layers"]["layers"]),
        "num_blocks": len(d["layers"]["groups"]["names"]),
        "labels": d["layers"]["labels"],
        "settings": settings,
        "product_s": single,
        "stages": stages,
        "timings": d["timings"],
        "wall_s": wall,
        "layers_png_bytes": layers_png,
        "top_eigenvalue": d["derived"]["lambda_max"],
        "top_converged": bool(all(d["top"]["converged"])),
        "progress_text": text,
        "jax": jax.__version__,
    }


def run(out_dir, *, quick: bool = False) -> C.Report:
    rep = C.Report(GROUP, TITLE, out_dir, quick=quick)
    rep.data["environment"] = C.environment()
    settings = _settings(quick)
    results = [
        bench_model(name, build, settings)
        for name, build in C.progress(_models(quick), description="analysis stages")
    ]
    rep.data["models"] = results
    rep.data["settings"] = settings
    rows = []
    for r in results:
        for s in STAGES:
            st = r["stages"][s]
            rows.append(
                [
                    r["model"],
                    f"{r['n']:,}",
                    s,
                    st["num_matvecs"],
                    C.fmt_s(st["seconds"]),
                    C.fmt_s(st["seconds_per_matvec"]),
                    st["expected_products"] if st["expected_products"] is not None else "-",
                    C.fmt_s(st["expected_seconds"]),
                    f"{st['actual_over_expected']:.2f}x" if st["actual_over_expected"] else "-",
                ]
            )
    rep.table(
        "Stages (cold: compilation included)",
        [
            "model",
            "n",
            "stage",
            "products",
            "time",
            "per product",
            "expected products",
            "expected time",
            "actual / expected",
        ],
        rows,
        note="Settings: "
        + ", ".join(f"{k}={v}" for k, v in settings.items())
        + ". One product (warm, measured by the progress display): "
        + ", ".join(f"{r['model']} {C.fmt_s(r['product_s'])}" for r in results)
        + ". Expected time = the stage's compilation (a factor times that of one product, "
        "`hvp.analysis._progress.COMPILE_FACTORS`) + products x the measured cost of one "
        "product (eigenvalue stages: single products; probe-batched stages: a block of "
        "`num_probes` products, timed when the products add up to more than 5 s).",
    )
    ratios = [
        st["actual_over_expected"]
        for r in results
        for st in r["stages"].values()
        if st["actual_over_expected"]
    ]
    rep.data["summary"] = {
        "total_s": {r["model"]: r["timings"]["total"] for r in results},
        "actual_over_expected_median": float(np.median(ratios)) if ratios else None,
        "actual_over_expected_range": [float(min(ratios)), float(max(ratios))] if ratios else None,
    }
    return rep
