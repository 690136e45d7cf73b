"""Measured large language models: gradient, one Hessian-vector product, top-1 ``hvp.eigsh``, a
Hutch++ ``hvp.trace`` and a short ``hvp.spectral_density`` (SLQ) for a decoder-only Flax NNX
transformer LM of about 10M, 50M and 100M parameters (issue 13, item 6), with the time and the
peak memory of each, and the GPU profile (item 7).

Run:

* ``python -m benchmarks --only lm_scale`` (or ``python -m benchmarks.bench_lm_scale``): the CPU
  sizes, results in ``benchmarks/results/cpu/lm_scale.{md,json,png}`` (about 30 minutes on 2
  shared cores); ``--quick``: tiny models, a temporary folder.
* ``python -m benchmarks --profile gpu``: the GPU profile (:func:`run_profile`). On the first
  accelerator it reads ``memory_stats()["bytes_limit"]``, keeps the sizes of a ladder (100M,
  300M, 1B, 2B, 4B parameters) whose estimated memory (:data:`BYTES_PER_PARAM`) fits in 80% of
  it, runs the LM suite in bfloat16 on them, largest first, and then the MLP of ``bench_scale``
  (product and lean ``eigsh``, largest first), within a wall-time budget (``--time-budget``,
  default 480 s, 70% for the LM: a size whose projected time would pass it is skipped and
  recorded so; the isolated processes share JAX's persistent compilation cache), and writes
  ``benchmarks/results/<device-name>/lm_scale.{md,json,png}`` after every measurement, so a
  run killed by a timeout keeps what finished. ``HVP_BENCH_DEVICE_BYTES`` overrides the device
  memory it finds (``tests/scale/test_bench_lm_scale_quick.py`` runs the profile's sizing and
  budget logic on the CPU that way).

Model (:func:`benchmarks._models.nnx_lm_random`): pre-norm causal transformer, vocabulary 8,192,
context 64, ``d_model`` 256 / 512 / 768 with ``d_model / 64`` heads and the number of blocks that
reaches the target (:func:`lm_config`; ``n = 2 V d + T d + L (12 d^2 + 13 d) + 2 d + V``),
random weights and random tokens, one batch of 4 sequences of 64 tokens, mean next-token
cross-entropy. The operator is the Hessian (``hvp.flax.from_nnx(model, "cross_entropy")
.hessian(batch, linearize=False)``: forward-over-reverse products, nothing stored per batch).

Settings (small, stated): ``eigsh(k=1, tol=1e-3, num_iters=20)`` (full mode: a 20-vector basis
with thick restarts until converged; the lean mode keeps its default step budget and stops when
converged); ``trace(method="hutch++",
num_matvecs=9)``; ``spectral_density(num_probes=1, num_iters=10)``; every algorithm with
``chunk_size=1`` where it has one, so they all share the operator's one compiled product.
"Full" is the default memory mode (``eigsh(basis="device")`` keeps ``num_iters + 1`` basis
vectors, SLQ ``reorthogonalize=True`` keeps ``num_iters + 1`` per probe group); "lean" is
``eigsh(basis="none")`` (``4 + 2k`` vectors, a second Lanczos pass for the eigenvector) and SLQ
``reorthogonalize=False``. The full modes run only where their estimated memory fits the
per-process budget (``FULL_BUDGET_CPU`` = 5 GB of the shared 24 GB machine; 80% of the device
on a GPU); the others are recorded as skipped with the estimate.

Each measurement runs in its own process (:func:`benchmarks._common.run_isolated`), so its peak
memory is its own. Gradient and product: median of 3 after a warm-up call. Algorithms: one run
after one warm-up product (the model's product is compiled and shared; the algorithm's small
``prepare``/``update`` steps compile inside the timed run, as in a first call). ``peak extra``
is the host RSS high-water mark while the timed calls ran minus the RSS before them (CPU), or
the device's ``peak_bytes_in_use`` of the whole process (GPU: model included); divided by
``n * 4`` bytes it is the memory in units of ``n`` float32 vectors.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks._common import (
    RESULTS,
    Report,
    device_name,
    environment,
    fmt_bytes,
    fmt_s,
    print_markdown,
    run_isolated,
)

VOCAB, SEQ_LEN, BATCH = 8192, 64, 4
CPU_SIZES = (1e7, 5e7, 1e8)
GPU_LADDER = (1e8, 3e8, 1e9, 2e9, 4e9)
QUICK_SIZES = (2e4, 6e4)
QUICK_LADDER = (2e4, 6e4, 1e6)
QUICK_SHAPE = dict(vocab=64, seq_len=8, batch=2)
MLP_GPU_LADDER = (1e7, 1e8, 1e9)
MLP_QUICK_LADDER = (1e3, 1e4)

EIGSH = dict(k=1, tol=1e-3, num_iters=20)
#: The lean mode's settings: its memory does not grow with the Lanczos steps, so it keeps its
#: default step budget (``max(4k + 60, 300)``) and stops when the wanted pair has converged
#: (``num_iters=20`` left it short of ``tol`` at every size: residuals 0.09-0.39 in the
#: 2026-12-01 00:21 run).
EIGSH_LEAN = dict(k=1, tol=1e-3)
TRACE = dict(method="hutch++", num_matvecs=9)
SLQ = dict(num_probes=1, num_iters=10)
WHATS = ("grad", "product", "eigsh_full", "eigsh_lean", "trace", "slq_full", "slq_lean")
LABELS = {
    "grad": "gradient",
    "product": "product",
    "eigsh_full": "eigsh (full)",
    "eigsh_lean": "eigsh (lean)",
    "trace": "Hutch++ trace",
    "slq_full": "SLQ (full)",
    "slq_lean": "SLQ (lean)",
}
FULL_BUDGET_CPU = 5e9  # bytes: per process, on the 24 GB machine shared by 6 engineers
#: The memory guard kills a CPU measurement above this resident size. The lean modes measured
#: 29-40 ``n`` float32 vectors at 10.5M parameters (with a fixed part); at 104.8M that can pass
#: 8 GB, which the shared 24 GB machine allows for one process at a time.
GUARD_CPU = 11e9
#: Estimated bytes per parameter of a GPU measurement (lean algorithms), all dtypes included:
#: bfloat16 parameters (2), the product's bfloat16 tangents and gradients (about 10), the
#: ``4 + 2k = 6`` float32 Lanczos vectors of the lean ``eigsh`` (24), and a margin.
BYTES_PER_PARAM = 48
#: Peak memory of the full modes in units of ``n`` float32 vectors, as measured on the CPU at
#: 10.5M parameters (``eigsh`` full basis 107 ``n``: its 21 vectors and the thick-restart
#: temporaries; SLQ with reorthogonalisation 32 ``n``), with a margin: the rule that decides
#: where a full mode is run.
FULL_OVER_N = {"eigsh_full": 110, "slq_full": 35}
#: The share of the profile's time budget given to the LM suite (the rest: the MLP).
LM_SHARE = 0.7
#: Fixed cost of one isolated measurement (process start, JAX, model, compilation), seconds,
#: used to project the next size's time when nothing was measured yet.
PROCESS_OVERHEAD_S = 30.0


# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------
def lm_config(n_target: float, *, vocab=VOCAB, seq_len=SEQ_LEN, batch=BATCH, seed=0) -> dict:
    """The LM configuration with at least ``n_target`` parameters (fewest blocks that reach it).

    ``d_model`` grows with the target (32 below 1e5, then 64, 256, 512, 768, 1024, 2048, 2560),
    heads of width 64 (or one head below ``d_model`` 64), then the number of blocks ``L``.
    """
    from benchmarks._arrays import lm_size

    widths = (
        (1e5, 32),
        (1e6, 64),
        (2e7, 256),
        (7e7, 512),
        (2.5e8, 768),
        (6e8, 1024),
        (1.5e9, 2048),
    )
    d = next((w for limit, w in widths if n_target <= limit), 2560)
    cfg = dict(vocab=vocab, seq_len=seq_len, d_model=d, heads=max(1, d // 64), batch=batch)
    base = lm_size(layers=0, **cfg)
    per_block = lm_size(layers=1, **cfg) - base
    cfg["layers"] = max(1, math.ceil((n_target - base) / per_block))
    cfg["seed"] = seed
    cfg["n"] = lm_size(**cfg)
    return cfg


def full_memory_bytes(what: str, n: int) -> float:
    """Estimated peak bytes of a full-memory mode (:data:`FULL_OVER_N` float32 vectors)."""
    return FULL_OVER_N[what] * 4.0 * n


def fit_sizes(ladder, bytes_limit: float, *, bytes_per_param=BYTES_PER_PARAM, share=0.8):
    """``(kept, skipped)``: the sizes of ``ladder`` whose estimated memory
    ``bytes_per_param * n`` fits in ``share * bytes_limit``, and ``[(n, reason), ...]`` for the
    rest."""
    kept, skipped = [], []
    for n in ladder:
        need = bytes_per_param * n
        if need <= share * bytes_limit:
            kept.append(n)
        else:
            skipped.append(
                (
                    n,
                    f"needs about {need / 1e9:.1f} GB ({bytes_per_param} bytes per parameter), "
                    f"more than {share:.0%} of the device's {bytes_limit / 1e9:.1f} GB",
                )
            )
    return kept, skipped


def project_seconds(n_next: float, count: int, done: list[tuple[float, float, int]]) -> float:
    """Projected wall time of ``count`` measurements of a size with ``n_next`` parameters from
    ``done = [(n, seconds, measurements)]`` (the sizes measured so far): the last size's time per
    measurement (compilation and process start-up included), times ``count``, scaled up linearly
    when ``n_next`` is larger (not down: start-up and compilation do not shrink with ``n``);
    ``count * PROCESS_OVERHEAD_S`` before any."""
    if not done:
        return count * PROCESS_OVERHEAD_S
    n_last, t_last, c_last = done[-1]
    return t_last / max(c_last, 1) * count * max(1.0, n_next / n_last)


def _clock() -> float:
    return time.monotonic()


def device_bytes_limit() -> tuple[float | None, str]:
    """``(bytes, source)``: ``HVP_BENCH_DEVICE_BYTES`` if set, else the first device's
    ``memory_stats()["bytes_limit"]`` (``None`` on a CPU, whose devices report none)."""
    fake = os.environ.get("HVP_BENCH_DEVICE_BYTES")
    if fake:
        return float(fake), "HVP_BENCH_DEVICE_BYTES"
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # pragma: no cover - backends without memory stats
        stats = {}
    limit = stats.get("bytes_limit")
    return (float(limit), "memory_stats()['bytes_limit']") if limit else (None, "none")


# --------------------------------------------------------------------------------------------
# one measurement (run in its own process)
# --------------------------------------------------------------------------------------------
@functools.cache
def _setup(config_json: str, dtype: str):
    """Model, problem, operator and a product's probe block for a configuration (cached: the
    quick in-process run reuses one compiled product; an isolated run builds it once anyway)."""
    import jax
    import jax.numpy as jnp

    import hvp
    import hvp.flax
    from benchmarks._models import nnx_lm_random

    cfg = json.loads(config_json)
    cfg.pop("n", None)
    model, batch = nnx_lm_random(dtype=jnp.dtype(dtype), **cfg)
    problem = hvp.flax.from_nnx(model, "cross_entropy")
    op = problem.hessian(batch, linearize=False)
    v = hvp.tree.rademacher_like(jax.random.key(1), problem.params)
    block = jax.tree_util.tree_map(lambda x: x[None], v)
    return problem, batch, op, block


def measure_one(*, config: dict, what: str, dtype: str = "float32") -> dict:
    """One measurement of ``what`` (one of :data:`WHATS`) on the LM of ``config``, in this
    process."""
    import jax
    import numpy as np

    import hvp
    from benchmarks._common import measure

    t0 = time.perf_counter()
    problem, batch, op, block = _setup(json.dumps(config, sort_keys=True), dtype)
    params = problem.params
    n = hvp.tree.size(params)
    key = jax.random.key(0)
    out = {"what": what, "n": n, "dtype": dtype, "config": config}
    if what == "grad":
        grad = jax.jit(jax.grad(problem.loss_fn))
        stats = measure(lambda: grad(params, batch), repeats=3, warmup=1)
        out["matvecs"] = 0
    elif what == "product":
        stats = measure(lambda: op.matmat(block), repeats=3, warmup=1)
        out["matvecs"] = 1
    else:
        t1 = time.perf_counter()
        jax.block_until_ready(op.matmat(block))  # compiles the shared product
        out["first_product_s"] = time.perf_counter() - t1
        if what.startswith("eigsh"):
            basis, kw = ("device", EIGSH) if what == "eigsh_full" else ("none", EIGSH_LEAN)

            def fn():
                return hvp.eigsh(op, key=key, basis=basis, **kw)
        elif what == "trace":

            def fn():
                return hvp.trace(op, key=key, chunk_size=1, **TRACE)
        else:
            reorth = what == "slq_full"

            def fn():
                return hvp.spectral_density(
                    op, key=key, chunk_size=1, reorthogonalize=reorth, **SLQ
                )

        stats = measure(fn, repeats=1, warmup=0)
        r = stats["value"]
        out["matvecs"] = int(r.num_matvecs)
        if what.startswith("eigsh"):
            out["eigenvalue"] = float(np.asarray(r.eigenvalues)[-1])
            out["residual"] = float(np.asarray(r.residuals)[-1])
            out["converged"] = bool(np.all(np.asarray(r.converged)))
        elif what == "trace":
            out["estimate"] = float(r.estimate)
            out["std_error"] = float(r.std_error)
        else:
            nodes = np.asarray(r.nodes).ravel()
            out["nodes_min"], out["nodes_max"] = float(nodes.min()), float(nodes.max())
    stats.pop("value", None)
    out.update(stats)
    peak = stats.get("device_peak_bytes") or stats.get("peak_extra_bytes")
    out["peak_bytes"] = peak
    out["peak_over_n"] = peak / (n * 4) if peak else None
    out["process_s"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------------
def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # pragma: no cover
        return "-"


class _Suite:
    """The rows of one run, re-written (JSON, Markdown, plot) after every measurement."""

    def __init__(self, out_dir: Path, *, quick: bool, profile: str, dtype: str, isolate: bool):
        self.report = Report(
            "lm_scale", "Large language models, measured: time and memory against n", out_dir
        )
        self.report.quick = quick
        self.profile, self.dtype, self.isolate = profile, dtype, isolate
        self.env = {"JAX_PLATFORMS": "cpu"} if profile == "cpu" else {}
        self.rows: list[dict] = []
        self.mlp_rows: list[dict] = []
        self.skipped: list[dict] = []
        self.data = self.report.data
        self.data.update(
            environment=environment(),
            profile=profile,
            dtype=dtype,
            settings=dict(
                batch=f"{QUICK_SHAPE['batch'] if quick else BATCH} sequences x "
                f"{QUICK_SHAPE['seq_len'] if quick else SEQ_LEN} tokens",
                eigsh=EIGSH,
                eigsh_lean=EIGSH_LEAN,
                trace=TRACE,
                slq=SLQ,
                chunk_size=1,
            ),
            uptime_start=_uptime(),
            lm=self.rows,
            mlp=self.mlp_rows,
            skipped=self.skipped,
        )

    def measure(self, target: str, kwargs: dict, *, timeout: float, mem_limit=None) -> dict:
        t0 = time.perf_counter()
        if self.isolate:
            res = run_isolated(
                target, kwargs, timeout=timeout, mem_limit_bytes=mem_limit, env=self.env
            )
        else:
            from benchmarks._common import call_target, jsonable

            try:
                res = jsonable(call_target(target, kwargs))
                res["status"] = "ok"
            except Exception as e:  # recorded, as run_isolated does
                res = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:400]}
            res["wall_s"] = time.perf_counter() - t0
        return res

    def write(self, *, plot: bool = False, uptime: bool = True) -> None:
        """Write the JSON and Markdown (and with ``plot`` the figure) as they stand now."""
        if uptime:
            self.data["uptime_end"] = _uptime()
        self.report.sections.clear()
        self._tables()
        if plot and any(r.get(w, {}).get("status") == "ok" for r in self.rows for w in WHATS):
            self.report.figures.clear()
            self._plot()
        self.report.write()

    # -- output ------------------------------------------------------------------------------
    def _tables(self) -> None:
        d = self.data
        s = d["settings"]
        self.report.text(
            "Set-up",
            f"Profile `{self.profile}`, parameters in {self.dtype}; one batch of {s['batch']}, "
            f"random tokens; Hessian products (forward-over-reverse). `eigsh(k=1, tol={EIGSH['tol']}, "
            f"num_iters={EIGSH['num_iters']})` (full; lean: the default step budget, stopping "
            "when converged), `trace(method='hutch++', num_matvecs="
            f"{TRACE['num_matvecs']})`, `spectral_density(num_probes={SLQ['num_probes']}, "
            f"num_iters={SLQ['num_iters']})`, `chunk_size=1`. Full: `basis='device'` / "
            "`reorthogonalize=True`; lean: `basis='none'` / `reorthogonalize=False`.\n\n"
            f"Machine load (`uptime`) at the start: `{d['uptime_start']}`; at the last write: "
            f"`{d['uptime_end']}` (the cores are shared with other jobs: times are upper "
            "bounds of an idle machine's)."
            + (
                f" Measurements kept from an earlier run (`--resume`; marked `resumed` in the "
                f"JSON) started {d['resumed_from'].get('date_utc')} under load "
                f"`{d['resumed_from'].get('uptime_start')}`."
                if d.get("resumed_from")
                else ""
            )
            + "".join(
                f" {LABELS[w]} at {e['n'] / 1e6:.1f}M: {e[w]['rerun_note']}."
                for e in self.rows
                for w in WHATS
                if (e.get(w) or {}).get("rerun_note")
            ),
        )

        def cell_t(r):
            if not r:
                return "-"
            if r.get("status") != "ok":
                return r.get("status", "?")
            m = r.get("matvecs")
            return fmt_s(r.get("median_s")) + (f" ({m})" if m and m > 1 else "")

        def cell_m(r):
            if not r or r.get("status") != "ok":
                return "-"
            x = r.get("peak_over_n")
            return f"{fmt_bytes(r.get('peak_bytes'))} ({x:.1f} n)" if x else "-"

        rows_t, rows_m = [], []
        for e in self.rows:
            n = e["n"]
            rows_t.append([f"{n / 1e6:.1f}M", *[cell_t(e.get(w)) for w in WHATS]])
            rows_m.append([f"{n / 1e6:.1f}M", *[cell_m(e.get(w)) for w in WHATS]])
        heads = ["n", *[LABELS[w] for w in WHATS]]
        self.report.table(
            "Time",
            heads,
            rows_t,
            note="Median wall time (products in parentheses); gradient and product: median of 3 "
            "after a warm-up; algorithms: one run after a warm-up product.",
        )
        mem_note = (
            "Peak host memory above the model, data and a warm product (RSS high-water mark of "
            "the timed calls minus the RSS before them), in bytes and units of `n` float32 "
            "vectors."
            if self.profile == "cpu"
            else "Device `peak_bytes_in_use` of the measurement's process (model included), in "
            "bytes and units of `n` float32 vectors."
        )
        self.report.table("Memory", heads, rows_m, note=mem_note)
        res_rows = []
        for e in self.rows:
            el, ef = e.get("eigsh_lean") or {}, e.get("eigsh_full") or {}
            tr, sl = e.get("trace") or {}, e.get("slq_lean") or {}
            res_rows.append(
                [
                    f"{e['n'] / 1e6:.1f}M",
                    f"{e['config']['d_model']} x {e['config']['layers']}",
                    _num(ef.get("eigenvalue"), 6),
                    _num(el.get("eigenvalue"), 6),
                    f"{el.get('converged', '-')} ({_num(el.get('residual'), 2)})",
                    f"{_num(tr.get('estimate'))} ± {_num(tr.get('std_error'))}",
                    f"[{_num(sl.get('nodes_min'))}, {_num(sl.get('nodes_max'))}]",
                    fmt_bytes(e["n"] * (2 if self.dtype == "bfloat16" else 4)),
                ]
            )
        self.report.table(
            "Results",
            [
                "n",
                "d_model x blocks",
                "top eigenvalue (full)",
                "top eigenvalue (lean)",
                "lean converged (residual)",
                "trace ± std error",
                "SLQ nodes (lean)",
                "parameters",
            ],
            res_rows,
            note="Residual: the true residual norm `||A y - lambda y||` of the lean mode's Ritz "
            "pair; converged means below its threshold (`tol * |lambda|` and the round-off "
            "floor) within `num_iters` Lanczos steps.",
        )
        if self.mlp_rows:
            self.report.table(
                "MLP (bench_scale's model) in the same run",
                ["n", "product", "eigsh lean", "products", "peak", "top eigenvalue"],
                [
                    [
                        f"{r['n_target']:.0e}",
                        cell_t(r.get("product")),
                        cell_t(r.get("eigsh_none")),
                        (r.get("eigsh_none") or {}).get("matvecs", "-"),
                        cell_m(_mlp_mem(r.get("eigsh_none"))),
                        _num((r.get("eigsh_none") or {}).get("eigenvalue")),
                    ]
                    for r in self.mlp_rows
                ],
            )
        if self.skipped:
            self.report.table(
                "Skipped",
                ["model", "n", "what", "reason"],
                [
                    [s["model"], f"{s['n']:.3g}", s.get("what", "all"), s["reason"]]
                    for s in self.skipped
                ],
            )

    def _plot(self) -> None:
        name = "lm_scale.png"
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover
            self.report.notes.append(f"{name}: not drawn (matplotlib is not installed)")
            return
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.5))
        for w in WHATS:
            pts = [
                (e["n"], e[w]["median_s"], e[w].get("peak_bytes"))
                for e in self.rows
                if (e.get(w) or {}).get("status") == "ok"
            ]
            if not pts:
                continue
            ns, ts, ms = zip(*pts, strict=True)
            ax_t.plot(ns, ts, "o-", label=LABELS[w])
            mm = [(a, b) for a, b in zip(ns, ms, strict=True) if b]
            if mm:
                ax_m.plot(*zip(*mm, strict=True), "o-", label=LABELS[w])
        mlp = _mlp_points(self.profile, self.mlp_rows)
        if mlp:
            ns, ts, ms = zip(*mlp, strict=True)
            ax_t.plot(ns, ts, "s--", color="grey", label="MLP product (bench_scale)")
            mm = [(a, b) for a, b in zip(ns, ms, strict=True) if b]
            if mm:
                ax_m.plot(*zip(*mm, strict=True), "s--", color="grey", label="MLP eigsh lean")
        nmax = max([e["n"] for e in self.rows] + [p[0] for p in mlp])
        nmin = min([e["n"] for e in self.rows] + [p[0] for p in mlp])
        for mult, style in ((4, ":"), (40, "-.")):
            ax_m.plot([nmin, nmax], [mult * nmin, mult * nmax], style, color="k", lw=0.8)
            ax_m.annotate(f"{mult // 4} n float32", (nmax, mult * nmax), fontsize=8)
        for ax, ylabel in ((ax_t, "wall time (s)"), (ax_m, "peak memory (bytes)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("parameters n")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_title("Time (transformer LM; MLP dashed)")
        ax_m.set_title(
            "Peak memory above the model" if self.profile == "cpu" else "Device peak memory"
        )
        ax_t.legend(fontsize=7)
        ax_m.legend(fontsize=7)
        fig.tight_layout()
        out = self.report.out_dir
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".lm_scale-", suffix=".png", dir=out)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=110)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the plot from other readers
            os.replace(tmp, out / name)  # atomic: a reader never sees half a file
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.remove(tmp)
        self.report.figures.append(name)


def _num(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _mlp_mem(r):
    if not r or r.get("status") != "ok":
        return r
    peak = r.get("device_peak_bytes") or r.get("peak_extra_bytes")
    return dict(r, peak_bytes=peak, peak_over_n=r.get("peak_extra_over_n"))


def _mlp_points(profile: str, mlp_rows: list[dict]) -> list[tuple]:
    """``[(n, product seconds, eigsh lean peak bytes)]`` of the MLP: this run's rows, or the
    committed CPU ``scale.json`` on the CPU profile."""
    rows = mlp_rows
    if not rows and profile == "cpu":
        path = RESULTS / "cpu" / "scale.json"
        try:
            rows = json.loads(path.read_text()).get("models", [])
        except (OSError, ValueError):
            rows = []
    pts = []
    for r in rows:
        p, e = r.get("product") or {}, r.get("eigsh_none") or {}
        if p.get("status") == "ok":
            peak = e.get("device_peak_bytes") or e.get("peak_extra_bytes")
            pts.append((p["n"], p["median_s"], peak if e.get("status") == "ok" else None))
    return pts


def _lm_size(
    suite: _Suite,
    cfg: dict,
    *,
    full_budget: float,
    timeout: float,
    mem_limit,
    deadline=None,
    previous: dict | None = None,
):
    """Measure every algorithm on one LM size; a row of ``suite.rows``, written after each.
    Entries of ``previous`` (the same size's row of an earlier run) that finished are kept."""
    n = cfg["n"]
    row = {"n": n, "config": cfg}
    suite.rows.append(row)
    for what in WHATS:
        old = (previous or {}).get(what) or {}
        if old.get("status") == "ok":
            row[what] = dict(old, resumed=True)
            continue
        if what.endswith("_full") and full_memory_bytes(what, n) > full_budget:
            need = full_memory_bytes(what, n)
            row[what] = {"status": "skipped", "reason": f"needs about {need / 1e9:.1f} GB"}
            suite.skipped.append(
                {
                    "model": "lm",
                    "n": n,
                    "what": what,
                    "reason": f"full memory mode needs about {need / 1e9:.1f} GB, more than the "
                    f"{full_budget / 1e9:.1f} GB budget; the lean mode is measured",
                }
            )
            continue
        left = timeout if deadline is None else min(timeout, deadline - _clock())
        if left <= 5:
            row[what] = {"status": "skipped", "reason": "time budget spent"}
            suite.skipped.append(
                {"model": "lm", "n": n, "what": what, "reason": "the time budget was spent"}
            )
            continue
        res = suite.measure(
            "benchmarks.bench_lm_scale:measure_one",
            {"config": cfg, "what": what, "dtype": suite.dtype},
            timeout=left,
            mem_limit=mem_limit,
        )
        row[what] = res
        print(
            f"[lm_scale] n={n:,} {what}: {res.get('status')} "
            f"{fmt_s(res.get('median_s'))} matvecs={res.get('matvecs', '-')} "
            f"peak={fmt_bytes(res.get('peak_bytes'))} wall={res.get('wall_s', 0):.0f} s",
            flush=True,
        )
        suite.write()
    suite.write(plot=True)
    return row


# --------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------
def render(out_dir: Path | str) -> Report:
    """Re-write ``lm_scale.md`` and ``lm_scale.png`` from the ``lm_scale.json`` in ``out_dir``
    (nothing is measured; e.g. after copying a GPU run's JSON)."""
    out_dir = Path(out_dir)
    data = json.loads((out_dir / "lm_scale.json").read_text())
    suite = _Suite.__new__(_Suite)
    suite.report = Report("lm_scale", data["title"], out_dir)
    suite.report.quick = data.get("quick", False)
    suite.profile, suite.dtype, suite.isolate = data["profile"], data["dtype"], False
    for k in ("group", "title", "quick", "figures", "notes"):
        data.pop(k, None)
    suite.report.data = suite.data = data
    suite.rows, suite.mlp_rows, suite.skipped = data["lm"], data["mlp"], data["skipped"]
    suite.write(plot=True, uptime=False)
    return suite.report


def _previous_rows(out_dir: Path, suite: _Suite) -> dict:
    """``{n: row}`` of the ``lm_scale.json`` already in ``out_dir`` (for ``resume``)."""
    try:
        old = json.loads((out_dir / "lm_scale.json").read_text())
    except (OSError, ValueError):
        return {}
    suite.data["resumed_from"] = {
        "uptime_start": old.get("uptime_start"),
        "date_utc": (old.get("environment") or {}).get("date_utc"),
    }
    return {r["n"]: r for r in old.get("lm", [])}


def run(out: Path | str | None = None, *, quick: bool = False, resume: bool = False) -> Report:
    """The CPU suite (the ``lm_scale`` group of ``python -m benchmarks``): 10M, 50M, 100M.

    With ``resume``, the measurements that finished in the ``lm_scale.json`` already in the
    output folder are kept and only the others run."""
    out_dir = Path(out) if out else (RESULTS / "cpu")
    suite = _Suite(out_dir, quick=quick, profile="cpu", dtype="float32", isolate=not quick)
    previous = _previous_rows(out_dir, suite) if resume else {}
    shape = QUICK_SHAPE if quick else {}
    for n_target in QUICK_SIZES if quick else CPU_SIZES:
        cfg = lm_config(n_target, **shape)
        _lm_size(
            suite,
            cfg,
            full_budget=FULL_BUDGET_CPU,
            timeout=2400,
            mem_limit=int(GUARD_CPU),
            previous=previous.get(cfg["n"]),
        )
    suite.write(plot=True)
    return suite.report


def run_profile(
    out: Path | str | None = None, *, quick: bool = False, time_budget: float = 480.0
) -> Report:
    """The GPU profile: the LM suite and the MLP scale suite sized to the device, in bfloat16,
    within ``time_budget`` seconds of wall time (see the module docstring)."""
    t_start = _clock()
    deadline = t_start + time_budget
    limit, source = device_bytes_limit()
    name = device_name()
    if limit is None:
        limit, source = 8e9, "default 8 GB (the device reports no memory limit)"
    out_dir = Path(out) if out else (RESULTS / name)
    suite = _Suite(out_dir, quick=quick, profile="gpu", dtype="bfloat16", isolate=not quick)
    # the measurements of a size compile the same product: share the compilations between their
    # processes (JAX's persistent cache), so the budget goes to products, not to compilers
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or tempfile.mkdtemp(prefix="hvp-jax-cache-")
    suite.env.update(JAX_COMPILATION_CACHE_DIR=cache)
    suite.data.update(
        device_bytes_limit=limit,
        device_bytes_source=source,
        time_budget_s=time_budget,
        bytes_per_param_rule=BYTES_PER_PARAM,
    )
    shape = QUICK_SHAPE if quick else {}
    ladder = QUICK_LADDER if quick else GPU_LADDER
    kept, skipped = fit_sizes(ladder, limit)
    for n, reason in skipped:
        suite.skipped.append({"model": "lm", "n": n, "reason": reason})
    print(
        f"[lm_scale] GPU profile on {name}: {limit / 1e9:.1f} GB ({source}); LM sizes "
        f"{[f'{n:.0e}' for n in kept]}; budget {time_budget:.0f} s",
        flush=True,
    )
    lm_deadline = t_start + LM_SHARE * time_budget
    full_budget = 0.8 * limit
    done: list[tuple[float, float, int]] = []
    # largest first: the goal is the largest model that fits; smaller ones while time is left
    for n_target in sorted(kept, reverse=True):
        cfg = lm_config(n_target, **shape)
        count = sum(
            1
            for w in WHATS
            if not (w.endswith("_full") and full_memory_bytes(w, cfg["n"]) > full_budget)
        )
        projected = project_seconds(cfg["n"], count, done)
        now = _clock()
        if now + projected > lm_deadline and done:
            suite.skipped.append(
                {
                    "model": "lm",
                    "n": cfg["n"],
                    "reason": f"projected {projected:.0f} s, over the {lm_deadline - now:.0f} s "
                    "left of the LM share of the time budget",
                }
            )
            suite.write()
            continue
        t0 = _clock()
        _lm_size(
            suite, cfg, full_budget=full_budget, timeout=600, mem_limit=None, deadline=deadline
        )
        done.append((cfg["n"], _clock() - t0, count))
    # the MLP of bench_scale: product and lean eigsh, the largest size that fits first
    mlp_kept, mlp_skipped = fit_sizes(MLP_QUICK_LADDER if quick else MLP_GPU_LADDER, limit)
    for n, reason in mlp_skipped:
        suite.skipped.append({"model": "mlp", "n": n, "reason": reason})
    done = []
    for n_target in sorted(mlp_kept, reverse=True):
        projected = project_seconds(n_target, 2, done)
        now = _clock()
        if now + projected > deadline and (done or now > deadline - 10):
            suite.skipped.append(
                {
                    "model": "mlp",
                    "n": n_target,
                    "reason": f"projected {projected:.0f} s, over the {deadline - now:.0f} s left",
                }
            )
            continue
        t0 = _clock()
        row = {"n_target": n_target}
        suite.mlp_rows.append(row)
        for what in ("product", "eigsh_none"):
            left = deadline - _clock()
            if left <= 5:
                row[what] = {"status": "skipped", "reason": "time budget spent"}
                continue
            row[what] = suite.measure(
                "benchmarks.bench_scale:measure_one",
                {"n_target": n_target, "what": what, "dtype": "bfloat16"},
                timeout=left,
            )
            print(f"[lm_scale] MLP n={n_target:.0e} {what}: {row[what].get('status')}", flush=True)
            suite.write()
        done.append((n_target, _clock() - t0, 2))
    suite.data["wall_s"] = _clock() - t_start
    suite.write(plot=True)
    return suite.report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_lm_scale", description=__doc__)
    p.add_argument(
        "--quick", action="store_true", help="tiny models, results in a temporary folder"
    )
    p.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--time-budget", type=float, default=480.0, help="GPU profile: seconds")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument(
        "--render",
        action="store_true",
        help="only re-write lm_scale.md and lm_scale.png from the lm_scale.json in --out",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="CPU: keep the finished measurements of the lm_scale.json in the output folder",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    out = args.out or (tempfile.mkdtemp(prefix="hvp-lm-scale-") if args.quick else None)
    if args.render:
        print_markdown(render(out or RESULTS / "cpu").markdown())
        return 0
    if args.profile == "gpu":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        rep = run_profile(out, quick=args.quick, time_budget=args.time_budget)
    else:
        rep = run(out, quick=args.quick, resume=args.resume)
    print_markdown(rep.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
