"""Per-layer part of an analysis report: the terminal table and ``layers.png``, readable for deep models.

Layers are shown by the short unique labels of :func:`hvp.tree.layer_labels`
(``decoder/encoderdecoderblock_7/SelfAttention_0/query`` -> ``block_7/attn/query``), either

* ``view="grouped"`` (the default): one row per block (``block_7``: the sum of its
  layers' traces, with a standard error from the per-probe block sums) and one
  per layer outside the repeated blocks (``embed``, ``encoder_norm``), or
* ``view="all"``: one row per layer.

The terminal shows the ``top`` rows by :math:`|\\operatorname{tr} A_{ll}|` and says how
much of the trace the rest holds; ``report.json`` always has every layer (``layers``) and
every block (``layers.groups``). The figure is a sorted horizontal bar chart (trace with
two standard errors, and the top eigenvector's share), legible at any number of layers
(at most :data:`MAX_BARS` bars, the rest summed in one), plus a heat map of the per-layer
trace over blocks x layer kind when the model has a stack of blocks.

Everything accepts an :class:`~hvp.analysis.AnalysisReport` or its dict (a loaded
``report.json``, also one written before blocks were recorded).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from hvp.linalg._checks import check_int

__all__ = [
    "LAYER_VIEWS",
    "DEFAULT_TOP_LAYERS",
    "MAX_BARS",
    "layer_rows",
    "layer_table",
    "layer_figure",
    "plot_layers",
    "block_groups",
]

#: The per-layer views: one row per block, or one per layer.
LAYER_VIEWS = ("grouped", "all")
#: Rows of the terminal table (the largest by ``|trace|``).
DEFAULT_TOP_LAYERS = 10
#: Bars of ``layers.png`` at most (the rest are summed in one bar).
MAX_BARS = 60


def _as_dict(report) -> dict:
    return report if isinstance(report, dict) else report.to_dict()


def _check_view(view: str) -> str:
    if view not in LAYER_VIEWS:
        raise ValueError(f"layer view must be one of {', '.join(LAYER_VIEWS)}, got {view!r}.")
    return view


def _labels(lay: dict):
    from hvp.tree import layer_labels

    names = list(lay["layers"])
    if lay.get("labels") and lay.get("block") and len(lay["labels"]) == len(names):
        return list(lay["labels"]), list(lay["block"]), list(lay.get("kind") or [""] * len(names))
    lab = layer_labels(names)
    return list(lab.short), list(lab.block), list(lab.kind)


def block_groups(layer_trace, labels) -> dict:
    """The ``layers.groups`` section of a report: per-block figures from a per-layer trace.

    Args:
      layer_trace: a :class:`hvp.linalg.LayerTrace` with per-probe ``samples``.
      labels: the :class:`hvp.tree.LayerLabels` of its layers.

    Returns:
      ``{"names", "num_layers", "trace", "trace_std_error"}`` (lists, blocks in order of first
      appearance); the standard errors come from the per-probe block sums.

    Example:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.linalg import layer_trace
      >>> from hvp.tree import layer_labels
      >>> params = {f"block_{i}": {"w": jnp.ones(2)} for i in range(2)}
      >>> op = hvp.from_dense(jnp.diag(jnp.arange(1.0, 5.0)), like=params)
      >>> lt = layer_trace(op, key=jax.random.key(0), method="exact")
      >>> block_groups(lt, layer_labels(lt.layers))["trace"]
      [3.0, 7.0]
    """
    g = layer_trace.grouped(dict(zip(labels.layers, labels.block)))
    counts = {b: labels.block.count(b) for b in g.layers}
    return {
        "names": list(g.layers),
        "num_layers": [counts[b] for b in g.layers],
        "trace": [float(x) for x in np.asarray(g.estimate)],
        "trace_std_error": [float(x) for x in np.asarray(g.std_error)],
    }


def layer_rows(report, view: str = "grouped") -> list[dict]:
    """The rows of the per-layer table, in parameter order (not sorted).

    Each row: ``label``, ``layers`` (the full names it covers), ``num_params``, ``trace``,
    ``std_error``, ``se_bound`` (True when the standard error is only an upper bound: a
    grouped row of a report without ``layers.groups``, where the sum of the layers' standard
    errors bounds the block's), ``mass`` (share of the top eigenvector), ``kind``.

    Example:
      >>> rep = {"layers": {"layers": ["a/Dense_0", "a/Dense_1"], "num_params": [3, 4],
      ...        "trace": [1.0, 2.0], "trace_std_error": [0.1, 0.2],
      ...        "top_eigenvector_mass": [0.25, 0.75]}}
      >>> [r["label"] for r in layer_rows(rep, "all")]
      ['dense_0', 'dense_1']
    """
    _check_view(view)
    d = _as_dict(report)
    lay = d["layers"]
    names = list(lay["layers"])
    short, block, kind = _labels(lay)
    params = [int(x) for x in lay["num_params"]]
    tr = _floats(lay["trace"])
    se = _floats(lay["trace_std_error"])
    mass = _floats(lay["top_eigenvector_mass"])
    if view == "all":
        return [
            dict(
                label=short[i],
                layers=[names[i]],
                num_params=params[i],
                trace=tr[i],
                std_error=se[i],
                se_bound=False,
                mass=mass[i],
                kind=kind[i],
            )
            for i in range(len(names))
        ]
    members: dict[str, list[int]] = {}
    for i, b in enumerate(block):
        members.setdefault(b, []).append(i)
    groups = lay.get("groups") or {}
    exact = dict(zip(groups.get("names", []), _floats(groups.get("trace_std_error", []))))
    rows = []
    for b, idx in members.items():
        honest = b in exact
        rows.append(
            dict(
                label=b,
                layers=[names[i] for i in idx],
                num_params=sum(params[i] for i in idx),
                trace=float(sum(tr[i] for i in idx)),
                std_error=exact[b] if honest else float(sum(se[i] for i in idx)),
                se_bound=not honest and len(idx) > 1,
                mass=float(sum(mass[i] for i in idx)),
                kind="",
            )
        )
    return rows


def _floats(x) -> list[float]:
    return [float("nan") if v is None else float(v) for v in np.asarray(x, dtype=object).ravel()]


def _by_size(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: -abs(r["trace"]) if math.isfinite(r["trace"]) else 0.0)


def _settings(d: dict, view, top):
    s = d.get("settings", {})
    view = _check_view(view if view is not None else s.get("layer_view", "grouped"))
    top = top if top is not None else s.get("top_layers", DEFAULT_TOP_LAYERS)
    return view, check_int("top", top, minimum=1)


def layer_table(report, *, view: str | None = None, top: int | None = None):
    """A ``rich.table.Table`` of the ``top`` layers (or blocks) by ``|trace|``.

    Columns: label, parameters, trace, its standard error, share of the total trace, share of
    the top eigenvector. The caption says how many rows are not shown and how much of the
    trace they hold; every layer is in ``report.json``. Fits an 80-column terminal for labels
    up to about 28 characters (labels are never cut: they are what tells rows apart).

    Args:
      report: an :class:`~hvp.analysis.AnalysisReport` or its dict.
      view: ``"grouped"`` or ``"all"`` (default: the report's ``settings.layer_view``, else
        ``"grouped"``).
      top: rows shown (default: ``settings.top_layers``, else :data:`DEFAULT_TOP_LAYERS`).

    Example:
      >>> import io
      >>> from rich.console import Console
      >>> rep = {"layers": {"layers": ["d/b_0/x", "d/b_1/x"], "num_params": [3, 4],
      ...        "trace": [1.0, 2.0], "trace_std_error": [0.1, 0.2],
      ...        "top_eigenvector_mass": [0.25, 0.75]}, "trace": {"estimate": 3.0}}
      >>> buf = io.StringIO()
      >>> Console(file=buf, width=80).print(layer_table(rep, view="all", top=1))
      >>> "b_1/x" in buf.getvalue() and "b_0/x" not in buf.getvalue()
      True
    """
    from rich import box
    from rich.table import Table

    from hvp.analysis._report import _fmt

    d = _as_dict(report)
    view, top = _settings(d, view, top)
    rows = layer_rows(d, view)
    shown = _by_size(rows)[:top]
    total = (d.get("trace") or {}).get("estimate")
    total = float(total) if total is not None else float(sum(r["trace"] for r in rows))
    what = "block" if view == "grouped" else "layer"
    width = min(max([len(r["label"]) for r in shown] + [len(what)]), 40)
    t = Table(
        title=f"Per-{what} curvature (top {len(shown)} of {len(rows)} by |trace|)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        pad_edge=False,
    )
    t.add_column(what, no_wrap=True, min_width=width, overflow="fold")
    if view == "grouped":
        t.add_column("layers", justify="right", no_wrap=True)
    t.add_column("params", justify="right", no_wrap=True)
    t.add_column("trace", justify="right", no_wrap=True)
    t.add_column("± s.e.", justify="right", no_wrap=True)
    t.add_column("of tr", justify="right", no_wrap=True)
    t.add_column("top vec", justify="right", no_wrap=True)
    for r in shown:
        share = r["trace"] / total if total else float("nan")
        cells = [r["label"]]
        if view == "grouped":
            cells.append(str(len(r["layers"])))
        cells += [
            f"{r['num_params']:,}",
            _fmt(r["trace"]),
            ("≤" if r["se_bound"] else "") + _fmt(r["std_error"]),
            f"{share:.1%}" if math.isfinite(share) else "nan",
            f"{r['mass']:.1%}",
        ]
        t.add_row(*cells)
    rest = len(rows) - len(shown)
    notes = []
    if rest:
        rest_tr = sum(r["trace"] for r in rows) - sum(r["trace"] for r in shown)
        them = f"{rest} more {what}" + (" holds" if rest == 1 else "s hold")
        notes.append(f"{them} {rest_tr / total:.1%} of the trace" if total else them)
    notes.append("every layer is in report.json (layers)")
    if view == "grouped" and any(len(r["layers"]) > 1 for r in rows):
        notes.append("--layers all for single layers")
    if any(r["se_bound"] for r in shown):
        notes.append("≤: bound (sum of the layers' s.e.)")
    t.caption = "; ".join(notes)
    t.caption_justify = "left"
    return t


def _heat(rows_all: list[dict], blocks: list[str]):
    """``(stack blocks, kinds, matrix)`` of per-layer traces over the repeated blocks, or ``None``."""
    stack = {}
    for r, b in zip(rows_all, blocks):
        if r["kind"]:
            stack.setdefault(b, {})[r["kind"]] = r["trace"]
    if len(stack) < 2:
        return None
    kinds = list(dict.fromkeys(k for v in stack.values() for k in v))
    names = sorted(stack, key=_natural)  # block_2 before block_10 (parameter order is lexical)
    mat = np.full((len(names), len(kinds)), np.nan)
    for i, b in enumerate(names):
        for j, k in enumerate(kinds):
            mat[i, j] = stack[b].get(k, np.nan)
    return names, kinds, mat


def _natural(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def layer_figure(report, *, view: str | None = None):
    """The matplotlib figure of ``layers.png`` (see the module docstring); close it after use.

    Left: trace per block (``view="grouped"``) or per layer (``"all"``), sorted by
    ``|trace|``, with two standard errors, as horizontal bars (one line per label, at most
    :data:`MAX_BARS`; the rest summed in one bar). Middle: the top eigenvector's share in the
    same rows. Right, when the model has a stack of at least two blocks: a heat map of the
    per-layer trace over blocks x layer kind.

    Example:
      >>> rep = {"layers": {"layers": ["d/b_0/x", "d/b_1/x"], "num_params": [3, 4],
      ...        "trace": [1.0, 2.0], "trace_std_error": [0.1, 0.2],
      ...        "top_eigenvector_mass": [0.25, 0.75]}}
      >>> fig = layer_figure(rep, view="all")
      >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
      ['b_1/x', 'b_0/x']
      >>> import matplotlib.pyplot as plt; plt.close(fig)
    """
    from hvp.analysis._plots import _OPERATOR_NAMES, _plt, _short

    plt = _plt()
    d = _as_dict(report)
    view, _ = _settings(d, view, None)
    rows = _by_size(layer_rows(d, view))
    if len(rows) > MAX_BARS:
        rest = rows[MAX_BARS - 1 :]
        rows = rows[: MAX_BARS - 1] + [
            dict(
                label=f"({len(rest)} more)",
                layers=[n for r in rest for n in r["layers"]],
                num_params=sum(r["num_params"] for r in rest),
                trace=float(sum(r["trace"] for r in rest)),
                std_error=float(sum(r["std_error"] for r in rest)),
                se_bound=True,
                mass=float(sum(r["mass"] for r in rest)),
                kind="",
            )
        ]
    rows_all = layer_rows(d, "all")
    _, blocks, _ = _labels(d["layers"])
    heat = _heat(rows_all, blocks)
    model = d.get("model", {})
    op = _OPERATOR_NAMES.get(model.get("operator"), model.get("operator") or "curvature")

    n = len(rows)
    longest = max((len(r["label"]) for r in rows), default=8)
    height = min(max(3.2, 0.24 * n + 1.6), 0.24 * MAX_BARS + 1.6)
    label_in = 0.075 * min(longest, 40) + 0.6
    widths = [3.4 + label_in, 2.2]
    if heat is not None:
        height = max(height, 0.3 * len(heat[0]) + 2.5)
        widths.append(max(3.5, 0.32 * len(heat[1]) + 1.5))
    fig = plt.figure(figsize=(sum(widths) + 0.6, height), dpi=110)
    grid = fig.add_gridspec(1, len(widths), width_ratios=widths)
    ax1 = fig.add_subplot(grid[0])
    ax2 = fig.add_subplot(grid[1], sharey=ax1)
    y = np.arange(n)[::-1]  # largest on top
    tr = np.array([r["trace"] for r in rows])
    se = np.array([r["std_error"] for r in rows])
    ax1.barh(
        y,
        tr,
        xerr=2 * np.where(np.isfinite(se), se, 0.0),
        color=["#1f77b4" if v >= 0 else "#d62728" for v in tr],
        alpha=0.85,
        capsize=2,
        height=0.7,
    )
    ax1.axvline(0, color="0.3", lw=0.6)
    ax1.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax1.set_ylim(-0.7, n - 0.3)
    ax1.set_xlabel(f"trace of the {op} block (± 2 s.e.)", fontsize=9)
    what = "block" if view == "grouped" else "layer"
    total = (d.get("trace") or {}).get("estimate")
    ax1.set_title(
        f"Per-{what} trace, sorted by |trace|"
        + (f" (total {float(total):.4g})" if total is not None else ""),
        fontsize=10,
    )
    ax1.grid(True, axis="x", alpha=0.3)
    ax2.barh(y, [100 * r["mass"] for r in rows], color="#ff7f0e", alpha=0.85, height=0.7)
    ax2.tick_params(axis="y", labelleft=False)
    ax2.set_xlim(0, 100)
    ax2.set_xlabel("top eigenvector (% of |v|²)", fontsize=9)
    ax2.set_title("Top-eigenvector share", fontsize=10)
    ax2.grid(True, axis="x", alpha=0.3)
    if heat is not None:
        names, kinds, mat = heat
        ax3 = fig.add_subplot(grid[2])
        finite = mat[np.isfinite(mat)]
        vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
        if finite.size and finite.min() < 0:
            im = ax3.imshow(mat, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        else:
            im = ax3.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=vmax or 1.0)
        ax3.set_yticks(np.arange(len(names)), names, fontsize=8)
        ax3.set_xticks(np.arange(len(kinds)), kinds, fontsize=7, rotation=60, ha="right")
        ax3.set_title("Per-layer trace: block x layer", fontsize=10)
        fig.colorbar(im, ax=ax3, fraction=0.05, pad=0.02)
    spec = model.get("spec")
    fig.suptitle(f"{op} by layer" + (f" — {_short(spec, 60)}" if spec else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))
    return fig


def plot_layers(report, path, *, view: str | None = None) -> Path:
    """Write :func:`layer_figure` to ``path`` (PNG, written atomically); return the path."""
    from hvp._io import atomic_savefig
    from hvp.analysis._plots import _plt

    fig = layer_figure(report, view=view)
    try:
        atomic_savefig(fig, path)
    finally:
        _plt().close(fig)
    return Path(path)
