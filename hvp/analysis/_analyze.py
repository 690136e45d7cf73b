r"""``hvp.analysis.analyze``: the curvature report of a checkpointed Flax model.

Pipeline (the ``hvp analyze`` command and :func:`analyze` run exactly this code):

1. build the model from a spec (:mod:`hvp.analysis._specs`), read the Orbax
   checkpoint read-only and put its arrays in place after a structure check
   (:mod:`hvp.analysis._checkpoint`); NaN/Inf in the restored variables is an
   error;
2. load the data from a spec (:mod:`hvp.analysis._data`);
3. build the curvature operator :math:`A` over the whole data set with
   :func:`hvp.flax.from_nnx` / :func:`hvp.flax.from_linen`: the Hessian
   :math:`H = \nabla^2_\theta L` or the Gauss-Newton matrix
   :math:`G = J^\top H_\ell J` (Schraudolph 2002; Martens 2010) of the mean
   loss :math:`L(\theta) = \frac1N \sum_i \ell_i(\theta)`;
4. compute, each with its own PRNG key, wall time and matvec count:

   * the ``k`` largest and ``k`` smallest eigenvalues with residuals
     :math:`\lVert A v - \lambda v \rVert` (thick-restart Lanczos,
     :func:`hvp.linalg.eigsh`);
   * :math:`\operatorname{tr} A` with a standard error (Hutch++, Meyer et al.
     2021, or Hutchinson 1989; :func:`hvp.linalg.trace`);
   * the spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad
     2017; Ghorbani, Krishnan & Xiao 2019; Yao et al. 2020, PyHessian),
     Gaussian-broadened (Lin, Saad & Yang 2016), and its negative mass
     :math:`\int_{-\infty}^0 \phi(\lambda) d\lambda` (the fraction of
     eigenvalues below zero);
   * per layer (leaves grouped by module path): the trace of the layer's
     diagonal block :math:`\operatorname{tr} A_{ll}` (Hutchinson restricted to
     the block, :func:`hvp.flax.layer_trace`) and the share
     :math:`\lVert v_{1,l} \rVert^2` of the top eigenvector in the layer
     (:func:`hvp.flax.layer_norms`);
   * derived figures: :math:`\lambda_{\max}`, :math:`\lambda_{\min}`, the
     condition estimate :math:`\kappa = \max|\lambda| / \min|\lambda|` over the
     :math:`2k` computed extreme eigenvalues (exactly
     :math:`\lambda_{\max}/\lambda_{\min}` when :math:`A` is positive definite,
     otherwise a lower bound of the condition number, whose smallest
     :math:`|\lambda|` lies inside the spectrum), the negative ratio
     :math:`|\lambda_{\min}| / \lambda_{\max}` (when :math:`\lambda_{\min} < 0`)
     and the negative mass (the fraction of eigenvalues below
     :math:`-\mathrm{tol}\cdot\max|\lambda|`, so that round-off around a null
     space does not count as negative curvature);
5. optionally write ``report.json``, ``density.png`` and ``layers.png``.

Seeds: ``key = jax.random.PRNGKey(seed)`` is split with
``jax.random.split(key, 5)`` into the keys of the top eigenpairs, the bottom
eigenpairs, the trace, the density and the per-layer trace (in that order),
so the same checkpoint, data, settings and seed give the same figures.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.util
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp._version import __version__
from hvp.analysis import _interrupt
from hvp.analysis._checkpoint import read_checkpoint, resolve_checkpoint, restore_into
from hvp.analysis._data import load_data
from hvp.analysis._errors import AnalysisError
from hvp.analysis._layer_report import block_groups
from hvp.analysis._progress import Stages, stage_products
from hvp.analysis._specs import load_model

__all__ = [
    "analyze",
    "AnalysisReport",
    "EigenSection",
    "TraceSection",
    "DensitySection",
    "LayerSection",
    "DerivedSection",
    "SCHEMA_VERSION",
    "OPERATORS",
    "TRACE_METHODS",
    "DEFAULTS",
    "check_dependencies",
]

#: Version of the ``report.json`` schema (see ``docs/analyze.md``).
SCHEMA_VERSION = 1
OPERATORS = ("hessian", "ggn")
TRACE_METHODS = ("hutch++", "hutchinson", "xtrace")
#: Default settings, shared by :func:`analyze`, ``hvp analyze`` and ``hvp demo``.
DEFAULTS = dict(
    data="digits",
    operator="hessian",
    k=5,
    num_probes=16,
    num_iters=64,
    eig_iters=None,
    tol=None,
    trace_method="hutch++",
    trace_matvecs=99,
    layer_matvecs=64,
    batch_size=2048,
    num_batches=None,
    seed=0,
    x64=False,
    chunk_size=None,
    grid_size=1000,
    layer_view="grouped",
    top_layers=10,
)
_SEED_ORDER = ("top", "bottom", "trace", "density", "layers")


@tu.result(static=("which",))
class EigenSection:
    """Extreme eigenvalues of the operator.

    Attributes:
      eigenvalues: ascending, shape ``(k,)``.
      residuals: ``||A v - lambda v||`` per pair (from true products).
      converged: per pair, residual within ``tol * |lambda_i|`` (floored at round-off, see
        :func:`hvp.linalg.eigsh`).
      num_matvecs, num_restarts, seconds: cost of this figure.
      which: ``"largest"`` or ``"smallest"``.

    Examples:
        >>> import numpy as np
        >>> from hvp.analysis import EigenSection
        >>> top = EigenSection(eigenvalues=np.array([4.0]), residuals=np.array([1e-9]),
        ...                    converged=np.array([True]), num_matvecs=12, num_restarts=0,
        ...                    seconds=0.1, which="largest")
        >>> top.to_dict()["eigenvalues"]
        [4.0]
    """

    eigenvalues: Any
    residuals: Any
    converged: Any
    num_matvecs: int
    num_restarts: int
    seconds: float
    which: str = "largest"


@tu.result(static=("method",))
class TraceSection:
    """``tr A`` with its standard error.

    Examples:
        >>> from hvp.analysis import TraceSection
        >>> section = TraceSection(estimate=5.0, std_error=0.1, num_matvecs=99, seconds=0.2, method="hutch++")
        >>> section.to_dict()["method"]
        'hutch++'
    """

    estimate: float
    std_error: float
    num_matvecs: int
    seconds: float
    method: str = "hutch++"


@tu.result()
class DensitySection:
    """Spectral density by stochastic Lanczos quadrature.

    Attributes:
      grid, density: the Gaussian-broadened density on a grid (integrates to 1).
      sigma: the Gaussian width.
      nodes, weights: the quadrature nodes (Ritz values) and weights, ``(num_probes, num_iters)``.
      negative_mass: estimated fraction of the eigenvalues below ``-zero_threshold``.
      zero_threshold: ``max(tol, hvp.linalg.zero_floor(dtype, tol)) * max|lambda|``; Ritz values closer to 0 count as zero (round-off, null space).
      num_probes, num_iters, num_matvecs, seconds: settings and cost.

    Examples:
        >>> import numpy as np
        >>> from hvp.analysis import DensitySection
        >>> grid = np.linspace(0.0, 1.0, 5)
        >>> section = DensitySection(grid=grid, density=np.ones(5), sigma=0.01, nodes=np.array([[0.5]]),
        ...                          weights=np.array([[1.0]]), negative_mass=0.0, zero_threshold=1e-6,
        ...                          num_probes=1, num_iters=1, num_matvecs=1, seconds=0.0)
        >>> section.to_dict()["grid"]
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """

    grid: Any
    density: Any
    sigma: float
    nodes: Any
    weights: Any
    negative_mass: float
    zero_threshold: float
    num_probes: int
    num_iters: int
    num_matvecs: int
    seconds: float


@tu.result(static=("layers", "labels", "block", "kind"))
class LayerSection:
    """Per-layer breakdown (layers in parameter order).

    Attributes:
      layers: layer names (module paths).
      labels, block, kind: each layer's short unique label, its block and its kind within the
        block (:func:`hvp.flax.layer_labels`: ``block_7/attn/query``, ``block_7``, ``attn/query``).
      groups: per block (``names``, ``num_layers``, ``trace``, ``trace_std_error``; standard
        errors from the per-probe block sums), for the grouped table and plot.
      num_params: parameters per layer.
      trace, trace_std_error: ``tr A_ll`` (Hutchinson on the diagonal block) and its standard error.
      top_eigenvector_mass: share of the top eigenvector's squared norm in each layer (sums to 1).
      eigenvector_mass: the same for each of the ``k`` top eigenvectors, ``(num_layers, k)``
        (columns in ascending eigenvalue order, the last one is the top eigenvector).
      num_matvecs, seconds: cost of the per-layer traces (the mass reuses the top eigenvectors).

    Examples:
        >>> import numpy as np
        >>> from hvp.analysis import LayerSection
        >>> section = LayerSection(layers=("dense", "out"), num_params=(6, 3), trace=np.array([2.0, 1.0]),
        ...                        trace_std_error=np.array([0.1, 0.1]), top_eigenvector_mass=np.array([0.9, 0.1]),
        ...                        eigenvector_mass=np.array([[0.9, 0.1]]), num_matvecs=64, seconds=0.1)
        >>> section.to_dict()["layers"]
        ['dense', 'out']
    """

    layers: tuple
    num_params: Any
    trace: Any
    trace_std_error: Any
    top_eigenvector_mass: Any
    eigenvector_mass: Any
    num_matvecs: int
    seconds: float
    labels: tuple = ()
    block: tuple = ()
    kind: tuple = ()
    groups: Any = None


@tu.result()
class DerivedSection:
    """Figures derived from the others (see the module docstring for definitions).

    ``num_matvecs`` / ``seconds`` are those of the figures they come from.

    Examples:
        >>> from hvp.analysis import DerivedSection
        >>> section = DerivedSection(lambda_max=4.0, lambda_min=-0.5, condition_estimate=None,
        ...                          positive_definite=False, negative_ratio=0.125, negative_mass=0.1,
        ...                          num_matvecs=0, seconds=0.0)
        >>> section.positive_definite, section.to_dict()["negative_ratio"]
        (False, 0.125)
    """

    lambda_max: float
    lambda_min: float
    condition_estimate: float
    positive_definite: bool
    negative_ratio: float
    negative_mass: float
    num_matvecs: int
    seconds: float


@tu.result()
class AnalysisReport:
    """The result of :func:`analyze`; ``report.to_dict()`` is the content of ``report.json``.

    Attributes:
      schema_version: :data:`SCHEMA_VERSION`.
      created: UTC time stamp (ISO 8601).
      settings: every setting of the analysis (with the defaults filled in).
      seeds: the seed and how each algorithm's key derives from it.
      versions: hvp, jax, jaxlib, flax, orbax-checkpoint, numpy, python.
      device: platform, device kind and count of the JAX backend used.
      checkpoint: the directory read, its step/item, restored and ignored paths.
      model: spec, framework, number of parameters, dtype.
      data: spec, number of examples and batches.
      top, bottom: :class:`EigenSection` for the ``k`` largest / smallest eigenvalues.
      trace: :class:`TraceSection`.
      density: :class:`DensitySection`.
      layers: :class:`LayerSection`.
      derived: :class:`DerivedSection`.
      timings: seconds per stage (``load_model``, ``load_checkpoint``, ``load_data``, ``operator``,
        ``top``, ``bottom``, ``trace``, ``density``, ``layers``, ``total``).
      num_matvecs: total operator products over all figures.
      command: an ``hvp analyze`` command line that reproduces the figures.
      extra: free-form provenance (the demo records its training run here).

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
        >>> report.to_dict()["schema_version"] == hvp.analysis.SCHEMA_VERSION
        True
        >>> files = report.write(tempfile.mkdtemp(), plots=False)
        >>> sorted(files), os.path.basename(files["report"])
        (['report'], 'report.json')
    """

    schema_version: int
    created: str
    settings: dict
    seeds: dict
    versions: dict
    device: dict
    checkpoint: dict
    model: dict
    data: dict
    top: EigenSection
    bottom: EigenSection
    trace: TraceSection
    density: DensitySection
    layers: LayerSection
    derived: DerivedSection
    timings: dict
    num_matvecs: int
    command: str
    extra: dict

    def write(self, out_dir, *, plots: bool = True) -> dict[str, str]:
        """Write ``report.json`` (and ``density.png``, ``layers.png``) into ``out_dir``; return the paths."""
        from hvp.analysis._report import write_outputs

        return write_outputs(self, out_dir, plots=plots)


def versions() -> dict:
    """Versions of the software that produced a report."""
    out = {
        "hvp": __version__,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for name, mod in (
        ("jaxlib", "jaxlib"),
        ("flax", "flax"),
        ("orbax-checkpoint", "orbax.checkpoint"),
        ("optax", "optax"),
    ):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[name] = getattr(m, "__version__", None) or _dist_version(name)
        except Exception:  # pragma: no cover - optional packages
            out[name] = None
    return out


def _dist_version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover
        return None


def device_info() -> dict:
    devs = jax.devices()
    return {
        "platform": devs[0].platform,
        "device_kind": devs[0].device_kind,
        "count": len(devs),
        "backend": jax.default_backend(),
    }


def _f(x) -> float:
    return float(np.asarray(x))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    return out, time.perf_counter() - t0


def _check_positive(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise AnalysisError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _command_line(checkpoint, model, data, settings: dict) -> str:
    parts = ["hvp", "analyze", str(checkpoint), "--model", str(model), "--data", str(data)]
    flags = [
        ("operator", "--operator"),
        ("k", "-k"),
        ("num_probes", "--probes"),
        ("num_iters", "--iters"),
        ("eig_iters", "--eig-iters"),
        ("tol", "--tol"),
        ("trace_method", "--trace-method"),
        ("trace_matvecs", "--trace-matvecs"),
        ("layer_matvecs", "--layer-matvecs"),
        ("batch_size", "--batch-size"),
        ("num_batches", "--num-batches"),
        ("seed", "--seed"),
        ("layer_view", "--layers"),
        ("top_layers", "--top-layers"),
        ("chunk_size", "--chunk-size"),
    ]
    for key, flag in flags:
        v = settings.get(key)
        if v is not None and v != DEFAULTS.get(key, object()):
            parts += [flag, str(v)]
        elif key == "seed":
            parts += [flag, str(v)]
    if settings.get("x64"):
        parts.append("--x64")
    return " ".join(parts)


def _density_grid(lo: float, hi: float, num: int):
    width = hi - lo
    if not np.isfinite(width) or width <= 0:
        width = max(abs(hi), abs(lo), 1.0)
    pad = 0.05 * width
    return np.linspace(lo - pad, hi + pad, num), width


#: Optional packages: (import name, what needs it, the pip extra that installs it).
_OPTIONAL = {
    # orbax-checkpoint is a dependency of hvp-jax (and of flax); checked for broken installs.
    "orbax": ("orbax.checkpoint", "reading the checkpoint", "orbax-checkpoint"),
    "matplotlib": ("matplotlib", "the PNG figures", "hvp-jax[plots]"),
}


def check_dependencies(*, plots: bool) -> None:
    """Check that the optional packages an analysis needs are installed, before any work.

    Orbax reads the checkpoint; matplotlib draws the figures (only with ``plots``).

    Raises:
      AnalysisError: naming the missing package, the extra that installs it and,
        for matplotlib, ``--no-plots``.

    Examples:
      >>> from hvp.analysis import check_dependencies
      >>> check_dependencies(plots=False)  # orbax-checkpoint is installed with flax
    """
    needed = ["orbax"] + (["matplotlib"] if plots else [])
    for name in needed:
        module, what, extra = _OPTIONAL[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            hint = (
                " or pass --no-plots (plots=False) to skip the figures"
                if name == "matplotlib"
                else ""
            )
            raise AnalysisError(
                f"{what.capitalize()} needs the package '{module.split('.')[0]}', which is not "
                f'installed: pip install "{extra}"{hint}.'
            )


def _restoring_x64(fn):
    """Run ``fn`` and then restore ``jax_enable_x64`` to its value before the call."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = bool(jax.config.jax_enable_x64)
        try:
            return fn(*args, **kwargs)
        finally:
            if bool(jax.config.jax_enable_x64) != before:
                jax.config.update("jax_enable_x64", before)

    return wrapper


@_restoring_x64
def analyze(
    checkpoint,
    *,
    model,
    data: Any = DEFAULTS["data"],
    operator: str = DEFAULTS["operator"],
    k: int = DEFAULTS["k"],
    num_probes: int = DEFAULTS["num_probes"],
    num_iters: int = DEFAULTS["num_iters"],
    eig_iters: int | None = DEFAULTS["eig_iters"],
    tol: float | None = DEFAULTS["tol"],
    trace_method: str = DEFAULTS["trace_method"],
    trace_matvecs: int = DEFAULTS["trace_matvecs"],
    layer_matvecs: int = DEFAULTS["layer_matvecs"],
    batch_size: int | None = DEFAULTS["batch_size"],
    num_batches: int | None = DEFAULTS["num_batches"],
    seed: int = DEFAULTS["seed"],
    x64: bool = DEFAULTS["x64"],
    chunk_size: int | None = DEFAULTS["chunk_size"],
    step: int | None = None,
    item: str | None = None,
    out_dir=None,
    plots: bool = True,
    layer_view: str = DEFAULTS["layer_view"],
    top_layers: int = DEFAULTS["top_layers"],
    overwrite: bool = False,
    progress: bool = False,
    console=None,
    extra: dict | None = None,
) -> AnalysisReport:
    r"""Curvature report of a model stored in an Orbax checkpoint (see the module docstring).

    Args:
      checkpoint: directory written by ``ocp.StandardCheckpointer`` or a
        ``CheckpointManager`` (root or step); opened read-only.
      model: model spec ``"module.path:factory"`` / ``"path/file.py:factory"``
        (the factory returns ``(model, loss)``; see :mod:`hvp.analysis._specs`),
        or from Python the factory itself.
      data: data spec (``"digits"``, ``"digits:images"``, a ``.npz`` path,
        ``"module:function"``; see :mod:`hvp.analysis._data`), or batches.
      operator: ``"hessian"`` or ``"ggn"``.
      k: number of largest and of smallest eigenvalues.
      num_probes: SLQ probes of the density.
      num_iters: Lanczos steps per SLQ probe.
      eig_iters: Lanczos basis size for the eigenvalues (default: eigsh's).
      tol: eigenpair residual tolerance relative to each eigenvalue,
        ``||r_i|| <= tol * |lambda_i|`` floored at round-off (as :func:`hvp.linalg.eigsh`;
        default ``1e-6`` in float64, ``1e-4`` in float32).
      trace_method: trace estimator (``"hutch++"``, ``"hutchinson"``, ``"xtrace"``).
      trace_matvecs: products of the trace estimate.
      layer_matvecs: Hutchinson probes for the per-layer traces.
      batch_size: examples per batch when cutting arrays (see :func:`hvp.analysis.load_data`).
      num_batches: use only the first ``num_batches`` batches (``None``: all).
      seed: the seed of every random choice (see "Seeds" above).
      x64: compute in float64 (turns on ``jax_enable_x64`` for the call and
        restores the previous setting when it returns); float32 otherwise.
      chunk_size: probes run at once by the trace, the density and the per-layer
        traces (``None``: the library's default); bounds their memory to about
        ``chunk_size`` parameter copies per product (times ``num_iters`` for the
        density's Lanczos bases).
      step: the step of a ``CheckpointManager`` root or Flax workdir (``None``: the latest).
      item: the item of a step directory, or the top-level key of the saved tree
        that holds the model state (``None``: found automatically).
      out_dir: if given, write ``report.json``, ``density.png``, ``layers.png`` there
        (each atomically). The directory is checked writable before any work.
      plots: write the PNGs (with ``out_dir``).
      layer_view: ``"grouped"`` (one row per block of layers, e.g. a transformer block) or
        ``"all"`` (one per layer) in the terminal table and ``layers.png``; ``report.json`` has
        both.
      top_layers: rows of the terminal's per-layer table (the largest by ``|trace|``).
      overwrite: replace the outputs of an earlier run in ``out_dir`` (the whole
        set: PNGs not written again are removed). Without it an ``out_dir``
        that already holds outputs is refused before any work.
      progress: show rich progress bars (stderr).
      console: a ``rich.console.Console`` for the progress bars.
      extra: free-form dict stored in the report's ``extra`` field.

    Returns:
      An :class:`AnalysisReport`.

    Raises:
      AnalysisError: any problem with the inputs (missing or unreadable
        checkpoint, structure mismatch, NaN parameters, bad spec, empty data,
        invalid setting, unwritable or already used ``out_dir``, a missing
        optional package), with a message that names the fix.
      KeyboardInterrupt: (:class:`hvp.analysis._interrupt.Interrupted` under
        the ``hvp`` command) on SIGINT/SIGTERM; no output file is left
        half-written.

    Examples:
      >>> from hvp.analysis import analyze
      >>> analyze("no/such/dir", model="hvp.analysis._demo:digits_mlp")
      Traceback (most recent call last):
      ...
      hvp.analysis._errors.AnalysisError: The checkpoint directory 'no/such/dir' does not exist.
    """
    t_start = time.perf_counter()
    if operator not in OPERATORS:
        raise AnalysisError(f"--operator must be one of {', '.join(OPERATORS)}, got {operator!r}.")
    if trace_method not in TRACE_METHODS:
        raise AnalysisError(
            f"--trace-method must be one of {', '.join(TRACE_METHODS)}, got {trace_method!r}."
        )
    _check_positive("-k", k)
    _check_positive("--probes", num_probes, 2)
    _check_positive("--iters", num_iters, 2)
    _check_positive("--trace-matvecs", trace_matvecs, 3)
    _check_positive("--layer-matvecs", layer_matvecs, 2)
    if eig_iters is not None:
        _check_positive("--eig-iters", eig_iters, 2)
    if layer_view not in ("grouped", "all"):
        raise AnalysisError(f"--layers must be 'grouped' or 'all', got {layer_view!r}.")
    _check_positive("--top-layers", top_layers)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise AnalysisError(f"--seed must be a non-negative integer, got {seed!r}.")
    if chunk_size is not None:
        _check_positive("--chunk-size", chunk_size)
    # Cheap checks before any heavy work: packages, the checkpoint path, the output directory.
    check_dependencies(plots=plots and out_dir is not None)
    resolve_checkpoint(checkpoint, step=step, item=item)
    if out_dir is not None:
        from hvp.analysis._report import prepare_output_dir

        prepare_output_dir(out_dir, overwrite=overwrite)
    if x64 and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)  # restored by @_restoring_x64
    dtype = jnp.float64 if x64 else jnp.float32
    tol_given = tol
    if tol is None:
        tol = 1e-6 if x64 else 1e-4
    timings: dict[str, float] = {}

    from hvp import flax as hflax
    from hvp import linalg

    stages = Stages(enabled=progress, console=console)
    with stages:
        # 1. model + checkpoint ------------------------------------------------------------
        with stages.stage("Building the model") as st:
            t0 = time.perf_counter()
            spec = load_model(model)
            timings["load_model"] = time.perf_counter() - t0
            st.done(spec.kind)
        with stages.stage("Reading the checkpoint") as st:
            t0 = time.perf_counter()
            ckpt = read_checkpoint(checkpoint, step=step, item=item)
            restored = restore_into(spec, ckpt, dtype=dtype)
            timings["load_checkpoint"] = time.perf_counter() - t0
            where = f" under key '{restored.key}'" if restored.key is not None else ""
            st.done(f"{len(restored.restored)} arrays{where}")
        if restored.kind == "nnx":
            problem = hflax.from_nnx(restored.model, spec.loss)
        else:
            problem = hflax.from_linen(
                restored.model, restored.variables, spec.loss, apply_kwargs=spec.apply_kwargs
            )
        params = problem.params
        bad = tu.nonfinite_leaves(params)
        if bad:
            raise AnalysisError(
                f"The checkpoint's parameters contain NaN or Inf in {', '.join(bad)}; curvature at such a "
                "point is meaningless. Analyse an earlier checkpoint of the run."
            )
        n = tu.size(params)

        _interrupt.check()
        # 2. data ----------------------------------------------------------------------------
        with stages.stage("Reading the data", total=num_batches) as st:
            t0 = time.perf_counter()
            ds = load_data(
                data,
                batch_size=batch_size,
                num_batches=num_batches,
                dtype=dtype,
                progress=st.advance_to,
            )
            timings["load_data"] = time.perf_counter() - t0
            st.done(
                f"{ds.num_examples} examples in {ds.num_batches} batch{'es' if ds.num_batches > 1 else ''}"
            )

        _interrupt.check()
        # 3. operator ------------------------------------------------------------------------
        t0 = time.perf_counter()
        try:
            op = problem.hessian(ds.batches) if operator == "hessian" else problem.ggn(ds.batches)
            jax.eval_shape(op._apply, params)
        except AnalysisError:
            raise
        except Exception as e:
            raise AnalysisError(
                f"The model and loss cannot be evaluated on the data '{ds.spec}': {_one_line(e)}"
            ) from e
        timings["operator"] = time.perf_counter() - t0
        if 2 * k > n:
            raise AnalysisError(
                f"-k {k} asks for {2 * k} eigenvalues but the model has only {n} parameters."
            )

        keys = dict(zip(_SEED_ORDER, jax.random.split(jax.random.PRNGKey(seed), len(_SEED_ORDER))))
        stages.estimate(  # expected products and seconds per stage (only with the display on)
            op,
            stage_products(
                n=n,
                k=k,
                eig_iters=eig_iters,
                trace_matvecs=trace_matvecs,
                num_probes=num_probes,
                num_iters=num_iters,
                layer_matvecs=layer_matvecs,
            ),
            block_size=num_probes,
        )

        # 4. figures -------------------------------------------------------------------------
        eig_kw = dict(tol=tol) if eig_iters is None else dict(tol=tol, num_iters=eig_iters)
        sections = {}
        for which, name in (("largest", "top"), ("smallest", "bottom")):
            _interrupt.check()
            with stages.stage(
                f"{'Top' if name == 'top' else 'Bottom'}-{k} eigenvalues (Lanczos)", expect=name
            ) as st:
                res, secs = _timed(
                    lambda w=which, nm=name: _quiet_eigsh(
                        linalg.eigsh, op, k, which=w, key=keys[nm], **eig_kw
                    )
                )
                sections[name] = res
                timings[name] = secs
                st.done(f"{int(res.num_matvecs)} matvecs")
        top, bottom = sections["top"], sections["bottom"]

        _interrupt.check()
        with stages.stage(f"Trace ({trace_method})", expect="trace") as st:
            tr, timings["trace"] = _timed(
                lambda: linalg.trace(
                    op,
                    key=keys["trace"],
                    num_matvecs=trace_matvecs,
                    method=trace_method,
                    chunk_size=chunk_size,
                )
            )
            st.done(f"{int(tr.num_matvecs)} matvecs")

        _interrupt.check()
        with stages.stage(
            f"Spectral density (SLQ, {num_probes} x {num_iters})", expect="density"
        ) as st:
            sd, timings["density"] = _timed(
                lambda: linalg.spectral_density(
                    op,
                    key=keys["density"],
                    num_probes=num_probes,
                    num_iters=num_iters,
                    chunk_size=chunk_size,
                )
            )
            st.done(f"{int(sd.num_matvecs)} matvecs")

        _interrupt.check()
        with stages.stage("Per-layer trace and eigenvector mass", expect="layers") as st:
            lt, timings["layers"] = _timed(
                lambda: hflax.layer_trace(
                    op, key=keys["layers"], num_matvecs=layer_matvecs, chunk_size=chunk_size
                )
            )
            st.done(f"{int(lt.num_matvecs)} matvecs")

    # 5. assemble ------------------------------------------------------------------------------
    top_sec = _eigen_section(top, "largest", timings["top"])
    bot_sec = _eigen_section(bottom, "smallest", timings["bottom"])

    lam_lo = min(float(np.min(np.asarray(sd.nodes))), bot_sec.eigenvalues[0])
    lam_hi = max(float(np.max(np.asarray(sd.nodes))), top_sec.eigenvalues[-1])
    grid, width = _density_grid(lam_lo, lam_hi, DEFAULTS["grid_size"])
    sigma = float(sd.default_sigma()) if hasattr(sd, "default_sigma") else _sigma(width)
    dens = np.asarray(sd.density(jnp.asarray(grid, dtype=dtype), sigma), dtype=np.float64)
    scale = float(max(np.abs(top_sec.eigenvalues).max(), np.abs(bot_sec.eigenvalues).max()))
    # |lambda| <= max(tol, eigsh's round-off floor) * max|lambda| counts as zero (round-off,
    # null space): the threshold of hvp.linalg.spectrum_summary.
    zero = max(float(tol), linalg.zero_floor(dtype, tol)) * scale
    neg_mass = _f(sd.negative_mass(zero))
    dens_sec = DensitySection(
        grid=grid,
        density=dens,
        sigma=float(sigma),
        nodes=np.asarray(sd.nodes, np.float64),
        weights=np.asarray(sd.weights, np.float64),
        negative_mass=neg_mass,
        zero_threshold=zero,
        num_probes=int(num_probes),
        num_iters=int(num_iters),
        num_matvecs=int(sd.num_matvecs),
        seconds=float(timings["density"]),
    )
    tr_sec = TraceSection(
        estimate=_f(tr.estimate),
        std_error=_f(tr.std_error),
        num_matvecs=int(tr.num_matvecs),
        seconds=float(timings["trace"]),
        method=trace_method,
    )

    groups = hflax.group_by_layer(params)
    sizes = dict(
        zip(tu.leaf_paths(params), (int(np.size(x)) for x in jax.tree_util.tree_leaves(params)))
    )
    mass = hflax.layer_norms(top.eigenvectors)
    layers = tuple(lt.layers)
    labels = hflax.layer_labels(layers)
    mass_mat = np.stack([np.asarray(mass[name], np.float64) for name in layers])
    layer_sec = LayerSection(
        layers=layers,
        num_params=[sum(sizes[p] for p in groups[name]) for name in layers],
        trace=np.asarray(lt.estimate, np.float64),
        trace_std_error=np.asarray(lt.std_error, np.float64),
        top_eigenvector_mass=mass_mat[:, -1],
        eigenvector_mass=mass_mat,
        num_matvecs=int(lt.num_matvecs),
        seconds=float(timings["layers"]),
        labels=labels.short,
        block=labels.block,
        kind=labels.kind,
        groups=block_groups(lt, labels),
    )
    derived = _derived(top_sec, bot_sec, dens_sec)

    settings = dict(
        operator=operator,
        k=int(k),
        num_probes=int(num_probes),
        num_iters=int(num_iters),
        eig_iters=eig_iters,
        tol=float(tol),
        trace_method=trace_method,
        trace_matvecs=int(trace_matvecs),
        layer_matvecs=int(layer_matvecs),
        batch_size=batch_size,
        num_batches=num_batches,
        seed=int(seed),
        x64=bool(x64),
        chunk_size=chunk_size,
        dtype=str(np.dtype(dtype)),
        density_grid_size=DEFAULTS["grid_size"],
        step=step,
        item=item,
        layer_view=layer_view,
        top_layers=int(top_layers),
    )
    model_name = spec.spec
    data_name = ds.spec
    total_mv = (
        top_sec.num_matvecs
        + bot_sec.num_matvecs
        + tr_sec.num_matvecs
        + dens_sec.num_matvecs
        + layer_sec.num_matvecs
    )
    timings["total"] = time.perf_counter() - t_start
    report = AnalysisReport(
        schema_version=SCHEMA_VERSION,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        settings=settings,
        seeds={
            "seed": int(seed),
            "derivation": f"jax.random.split(jax.random.PRNGKey(seed), {len(_SEED_ORDER)})",
            "order": list(_SEED_ORDER),
        },
        versions=versions(),
        device=device_info(),
        checkpoint={
            "path": str(Path(ckpt.requested)),
            "item_dir": ckpt.path,
            "step": ckpt.step,
            "item": ckpt.item,
            "key": restored.key,
            "restored": list(restored.restored),
            "ignored": list(restored.ignored),
        },
        model={
            "spec": model_name,
            "framework": restored.kind,
            "num_params": int(n),
            "num_layers": len(layers),
            "operator": operator,
            "dtype": str(np.dtype(dtype)),
        },
        data={
            "spec": data_name,
            "num_examples": int(ds.num_examples),
            "num_batches": int(ds.num_batches),
            "batch_size": batch_size,
        },
        top=top_sec,
        bottom=bot_sec,
        trace=tr_sec,
        density=dens_sec,
        layers=layer_sec,
        derived=derived,
        timings={k_: float(v) for k_, v in timings.items()},
        num_matvecs=int(total_mv),
        command=(
            _command_line(checkpoint, model_name, data_name, {**settings, "tol": tol_given})
            if isinstance(data, str) and isinstance(model, str)
            else ""
        ),
        extra=dict(extra or {}),
    )
    _interrupt.check()
    if out_dir is not None:
        with _interrupt.deferred():  # a signal here is raised once every file is complete
            report.write(out_dir, plots=plots)
    return report


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _quiet_eigsh(eigsh, op, k, **kw):
    """eigsh, with its non-convergence warning kept (the report's ``converged`` flags carry it)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = eigsh(op, k, **kw)
    for w in caught:
        if not issubclass(w.category, RuntimeWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return res


def _sigma(width: float) -> float:
    """Fallback Gaussian width of the broadened density: 1% of the spectral width."""
    return 0.01 * float(width)


def _eigen_section(res, which: str, seconds: float) -> EigenSection:
    return EigenSection(
        eigenvalues=np.asarray(res.eigenvalues, np.float64),
        residuals=np.asarray(res.residuals, np.float64),
        converged=np.asarray(res.converged, bool),
        num_matvecs=int(res.num_matvecs),
        num_restarts=int(getattr(res, "num_restarts", 0)),
        seconds=float(seconds),
        which=which,
    )


def _derived(top: EigenSection, bottom: EigenSection, dens: DensitySection) -> DerivedSection:
    lam = np.concatenate([top.eigenvalues, bottom.eigenvalues])
    lam_max, lam_min = float(lam.max()), float(lam.min())
    mags = np.abs(lam)
    from hvp import linalg

    # one zero threshold for the labels, the condition estimate and the negative mass
    zero = float(dens.zero_threshold)
    label, singular, _ = linalg.definiteness(lam_min, lam_max, zero)
    nonzero = mags[mags > zero]
    cond = float("inf") if singular or not nonzero.size else float(nonzero.max() / nonzero.min())
    neg_ratio = float(-lam_min / lam_max) if (lam_min < -zero and lam_max > zero) else 0.0
    return DerivedSection(
        lambda_max=lam_max,
        lambda_min=lam_min,
        condition_estimate=cond,
        positive_definite=label == "positive definite",
        negative_ratio=neg_ratio,
        negative_mass=dens.negative_mass,
        num_matvecs=int(top.num_matvecs + bottom.num_matvecs + dens.num_matvecs),
        seconds=float(top.seconds + bottom.seconds + dens.seconds),
    )
