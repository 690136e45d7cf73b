"""Figures of a loss landscape (matplotlib, Agg backend; files written atomically)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hvp._io import atomic_savefig

__all__ = ["plot_landscape"]

_NAMES = {
    "hessian": "Hessian",
    "ggn": "GGN",
    "empirical_fisher": "empirical Fisher",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _axis_label(d: dict, name: str) -> str:
    kind = d.get("kind")
    if kind == "eigenvector":
        return f"{name}: eigenvector {d.get('rank', 0) + 1} (lambda = {d['eigenvalue']:.4g})"
    if kind == "towards_target":
        return f"{name}: towards the target (1 = target)"
    if kind == "filter_normalized_random":
        return f"{name}: filter-normalised random direction"
    return f"{name}: given direction (norm {d.get('norm', float('nan')):.3g})"


def plot_landscape(result, path, *, surface_path=None, title: str | None = None) -> list[Path]:
    """Draw a :class:`~hvp.landscape.LandscapeResult` (or its dict) to PNG files.

    A 1-D slice: the loss against ``a`` with the operator's second-order model
    ``L + a g.d + 1/2 lambda a^2`` overlaid (dashed). A 2-D slice: filled contours of the loss
    with the second-order model's contours in dashed lines, and, with ``surface_path``, a 3-D
    surface. Each file is written to a temporary file and renamed (never half-written).

    Args:
      result: a :class:`~hvp.landscape.LandscapeResult` or its ``to_dict()``.
      path: the PNG of the line (1-D) or contour (2-D) plot.
      surface_path: optional PNG of the 3-D surface (2-D slices only).
      title: optional title (default: the directions' kind and the operator).

    Returns:
      The list of paths written.

    Raises:
      ValueError: ``surface_path`` for a 1-D slice.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, hvp
      >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p) ** 2), jnp.zeros(2), (jnp.eye(2), jnp.zeros(2)))
      >>> r = hvp.landscape(H, directions=jnp.array([1.0, 0.0]), num_points=3)
      >>> out = hvp.landscape.plot_landscape(r, os.path.join(tempfile.mkdtemp(), "line.png"))
      >>> [p.name for p in out]
      ['line.png']
    """
    r = result if isinstance(result, dict) else result.to_dict()
    losses = np.asarray(r["losses"], dtype=float)
    quad = np.asarray(r["quadratic"], dtype=float)
    coords = [np.asarray(c, dtype=float) for c in r["coordinates"]]
    dirs = r["directions"]
    op = _NAMES.get(r.get("operator", ""), r.get("operator", ""))
    title = title or f"Loss landscape ({r.get('kind', '')} directions, {op})"
    plt = _plt()
    written = []
    if losses.ndim == 1:
        if surface_path is not None:
            raise ValueError("`surface_path` needs a 2-D slice (dims=2); this one is 1-D.")
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(coords[0], losses, "o-", ms=3, label="loss over the data set")
        # the model: same y-range as the loss so that a parabola far off does not flatten it
        ax.plot(coords[0], quad, "--", label=f"second-order model ({op})")
        span = np.nanmax(losses) - np.nanmin(losses)
        pad = 0.1 * span if span > 0 else 1.0
        ax.set_ylim(np.nanmin(losses) - pad, np.nanmax(losses) + pad)
        ax.axvline(0.0, color="0.7", lw=0.8)
        ax.set_xlabel(_axis_label(dirs[0], "a"))
        ax.set_ylabel("loss")
        ax.legend()
    else:
        fig, ax = plt.subplots(figsize=(6, 5))
        aa, bb = np.meshgrid(coords[0], coords[1], indexing="ij")
        cs = ax.contourf(aa, bb, losses, levels=30, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="loss")
        ax.contour(
            aa, bb, quad, levels=cs.levels, colors="white", linestyles="dashed", linewidths=0.6
        )
        ax.plot([0], [0], "r+", ms=10)
        ax.set_xlabel(_axis_label(dirs[0], "a"))
        ax.set_ylabel(_axis_label(dirs[1], "b"))
        ax.text(
            0.01,
            0.01,
            "dashed: second-order model",
            transform=ax.transAxes,
            color="white",
            fontsize=8,
        )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    written.append(Path(path))
    if surface_path is not None:
        fig = plt.figure(figsize=(6, 5))
        ax = fig.add_subplot(projection="3d")
        aa, bb = np.meshgrid(coords[0], coords[1], indexing="ij")
        ax.plot_surface(aa, bb, losses, cmap="viridis", linewidth=0, antialiased=True)
        ax.set_xlabel("a")
        ax.set_ylabel("b")
        ax.set_zlabel("loss")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        atomic_savefig(fig, surface_path, dpi=110)
        plt.close(fig)
        written.append(Path(surface_path))
    return written
