"""A data set streamed from disk: time per pass and peak memory as the data set grows to 2 GiB.

Run: ``python -m benchmarks.bench_stream`` (CPU, a few minutes on 2 cores; results in
``benchmarks/results/cpu/stream.{md,json,png}``), or ``--quick`` (tiny sizes, a temporary
directory); also ``python -m benchmarks --only stream``.

The data set is written once to a temporary directory as two ``.npy`` files (features
``(N, D)`` float32 and integer labels), in chunks, and deleted at the end. Each data-set size is
a prefix of it, read through :class:`hvp.operators.ArrayBatches` (``np.load(mmap_mode="r")``:
slices of a memory map, read from disk when a batch is moved to the device) by a streamed
Hessian (``stream=True``, ``prefetch=1``) of a small MLP ``D -> 16 -> 10`` (tanh, softmax
cross-entropy), so one pass over 2 GiB takes seconds. Every measurement runs in its own process
(:func:`benchmarks._common.run_isolated`).

Memory. The pages of a memory-mapped file that a pass has read count in the resident set
(``VmRSS``, ``VmHWM``) as *file-backed* pages, which the kernel drops when memory is short: the
RSS high-water mark of a pass over a 2 GiB file is about 2 GiB larger than over a small one
without anything being allocated. The benchmark therefore reports

* **peak anonymous memory** (``RssAnon`` of ``/proc/self/status``, sampled every 5 ms by a
  thread while the measured calls run): the memory the process itself allocated (JAX runtime,
  compiled programs, batches on the device, which on the CPU are host memory, temporaries);
* **peak device-buffer bytes** (the sum of ``nbytes`` over ``jax.live_arrays()``, sampled the
  same way): the arrays JAX holds (parameters, vectors, the batches in flight);
* the RSS high-water mark (``VmHWM``) for contrast: it grows with the file, the anonymous
  memory does not.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import (
    Report,
    environment,
    fmt_bytes,
    fmt_s,
    print_markdown,
    reset_peak_rss,
    run_isolated,
    status_field,
)

GIB = 1 << 30
DIM, HIDDEN, CLASSES = 1024, 16, 10
BATCH = 8192
SIZES_GIB = (0.25, 0.5, 1.0, 2.0)
QUICK = {"dim": 64, "hidden": 8, "batch": 256, "sizes_gib": (0.002, 0.004)}


def example_bytes(dim: int) -> int:
    return 4 * dim + 4  # float32 features + an int32 label


def write_dataset(folder, num_examples: int, dim: int, *, seed: int = 0, chunk: int = 1 << 16):
    """Write ``x.npy`` (``(N, D)`` float32, standard normal) and ``y.npy`` (int32 labels) in chunks.

    Returns the two paths. Nothing larger than ``chunk`` examples is held in memory.
    """
    import numpy as np

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    x = np.lib.format.open_memmap(
        folder / "x.npy", mode="w+", dtype=np.float32, shape=(num_examples, dim)
    )
    y = np.lib.format.open_memmap(
        folder / "y.npy", mode="w+", dtype=np.int32, shape=(num_examples,)
    )
    for lo in range(0, num_examples, chunk):
        hi = min(lo + chunk, num_examples)
        x[lo:hi] = rng.standard_normal((hi - lo, dim), dtype=np.float32)
        y[lo:hi] = rng.integers(0, CLASSES, size=hi - lo, dtype=np.int32)
    x.flush()
    y.flush()
    del x, y
    return str(folder / "x.npy"), str(folder / "y.npy")


class _Sampler:
    """Samples ``RssAnon`` and the bytes of ``jax.live_arrays()`` in a thread; keeps the peaks."""

    def __init__(self, period: float = 0.005):
        self.period = period
        self.peak_anon = 0
        self.peak_live = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def anon() -> int:
        return status_field("RssAnon") or 0

    @staticmethod
    def live() -> int:
        import jax

        return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())

    def sample(self) -> None:
        self.peak_anon = max(self.peak_anon, self.anon())
        try:
            self.peak_live = max(self.peak_live, self.live())
        except RuntimeError:  # an array deleted while listed
            pass

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period)

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()
        return False


def _setup(x_path, y_path, num_examples, batch, hidden, stream=True):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import hvp

    x = np.load(x_path, mmap_mode="r")[:num_examples]
    y = np.load(y_path, mmap_mode="r")[:num_examples]
    dim = x.shape[1]
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w1": jax.random.normal(k1, (dim, hidden), jnp.float32) / math.sqrt(dim),
        "b1": jnp.zeros((hidden,), jnp.float32),
        "w2": jax.random.normal(k2, (hidden, CLASSES), jnp.float32) / math.sqrt(hidden),
        "b2": jnp.zeros((CLASSES,), jnp.float32),
    }

    def model(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    data = hvp.operators.ArrayBatches((x, y), batch_size=batch)
    if not stream:
        data = list(data)
    return params, model, data


def measure_one(
    *,
    x_path: str,
    y_path: str,
    num_examples: int,
    what: str,
    batch: int = BATCH,
    hidden: int = HIDDEN,
) -> dict:
    """One measurement in this process.

    ``what``: ``"product"`` (the building pass, then one Hessian-vector product pass timed as the
    median of 2 after a warm-up), ``"algorithms"`` (Hutch++ trace, top-1 ``eigsh``, diagonal,
    a short SLQ density, and one Monte-Carlo Fisher product, each once after a warm-up product
    pass), or ``"compare"`` (the same algorithms on the streamed and on the in-memory operator:
    their relative differences).
    """
    import jax
    import numpy as np

    import hvp

    key = jax.random.key(0)
    out: dict = {"what": what, "num_examples": num_examples}
    t0 = time.perf_counter()
    params, model, data = _setup(x_path, y_path, num_examples, batch, hidden)
    loss = hvp.operators.compose(model, hvp.losses.softmax_cross_entropy)
    op = hvp.hessian(loss, params, data, stream=True)
    out["build_s"] = time.perf_counter() - t0  # the first pass: validation and checksums
    out.update(
        n=hvp.tree.size(params),
        num_batches=op.num_batches,
        data_bytes=int(data.nbytes),
        batch_bytes=int(data.nbytes // max(op.num_batches, 1)),
        streaming=bool(op.streaming),
    )
    v = hvp.tree.rademacher_like(key, params)

    def passes():
        return op.dataset.passes

    def algorithms(o):
        res = {}
        t = time.perf_counter()
        r = hvp.trace(o, key=key, num_matvecs=12, method="hutch++")
        res["trace"] = dict(
            estimate=float(r.estimate), std_error=float(r.std_error), num_matvecs=r.num_matvecs
        )
        res["trace"]["s"] = time.perf_counter() - t
        t = time.perf_counter()
        r = hvp.eigsh(o, 1, key=key, tol=1e-3, num_iters=20)
        res["eigsh"] = dict(
            eigenvalue=float(r.eigenvalues[0]),
            converged=bool(np.all(r.converged)),
            num_matvecs=r.num_matvecs,
            s=time.perf_counter() - t,
        )
        t = time.perf_counter()
        r = hvp.diagonal(o, key=key, num_matvecs=8)
        res["diagonal"] = dict(
            norm=float(hvp.tree.norm(r.estimate)),
            num_matvecs=r.num_matvecs,
            s=time.perf_counter() - t,
            estimate=np.asarray(hvp.tree.ravel(r.estimate)),
        )
        t = time.perf_counter()
        r = hvp.spectral_density(o, key=key, num_probes=4, num_iters=8)
        res["slq"] = dict(
            nodes_max=float(np.max(r.nodes)), num_matvecs=r.num_matvecs, s=time.perf_counter() - t
        )
        return res

    if what == "product":
        jax.block_until_ready(op.mv(v))  # warm-up: compiles the per-batch program
        p0 = passes()
        times = []
        with _Sampler() as smp:
            hwm_reset = reset_peak_rss()
            for _ in range(2):
                t = time.perf_counter()
                jax.block_until_ready(op.mv(v))
                times.append(time.perf_counter() - t)
        out.update(
            pass_s=float(np.median(times)),
            pass_times_s=times,
            passes=passes() - p0,
            gb_per_s=data.nbytes / 1e9 / float(np.median(times)),
        )
    elif what == "algorithms":
        jax.block_until_ready(op.mv(v))
        p0 = passes()
        t = time.perf_counter()
        with _Sampler() as smp:
            hwm_reset = reset_peak_rss()
            res = algorithms(op)
            t1 = time.perf_counter()
            fisher = hvp.fisher(
                model, hvp.losses.softmax_cross_entropy, params, op.dataset, key=key
            )
            jax.block_until_ready(fisher.mv(v))
            res["fisher_product"] = dict(s=time.perf_counter() - t1, num_matvecs=1)
        res["diagonal"].pop("estimate")
        out.update(res, passes=passes() - p0, total_s=time.perf_counter() - t)
    elif what == "compare":
        st = algorithms(op)
        _, _, batches = _setup(x_path, y_path, num_examples, batch, hidden, stream=False)
        mem_op = hvp.hessian(loss, params, batches, stream=False, linearize=False)
        mem = algorithms(mem_op)

        def rel(a, b):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

        mv_s, mv_m = (np.asarray(hvp.tree.ravel(o.mv(v)), np.float64) for o in (op, mem_op))
        out["relative_difference"] = {
            "product": rel(mv_s, mv_m),
            "trace": rel(st["trace"]["estimate"], mem["trace"]["estimate"]),
            "eigsh": rel(st["eigsh"]["eigenvalue"], mem["eigsh"]["eigenvalue"]),
            "diagonal": rel(st["diagonal"]["estimate"], mem["diagonal"]["estimate"]),
            "slq_nodes_max": rel(st["slq"]["nodes_max"], mem["slq"]["nodes_max"]),
        }
        out["streamed_matvecs"] = {
            k: st[k]["num_matvecs"] for k in ("trace", "eigsh", "diagonal", "slq")
        }
        out["in_memory_matvecs"] = {
            k: mem[k]["num_matvecs"] for k in ("trace", "eigsh", "diagonal", "slq")
        }
        out["dtype"] = "float32"
        return out
    else:
        raise ValueError(f"unknown measurement {what!r}")
    out.update(
        peak_anon_bytes=smp.peak_anon,
        peak_live_array_bytes=smp.peak_live,
        peak_rss_hwm_bytes=status_field("VmHWM") if hwm_reset else None,
        rss_file_bytes_after=status_field("RssFile"),
    )
    return out


def run(out_dir=None, *, quick: bool = False, sizes_gib=None) -> Report:
    """Write the data set, run the measurements (each in its own process), build the report."""
    cfg = (
        dict(QUICK)
        if quick
        else {"dim": DIM, "hidden": HIDDEN, "batch": BATCH, "sizes_gib": SIZES_GIB}
    )
    if sizes_gib is not None:
        cfg["sizes_gib"] = tuple(sizes_gib)
    dim, batch, hidden = cfg["dim"], cfg["batch"], cfg["hidden"]
    sizes = [max(batch, int(s * GIB) // example_bytes(dim)) for s in cfg["sizes_gib"]]
    out_dir = (
        Path(out_dir)
        if out_dir is not None
        else Path(tempfile.mkdtemp(prefix="hvp-stream-"))
        if quick
        else Path(__file__).parent / "results" / "cpu"
    )
    report = Report("stream", "A data set streamed from disk: time and memory as it grows", out_dir)
    report.quick = quick
    report.data["environment"] = environment()
    report.data["settings"] = dict(cfg, example_bytes=example_bytes(dim), prefetch=1)
    env = {"JAX_PLATFORMS": "cpu"}
    tmp = tempfile.mkdtemp(prefix="hvp-stream-data-")
    try:
        t = time.perf_counter()
        x_path, y_path = write_dataset(tmp, max(sizes), dim)
        report.data["write_s"] = time.perf_counter() - t
        report.data["file_bytes"] = os.path.getsize(x_path) + os.path.getsize(y_path)
        print(
            f"wrote {report.data['file_bytes'] / 1e9:.2f} GB in {report.data['write_s']:.1f} s",
            flush=True,
        )

        def one(n, what):
            res = run_isolated(
                "benchmarks.bench_stream:measure_one",
                dict(
                    x_path=x_path,
                    y_path=y_path,
                    num_examples=n,
                    what=what,
                    batch=batch,
                    hidden=hidden,
                ),
                timeout=900,
                env=env,
            )
            print(what, n, res.get("status"), res.get("pass_s") or res.get("total_s"), flush=True)
            return res

        products = [one(n, "product") for n in sizes]
        algos = [one(n, "algorithms") for n in (sizes[0], sizes[-1])]
        compare = one(sizes[0], "compare")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.data.update(products=products, algorithms=algos, compare=compare)
    _tables(report, products, algos, compare)
    _plot(report, products)
    return report


def _ok(r):
    return r.get("status") == "ok"


def _tables(report, products, algos, compare):
    rows = []
    for r in products:
        if not _ok(r):
            rows.append(
                [r.get("num_examples"), r.get("status"), r.get("reason", "")[:80], "", "", "", ""]
            )
            continue
        rows.append(
            [
                fmt_bytes(r["data_bytes"]),
                f"{r['num_examples']:,} / {r['num_batches']}",
                fmt_s(r["build_s"]),
                fmt_s(r["pass_s"]),
                f"{r['gb_per_s']:.2f}",
                fmt_bytes(r["peak_anon_bytes"]),
                fmt_bytes(r["peak_live_array_bytes"]),
                fmt_bytes(r["peak_rss_hwm_bytes"]),
            ]
        )
    ok = [r for r in products if _ok(r)]
    note = ""
    if len(ok) >= 2:
        anon = [r["peak_anon_bytes"] for r in ok]
        live = [r["peak_live_array_bytes"] for r in ok]
        grow = ok[-1]["data_bytes"] / ok[0]["data_bytes"]
        note = (
            f"From {fmt_bytes(ok[0]['data_bytes'])} to {fmt_bytes(ok[-1]['data_bytes'])} of data "
            f"({grow:.0f}x), the peak anonymous memory stays within "
            f"{fmt_bytes(min(anon))}-{fmt_bytes(max(anon))} and the peak device-buffer bytes within "
            f"{fmt_bytes(min(live))}-{fmt_bytes(max(live))} (two batches of "
            f"{fmt_bytes(ok[0]['batch_bytes'])} at most, `prefetch + 1`), while the RSS high-water "
            "mark grows with the file (its pages are file-backed, see the notes). "
        )
    report.table(
        "One Hessian-vector product pass over the data set",
        [
            "data",
            "examples / batches",
            "building pass",
            "product pass",
            "GB/s",
            "peak anonymous",
            "peak device buffers",
            "RSS high-water (file pages incl.)",
        ],
        rows,
        note=note
        + "Product pass: median of 2 passes after a warm-up pass (compilation excluded); the "
        "building pass reads every batch once to validate it and record its checksum and weight.",
    )
    arows = []
    for r in algos:
        if not _ok(r):
            arows.append(
                [r.get("num_examples"), r.get("status"), r.get("reason", "")[:80]] + [""] * 6
            )
            continue
        arows.append(
            [
                fmt_bytes(r["data_bytes"]),
                f"{fmt_s(r['trace']['s'])} ({r['trace']['num_matvecs']})",
                f"{fmt_s(r['eigsh']['s'])} ({r['eigsh']['num_matvecs']}, "
                f"{'converged' if r['eigsh']['converged'] else 'not converged'})",
                f"{fmt_s(r['diagonal']['s'])} ({r['diagonal']['num_matvecs']})",
                f"{fmt_s(r['slq']['s'])} ({r['slq']['num_matvecs']})",
                fmt_s(r["fisher_product"]["s"]),
                r["passes"],
                fmt_bytes(r["peak_anon_bytes"]),
                fmt_bytes(r["peak_live_array_bytes"]),
            ]
        )
    report.table(
        "Every algorithm family on the streamed operator",
        [
            "data",
            "Hutch++ trace (products)",
            "top-1 eigsh (products)",
            "diagonal (products)",
            "SLQ 4 probes x 8 (products)",
            "Fisher product",
            "data passes",
            "peak anonymous",
            "peak device buffers",
        ],
        arows,
        note="`hvp.trace(method='hutch++', num_matvecs=12)`, `hvp.eigsh(k=1, tol=1e-3)`, "
        "`hvp.diagonal(num_matvecs=8)`, `hvp.spectral_density(num_probes=4, num_iters=8)` and one "
        "product of the Monte-Carlo Fisher (`hvp.fisher` over the same streamed data set), once "
        "each after a warm-up product; times and peaks include compiling each algorithm's "
        "programs (the same at every data-set size), which is most of the anonymous peak. A block of vectors costs one pass: Hutch++ 3 passes for 12 "
        "products, the diagonal 1 pass for 8, SLQ one pass per Lanczos step for its 4 probes.",
    )
    if _ok(compare):
        d = compare["relative_difference"]
        report.table(
            f"Streamed vs in-memory operator ({compare['num_examples']:,} examples, float32)",
            ["quantity", "relative difference"],
            [[k, f"{v:.1e}"] for k, v in d.items()],
            note="The same algorithms with the same keys on the streamed operator and on the "
            "in-memory one (`stream=False`, the batches stacked on the device, one `lax.scan`): "
            + (
                "identical bit for bit here (the stream adds the batches in the scan's order, "
                "the ragged last batch last, with the same per-batch arithmetic)"
                if max(d.values()) == 0.0
                else "equal to float32 round-off (the batches are added in another order)"
            )
            + "; the float64 equality to 1e-12 is tested in tests/operators/test_streaming.py.",
        )
    report.notes.append(
        "Peak anonymous memory: the largest `RssAnon` (/proc/self/status) sampled every 5 ms "
        "while the measured calls ran, in a process of its own. File-backed pages of the memory "
        "map are excluded: they are the page cache, shared and dropped by the kernel under "
        "pressure, and they make `VmRSS`/`VmHWM` grow with the file (last column)."
    )
    report.notes.append(
        "Peak device buffers: the largest total `nbytes` of `jax.live_arrays()` sampled the same "
        "way (parameters, vectors, Krylov bases, the batches on the device)."
    )


def _plot(report, products):
    ok = [r for r in products if _ok(r)]
    if not ok:
        return

    def draw(fig):
        gb = [r["data_bytes"] / 1e9 for r in ok]
        ax = fig.add_subplot(1, 2, 1)
        ax.plot(gb, [r["peak_anon_bytes"] / 1e9 for r in ok], "o-", label="peak anonymous memory")
        ax.plot(
            gb, [r["peak_live_array_bytes"] / 1e9 for r in ok], "s-", label="peak device buffers"
        )
        ax.plot(
            gb,
            [(r["peak_rss_hwm_bytes"] or 0) / 1e9 for r in ok],
            "^--",
            label="RSS high-water (with file pages)",
        )
        ax.set_xlabel("data set (GB on disk)")
        ax.set_ylabel("GB")
        ax.set_title("memory of a product pass")
        ax.legend(fontsize=7)
        ax = fig.add_subplot(1, 2, 2)
        ax.plot(gb, [r["pass_s"] for r in ok], "o-")
        ax.set_xlabel("data set (GB on disk)")
        ax.set_ylabel("seconds")
        ax.set_title("time of a product pass")

    report.figure("stream.png", draw, figsize=(9.0, 3.8))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_stream", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes, results in a temporary folder")
    p.add_argument("--out", default=None, help="output folder")
    args = p.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    rep = run(args.out, quick=args.quick)
    rep.write()
    print_markdown(rep.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
