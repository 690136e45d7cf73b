"""``report.json``: its schema, the writer, and the terminal summary table.

The schema (version :data:`~hvp.analysis.SCHEMA_VERSION`) is documented field
by field in ``docs/analyze.md``; :data:`REPORT_SCHEMA` lists the required keys
of every section and :func:`validate_report` checks a loaded report against it.
Non-finite numbers are written as ``null`` (NaN) or ``"inf"``/``"-inf"``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hvp._io import atomic_write_text, check_writable_dir
from hvp.analysis._errors import AnalysisError

__all__ = [
    "REPORT_SCHEMA",
    "validate_report",
    "write_outputs",
    "prepare_output_dir",
    "OUTPUT_FILES",
    "write_json",
    "load_report",
    "summary_table",
    "print_summary",
    "FIGURE_KEYS",
]

_COST = ["num_matvecs", "seconds"]

#: Required keys of ``report.json``: top-level keys, and for each section its keys.
REPORT_SCHEMA: dict[str, list[str] | None] = {
    "schema_version": None,
    "created": None,
    "settings": [
        "operator",
        "k",
        "num_probes",
        "num_iters",
        "eig_iters",
        "tol",
        "trace_method",
        "trace_matvecs",
        "layer_matvecs",
        "batch_size",
        "num_batches",
        "seed",
        "x64",
        "dtype",
        "density_grid_size",
        "step",
        "item",
    ],
    "seeds": ["seed", "derivation", "order"],
    "versions": ["hvp", "jax", "jaxlib", "flax", "orbax-checkpoint", "numpy", "python"],
    "device": ["platform", "device_kind", "count", "backend"],
    "checkpoint": ["path", "item_dir", "step", "item", "restored", "ignored"],
    "model": ["spec", "framework", "num_params", "num_layers", "operator", "dtype"],
    "data": ["spec", "num_examples", "num_batches", "batch_size"],
    "top": ["eigenvalues", "residuals", "converged", "num_restarts", "which"] + _COST,
    "bottom": ["eigenvalues", "residuals", "converged", "num_restarts", "which"] + _COST,
    "trace": ["estimate", "std_error", "method"] + _COST,
    "density": [
        "grid",
        "density",
        "sigma",
        "nodes",
        "weights",
        "negative_mass",
        "zero_threshold",
        "num_probes",
        "num_iters",
    ]
    + _COST,
    "layers": [
        "layers",
        "num_params",
        "trace",
        "trace_std_error",
        "top_eigenvector_mass",
        "eigenvector_mass",
    ]
    + _COST,
    "derived": [
        "lambda_max",
        "lambda_min",
        "condition_estimate",
        "positive_definite",
        "negative_ratio",
        "negative_mass",
    ]
    + _COST,
    "timings": [
        "load_model",
        "load_checkpoint",
        "load_data",
        "operator",
        "top",
        "bottom",
        "trace",
        "density",
        "layers",
        "total",
    ],
    "num_matvecs": None,
    "command": None,
    "extra": [],
}

#: The figures compared when checking that two reports agree (``section.key`` paths).
FIGURE_KEYS = (
    "top.eigenvalues",
    "top.residuals",
    "bottom.eigenvalues",
    "bottom.residuals",
    "trace.estimate",
    "trace.std_error",
    "density.nodes",
    "density.weights",
    "density.density",
    "density.negative_mass",
    "layers.trace",
    "layers.trace_std_error",
    "layers.top_eigenvector_mass",
    "derived.lambda_max",
    "derived.lambda_min",
    "derived.condition_estimate",
    "derived.negative_mass",
)


def validate_report(d: dict) -> None:
    """Raise ``ValueError`` listing every key of :data:`REPORT_SCHEMA` missing from a report dict.

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
        >>> hvp.analysis.validate_report(report.to_dict())  # passes silently
        >>> hvp.analysis.validate_report({"schema_version": hvp.analysis.SCHEMA_VERSION})
        Traceback (most recent call last):
        ...
        ValueError: report is missing keys: ...
    """
    missing = []
    for key, sub in REPORT_SCHEMA.items():
        if key not in d:
            missing.append(key)
            continue
        for s in sub or ():
            if not isinstance(d[key], dict) or s not in d[key]:
                missing.append(f"{key}.{s}")
    if missing:
        raise ValueError(f"report is missing keys: {', '.join(missing)}")


def write_json(report, path) -> Path:
    """Write a report (or its dict) as JSON to ``path`` atomically (temporary file, then rename)."""
    d = report.to_dict() if hasattr(report, "to_dict") else report
    validate_report(d)
    path = Path(path)
    atomic_write_text(path, json.dumps(d, indent=1) + "\n")
    return path


def load_report(path) -> dict:
    """Read a ``report.json`` and check its schema.

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
        >>> files = report.write(tempfile.mkdtemp(), plots=False)
        >>> loaded = hvp.analysis.load_report(files["report"])
        >>> loaded["top"]["eigenvalues"] == report.to_dict()["top"]["eigenvalues"]
        True
    """
    d = json.loads(Path(path).read_text())
    validate_report(d)
    return d


#: The files an analysis writes into its output directory (the PNGs only with plots).
OUTPUT_FILES = ("report.json", "density.png", "layers.png", "compression.png", "influence.png")
#: The landscape figures (``--landscape``; see :func:`write_landscape_plots`).
LANDSCAPE_FILES = ("landscape_eigen.png", "landscape_random.png", "landscape_surface.png")


def prepare_output_dir(out_dir, *, overwrite: bool = False, extra: tuple[str, ...] = ()) -> Path:
    """Check an output directory before any heavy work; return it as a ``Path``.

    The directory is created if needed and must be writable. If it already holds
    an output of an earlier run (one of :data:`OUTPUT_FILES`, or a name in
    ``extra``) the call raises unless ``overwrite`` is true; with ``overwrite``
    the later :func:`write_outputs` replaces the whole set (outputs it does not
    write again, such as the PNGs under ``plots=False``, are removed).

    Raises:
      AnalysisError: the directory cannot be created or written to, is a file,
        or holds earlier outputs and ``overwrite`` is false.

    Example:
      >>> import tempfile
      >>> from hvp.analysis._report import prepare_output_dir
      >>> prepare_output_dir(tempfile.mkdtemp()).is_dir()
      True
    """
    out = Path(out_dir)
    try:
        check_writable_dir(out)
    except OSError as e:
        raise AnalysisError(f"{e} (--out).") from None
    if not overwrite:
        found = [
            name for name in (*OUTPUT_FILES, *LANDSCAPE_FILES, *extra) if (out / name).exists()
        ]
        if found:
            raise AnalysisError(
                f"The output directory '{out}' already holds {', '.join(found)} from an earlier "
                "run; pass --overwrite (overwrite=True) to replace them, or choose another --out."
            )
    return out


def write_outputs(report, out_dir, *, plots: bool = True) -> dict[str, str]:
    """Write ``report.json`` and, with ``plots``, ``density.png`` and ``layers.png`` into ``out_dir``.

    Every file is written atomically (a reader sees the previous complete file or
    the new one, never a partial file). The whole set is replaced: an output of an
    earlier run that this call does not write (the PNGs when ``plots`` is false)
    is removed, so no stale figure sits beside a new report.

    Raises:
      AnalysisError: the directory cannot be created or written to.
    """
    out = prepare_output_dir(out_dir, overwrite=True)
    files = {"report": str(write_json(report, out / "report.json"))}
    if plots:
        from hvp.analysis._plots import plot_density, plot_layers

        files["density_plot"] = str(plot_density(report, out / "density.png"))
        files["layers_plot"] = str(plot_layers(report, out / "layers.png"))
    else:
        for name in ("density.png", "layers.png"):
            (out / name).unlink(missing_ok=True)
    # the compression section's figure (hvp analyze --compression)
    section = (
        report.get("compression")
        if isinstance(report, dict)
        else getattr(report, "compression", None)
    )
    if plots and section is not None:
        from hvp.analysis._compression_critical import plot_compression

        files["compression_plot"] = str(plot_compression(report, out / "compression.png"))
    else:
        (out / "compression.png").unlink(missing_ok=True)
    # the influence section's figure (hvp analyze --influence)
    section = (
        report.get("influence") if isinstance(report, dict) else getattr(report, "influence", None)
    )
    if plots and section is not None:
        from hvp.analysis._influence_section import plot_influence

        files["influence_plot"] = str(plot_influence(report, out / "influence.png"))
    else:
        (out / "influence.png").unlink(missing_ok=True)
    files.update(write_landscape_plots(report, out, plots=plots))
    return files


def write_landscape_plots(report, out_dir, *, plots: bool = True) -> dict[str, str]:
    """The ``--landscape`` figures: the 1-D slice with its quadratic model, contour, surface.

    Written (atomically) when the report has a ``landscape`` section and ``plots`` is true;
    otherwise any landscape figure of an earlier run in ``out_dir`` is removed.

    Examples:
      >>> import tempfile
      >>> from hvp.analysis._report import write_landscape_plots
      >>> write_landscape_plots({"landscape": None}, tempfile.mkdtemp())
      {}
    """
    from pathlib import Path

    out = Path(out_dir)
    section = report.get("landscape") if isinstance(report, dict) else report.landscape
    if not (plots and section):
        for name in LANDSCAPE_FILES:
            (out / name).unlink(missing_ok=True)
        return {}
    from hvp.landscape import plot_landscape

    eigen, random, surface = (out / name for name in LANDSCAPE_FILES)
    plot_landscape(section["eigen"], eigen, title="Loss along the top eigenvector")
    plot_landscape(
        section["random"],
        random,
        surface_path=surface,
        title="Loss on two filter-normalised random directions",
    )
    return {
        "landscape_eigen_plot": str(eigen),
        "landscape_random_plot": str(random),
        "landscape_surface_plot": str(surface),
    }


def _get(report, section: str, key: str | None = None) -> Any:
    if isinstance(report, dict):
        v = report[section]
        return v if key is None else v[key]
    v = getattr(report, section)
    return v if key is None else getattr(v, key)


def _fmt(x) -> str:
    if x is None:
        return "nan"
    if isinstance(x, str):
        return x
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.4e}"
    return f"{x:.5g}"


def _list(x):
    import numpy as np

    return [float(v) for v in np.asarray(x, dtype=float).ravel()]


def negative_mass_cells(density) -> tuple[str, str, str | None]:
    """The headline's negative-mass cells ``(value, error, hint)`` from a density section.

    ``value`` is the estimate with its quadrature bracket, ``"0.017 (0.011-0.024)"``;
    ``error`` the probe standard error, ``"± 0.003"``; ``hint`` says how to narrow the
    bracket when it is wider than ``max(0.02, estimate)`` (``None`` otherwise). Reports
    written before the bracket existed give the bare estimate.

    Examples:
        >>> from hvp.analysis._report import negative_mass_cells
        >>> negative_mass_cells({"negative_mass": 0.017, "negative_mass_lower": 0.011,
        ...                      "negative_mass_upper": 0.024, "negative_mass_std_error": 0.003})
        ('0.017 (0.011–0.024)', '± 0.003', None)
        >>> wide = negative_mass_cells({"negative_mass": 0.24, "negative_mass_lower": 0.03,
        ...                             "negative_mass_upper": 0.8, "negative_mass_std_error": 0.07,
        ...                             "num_iters": 64})
        >>> wide[0], "raise --iters (now 64)" in wide[2]
        ('0.24 (0.03–0.8)', True)
    """
    get = density.get if isinstance(density, dict) else lambda k: getattr(density, k, None)
    est, lo, hi = get("negative_mass"), get("negative_mass_lower"), get("negative_mass_upper")
    se = get("negative_mass_std_error")
    if est is None or lo is None or hi is None:
        return _fmt(est), "", None
    if not all(math.isfinite(float(x)) for x in (est, lo, hi)):
        return _fmt(est), "", None

    def mass(x) -> str:
        return f"{float(x):.3g}"

    value = f"{mass(est)} ({mass(lo)}–{mass(hi)})"
    err = "" if se is None or not math.isfinite(float(se)) else f"± {mass(se)}"
    hint = None
    if float(hi) - float(lo) > max(0.02, float(est)):
        iters = get("num_iters")
        now = f" (now {iters})" if iters is not None else ""
        hint = (
            f"negative mass: the SLQ quadrature bracket {mass(lo)}–{mass(hi)} is wide (a Ritz "
            f"value standing for many eigenvalues lies near the zero threshold); more Lanczos "
            f"steps narrow it: raise --iters{now}, more probes do not."
        )
    return value, err, hint


def summary_table(report):
    """A ``rich.table.Table`` with every global figure, its error, matvecs and seconds.

    The per-layer figures have their own table
    (:func:`hvp.analysis._layer_report.layer_table`); :func:`print_summary` prints both.

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
        >>> table = hvp.analysis.summary_table(report)
        >>> [c.header for c in table.columns], table.row_count
        (['figure', 'value', '± / residual', 'matvecs', 'seconds'], 7)
    """
    from rich.table import Table

    g = lambda s, k=None: _get(report, s, k)  # noqa: E731
    model = g("model")
    data = g("data")
    title = (
        f"{model['operator'].upper()} of {model['spec']}  ·  {model['num_params']:,} parameters  ·  "
        f"{data['num_examples']:,} examples  ·  {model['dtype']}"
    )
    t = Table(title=title, title_justify="left", show_lines=False)
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("± / residual", justify="right")
    t.add_column("matvecs", justify="right")
    t.add_column("seconds", justify="right")

    for name, label in (("top", "largest"), ("bottom", "smallest")):
        vals, res = _list(g(name, "eigenvalues")), _list(g(name, "residuals"))
        conv = list(g(name, "converged"))
        order = range(len(vals) - 1, -1, -1) if name == "top" else range(len(vals))
        for j, i in enumerate(order):
            flag = "" if bool(conv[i]) else " [red](not converged)"
            t.add_row(
                f"λ {label} #{j + 1}",
                _fmt(vals[i]),
                _fmt(res[i]) + flag,
                str(g(name, "num_matvecs")) if j == 0 else "",
                f"{g(name, 'seconds'):.2f}" if j == 0 else "",
            )
        t.add_section()
    t.add_row(
        f"trace ({g('trace', 'method')})",
        _fmt(g("trace", "estimate")),
        _fmt(g("trace", "std_error")),
        str(g("trace", "num_matvecs")),
        f"{g('trace', 'seconds'):.2f}",
    )
    neg_value, neg_err, neg_hint = negative_mass_cells(g("density"))
    t.add_row(
        "negative mass (SLQ)",
        neg_value,
        neg_err,
        str(g("density", "num_matvecs")),
        f"{g('density', 'seconds'):.2f}",
    )
    t.add_row(
        f"per-layer traces ({len(g('layers', 'layers'))} layers)",
        "table below",
        "",
        str(g("layers", "num_matvecs")),
        f"{g('layers', 'seconds'):.2f}",
    )
    unconv = _unconverged_extremes(g("derived"))
    t.add_row("condition estimate", _fmt(g("derived", "condition_estimate")), unconv, "", "")
    t.add_row("|λ_min| / λ_max", _fmt(g("derived", "negative_ratio")), unconv, "", "")
    t.caption = (
        f"total {g('num_matvecs')} matvecs, {g('timings')['total']:.1f} s; seed "
        f"{g('settings')['seed']}"
    )
    if neg_hint:
        t.caption += "\n" + neg_hint
    return t


def _unconverged_extremes(derived) -> str:
    """A red note naming λ_min / λ_max when the pair behind it did not converge, else ``""``."""
    d = derived if isinstance(derived, dict) else derived.to_dict()
    ends = [e for e in ("min", "max") if d.get(f"lambda_{e}_converged") is False]
    if not ends:
        return ""
    return "[red](from unconverged " + " and ".join(f"λ_{e}" for e in ends) + ")"


def print_summary(
    report, console=None, *, layer_view: str | None = None, top_layers: int | None = None
) -> None:
    """Print :func:`summary_table` and the per-layer table on the terminal (stdout by default).

    ``layer_view`` (``"grouped"``/``"all"``) and ``top_layers`` choose the per-layer rows (see
    :func:`hvp.analysis._layer_report.layer_table`; default: the report's settings).

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
        >>> import io
        >>> from rich.console import Console
        >>> buf = io.StringIO()
        >>> hvp.analysis.print_summary(report, Console(file=buf, width=120))
        >>> "λ largest #1" in buf.getvalue(), "per-layer traces" in buf.getvalue()
        (True, True)
    """
    from rich.console import Console

    from hvp.analysis._layer_report import layer_table

    console = console or Console()
    console.print(summary_table(report))
    console.print(layer_table(report, view=layer_view, top=top_layers))
    _print_critical_and_compression(report, console)
    from hvp.analysis._influence_section import influence_table

    table = influence_table(report)
    if table is not None:
        console.print(table)


def _print_critical_and_compression(report, console) -> None:
    """The critical-point verdict and, when present, the compression table."""
    from hvp.analysis._compression_critical import compression_table, critical_rows

    for figure, value in critical_rows(report):
        console.print(f"{figure}: {value}")
    table = compression_table(report)
    if table is not None:
        console.print(table)
