"""Group 2 - what one Hessian-vector product costs, as a multiple of one gradient.

For each model (the tanh MLP on the digits, a CNN on the digits, a small Flax
transformer LM, a small Flax ResNet with BatchNorm) and one batch, times with the
same inputs:

* ``gradient``: ``jax.jit(jax.grad(loss))``, the unit;
* ``forward-over-reverse``: ``jax.jvp(jax.grad(loss))`` (Pearlmutter 1994), jit-compiled;
* ``reverse-over-reverse``: ``jax.grad(lambda p: <grad loss(p), v>)``;
* ``reverse-over-forward``: ``jax.grad(lambda p: jvp(loss)(p; v))``;
* ``linearize-once``: ``jax.linearize(jax.grad(loss), params)`` once, then only the
  linear map per product (residuals kept in memory);
* ``hvp.hessian @ v``: the default operator (``linearize="auto"``: linearised when
  the residuals fit its memory budget), including its Python-side validation and
  dispatch (``check_finite=False``);
* ``hvp.hessian(linearize=False) @ v`` and ``hvp.hessian(linearize=True) @ v``.

**Wrapper overhead**: the operator's product against the raw JAX product it wraps on
the same batch (``linearize=False`` against forward-over-reverse, ``linearize=True``
against linearize-once), warm (median of repeats, interleaved passes) and cold (a
fresh loss function: trace + compile + first product; for the operator this includes
building it). Target: at most 5% more, warm.

**Block products**: ``op.matmat`` of k probes with ``block="vmap"``, ``block="map"``
and the default ``block="auto"``, against k single ``op @ v`` calls (per probe). Target:
the default never slower per probe than single products.

Every function takes the parameters, probe and batch as jit *arguments* (no
constants baked into the compiled code). Median of repeats with IQR.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import hvp
from benchmarks import _common as C
from benchmarks import _models as M
from hvp import tree as tu

GROUP = "hvp_modes"
TITLE = "HVP cost: differentiation modes, operator overhead and block products"

OP_DEFAULT = "hvp.hessian @ v"
OP_FWD = "hvp.hessian(linearize=False) @ v"
OP_LIN = "hvp.hessian(linearize=True) @ v"
OVERHEAD_TARGET = 1.05


def _resnet(**kw):
    """The small Flax ResNet with BatchNorm (evaluation mode) as ``(params, loss_fn, batch)``."""
    factory, variables, batches = M.resnet_bn(**kw)
    (model, _, apply_kw), _ = factory()
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss_fn(p, batch):
        x, y = batch
        logits = model.apply({"params": p, **rest}, x, **apply_kw)
        return M.cross_entropy(logits, y)

    return variables["params"], loss_fn, batches[0]


def _models(quick: bool):
    if quick:
        return [
            ("MLP 64-8-8-10, 64 digits", lambda: M.mlp(8, num_examples=64)),
            ("CNN 2-4 channels, 64 digits", lambda: M.cnn(channels=(2, 4), num_examples=64)),
            (
                "Flax transformer d=16, 1 layer",
                lambda: M.transformer(d_model=16, heads=2, layers=1, batch=8, seq_len=8, vocab=16),
            ),
        ]
    return [
        ("MLP 64-128-128-10, 1797 digits", lambda: M.mlp(128)),
        ("MLP 64-512-512-10, 1797 digits", lambda: M.mlp(512)),
        ("CNN 16-32 channels, 1797 digits", lambda: M.cnn(channels=(16, 32))),
        ("Flax transformer d=64, 2 layers", lambda: M.transformer()),
        ("Flax ResNet-BN 8 filters, 32 images 16x16", lambda: _resnet()),
    ]


def _raw_fns(loss_fn):
    def f_of(b):
        return lambda p: loss_fn(p, b)

    grad = jax.jit(lambda p, b: jax.grad(f_of(b))(p))
    fwd_rev = jax.jit(lambda p, v, b: jax.jvp(jax.grad(f_of(b)), (p,), (v,))[1])
    rev_rev = jax.jit(lambda p, v, b: jax.grad(lambda q: tu.dot(jax.grad(f_of(b))(q), v))(p))
    rev_fwd = jax.jit(lambda p, v, b: jax.grad(lambda q: jax.jvp(f_of(b), (q,), (v,))[1])(p))
    linearize = jax.jit(lambda p, b: jax.linearize(jax.grad(f_of(b)), p)[1])
    apply_lin = jax.jit(lambda lin, v: lin(v))
    return grad, fwd_rev, rev_rev, rev_fwd, linearize, apply_lin


def _cold(loss_fn, params, v, batch) -> dict:
    """First call with a fresh loss function (no cached trace or compilation), in seconds."""
    out = {}
    for label in ("forward-over-reverse", OP_FWD, OP_DEFAULT):
        fresh = lambda p, b: loss_fn(p, b)  # noqa: E731 - a new function: nothing cached
        t0 = time.perf_counter()
        if label == "forward-over-reverse":
            f = jax.jit(
                lambda p, v, b, fresh=fresh: jax.jvp(jax.grad(lambda q: fresh(q, b)), (p,), (v,))[1]
            )
            jax.block_until_ready(f(params, v, batch))
        else:
            kw = {"linearize": False} if label == OP_FWD else {}
            op = hvp.hessian(fresh, params, batch, check_finite=False, **kw)
            jax.block_until_ready(op @ v)
        out[label] = time.perf_counter() - t0
    return out


def bench_model(name: str, build, *, quick: bool, light: bool = False) -> dict:
    """All modes for one model. Quick mode (CI): no cold times and no reverse-over-* modes;
    ``light`` (quick mode, slow-compiling models): gradient, forward-over-reverse and the
    operators only, no block products."""
    params, loss_fn, batch = build()
    n = M.num_params(params)
    v = tu.rademacher_like(jax.random.PRNGKey(0), params)
    min_time = 0.0 if quick else 2.0
    reps = 2 if quick else 15
    passes = 1 if quick else 3
    probe_counts = () if light else (2,) if quick else (8, 32)

    cold = {} if quick else _cold(loss_fn, params, v, batch)
    grad, fwd_rev, rev_rev, rev_fwd, linearize, apply_lin = _raw_fns(loss_fn)
    op = hvp.hessian(loss_fn, params, batch, check_finite=False)
    op_fwd = hvp.hessian(loss_fn, params, batch, check_finite=False, linearize=False)
    ref = fwd_rev(params, v, batch)
    cases = {
        "gradient": lambda: grad(params, batch),
        "forward-over-reverse": lambda: fwd_rev(params, v, batch),
        OP_DEFAULT: lambda: op @ v,
        OP_FWD: lambda: op_fwd @ v,
    }
    checks = [(OP_DEFAULT, op @ v), (OP_FWD, op_fwd @ v)]
    if not quick:
        cases["reverse-over-reverse"] = lambda: rev_rev(params, v, batch)
        cases["reverse-over-forward"] = lambda: rev_fwd(params, v, batch)
        checks += [
            ("reverse-over-reverse", rev_rev(params, v, batch)),
            ("reverse-over-forward", rev_fwd(params, v, batch)),
        ]
    if not light:
        lin = linearize(params, batch)
        op_lin = hvp.hessian(loss_fn, params, batch, check_finite=False, linearize=True)
        cases["linearize-once"] = lambda: apply_lin(lin, v)
        cases[OP_LIN] = lambda: op_lin @ v
        checks += [("linearize-once", apply_lin(lin, v)), (OP_LIN, op_lin @ v)]
    # correctness first: every mode gives the same product
    errs = {label: float(tu.norm(tu.sub(out, ref)) / tu.norm(ref)) for label, out in checks}

    times = {}
    # interleaved passes, keep the fastest median: limits drift from other load
    for _ in range(passes):
        for label, fn in cases.items():
            t = C.time_fn(fn, repeats=reps, warmup=1, min_time=min_time)
            t.pop("value")
            if label not in times or t["median_s"] < times[label]["median_s"]:
                times[label] = t
    g = times["gradient"]["median_s"]
    ratios = {k: t["median_s"] / g for k, t in times.items()}
    med = {k: t["median_s"] for k, t in times.items()}
    overhead = {OP_FWD: med[OP_FWD] / med["forward-over-reverse"]}
    if not light:
        overhead[OP_LIN] = med[OP_LIN] / med["linearize-once"]
    if cold:
        overhead["cold " + OP_FWD] = cold[OP_FWD] / cold["forward-over-reverse"]

    batched = {}
    if probe_counts:
        ops = {
            m: hvp.hessian(loss_fn, params, batch, check_finite=False, block=m)
            for m in ("vmap", "map")
        }
        ops["auto"] = op
    for k in probe_counts:
        vs = tu.rademacher_like(jax.random.PRNGKey(k), tu.map(lambda x, k=k: jnp.stack([x] * k), v))
        singles = [tu.index(vs, i) for i in range(k)]
        fns = {"singles": lambda singles=singles: [op @ s for s in singles]}
        fns.update({m: (lambda o=o, vs=vs: o.matmat(vs)) for m, o in ops.items()})
        bt = {}
        for _ in range(passes):
            for label, fn in fns.items():
                t = C.time_fn(fn, repeats=max(2, reps // 2), warmup=1, min_time=min_time / 2)
                t.pop("value")
                if label not in bt or t["median_s"] < bt[label]["median_s"]:
                    bt[label] = t
        last = op @ singles[-1]
        check = max(
            float(tu.norm(tu.sub(tu.index(o.matmat(vs), k - 1), last)) / tu.norm(last))
            for o in ops.values()
        )
        per = {label: t["median_s"] / k for label, t in bt.items()}
        batched[k] = {
            "per_probe_s": per,
            "auto_mode": op.block_mode(),
            "speedup": per["singles"] / per["auto"],
            "max_rel_diff": check,
        }
    return {
        "model": name,
        "n": n,
        "linearized_by_default": op.linearized,
        "times": times,
        "ratios": ratios,
        "overhead": overhead,
        "cold_s": cold,
        "agreement_rel_err": errs,
        "batched": batched,
        "light": light,
    }


def run(out_dir, *, quick: bool = False) -> C.Report:
    rep = C.Report(GROUP, TITLE, out_dir, quick=quick)
    rep.data["environment"] = C.environment()
    results = []
    for name, build in C.progress(_models(quick), description="hvp modes"):
        # quick mode: the transformer (slow to compile) only times the plain products
        results.append(bench_model(name, build, quick=quick, light=quick and "transformer" in name))
    rep.data["models"] = results

    modes = [
        "forward-over-reverse",
        "reverse-over-reverse",
        "reverse-over-forward",
        "linearize-once",
        OP_DEFAULT,
        OP_FWD,
        OP_LIN,
    ]
    rows = []
    for r in results:
        rows.append(
            [r["model"], f"{r['n']:,}", C.fmt_spread(r["times"]["gradient"])]
            + [f"{r['ratios'][m]:.2f}x" if m in r["ratios"] else "-" for m in modes]
        )
    rep.table(
        "Time per product as a multiple of one gradient (median of repeats; gradient: median (IQR))",
        ["model", "n", "gradient"] + modes,
        rows,
        note="All products agree with forward-over-reverse to relative error "
        f"{max(max(r['agreement_rel_err'].values()) for r in results):.1e} (float32). "
        f'`{OP_DEFAULT}` is linearised by default (`linearize="auto"`) on: '
        + ", ".join(r["model"] for r in results if r["linearized_by_default"])
        + ".",
    )

    orows = []

    def cell(x, fmt):
        return "-" if x is None else fmt(x)

    for r in results:
        o, t, c = r["overhead"], r["times"], r["cold_s"]

        def med(k, t=t):
            return t[k]["median_s"] if k in t else None

        orows.append(
            [
                r["model"],
                cell(med("forward-over-reverse"), C.fmt_s),
                cell(med(OP_FWD), C.fmt_s),
                cell(o.get(OP_FWD), "{:.3f}x".format),
                cell(med("linearize-once"), C.fmt_s),
                cell(med(OP_LIN), C.fmt_s),
                cell(o.get(OP_LIN), "{:.3f}x".format),
                cell(c.get("forward-over-reverse"), "{:.2f} s".format),
                cell(c.get(OP_FWD), "{:.2f} s".format),
                cell(c.get(OP_DEFAULT), "{:.2f} s".format),
            ]
        )
    rep.table(
        "Wrapper overhead: the operator against the raw JAX product on the same batch",
        [
            "model",
            "raw fwd-over-rev",
            "`linearize=False`",
            "ratio",
            "raw linearize-once",
            "`linearize=True`",
            "ratio",
            "cold raw",
            "cold `linearize=False`",
            "cold default",
        ],
        orows,
        note="Warm: median of repeats, fastest of interleaved passes. Cold: a fresh loss function, "
        "first product including tracing and compilation (for the operators also building them: "
        "validation and, for the default, the linearisation).",
    )

    brows = []
    for r in results:
        for k, b in r["batched"].items():
            p = b["per_probe_s"]
            brows.append(
                [r["model"], k]
                + [C.fmt_s(p[m]) for m in ("singles", "vmap", "map", "auto")]
                + [b["auto_mode"], f"{b['speedup']:.2f}x"]
            )
    rep.table(
        "Block products: per probe, `op.matmat` of k probes vs k single `op @ v` (default operator)",
        ["model", "k", "single calls", "vmap", "map", "auto", "auto chose", "auto speed-up"],
        brows,
    )

    worst_overhead = max(v for r in results for k, v in r["overhead"].items() if "cold" not in k)
    speedups = [b["speedup"] for r in results for b in r["batched"].values()] or [float("nan")]
    default = float(np.median([r["ratios"][OP_DEFAULT] for r in results]))
    rep.data["summary"] = {
        "median_default_ratio": default,
        "median_best_ratio": float(
            np.median([min(r["ratios"][OP_FWD], r["ratios"].get(OP_LIN, np.inf)) for r in results])
        ),
        "target_ratio": 2.0,
        "target_met": bool(default <= 2.0),
        "worst_overhead": worst_overhead,
        "overhead_target": OVERHEAD_TARGET,
        "median_matmat_speedup": float(np.median(speedups)),
        "min_matmat_speedup": float(np.min(speedups)),
    }
    rep.text(
        "Targets",
        f"- Default HVP (`{OP_DEFAULT}`) at most 2.0x a gradient, median over models: "
        f"**{default:.2f}x** — {'met' if default <= 2.0 else 'MISSED'}.\n"
        f"- Operator product at most {OVERHEAD_TARGET:.2f}x the raw JAX product (warm, worst "
        f"model and mode): **{worst_overhead:.3f}x** — "
        f"{'met' if worst_overhead <= OVERHEAD_TARGET else 'MISSED'}.\n"
        f'- Block products (`block="auto"`) never slower per probe than single products: '
        f"lowest speed-up **{np.min(speedups):.2f}x** (median {np.median(speedups):.2f}x) — "
        f"{'met' if np.min(speedups) >= 0.95 else 'MISSED'} (within 5% timing noise)."
        + (" Quick mode: tiny models, few repeats; not a measurement." if quick else ""),
    )

    def draw(fig):
        ax = fig.add_subplot(111)
        x = np.arange(len(results))
        width = 0.8 / len(modes)
        for i, m in enumerate(modes):
            ax.bar(
                x + (i - len(modes) / 2 + 0.5) * width,
                [r["ratios"].get(m, 0.0) for r in results],
                width,
                label=m,
            )
        ax.axhline(2.0, color="k", ls="--", lw=1, label="target 2.0x")
        ax.axhline(1.0, color="grey", ls=":", lw=1)
        ax.set_xticks(x)
        ax.set_xticklabels(
            [f"{r['model'].split(',')[0]}\nn={r['n']:,}" for r in results], fontsize=8
        )
        ax.set_ylabel("time / gradient time")
        ax.set_title(f"HVP cost relative to one gradient ({C.device_name()})")
        ax.legend(fontsize=7, ncol=2)

    rep.figure("hvp_modes.png", draw, figsize=(9, 4.8))
    return rep
