"""Group 3 - estimator accuracy per matvec on known spectra.

Operators ``A = Q diag(lambda) Q^T`` (float64, Haar-random ``Q``, n = 1,000) with
three spectra:

* ``flat``: ``lambda`` evenly spaced in [1, 2] (no structure to exploit);
* ``power-law``: ``lambda_i = i^-2`` (fast decay: low-rank sketches pay);
* ``outliers``: a bulk of small eigenvalues of both signs (Gaussian, standard
  deviation 0.025 around 0.01, clipped to [-0.04, 0.06]) plus 9 large outliers between 1 and 20, the shape of a
  trained classifier's Hessian (Sagun et al. 2017; Papyan 2019; Ghorbani et al. 2019).

Measured over independent keys:

* trace: relative error of ``hvp.trace`` with ``method`` hutchinson / hutch++ /
  xtrace against the exact trace, as the number of matvecs grows (mean over keys),
  and the mean reported ``std_error`` next to the observed root-mean-square error;
* spectral density: Wasserstein-1 distance between ``hvp.spectral_density``
  (stochastic Lanczos quadrature) and the exact eigenvalue distribution, divided
  by the spectral range, against Lanczos iterations (probes fixed) and against
  probes (iterations fixed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import hvp
from benchmarks import _common as C

GROUP = "estimators"
TITLE = "Estimator accuracy per matvec on known spectra (float64)"

METHODS = ("hutchinson", "hutch++", "xtrace")


def spectra(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    flat = np.linspace(1.0, 2.0, n)
    power = np.arange(1, n + 1, dtype=float) ** -2.0
    k = 9
    # bulk: Gaussian of standard deviation 0.025 around 0.01, clipped to [-0.04, 0.06]
    bulk = 0.01 + 0.05 * np.clip(rng.standard_normal(n - k) / 2.0, -1, 1)
    outliers = np.geomspace(1.0, 20.0, k)
    return {"flat": flat, "power-law": power, "outliers": np.concatenate([bulk, outliers])}


def operator(eigs: np.ndarray, seed: int = 1):
    n = eigs.size
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    q = q * np.sign(np.diag(r))
    a = (q * eigs) @ q.T
    return hvp.from_dense(jnp.asarray((a + a.T) / 2, jnp.float64))


_CACHE: dict = {}


def _trace_fn(method: str, m: int):
    """``(keys, op) -> (estimates, std_errors)``, vmapped over keys, compiled once per (method, m)."""
    if (method, m) not in _CACHE:
        trace = C.algorithm("trace")
        _CACHE[method, m] = jax.jit(
            jax.vmap(
                lambda k, op: _est(trace(op, key=k, num_matvecs=m, method=method)),
                in_axes=(0, None),
            )
        )
    return _CACHE[method, m]


def trace_errors(op, true_trace: float, budgets, keys) -> dict:
    out = {}
    for method in METHODS:
        rows = []
        for m in budgets:
            est, se = _trace_fn(method, m)(keys, op)
            est, se = np.asarray(est), np.asarray(se)
            err = np.abs(est - true_trace) / abs(true_trace)
            rows.append(
                {
                    "matvecs": int(m),
                    "mean_rel_err": float(err.mean()),
                    "median_rel_err": float(np.median(err)),
                    "rms_rel_err": float(np.sqrt(np.mean(err**2))),
                    "mean_rel_std_error": float(np.mean(se) / abs(true_trace)),
                    "within_2se": float(np.mean(np.abs(est - true_trace) <= 2 * se)),
                }
            )
        out[method] = rows
    return out


def _est(res):
    return res.estimate, res.std_error


def slq_errors(op, eigs, *, iters_list, probes_list, fixed_probes, fixed_iters, keys) -> dict:
    sd = C.algorithm("spectral_density")
    span = float(eigs.max() - eigs.min())

    def w1(num_probes, num_iters):
        vals = []
        for key in keys:
            res = sd(op, key=key, num_probes=num_probes, num_iters=num_iters)
            vals.append(res.wasserstein1(eigs) / span)
        return {
            "mean_w1_rel": float(np.mean(vals)),
            "max_w1_rel": float(np.max(vals)),
            "num_probes": num_probes,
            "num_iters": num_iters,
        }

    return {
        "vs_iters": [w1(fixed_probes, m) for m in iters_list],
        "vs_probes": [w1(p, fixed_iters) for p in probes_list],
    }


def run(out_dir, *, quick: bool = False) -> C.Report:
    rep = C.Report(GROUP, TITLE, out_dir, quick=quick)
    rep.data["environment"] = C.environment()
    jax.config.update("jax_enable_x64", True)
    try:
        n = 200 if quick else 1000
        budgets = (12,) if quick else (12, 24, 48, 96, 192, 384)
        num_keys = 4 if quick else 40
        iters_list = (20,) if quick else (5, 10, 20, 40, 80)
        probes_list = (4,) if quick else (1, 2, 4, 8, 16, 32)
        fixed_probes, fixed_iters = (4, 20) if quick else (8, 40)
        slq_keys = [jax.random.PRNGKey(100 + i) for i in range(1 if quick else 5)]
        keys = jax.random.split(jax.random.PRNGKey(0), num_keys)
        rep.data["settings"] = {
            "n": n,
            "budgets": list(budgets),
            "num_keys": num_keys,
            "iters_list": list(iters_list),
            "probes_list": list(probes_list),
            "fixed_probes": fixed_probes,
            "fixed_iters": fixed_iters,
            "slq_keys": len(slq_keys),
        }
        results = {}
        for name, eigs in C.progress(spectra(n).items(), description="estimators"):
            op = operator(eigs)
            tr = float(eigs.sum())
            results[name] = {
                "true_trace": tr,
                "lambda_min": float(eigs.min()),
                "lambda_max": float(eigs.max()),
                "trace": trace_errors(op, tr, budgets, keys),
                "slq": slq_errors(
                    op,
                    eigs,
                    iters_list=iters_list,
                    probes_list=probes_list,
                    fixed_probes=fixed_probes,
                    fixed_iters=fixed_iters,
                    keys=slq_keys,
                ),
            }
            print(f"  {name}: done", flush=True)
    finally:
        jax.config.update("jax_enable_x64", False)
    rep.data["spectra"] = results

    # ---- tables ---------------------------------------------------------------------------
    rows = []
    for name, r in results.items():
        for i, m in enumerate(budgets):
            cells = [name, m]
            for method in METHODS:
                t = r["trace"][method][i]
                cells.append(f"{t['mean_rel_err']:.1e} (se {t['mean_rel_std_error']:.1e})")
            rows.append(cells)
    rep.table(
        f"Trace: mean relative error over {num_keys} keys (mean reported std. error in brackets), n = {n}",
        ["spectrum", "matvecs"] + list(METHODS),
        rows,
        note="Hutchinson uses Rademacher probes; Hutch++ spends a third of the budget on a range "
        "sketch, a third on its products and a third on Hutchinson for the rest; XTrace uses "
        "m/2 Gaussian probes twice (exchangeable leave-one-out).",
    )
    srows = []
    for name, r in results.items():
        for t in r["slq"]["vs_iters"]:
            srows.append([name, t["num_probes"], t["num_iters"], f"{t['mean_w1_rel']:.2e}"])
        for t in r["slq"]["vs_probes"]:
            srows.append([name, t["num_probes"], t["num_iters"], f"{t['mean_w1_rel']:.2e}"])
    rep.table(
        f"SLQ: Wasserstein-1 distance to the exact spectrum / spectral range (mean over {len(slq_keys)} keys)",
        ["spectrum", "probes", "Lanczos iterations", "W1 / range"],
        srows,
    )

    # headline: matvecs to reach 1% relative trace error (interpolated in log-log)
    def needed(rows_m, target=1e-2):
        ms = np.array([t["matvecs"] for t in rows_m], float)
        es = np.array([t["mean_rel_err"] for t in rows_m], float)
        if es[0] <= target:
            return f"<= {int(ms[0])}"
        for i in range(1, len(ms)):
            if es[i] <= target:
                a = (np.log(target) - np.log(es[i - 1])) / (np.log(es[i]) - np.log(es[i - 1]))
                return f"{int(round(np.exp(np.log(ms[i - 1]) + a * (np.log(ms[i]) - np.log(ms[i - 1])))))}"
        return f"> {int(ms[-1])}"

    hrows = [[name] + [needed(r["trace"][m]) for m in METHODS] for name, r in results.items()]
    rep.data["matvecs_for_1pct"] = {
        name: {m: needed(r["trace"][m]) for m in METHODS} for name, r in results.items()
    }
    rep.table(
        "Matvecs for 1% mean relative trace error (log-log interpolation)",
        ["spectrum"] + list(METHODS),
        hrows,
    )

    def draw_trace(fig):
        for j, (name, r) in enumerate(results.items()):
            ax = fig.add_subplot(1, len(results), j + 1)
            for method in METHODS:
                ms = [t["matvecs"] for t in r["trace"][method]]
                ax.loglog(ms, [t["mean_rel_err"] for t in r["trace"][method]], "o-", label=method)
            ms = np.array(budgets, float)
            base = r["trace"]["hutchinson"][0]["mean_rel_err"]
            ax.loglog(ms, base * np.sqrt(ms[0] / ms), "k:", lw=1, label="∝ 1/√m")
            ax.loglog(ms, base * (ms[0] / ms), "k--", lw=0.8, label="∝ 1/m")
            C.log_xticks(ax, budgets)
            ax.set_title(f"{name} (n={n})")
            ax.set_xlabel("matvecs m")
            if j == 0:
                ax.set_ylabel("mean |error| / |trace|")
            ax.legend(fontsize=7)
        fig.suptitle("Trace estimators: error vs matvecs")

    rep.figure("estimators_trace.png", draw_trace, figsize=(12, 4))

    def draw_slq(fig):
        ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
        for name, r in results.items():
            ax1.loglog(
                [t["num_iters"] for t in r["slq"]["vs_iters"]],
                [t["mean_w1_rel"] for t in r["slq"]["vs_iters"]],
                "o-",
                label=name,
            )
            ax2.loglog(
                [t["num_probes"] for t in r["slq"]["vs_probes"]],
                [t["mean_w1_rel"] for t in r["slq"]["vs_probes"]],
                "o-",
                label=name,
            )
        C.log_xticks(ax1, iters_list)
        C.log_xticks(ax2, probes_list)
        ax1.set_xlabel("Lanczos iterations")
        ax1.set_ylabel("W1 / spectral range")
        ax1.set_title(f"SLQ, {fixed_probes} probes")
        ax2.set_xlabel("probes")
        ax2.set_title(f"SLQ, {fixed_iters} iterations")
        for ax in (ax1, ax2):
            ax.legend(fontsize=7)

    rep.figure("estimators_slq.png", draw_slq, figsize=(9, 4))
    return rep
