"""Measured scale: time per product and peak memory as the model and the data set grow, for
``hvp.eigsh`` with the full Lanczos basis (``basis="device"``) and the memory-lean mode
(``basis="none"``).

Run: ``python -m benchmarks.bench_scale`` (CPU, about 5 minutes on 2 cores; results in
``benchmarks/results/cpu/scale.{md,json}``), ``--quick`` (tiny sizes, a temporary directory), or
on one GPU ``python -m benchmarks.bench_scale --device gpu`` (bfloat16 parameters, sizes up to
1e9 parameters where the device memory allows; results in ``benchmarks/results/<device>/``).

Every measurement runs in its own process (:func:`benchmarks._common.run_isolated`), so its
peak memory is its own: ``peak extra`` is the high-water mark of the host RSS (CPU) or of the
device's bytes in use (GPU) while the measured calls ran, minus what was resident after the
model, the data and a warm-up call; it is divided by ``n * bytes(accumulation dtype)`` to give the
memory in units of ``n`` (parameter-sized vectors). Times are medians of the repeats (3 for a
product, 1 for ``eigsh``) after a warm-up call (compilation excluded).

The model is an MLP ``64 -> w -> w -> 10`` (tanh, softmax cross-entropy) on random data, whose
width ``w`` is chosen for the target ``n``; the operator is the Hessian (forward-over-reverse
products, ``linearize=False``) over a list of batches of 32 examples.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from benchmarks._common import (
    Report,
    device_name,
    environment,
    fmt_bytes,
    fmt_s,
    print_markdown,
    run_isolated,
)

D_IN, D_OUT, BATCH = 64, 10, 32
CPU_SIZES = (1e4, 1e5, 1e6, 1e7)
GPU_SIZES = (1e6, 1e7, 1e8, 3e8, 1e9)
CPU_BATCHES = (1, 4, 16)
GPU_BATCHES = (1, 8, 64)


def width_for(n_target: float) -> int:
    """Hidden width ``w`` with ``n = w^2 + (D_IN + D_OUT + 2) w + D_OUT`` closest to the target."""
    b = D_IN + D_OUT + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * (n_target - D_OUT))) / 2))


def measure_one(
    *, n_target: float, what: str, num_batches: int = 1, dtype: str = "float32", k: int = 1
) -> dict:
    """One measurement in this process: ``what`` is ``"product"``, ``"eigsh_device"`` or
    ``"eigsh_none"``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import hvp
    from benchmarks._common import measure

    w = width_for(n_target)
    dt = jnp.dtype(dtype)
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "w1": (jax.random.normal(k1, (D_IN, w)) / math.sqrt(D_IN)).astype(dt),
        "b1": jnp.zeros((w,), dt),
        "w2": (jax.random.normal(k2, (w, w)) / math.sqrt(w)).astype(dt),
        "b2": jnp.zeros((w,), dt),
        "w3": (jax.random.normal(k3, (w, D_OUT)) / math.sqrt(w)).astype(dt),
        "b3": jnp.zeros((D_OUT,), dt),
    }
    n = hvp.tree.size(params)
    xs = jax.random.normal(k4, (num_batches, BATCH, D_IN)).astype(dt)
    ys = jax.random.randint(k4, (num_batches, BATCH), 0, D_OUT)
    batches = [(xs[i], ys[i]) for i in range(num_batches)]

    def loss(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"] + p["b2"])
        return hvp.losses.softmax_cross_entropy(h @ p["w3"] + p["b3"], y)

    op = hvp.hessian(loss, params, batches, linearize=False)
    acc_bytes = np.dtype(hvp.tree.accumulation_dtype(dt)).itemsize
    out = {"n": n, "width": w, "num_batches": num_batches, "dtype": dtype, "what": what}
    if what == "product":
        v = hvp.tree.rademacher_like(key, params)
        stats = measure(lambda: op @ v, repeats=3, warmup=1)
        out["matvecs"] = 1
    else:
        basis = what.split("_", 1)[1]
        stats = measure(
            lambda: hvp.eigsh(op, k, key=key, tol=1e-3, basis=basis), repeats=1, warmup=1
        )
        r = stats["value"]
        out["matvecs"] = r.num_matvecs
        out["eigenvalue"] = float(r.eigenvalues[-1])
        out["converged"] = bool(np.all(np.asarray(r.converged)))
    stats.pop("value", None)
    out.update(stats)
    extra = stats.get("device_peak_bytes") or stats.get("peak_extra_bytes")
    out["peak_extra_over_n"] = extra / (n * acc_bytes) if extra else None
    return out


def _mem_budget(device: str) -> float:
    """Bytes a measurement may use: 8 GB of host memory on CPU, 80% of the GPU's memory."""
    if device == "gpu":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return 0.8 * float(stats.get("bytes_limit", 80e9))
    return 8e9


def run(*, quick: bool = False, device: str = "cpu", out: str | None = None) -> dict:
    """Run the scale benchmark and write ``scale.{json,md}``."""
    env_over = {}
    if device == "cpu":
        env_over["JAX_PLATFORMS"] = "cpu"
        sizes, batch_counts, dtype = CPU_SIZES, CPU_BATCHES, "float32"
    else:
        sizes, batch_counts, dtype = GPU_SIZES, GPU_BATCHES, "bfloat16"
    if quick:
        sizes, batch_counts = (1e3, 1e4), (1, 2)
    budget = _mem_budget(device)
    acc = 4  # float32 accumulation for float32 and bfloat16 parameters
    out_dir = (
        Path(out)
        if out
        else Path(tempfile.mkdtemp(prefix="hvp-scale-"))
        if quick
        else Path(__file__).parent / "results" / (device_name() if device == "gpu" else "cpu")
    )
    report = Report("scale", "Scale: time and memory as the model and the data set grow", out_dir)
    report.quick = quick
    report.data["environment"] = environment()
    rows, model_rows = [], []

    def one(n_target, what, nb=1):
        need = {"product": 6, "eigsh_device": 40, "eigsh_none": 20}[what] * n_target * acc
        if need > budget:
            return {"status": "skipped", "reason": f"needs about {need / 1e9:.0f} GB", "what": what}
        res = run_isolated(
            "benchmarks.bench_scale:measure_one",
            {"n_target": n_target, "what": what, "num_batches": nb, "dtype": dtype},
            timeout=600,
            mem_limit_bytes=int(budget * 1.25) if device == "cpu" else None,
            env=env_over,
        )
        res.setdefault("what", what)
        print(what, n_target, nb, res.get("status"), res.get("median_s"), flush=True)
        return res

    for n_target in sizes:
        entry = {"n_target": n_target}
        for what in ("product", "eigsh_device", "eigsh_none"):
            entry[what] = one(n_target, what)
        rows.append(entry)
    mid = sizes[len(sizes) // 2]
    data_rows = [{"num_batches": nb, "product": one(mid, "product", nb)} for nb in batch_counts]
    report.data.update(models=rows, data=data_rows, device=device, dtype=dtype)

    def cell_t(r):
        return fmt_s(r.get("median_s")) if r.get("status") == "ok" else r.get("status", "?")

    def cell_m(r):
        if r.get("status") != "ok":
            return r.get("reason", r.get("status", "?"))[:60]
        x = r.get("peak_extra_over_n")
        return (
            f"{fmt_bytes(r.get('device_peak_bytes') or r.get('peak_extra_bytes'))} ({x:.1f} n)"
            if x
            else "-"
        )

    for e in rows:
        p, f, le = e["product"], e["eigsh_device"], e["eigsh_none"]
        n = p.get("n") or f.get("n") or le.get("n") or int(e["n_target"])
        model_rows.append(
            [
                f"{n:.3g}",
                cell_t(p),
                cell_t(f),
                f.get("matvecs", "-"),
                cell_m(f),
                cell_t(le),
                le.get("matvecs", "-"),
                cell_m(le),
                f"{f.get('eigenvalue', float('nan')):.5g} / {le.get('eigenvalue', float('nan')):.5g}",
            ]
        )
    report.table(
        "Model size (1 batch of 32 examples)",
        [
            "n",
            "product",
            "eigsh full",
            "products",
            "full: peak extra",
            "eigsh lean",
            "products",
            "lean: peak extra",
            "top eigenvalue full / lean",
        ],
        model_rows,
        note=(
            "Top-1 `eigsh` (`tol=1e-3`). Peak extra: memory above the model, data and a warm "
            "product, in bytes and in units of `n` float32 vectors. The full basis holds "
            "`num_iters + 1 = 31` vectors; the lean mode `4 + 2k` plus a step's temporaries."
        ),
    )
    report.table(
        f"Data-set size (model n = {mid:.0e})",
        ["batches of 32", "product", "peak extra"],
        [[r["num_batches"], cell_t(r["product"]), cell_m(r["product"])] for r in data_rows],
        note="The batches are a list: one `lax.scan` over them; time grows with the data, memory does not.",
    )
    payload = report.write()
    print_markdown(report.markdown())
    return payload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes, results in a temporary folder")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--out", default=None, help="output folder")
    args = p.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    run(quick=args.quick, device=args.device, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
