"""Plots of a monitored run (matplotlib, Agg backend; imported only when plotting)."""

from __future__ import annotations

import os

import numpy as np

from hvp._io import atomic_savefig

__all__ = ["plot_history"]


def sharpness_axis(eigenvalues, thresholds):
    """y-limits of the sharpness panel and whether the ``2/lr`` line is in them.

    The axis is scaled to the measured eigenvalues (padded by 8 % of their
    range); the threshold values extend it only up to half a range (or half the
    largest magnitude) above the largest eigenvalue, so that a far-away ``2/lr``
    (adaptive optimisers such as Adam, warm-up schedules) does not flatten the
    measured curve. The line is drawn where it falls in those limits, else a
    note gives its value.

    Args:
      eigenvalues: array of the plotted eigenvalues (any shape, NaN ignored).
      thresholds: the ``2/lr`` values (may be empty).

    Returns:
      ``((low, high), in_range)``; ``in_range`` is true when some threshold is
      inside the limits.

    Example:
      >>> from hvp.monitor._plot import sharpness_axis
      >>> (lo, hi), shown = sharpness_axis([1.0, 2.0, 3.0], [2000.0])
      >>> hi < 5, shown
      (True, False)
      >>> sharpness_axis([1.0, 3.0], [3.5])[1]
      True
    """
    vals = np.asarray(eigenvalues, dtype=float).ravel()
    vals = vals[np.isfinite(vals)]
    lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (0.0, 1.0)
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    low, high = lo - 0.08 * span, hi + 0.08 * span
    thr = np.asarray(thresholds, dtype=float).ravel()
    thr = thr[np.isfinite(thr)]
    cap = hi + 0.5 * max(span, abs(hi))
    near = thr[thr <= cap]
    if near.size:
        high = max(high, float(near.max()) + 0.04 * span)
        low = min(low, float(near.min()) - 0.04 * span)
    in_range = bool(np.any((thr >= low) & (thr <= high)))
    return (low, high), in_range


def plot_history(history, path, *, densities=None, title=None, operator_name="hessian"):
    """Sharpness (top eigenvalues) vs step with the ``2/lr`` line; trace vs step; densities.

    The sharpness axis is scaled to the measured eigenvalues; the ``2/lr`` line
    is drawn only where it is in range (see :func:`sharpness_axis`), otherwise a
    note gives its smallest value. The file is written atomically.

    Args:
      history: list of :class:`~hvp.monitor.MonitorRecord`.
      path: output PNG path (folders are created).
      densities: optional ``{step: SpectralDensity}`` drawn in a third panel.
      title: figure title.
      operator_name: used in the axis labels (``"hessian"``, ``"ggn"``, ...).

    Returns:
      ``path``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import hvp
        >>> def loss_fn(params, batch):  # least squares: the Hessian is diag(1, 4)
        ...     x, y = batch
        ...     return jnp.mean((x @ params["w"] - y) ** 2)
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
        >>> monitor = hvp.CurvatureMonitor.from_loss(loss_fn, batch, every=10, trace=False, key=jax.random.PRNGKey(0))
        >>> _ = monitor(0, {"w": jnp.zeros(2)})
        >>> import os, tempfile
        >>> path = hvp.monitor.plot_history(monitor.history, os.path.join(tempfile.mkdtemp(), "curvature.png"))
        >>> os.path.basename(path), os.path.getsize(path) > 0
        ('curvature.png', True)
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover
        raise ImportError("Plotting needs matplotlib: pip install 'hvp-jax[plots]'.") from err
    if not history:
        raise ValueError(
            "The monitor has no records yet: call it at a scheduled step before plotting."
        )

    steps = np.array([r.step for r in history])
    eigs = np.array([np.asarray(r.eigenvalues, dtype=float) for r in history])  # (T, k) descending
    has_trace = any(r.trace is not None for r in history)
    densities = dict(densities or {})
    panels = 1 + int(has_trace) + int(bool(densities))
    fig, axes = plt.subplots(panels, 1, figsize=(7.5, 3.0 * panels + 0.6), squeeze=False)
    axes = axes[:, 0]

    ax = axes[0]
    k = eigs.shape[1]
    for i in range(k - 1, -1, -1):
        ax.plot(
            steps,
            eigs[:, i],
            marker="o" if i == 0 else None,
            ms=3,
            lw=2.0 if i == 0 else 1.0,
            alpha=1.0 if i == 0 else 0.5,
            color="C0" if i == 0 else "C7",
            label=r"sharpness $\lambda_1$"
            if i == 0
            else (
                (rf"$\lambda_2 \ldots \lambda_{k}$" if k > 2 else r"$\lambda_2$")
                if i == 1
                else None
            ),
        )
    thr = [(r.step, r.lr_threshold) for r in history if r.lr_threshold is not None]
    ts, tv = np.array(thr).T if thr else (np.array([]), np.array([]))
    ylim, in_range = sharpness_axis(eigs, tv)
    ax.set_ylim(*ylim)
    if thr and in_range:
        if np.allclose(tv, tv[0]):
            ax.axhline(tv[0], ls="--", color="C3", lw=1.5, label=rf"$2/\eta$ = {tv[0]:.3g}")
        else:
            ax.plot(ts, tv, ls="--", color="C3", lw=1.5, label=r"$2/\eta$ (schedule)")
    elif thr:  # a legend entry only: the line would flatten the measured curve
        ax.plot(
            [],
            [],
            ls="--",
            color="C3",
            lw=1.5,
            label=rf"$2/\eta \geq$ {tv.min():.3g} (off this scale)",
        )
    label = {"hessian": "Hessian", "ggn": "GGN", "empirical_fisher": "Fisher"}.get(
        operator_name, operator_name
    )
    ax.set_ylabel(f"top {label} eigenvalue")
    ax.set_title(title or "Sharpness during training")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)

    if has_trace:
        ax = axes[1]
        pts = [(r.step, r.trace, r.trace_std_error or 0.0) for r in history if r.trace is not None]
        ts, tv, te = (np.array(x) for x in zip(*pts))
        ax.errorbar(
            ts,
            tv,
            yerr=2 * te,
            marker="o",
            ms=3,
            color="C1",
            capsize=2,
            lw=1.5,
            label="trace (Hutchinson, $\\pm 2$ s.e.)",
        )
        ax.set_ylabel(f"{label} trace")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    axes[-1 if not densities else -2].set_xlabel("training step")

    if densities:
        ax = axes[-1]
        cmap = plt.get_cmap("viridis")
        items = sorted(densities.items())
        lo = min(float(np.min(d.nodes)) for _, d in items)
        hi = max(float(np.max(d.nodes)) for _, d in items)
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        grid = np.linspace(lo - pad, hi + pad, 800)
        sigma = (hi - lo if hi > lo else 1.0) / 200
        for j, (s, d) in enumerate(items):
            y = np.asarray(d.density(grid, sigma))
            ax.semilogy(
                grid,
                np.maximum(y, 1e-8),
                color=cmap(j / max(len(items) - 1, 1)),
                lw=1.2,
                label=f"step {s}",
            )
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("spectral density")
        ax.set_ylim(bottom=1e-6)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)

    fig.tight_layout()
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    try:
        atomic_savefig(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path
