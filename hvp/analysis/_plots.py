"""Figures of an analysis report (matplotlib, Agg backend, no display needed).

* :func:`plot_density`: the eigenvalue density on a log scale (like PyHessian's
  ESD plot) with the Lanczos extreme eigenvalues marked and the negative mass
  in the legend.
* :func:`plot_layers`: per-layer trace (with standard-error bars) and the
  share of the top eigenvector in each layer.

Both accept an :class:`~hvp.analysis.AnalysisReport` or its dict (a loaded
``report.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_density", "plot_layers"]

_OPERATOR_NAMES = {"hessian": "Hessian", "ggn": "Gauss-Newton (GGN)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _as_dict(report) -> dict:
    return report if isinstance(report, dict) else report.to_dict()


def _short(spec: str, width: int = 48) -> str:
    return spec if len(spec) <= width else "…" + spec[-(width - 1) :]


def plot_density(report, path) -> Path:
    """Write the log-scale spectral density plot of a report to ``path`` (PNG).

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import flax.linen as nn
        >>> import orbax.checkpoint as ocp
        >>> import hvp
        >>> def tiny():  # a model factory: ((Linen module, variables), loss)
        ...     net = nn.Dense(2)
        ...     return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse"
        >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> checkpointer = ocp.StandardCheckpointer()
        >>> checkpointer.save(ckpt, tiny()[0][1])
        >>> checkpointer.wait_until_finished(); checkpointer.close()
        >>> rng = np.random.default_rng(0)
        >>> data = [(rng.normal(size=(8, 3)), rng.normal(size=(8, 2)))]
        >>> report = hvp.analysis.analyze(ckpt, model=tiny, data=data, k=1, num_probes=2, num_iters=4,
        ...                               trace_method="hutchinson", trace_matvecs=4, layer_matvecs=2,
        ...                               plots=False, x64=True)
        >>> path = hvp.analysis.plot_density(report, os.path.join(tempfile.mkdtemp(), "density.png"))
        >>> path.name, path.stat().st_size > 0
        ('density.png', True)
    """
    plt = _plt()
    d = _as_dict(report)
    dens, model = d["density"], d["model"]
    grid = np.asarray(dens["grid"], dtype=float)
    rho = np.asarray(dens["density"], dtype=float)
    rho = np.where(np.isfinite(rho), rho, 0.0)
    peak = float(rho.max()) if rho.size and rho.max() > 0 else 1.0
    floor = peak * 1e-7
    op = _OPERATOR_NAMES.get(model["operator"], model["operator"])

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    ax.semilogy(
        grid,
        np.maximum(rho, floor),
        color="#1f77b4",
        lw=1.6,
        label=f"SLQ density ({dens['num_probes']} probes × {dens['num_iters']} steps, σ={dens['sigma']:.2g})",
    )
    ax.fill_between(grid, floor, np.maximum(rho, floor), color="#1f77b4", alpha=0.15)
    neg = grid <= 0
    if neg.any() and dens["negative_mass"] and dens["negative_mass"] > 0:
        ax.fill_between(
            grid[neg],
            floor,
            np.maximum(rho[neg], floor),
            color="#d62728",
            alpha=0.25,
            label=f"negative mass {dens['negative_mass']:.2%}",
        )
    top = np.asarray(d["top"]["eigenvalues"], dtype=float)
    bot = np.asarray(d["bottom"]["eigenvalues"], dtype=float)
    for i, lam in enumerate(top):
        ax.axvline(
            lam,
            color="#ff7f0e",
            lw=0.9,
            ls="--",
            alpha=0.9,
            label=f"top-{len(top)} eigenvalues (Lanczos)" if i == 0 else None,
        )
    for i, lam in enumerate(bot):
        ax.axvline(
            lam,
            color="#2ca02c",
            lw=0.9,
            ls=":",
            alpha=0.9,
            label=f"bottom-{len(bot)} eigenvalues (Lanczos)" if i == 0 else None,
        )
    if grid[0] < 0 < grid[-1]:
        ax.axvline(0.0, color="0.3", lw=0.6)
    ax.set_ylim(floor, peak * 3)
    ax.set_xlim(grid[0], grid[-1])
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (log scale)")
    ax.set_title(
        f"{op} eigenvalue density — {_short(model['spec'])}\n"
        f"{model['num_params']:,} parameters, {d['data']['num_examples']:,} examples "
        f"({_short(d['data']['spec'], 30)}), λ_max = {d['derived']['lambda_max']:.4g}, "
        f"λ_min = {d['derived']['lambda_min']:.4g}",
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper center", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_layers(report, path) -> Path:
    """Write the per-layer bar chart (trace ± standard error, top-eigenvector mass) to ``path`` (PNG).

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import flax.linen as nn
        >>> import orbax.checkpoint as ocp
        >>> import hvp
        >>> def tiny():  # a model factory: ((Linen module, variables), loss)
        ...     net = nn.Dense(2)
        ...     return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse"
        >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> checkpointer = ocp.StandardCheckpointer()
        >>> checkpointer.save(ckpt, tiny()[0][1])
        >>> checkpointer.wait_until_finished(); checkpointer.close()
        >>> rng = np.random.default_rng(0)
        >>> data = [(rng.normal(size=(8, 3)), rng.normal(size=(8, 2)))]
        >>> report = hvp.analysis.analyze(ckpt, model=tiny, data=data, k=1, num_probes=2, num_iters=4,
        ...                               trace_method="hutchinson", trace_matvecs=4, layer_matvecs=2,
        ...                               plots=False, x64=True)
        >>> path = hvp.analysis.plot_layers(report, os.path.join(tempfile.mkdtemp(), "layers.png"))
        >>> path.name, path.stat().st_size > 0
        ('layers.png', True)
    """
    plt = _plt()
    d = _as_dict(report)
    lay, model = d["layers"], d["model"]
    names = list(lay["layers"])
    tr = np.asarray(lay["trace"], dtype=float)
    se = np.asarray(lay["trace_std_error"], dtype=float)
    mass = np.asarray(lay["top_eigenvector_mass"], dtype=float)
    counts = list(lay["num_params"])
    op = _OPERATOR_NAMES.get(model["operator"], model["operator"])
    labels = [f"{n}\n({c:,})" for n, c in zip(names, counts)]
    x = np.arange(len(names))
    width = max(7.0, 1.1 * len(names) + 3)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(min(width, 16), 4.6), dpi=120)
    colors = ["#1f77b4" if v >= 0 else "#d62728" for v in tr]
    ax1.bar(
        x,
        tr,
        yerr=2 * se,
        color=colors,
        capsize=4,
        alpha=0.85,
        label=f"estimate ± 2 s.e. ({lay['num_matvecs']} probes)",
    )
    ax1.axhline(0, color="0.3", lw=0.6)
    ax1.set_xticks(x, labels, fontsize=8, rotation=30 if len(names) > 6 else 0)
    ax1.set_xlabel("layer (parameters)")
    ax1.set_ylabel(f"trace of the layer's {op} block")
    ax1.set_title(
        f"Per-layer trace (total {d['trace']['estimate']:.4g} ± {d['trace']['std_error']:.2g})",
        fontsize=10,
    )
    ax1.grid(True, axis="y", alpha=0.3)
    top1 = float(np.max(np.maximum(tr + 2 * se, 0))) if tr.size else 1.0
    bot1 = float(np.min(np.minimum(tr - 2 * se, 0))) if tr.size else 0.0
    ax1.set_ylim(bot1 * 1.1, top1 * 1.25 if top1 > 0 else 1.0)
    ax1.legend(fontsize=7.5, loc="upper center")

    ax2.bar(
        x,
        100 * mass,
        color="#ff7f0e",
        alpha=0.85,
        label=f"top eigenvector (λ = {d['derived']['lambda_max']:.4g})",
    )
    share = 100 * np.asarray(counts, dtype=float) / max(sum(counts), 1)
    ax2.scatter(x, share, color="0.2", marker="_", s=400, zorder=3, label="share of parameters")
    ax2.set_xticks(x, labels, fontsize=8, rotation=30 if len(names) > 6 else 0)
    ax2.set_xlabel("layer (parameters)")
    ax2.set_ylabel("share of squared norm (%)")
    ax2.set_ylim(0, 130)
    ax2.set_yticks(np.arange(0, 101, 20))
    ax2.set_title("Top-eigenvector mass per layer", fontsize=10)
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.legend(fontsize=7.5, loc="upper right", handlelength=1.5)
    fig.suptitle(f"{op} by layer — {_short(model['spec'], 60)}", fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
