"""How close the influence section of ``hvp analyze --influence`` is to the exact influence.

The demo model of ``hvp demo`` (tanh MLP 64-32-10, 2,410 parameters, trained 300 Adam steps on
the 1,797 digits, seed 0) in float64: the section's default damping
(``max(0, -lambda_min) + 1e-3 lambda_max``, the report's rule) and its default test examples
(the last 3 digits, their own scores left out), then

* the exact influence (``method="dense"``: the dense Hessian and ``numpy.linalg.solve``);
* what ``--influence-method auto`` runs for this model (more than 1,000 parameters): the
  scores by conjugate gradients (``hvp.solve``, relative residual 1e-8 in float64), the
  self-influence by the Arnoldi variant with ``p`` = 20 eigenpairs (the default
  ``--influence-rank``);
* ``--influence-method arnoldi``: the Arnoldi variant with ``p`` = 20 and 100 eigenpairs from
  ``hvp.eigsh`` for the scores too;

compared over all 1,797 training examples of each test digit: relative error, Spearman rank
correlation, and the overlap of the section's top-5 helpful / harmful / self-influence lists
with the exact ones. Run: ``python -m benchmarks.influence_analyze_demo`` (a few minutes on 2
CPU cores); writes ``benchmarks/results/cpu/influence_analyze.{md,json}``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import hvp  # noqa: E402
from hvp.analysis._data import digits  # noqa: E402
from hvp.analysis._demo import digits_mlp, train  # noqa: E402

OUT = Path(__file__).parent / "results" / "cpu"
TOP = 5
NUM_TEST = 3


def _lists(scores, self_inf, test_idx):
    s = np.array(scores, np.float64)
    for t, i in enumerate(test_idx):
        s[t, i] = np.nan
    helpful = np.argsort(np.where(np.isnan(s), np.inf, s), axis=1)[:, :TOP]
    harmful = np.argsort(np.where(np.isnan(s), np.inf, -s), axis=1)[:, :TOP]
    return s, helpful, harmful, np.argsort(-np.asarray(self_inf))[:TOP]


def main() -> dict:
    model, _ = digits_mlp()
    loss, acc, secs = train(model, steps=300, seed=0)
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), state))
    x, y = digits(dtype=np.float64)
    data = (jnp.asarray(x), jnp.asarray(y))
    H = hvp.flax.from_nnx(model, "cross_entropy").hessian([data])
    n = len(y)
    test_idx = list(range(n - NUM_TEST, n))
    test = jax.tree_util.tree_map(lambda a: a[n - NUM_TEST :], data)

    t0 = time.perf_counter()
    lam = np.linalg.eigvalsh(np.asarray(H.dense()))
    damping = max(0.0, -lam[0]) + 1e-3 * lam[-1]
    exact = hvp.influence(H, test, data, method="dense", damping=damping, with_self_influence=True)
    t_dense = time.perf_counter() - t0
    ref, ref_help, ref_harm, ref_self = _lists(exact.scores, exact.self_influence, test_idx)
    rows = []
    for p in ("solve", 20, 100):
        t0 = time.perf_counter()
        if p == "solve":  # the section's auto method above 1,000 parameters
            r = hvp.influence(
                H, test, data, method="solve", solver="cg", rtol=1e-8, damping=damping
            )
            si = hvp.influence.self_influence(
                H, data, rank=20, key=jax.random.key(0), damping=damping
            )
            r = dataclasses.replace(
                r,
                self_influence=si.self_influence,
                num_matvecs=r.num_matvecs + si.num_matvecs,
                converged=r.converged and si.converged,
            )
        else:
            r = hvp.influence(
                H,
                test,
                data,
                rank=p,
                key=jax.random.key(0),
                damping=damping,
                with_self_influence=True,
            )
        seconds = time.perf_counter() - t0
        s, helpful, harmful, self_top = _lists(r.scores, r.self_influence, test_idx)
        ok = ~np.isnan(ref)
        rows.append(
            {
                "method": (
                    "solve (CG, rtol 1e-8; self-influence arnoldi p=20)"
                    if p == "solve"
                    else f"arnoldi p={p}"
                ),
                "converged": bool(r.converged),
                "relative_error": float(np.linalg.norm(s[ok] - ref[ok]) / np.linalg.norm(ref[ok])),
                "spearman": [
                    float(spearmanr(s[t][ok[t]], ref[t][ok[t]]).statistic) for t in range(NUM_TEST)
                ],
                "top5_helpful_overlap": [
                    len(set(helpful[t]) & set(ref_help[t])) for t in range(NUM_TEST)
                ],
                "top5_harmful_overlap": [
                    len(set(harmful[t]) & set(ref_harm[t])) for t in range(NUM_TEST)
                ],
                "self_influence_spearman": float(
                    spearmanr(r.self_influence, exact.self_influence).statistic
                ),
                "top5_self_influence_overlap": len(set(self_top) & set(ref_self)),
                "num_matvecs": int(r.num_matvecs),
                "seconds": seconds,
            }
        )
    out = {
        "model": "hvp.analysis._demo:digits_mlp (2,410 parameters), 300 Adam steps, seed 0",
        "train": {"loss": float(loss), "accuracy": float(acc)},
        "lambda_min": float(lam[0]),
        "lambda_max": float(lam[-1]),
        "damping": float(damping),
        "test_indices": test_idx,
        "dense": {"num_matvecs": int(exact.num_matvecs), "seconds": t_dense},
        "exact_top5_helpful": ref_help.tolist(),
        "exact_top5_harmful": ref_harm.tolist(),
        "exact_top5_self_influence": ref_self.tolist(),
        "arnoldi": rows,
        "device": jax.devices()[0].device_kind,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "influence_analyze.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "# Influence section of `hvp analyze` vs the exact influence (demo model, float64)",
        "",
        f"{out['model']}; train loss {loss:.4f}, accuracy {acc:.1%}. Hessian eigenvalues "
        f"{lam[0]:.4g} … {lam[-1]:.4g}; damping {damping:.4g} (the section's default rule). "
        f"Test digits: the last {NUM_TEST} ({test_idx}), scored against all {n} training digits "
        f"(their own score left out). Exact: dense Hessian ({exact.num_matvecs} products, "
        f"{t_dense:.1f} s). Seconds are wall time of one run on a shared CPU, compilation "
        "included (programs compiled by an earlier row are reused): a rough guide, not a timing "
        "benchmark.",
        "",
        "| method | rel. error | Spearman (3 test digits) | top-5 helpful overlap | top-5 harmful "
        "overlap | self-infl. Spearman | top-5 self-infl. overlap | products | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['relative_error']:.3g} | "
            f"{', '.join(f'{v:.3f}' for v in r['spearman'])} | "
            f"{', '.join(map(str, r['top5_helpful_overlap']))} | "
            f"{', '.join(map(str, r['top5_harmful_overlap']))} | "
            f"{r['self_influence_spearman']:.3f} | {r['top5_self_influence_overlap']} | "
            f"{r['num_matvecs']} | {r['seconds']:.1f} |"
        )
    (OUT / "influence_analyze.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
