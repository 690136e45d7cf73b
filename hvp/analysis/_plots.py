"""Figures of an analysis report (matplotlib, Agg backend, no display needed).

* :func:`plot_density`: the eigenvalue density on a log scale (like PyHessian's
  ESD plot) with the Lanczos extreme eigenvalues marked, the negative mass
  in the legend and the critical-point verdict (gradient norm, tolerances) under
  the title: the picture of the spectrum ends with what kind of point it is.
* :func:`plot_layers`: per-block or per-layer trace (with standard-error bars)
  and the share of the top eigenvector, legible for deep models (see
  :mod:`hvp.analysis._layer_report`).

Both accept an :class:`~hvp.analysis.AnalysisReport` or its dict (a loaded
``report.json``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hvp._io import atomic_savefig

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
            label=_negative_mass_label(dens),
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
        f"({_short(d['data']['spec'], 30)}), λ_max = {d['derived']['lambda_max']:.4g}"
        f"{_unconverged_mark(d, 'max')}, λ_min = {d['derived']['lambda_min']:.4g}"
        f"{_unconverged_mark(d, 'min')}" + _verdict_line(d),
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper center", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_savefig(fig, path)
    finally:
        plt.close(fig)
    return path


def _unconverged_mark(d: dict, end: str) -> str:
    """``" (not converged)"`` when the pair behind ``lambda_<end>`` did not converge."""
    return " (not converged)" if d["derived"].get(f"lambda_{end}_converged") is False else ""


def _verdict_line(d: dict) -> str:
    """The critical-point verdict under the title (``""`` for a report without the section)."""
    c = d.get("critical")
    if not c:
        return ""
    kind, verdict = c.get("kind"), str(c["verdict"])
    if kind == "not critical":
        return f"\nverdict: {verdict} (> tolerance {c['grad_tol']:g})"
    if kind == "inconclusive":
        return "\nverdict: inconclusive with the GGN (PSD by construction; use --operator hessian)"
    return (
        f"\nverdict: {verdict} (‖∇L‖ = {c['gradient_norm']:.2g} ≤ {c['grad_tol']:g}; "
        f"|λ| ≤ {c['zero_threshold']:.2g} counts as 0)"
    )


def plot_layers(report, path, *, view: str | None = None) -> Path:
    """Write the per-layer figure of a report to ``path`` (PNG).

    Sorted bars of trace ± 2 s.e. and top-eigenvector share per block or layer, and a
    blocks x layer heat map for stacks of blocks. See :mod:`hvp.analysis._layer_report`; ``view`` is ``"grouped"`` or ``"all"`` (default:
    the report's ``settings.layer_view``).

    Examples:
        >>> import os, tempfile
        >>> from hvp.analysis import plot_layers
        >>> rep = {"layers": {"layers": ["d/b_0/x", "d/b_1/x"], "num_params": [3, 4],
        ...        "trace": [1.0, 2.0], "trace_std_error": [0.1, 0.2],
        ...        "top_eigenvector_mass": [0.25, 0.75]}}
        >>> path = plot_layers(rep, os.path.join(tempfile.mkdtemp(), "layers.png"), view="all")
        >>> path.name, path.stat().st_size > 0
        ('layers.png', True)
    """
    from hvp.analysis._layer_report import plot_layers as _plot_layers

    return _plot_layers(report, path, view=view)


def _negative_mass_label(dens: dict) -> str:
    """``negative mass 14.00% (9.20–62.00%)``: the estimate and, when known, its bracket."""
    label = f"negative mass {dens['negative_mass']:.2%}"
    lo, hi = dens.get("negative_mass_lower"), dens.get("negative_mass_upper")
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        label += f" ({lo:.2%}–{hi:.2%})"
    return label
