"""Group 1 - matrix-free HVPs against the dense Hessian.

The tanh MLP ``64-w-w-10`` with cross-entropy on all 1,797 digits (float32),
widths giving n from about 10^3 to 10^6 parameters. For each n, each in its own
process (so its peak memory is its own, and a dense computation that runs out of
memory or time is killed and recorded instead of crashing the run):

* one HVP, ``hvp.hessian(loss, params, batch, check_finite=False) @ v``;
* the top-5 eigenvalues by ``hvp.eigsh(op, k=5)`` (thick-restart Lanczos);
* the dense Hessian by ``jax.hessian`` on the raveled parameters plus
  ``jnp.linalg.eigh``; sizes whose estimated memory exceeds twice the memory guard
  are skipped with the estimate (``skipped: needs X GB``), the others run under the
  guard (killed when their resident memory passes it) and a wall-clock limit.

Where both sides finish, the top-5 eigenvalues are compared. The crossover n
(where ``eigsh`` becomes faster than dense) and the largest n each side reaches
are written to the report.
"""

from __future__ import annotations

import numpy as np

from benchmarks import _common as C

GROUP = "dense_vs_hvp"
TITLE = "Matrix-free HVP and Lanczos vs the dense Hessian (tanh MLP on the digits, float32)"

FULL_WIDTHS = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUICK_WIDTHS = (4,)
K = 5
EIGSH_TOL = 1e-5  # residual tolerance relative to |lambda_max|; float32 products


# ---------------------------------------------------------------------------------------------
# measurements (run in child processes by benchmarks._worker)
# ---------------------------------------------------------------------------------------------
def _setup(width, num_examples, linearize=False):
    import jax

    import hvp
    from benchmarks import _models as M

    params, loss_fn, batch = M.mlp(width, num_examples=num_examples)
    op = hvp.hessian(loss_fn, params, batch, check_finite=False, linearize=linearize)
    v = hvp.tree.rademacher_like(jax.random.PRNGKey(1), params)
    return params, loss_fn, batch, op, v


def measure_hvp(width: int, num_examples: int | None = None, repeats: int = 5) -> dict:
    """One HVP with the default operator (forward-over-reverse) and with ``linearize=True``."""
    out = {}
    for mode, lin in (("default", False), ("linearize", True)):
        _, _, _, op, v = _setup(width, num_examples, linearize=lin)
        stats = C.measure(lambda op=op, v=v: op @ v, repeats=repeats, warmup=2, min_time=0.5)
        stats.pop("value")
        out[mode] = stats
        n = op.size
        del op, v
    best = min(out, key=lambda m: out[m]["median_s"])
    return {"n": n, "mode": best, **out[best], "modes": out}


def measure_eigsh(
    width: int, num_examples: int | None = None, repeats: int = 3, linearize: bool = False
) -> dict:
    import jax

    _, _, _, op, _ = _setup(width, num_examples, linearize=linearize)
    key = jax.random.PRNGKey(0)
    eigsh = C.algorithm("eigsh")
    stats = C.measure(lambda: eigsh(op, k=K, key=key, tol=EIGSH_TOL), repeats=repeats, warmup=1)
    res = stats.pop("value")
    return {
        "n": op.size,
        **stats,
        "eigenvalues": np.asarray(res.eigenvalues, np.float64).tolist(),
        "residuals": np.asarray(res.residuals, np.float64).tolist(),
        "converged": np.asarray(res.converged).tolist(),
        "num_matvecs": int(res.num_matvecs),
    }


def measure_dense(width: int, num_examples: int | None = None, repeats: int = 1) -> dict:
    import gc
    import time

    import jax
    import jax.numpy as jnp

    from hvp import tree as tu

    params, loss_fn, batch, op, _ = _setup(width, num_examples)
    flat = tu.ravel(params)
    unravel = tu.unravel_fn(params)
    hess = jax.jit(jax.hessian(lambda f, b: loss_fn(unravel(f), b)))
    eigh = jax.jit(jnp.linalg.eigh)
    # compile ahead of time (the timed calls are the computation alone)
    hess_c = hess.lower(flat, batch).compile()
    n = op.size
    eigh_c = eigh.lower(jax.ShapeDtypeStruct((n, n), flat.dtype)).compile()
    gc.collect()
    before = C.rss_bytes()
    reset = C.reset_peak_rss()
    if n <= 2000:  # cheap: one untimed run first (first executions pay one-off set-up costs)
        jax.block_until_ready(eigh_c(hess_c(flat, batch)))
    t0 = time.perf_counter()
    H = hess_c(flat, batch).block_until_ready()
    t1 = time.perf_counter()
    if n > 2000:
        jax.block_until_ready(
            eigh_c(H)
        )  # untimed first run of eigh (seconds, vs minutes for jax.hessian)
    t1b = time.perf_counter()
    w, _ = jax.block_until_ready(eigh_c(H))
    t2 = time.perf_counter()
    peak = C.peak_rss_bytes()
    top = np.sort(np.asarray(w, np.float64))[-K:]
    return {
        "n": n,
        "hessian": C.summarize([t1 - t0]),
        "eigh": C.summarize([t2 - t1b]),
        "total_median_s": (t1 - t0) + (t2 - t1b),
        "eigenvalues": top.tolist(),
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "peak_extra_bytes": (peak - before) if reset and peak and before else None,
    }


# ---------------------------------------------------------------------------------------------
def dense_estimate_bytes(width: int, num_examples: int, itemsize: int = 4) -> int:
    """Memory ``jax.hessian`` + ``eigh`` need, roughly.

    ``jax.hessian`` is ``jacfwd(jacrev(f))``: the reverse pass is vmapped over n
    tangents, each carrying the activations of every layer for every example
    (``n * N * (2w + 10)`` numbers, about three live copies), plus the ``n x n``
    matrix, ``eigh``'s copy and its eigenvectors.
    """
    from benchmarks._models import mlp_size

    n = mlp_size(width)
    acts = n * num_examples * (2 * width + 10)
    return int(itemsize * (3 * acts + 3 * n * n))


def _guard_bytes() -> int:
    avail = C.available_memory_bytes() or 8 * 2**30
    return int(0.75 * avail)


def run(out_dir, *, quick: bool = False) -> C.Report:
    from benchmarks._models import mlp_size

    rep = C.Report(GROUP, TITLE, out_dir, quick=quick)
    rep.data["environment"] = C.environment()
    widths = QUICK_WIDTHS if quick else FULL_WIDTHS
    num_examples = 256 if quick else 1797
    timeout = 120.0 if quick else 600.0
    guard = _guard_bytes()
    rep.data["settings"] = {
        "widths": list(widths),
        "num_examples": num_examples,
        "k": K,
        "eigsh_tol": EIGSH_TOL,
        "dtype": "float32",
        "memory_guard_bytes": guard,
        "dense_timeout_s": timeout,
    }
    rows = []
    for width in C.progress(widths, description="dense vs hvp"):
        n = mlp_size(width)
        kw = {"width": width, "num_examples": num_examples}
        one = C.run_isolated(
            "benchmarks.bench_dense_vs_hvp:measure_hvp",
            {**kw, **({"repeats": 2} if quick else {})},
            timeout=timeout,
            mem_limit_bytes=guard,
        )
        lin = one.get("mode") == "linearize"
        eig = C.run_isolated(
            "benchmarks.bench_dense_vs_hvp:measure_eigsh",
            {**kw, "repeats": 1 if (quick or n > 200_000) else 3, "linearize": lin},
            timeout=max(timeout, 900),
            mem_limit_bytes=guard,
        )
        est = dense_estimate_bytes(width, num_examples)
        if est > 2 * guard:
            dense = {
                "status": "skipped",
                "reason": f"skipped: needs about {est / 1e9:.0f} GB (estimate), memory guard "
                f"{guard / 1e9:.1f} GB",
            }
        else:
            dense = C.run_isolated(
                "benchmarks.bench_dense_vs_hvp:measure_dense",
                {**kw, "repeats": 1},
                timeout=timeout,
                mem_limit_bytes=guard,
            )
        row = {
            "width": width,
            "n": n,
            "hvp": one,
            "eigsh": eig,
            "dense": dense,
            "dense_estimate_bytes": est,
        }
        if eig.get("status") == "ok" and dense.get("status") == "ok":
            a, b = np.asarray(eig["eigenvalues"]), np.asarray(dense["eigenvalues"])
            row["eig_max_rel_err"] = float(
                np.max(np.abs(np.sort(a) - np.sort(b)) / np.max(np.abs(b)))
            )
        rows.append(row)
        print(
            f"  n={n:>9,}: hvp {C.fmt_s(one.get('median_s'))}, eigsh {C.fmt_s(eig.get('median_s'))}, "
            f"dense {C.fmt_s(dense.get('total_median_s')) if dense.get('status') == 'ok' else dense.get('status')}",
            flush=True,
        )
    rep.data["rows"] = rows

    # ---- summary: crossover and reach -------------------------------------------------------
    both = [
        r for r in rows if r["eigsh"].get("status") == "ok" and r["dense"].get("status") == "ok"
    ]
    crossover = None
    for r in both:
        if r["eigsh"]["median_s"] < r["dense"]["total_median_s"]:
            crossover = r["n"]
            break
    eigsh_faster_everywhere = bool(both) and all(
        r["eigsh"]["median_s"] < r["dense"]["total_median_s"] for r in both
    )
    dense_ok = [r["n"] for r in rows if r["dense"].get("status") == "ok"]
    hvp_ok = [r["n"] for r in rows if r["eigsh"].get("status") == "ok"]
    first_fail = next((r for r in rows if r["dense"].get("status") != "ok"), None)
    rep.data["summary"] = {
        "crossover_n": crossover,
        "eigsh_faster_at_every_common_n": eigsh_faster_everywhere,
        "largest_n_dense": max(dense_ok) if dense_ok else None,
        "largest_n_eigsh": max(hvp_ok) if hvp_ok else None,
        "dense_stops_at": None
        if first_fail is None
        else {
            "n": first_fail["n"],
            "status": first_fail["dense"].get("status"),
            "reason": first_fail["dense"].get("reason"),
        },
        "max_eig_rel_err": max((r["eig_max_rel_err"] for r in both), default=None),
    }

    def dense_cell(d):
        if d.get("status") == "ok":
            return f"{C.fmt_s(d['hessian']['median_s'])} + {C.fmt_s(d['eigh']['median_s'])}"
        reason = d.get("reason", "")
        return reason if reason.startswith(d.get("status", "")) else f"{d.get('status')}: {reason}"

    table = []
    for r in rows:
        one, eig, d = r["hvp"], r["eigsh"], r["dense"]
        table.append(
            [
                f"{r['n']:,}",
                r["width"],
                (
                    f"{C.fmt_spread(one)} ({one['mode']})"
                    if one.get("status") == "ok"
                    else one.get("status")
                ),
                C.fmt_bytes(one.get("peak_extra_bytes")),
                (
                    f"{C.fmt_spread(eig)}, {eig['num_matvecs']} matvecs"
                    + ("" if all(eig["converged"]) else " (not all converged)")
                )
                if eig.get("status") == "ok"
                else f"{eig.get('status')}: {eig.get('reason', '')}",
                C.fmt_bytes(eig.get("peak_extra_bytes")),
                dense_cell(d),
                (
                    C.fmt_bytes(d.get("peak_extra_bytes"))
                    if d.get("status") == "ok"
                    else f"> {C.fmt_bytes(d.get('peak_child_rss_bytes'))} when stopped"
                    if d.get("peak_child_rss_bytes")
                    else f"~{C.fmt_bytes(r['dense_estimate_bytes'])} (estimate)"
                ),
                f"{r['eig_max_rel_err']:.1e}" if "eig_max_rel_err" in r else "-",
            ]
        )
    rep.table(
        "Per size (median (IQR) of repeats; memory: peak host RSS above the process baseline)",
        [
            "n",
            "width",
            "one HVP",
            "HVP memory",
            f"top-{K} by hvp.eigsh",
            "eigsh memory",
            "dense: jax.hessian + eigh",
            "dense memory",
            f"top-{K} rel. diff",
        ],
        table,
        note=f"One HVP: `hvp.hessian(loss, params, batch, check_finite=False) @ v`, the faster of the default "
        f"(forward-over-reverse) and `linearize=True` (named in brackets; both are in the JSON), which "
        f"`hvp.eigsh(op, k={K}, tol={EIGSH_TOL})` then uses. The dense side runs `jax.jit(jax.hessian(...))` on "
        f"the raveled parameters then `jnp.linalg.eigh`, compiled ahead of time. Memory guard "
        f"{guard / 1e9:.1f} GB (75% of the memory available at the start), time limit {timeout:.0f} s.",
    )
    s = rep.data["summary"]
    lines = [
        f"- Crossover: `hvp.eigsh` top-{K} is faster than dense from n = {s['crossover_n']:,}"
        if s["crossover_n"]
        else "- Crossover: none among the sizes where both ran"
    ]
    if eigsh_faster_everywhere:
        lines[-1] += " (the smallest size measured: faster at every size where both ran)"
    lines.append(
        f"- Largest n reached: dense {s['largest_n_dense']:,}"
        if s["largest_n_dense"]
        else "- Largest n reached: dense none"
    )
    lines[-1] += (
        f"; hvp.eigsh {s['largest_n_eigsh']:,}" if s["largest_n_eigsh"] else "; hvp.eigsh none"
    )
    if s["dense_stops_at"]:
        lines.append(
            f"- Dense stops at n = {s['dense_stops_at']['n']:,}: {s['dense_stops_at']['status']} — "
            f"{s['dense_stops_at']['reason']}"
        )
    if s["max_eig_rel_err"] is not None:
        lines.append(
            f"- Top-{K} eigenvalues agree to {s['max_eig_rel_err']:.1e} (relative to the largest) "
            "where both exist."
        )
    rep.text("Summary", "\n".join(lines))

    def draw(fig):
        ax = fig.add_subplot(121)

        def series(get):
            xs, ys = [], []
            for r in rows:
                y = get(r)
                if y is not None:
                    xs.append(r["n"]), ys.append(y)
            return xs, ys

        for label, get, style, color in [
            ("one HVP", lambda r: r["hvp"].get("median_s"), "o-", "C0"),
            (f"top-{K} hvp.eigsh", lambda r: r["eigsh"].get("median_s"), "s-", "C1"),
            ("dense jax.hessian + eigh", lambda r: r["dense"].get("total_median_s"), "^-", "C2"),
        ]:
            xs, ys = series(get)
            if xs:
                ax.loglog(xs, ys, style, label=label, color=color)
        for r in rows:
            if r["dense"].get("status") not in ("ok", None):
                ax.axvline(r["n"], color="r", ls=":", lw=1)
                ax.text(
                    r["n"],
                    ax.get_ylim()[1] if ax.has_data() else 1,
                    f" dense {r['dense']['status']}",
                    color="r",
                    fontsize=7,
                    rotation=90,
                    va="top",
                )
                break
        ax.set_xlabel("parameters n")
        ax.set_ylabel("seconds")
        ax.set_title("time")
        ax.legend(fontsize=7)
        ax2 = fig.add_subplot(122)
        for label, get, style, color in [
            ("one HVP", lambda r: r["hvp"].get("peak_extra_bytes"), "o-", "C0"),
            (f"top-{K} hvp.eigsh", lambda r: r["eigsh"].get("peak_extra_bytes"), "s-", "C1"),
            ("dense (measured)", lambda r: r["dense"].get("peak_extra_bytes"), "^-", "C2"),
            ("dense (estimate)", lambda r: r["dense_estimate_bytes"], "^:", "C2"),
        ]:
            xs, ys = series(get)
            ys = [
                max(y, 1e6) / 1e9 for y in ys
            ]  # floored at 1 MB (a product may need no new pages)
            if xs:
                ax2.loglog(
                    xs,
                    ys,
                    style,
                    label=label,
                    color=color,
                    alpha=0.6 if "estimate" in label else 1.0,
                )
        mem = C.total_memory_bytes()
        if mem:
            ax2.axhline(mem / 1e9, color="k", ls="--", lw=1, label="machine memory")
        ax2.set_xlabel("parameters n")
        ax2.set_ylabel("GB")
        ax2.set_title("peak host memory above the baseline (floor 1 MB)")
        ax2.legend(fontsize=7)
        fig.suptitle(f"tanh MLP on digits, float32, {C.device_name()}")

    rep.figure("dense_vs_hvp.png", draw, figsize=(10, 4.2))
    return rep
