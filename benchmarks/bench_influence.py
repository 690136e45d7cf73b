"""Group ``influence`` - influence functions on a convex model against exact and leave-one-out values.

Model: L2-regularised multinomial logistic regression on scikit-learn's 8x8 digits (64 pixels +
bias, 10 classes: 650 parameters), ``N`` training and a few test digits, trained by Newton's
method to a gradient norm below 1e-12 in float64, where the influence function of Koh & Liang
(2017) is exact to first order in ``1/N``.

Measured, all in one run:

* ``hvp.influence`` with ``method="dense"`` (dense operator, NumPy solve), ``"arnoldi"``
  (top-``p`` eigenpairs of the Hessian, ``p`` in a range), and ``"solve"`` (``hvp.solve``, when
  this build has it) against the exact inverse-Hessian influence from ``jax.hessian`` and
  per-example ``jax.grad`` (the reference formula, float64): relative error, Spearman rank
  correlation, operator products and time (warm, median of repeats);
* leave-one-out retraining (Newton from the optimum, to a gradient norm below 1e-12) for the
  ``K`` training points with the largest predicted effect on each of a few test digits: the
  actual change of the test loss against the prediction ``-score / N`` (Spearman and Pearson);
* a figure of the most helpful and most harmful training digits for a few test digits.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import hvp
from benchmarks import _common as C

GROUP = "influence"
TITLE = "Influence functions on digits logistic regression vs exact and leave-one-out (float64)"
ALPHA = 1e-2  # L2 regularisation (the model is strictly convex)


def data(n_train: int, n_test: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float64)
    y = d.target.astype(np.int32)
    idx = np.random.default_rng(0).permutation(len(y))
    tr, te = idx[:n_train], idx[n_train : n_train + n_test]
    return (x[tr], y[tr]), (x[te], y[te]), d.images[tr], d.images[te]


def loss_fn(params, batch):
    x, y = batch
    logits = x @ params["w"] + params["b"]
    nll = jnp.mean(
        jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    )
    return nll + 0.5 * ALPHA * (jnp.sum(params["w"] ** 2) + jnp.sum(params["b"] ** 2))


def unravel(theta):
    return {"b": theta[:10], "w": theta[10:].reshape(64, 10)}  # hvp.tree.ravel order: b, w


def flat_loss(theta, batch):
    return loss_fn(unravel(theta), batch)


_grad = jax.jit(jax.grad(flat_loss))
_hess = jax.jit(jax.hessian(flat_loss))


def train(batch, theta0):
    theta = theta0
    for _ in range(50):
        g = _grad(theta, batch)
        if float(jnp.linalg.norm(g)) < 1e-12:
            break
        theta = theta - jnp.linalg.solve(_hess(theta, batch), g)
    return theta


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(np.ravel(a), np.ravel(b)).statistic)


def run(out_dir, *, quick: bool = False) -> C.Report:
    rep = C.Report(GROUP, TITLE, out_dir, quick=quick)
    rep.data["environment"] = C.environment()
    jax.config.update("jax_enable_x64", True)
    try:
        return _run(rep, quick)
    finally:
        jax.config.update("jax_enable_x64", False)


def _run(rep, quick):
    n_train, n_test = (200, 4) if quick else (400, 8)
    n_loo_tests, k_loo = (1, 8) if quick else (3, 20)
    ranks = (10, 50) if quick else (10, 50, 200)
    repeats = 1 if quick else 3
    (train_set, test_set, train_img, test_img) = data(n_train, n_test)
    train_b = tuple(jnp.asarray(a) for a in train_set)
    test_b = tuple(jnp.asarray(a) for a in test_set)
    theta = train(train_b, jnp.zeros(650))
    params = unravel(theta)
    H = hvp.hessian(loss_fn, params, [train_b])
    rep.data["settings"] = dict(
        n_train=n_train,
        n_test=n_test,
        alpha=ALPHA,
        num_params=650,
        ranks=list(ranks),
        loo_tests=n_loo_tests,
        loo_points=k_loo,
        repeats=repeats,
        grad_norm=float(jnp.linalg.norm(_grad(theta, train_b))),
    )

    # ---- the reference: jax.hessian and per-example jax.grad ---------------------------------
    t0 = time.perf_counter()
    Hd = np.asarray(_hess(theta, train_b))
    per_ex = jax.jit(jax.vmap(jax.grad(flat_loss), in_axes=(None, 0)))
    g_tr = np.asarray(per_ex(theta, (train_b[0][:, None], train_b[1][:, None])))
    g_te = np.asarray(per_ex(theta, (test_b[0][:, None], test_b[1][:, None])))
    exact = -g_te @ np.linalg.solve(Hd, g_tr.T)
    t_ref = time.perf_counter() - t0
    lam = np.linalg.eigvalsh(Hd)
    rep.data["hessian"] = dict(lambda_max=float(lam[-1]), lambda_min=float(lam[0]))

    def compare(name, fn):
        stats = C.time_fn(fn, repeats=repeats, warmup=1)
        r = stats["value"]
        rel = float(np.max(np.abs(r.scores - exact)) / np.max(np.abs(exact)))
        rho = float(np.mean([spearman(r.scores[t], exact[t]) for t in range(n_test)]))
        row = dict(
            method=name,
            rel_err=rel,
            spearman=rho,
            num_matvecs=r.num_matvecs,
            converged=r.converged,
            median_s=stats["median_s"],
        )
        print(
            f"  {name}: rel err {rel:.2e}, spearman {rho:.4f}, {stats['median_s']:.2f} s",
            flush=True,
        )
        return row

    rows = [
        compare("dense", lambda: hvp.influence(H, test_b, train_b, method="dense", chunk_size=64))
    ]
    key = jax.random.key(0)
    for p in ranks:
        eig = hvp.eigsh(H, p, key=key)  # once; the timing below is the projection and the scores
        row = compare(
            f"arnoldi p={p}",
            lambda eig=eig: hvp.influence(H, test_b, train_b, eigsh=eig, chunk_size=64),
        )
        row["eigsh_matvecs"] = int(eig.num_matvecs)
        rows.append(row)
    if hasattr(hvp.linalg, "solve"):
        rows.append(
            compare(
                "solve (CG)",
                lambda: hvp.influence(
                    H, test_b, train_b, method="solve", rtol=1e-10, chunk_size=64
                ),
            )
        )
    else:
        rep.notes.append("solve-based variant not measured: hvp.solve is not in this build.")
    rep.data["methods"] = rows
    rep.data["reference_s"] = t_ref
    rep.table(
        f"Scores of {n_test} test digits x {n_train} training digits against the exact "
        "inverse-Hessian influence (jax.hessian, float64)",
        [
            "method",
            "max rel. error",
            "Spearman (mean over test digits)",
            "products",
            "converged",
            "time (warm, median)",
        ],
        [
            [
                r["method"],
                f"{r['rel_err']:.1e}",
                f"{r['spearman']:.4f}",
                f"{r['num_matvecs']}"
                + (f" (+{r['eigsh_matvecs']} eigsh)" if "eigsh_matvecs" in r else ""),
                r["converged"],
                C.fmt_s(r["median_s"]),
            ]
            for r in rows
        ],
        note=f"Reference (dense Hessian + per-example gradients + solve): {C.fmt_s(t_ref)}. Arnoldi "
        "keeps the top-p eigenpairs and ignores the rest of the spectrum (p = 650 would be the full space: exact, checked in tests/influence); "
        "its eigsh products are counted once, outside the timing.",
    )

    # ---- leave-one-out retraining ------------------------------------------------------------
    loo = []
    for t in range(n_loo_tests):
        test1 = (test_b[0][t : t + 1], test_b[1][t : t + 1])
        base = float(flat_loss(theta, test1))
        pred = -exact[t] / n_train
        idx = np.argsort(-np.abs(pred))[:k_loo]
        actual = []
        for i in idx:
            keep = np.delete(np.arange(n_train), i)
            th = train((train_b[0][keep], train_b[1][keep]), theta)
            actual.append(float(flat_loss(th, test1)) - base)
        actual = np.array(actual)
        ours = -hvp.influence(H, test1, train_b, method="dense").scores[0][idx] / n_train
        loo.append(
            dict(
                test=t,
                label=int(test_set[1][t]),
                predicted=pred[idx].tolist(),
                hvp_predicted=ours.tolist(),
                actual=actual.tolist(),
                spearman=spearman(ours, actual),
                pearson=float(np.corrcoef(ours, actual)[0, 1]),
            )
        )
        print(f"  LOO test {t}: spearman {loo[-1]['spearman']:.4f}", flush=True)
    rep.data["loo"] = loo
    rep.table(
        f"Leave-one-out retraining: the {k_loo} training digits with the largest predicted effect per test digit",
        ["test digit", "label", "Spearman", "Pearson", "largest |actual change|"],
        [
            [
                r["test"],
                r["label"],
                f"{r['spearman']:.4f}",
                f"{r['pearson']:.4f}",
                f"{np.max(np.abs(r['actual'])):.2e}",
            ]
            for r in loo
        ],
        note="Predicted change of the test loss when a training digit is removed: -score / N "
        "(hvp.influence, method='dense'); actual: retrained by Newton's method to a gradient norm "
        "below 1e-12 without it.",
    )

    # ---- figure: most helpful / harmful training digits ---------------------------------------
    shown = min(3, n_test)
    top = 4

    def draw(fig):
        axes = fig.subplots(shown, 1 + 2 * top)
        for t in range(shown):
            s = exact[t]
            helpful, harmful = np.argsort(s)[:top], np.argsort(-s)[:top]
            cells = [("test", test_img[t], f"test: {test_set[1][t]}")]
            cells += [("help", train_img[i], f"{train_set[1][i]} ({s[i]:.2g})") for i in helpful]
            cells += [("harm", train_img[i], f"{train_set[1][i]} ({s[i]:.2g})") for i in harmful]
            for ax, (kind, img, title) in zip(axes[t], cells):
                ax.imshow(img, cmap="gray_r")
                color = {"test": "black", "help": "tab:green", "harm": "tab:red"}[kind]
                ax.set_title(title, fontsize=7, color=color)
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle(
            f"Test digit | {top} most helpful (green, score < 0) | {top} most harmful (red)",
            fontsize=9,
        )

    rep.figure("influence_digits.png", draw, figsize=(1.0 * (1 + 2 * top), 1.25 * shown + 0.4))
    rep.data["top_influence"] = [
        dict(
            test=t,
            helpful=np.argsort(exact[t])[:top].tolist(),
            harmful=np.argsort(-exact[t])[:top].tolist(),
        )
        for t in range(shown)
    ]
    return rep
