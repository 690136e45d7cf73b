"""Group 7 - CG iterations on a trained MLP's damped GGN, with and without preconditioning.

A tanh MLP ``64-W-W-10`` is trained on scikit-learn's digits (1,797 examples, full batch) with
Adam (optax); then ``hvp.solve(G, g, method="cg", damping=lam, rtol=1e-4)`` solves the damped
Gauss-Newton system of the trained network (the Newton / Hessian-free step for the gradient
``g`` at the trained parameters) over the whole data set with:

* no preconditioner;
* the Jacobi preconditioner from the Hutchinson diagonal (100 Rademacher probes);
* spectral deflation of the top-k GGN eigenpairs from ``hvp.eigsh`` (k = 5, 10, 20).

Reported per configuration: CG iterations, CG products, the products spent building the
preconditioner, the true relative residual and ``converged`` (from ``hvp.solve``), and the wall
time of the solve and of the build (median of repeats after a warm-up, ``block_until_ready``).
The top GGN eigenvalues and an estimate of the smallest are recorded to explain the counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import hvp
from benchmarks import _common as C
from benchmarks import _models as M

GROUP = "solve"
TITLE = "CG on a trained MLP's damped GGN: iterations with and without preconditioning"

RTOL = 1e-4
DAMPING = 1e-3


def _train(width: int, steps: int, dtype):
    import optax

    params, loss_fn, batch = M.mlp(width, dtype=dtype)
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(loss_fn)(params, batch)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, loss_fn, batch, losses


def run(out_dir, *, quick: bool = False) -> C.Report:
    rep = C.Report(GROUP, TITLE, out_dir, quick=quick)
    rep.data["environment"] = C.environment()
    width = 16 if quick else 32
    steps = 50 if quick else 300
    ks = (5,) if quick else (5, 10, 20)
    repeats = 1 if quick else 3
    dtype = jnp.float32
    params, loss_fn, batch, losses = _train(width, steps, dtype)
    grad = jax.grad(loss_fn)(params, batch)
    op = hvp.ggn(M.mlp_apply, hvp.losses.softmax_cross_entropy, params, batch)
    n = op.size
    rep.data["settings"] = {
        "width": width,
        "parameters": n,
        "examples": int(batch[0].shape[0]),
        "adam_steps": steps,
        "final_train_loss": losses[-1],
        "rtol": RTOL,
        "damping": DAMPING,
        "dtype": "float32",
        "repeats": repeats,
    }
    key = jax.random.key(0)
    top = hvp.eigsh(op, max(ks), key=key, tol=1e-4)
    bottom = hvp.eigsh(op, 1, key=key, which="smallest", tol=1e-2, num_iters=60)
    rep.data["spectrum"] = {
        "top": [float(v) for v in np.asarray(top.eigenvalues)[::-1]],
        "smallest_estimate": float(np.asarray(bottom.eigenvalues)[0]),
    }
    configs = [("none", None, lambda: None)]
    configs.append(
        (
            "diagonal (100 probes)",
            "diagonal",
            lambda: hvp.linalg.Preconditioner.from_diagonal(op, key=key),
        )
    )
    for k in ks:
        configs.append(
            (
                f"deflation k={k}",
                "deflation",
                lambda k=k: hvp.linalg.Preconditioner.from_eigsh(op, k, key=key),
            )
        )
    rows, records = [], []
    for label, kind, build in C.progress(configs, description="solve"):
        b_stats = C.time_fn(build, repeats=repeats, warmup=1) if kind else None
        pre = b_stats["value"] if kind else None

        def call(pre=pre):
            r = hvp.solve(
                op,
                grad,
                method="cg",
                damping=DAMPING,
                rtol=RTOL,
                preconditioner=pre,
                max_matvecs=3000,
            )
            return r

        s_stats = C.time_fn(call, repeats=repeats, warmup=1)
        r = s_stats["value"]
        built = 0 if pre is None else int(pre.num_matvecs)
        rec = {
            "config": label,
            "cg_iterations": int(r.num_iters),
            "cg_products": int(r.num_matvecs) - built,
            "build_products": built,
            "relative_residual": float(r.relative_residual),
            "converged": bool(r.converged),
            "solve_s": s_stats["median_s"],
            "build_s": None if b_stats is None else b_stats["median_s"],
        }
        records.append(rec)
        rows.append(
            [
                label,
                rec["cg_iterations"],
                rec["cg_products"],
                rec["build_products"],
                f"{rec['relative_residual']:.2e}",
                rec["converged"],
                C.fmt_s(rec["solve_s"]),
                C.fmt_s(rec["build_s"]) if rec["build_s"] is not None else "-",
            ]
        )
    rep.data["results"] = records
    sp = rep.data["spectrum"]
    rep.table(
        f"CG to rtol {RTOL:g} on the damped GGN (damping {DAMPING:g}), MLP 64-{width}-{width}-10, "
        f"n = {n}, after {steps} Adam steps",
        [
            "preconditioner",
            "CG iterations",
            "CG products",
            "build products",
            "true rel. residual",
            "converged",
            "solve time",
            "build time",
        ],
        rows,
        note=(
            f"GGN top eigenvalues {', '.join(f'{v:.3g}' for v in sp['top'][:5])}, ... (k-th: "
            f"{sp['top'][-1]:.3g}); smallest (Lanczos estimate) {sp['smallest_estimate']:.3g}. "
            "CG products = iterations + 1 (the true-residual check). Times: median of "
            f"{repeats} after a warm-up; the build is paid once and reused across solves."
        ),
    )
    return rep
