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
   * per layer (leaves grouped by module path, :func:`hvp.tree.group_by_layer`): the trace
     of the layer's diagonal block :math:`\operatorname{tr} A_{ll}` (Hutchinson restricted to
     the block, :func:`hvp.linalg.layer_trace`) and the share
     :math:`\lVert v_{1,l} \rVert^2` of the top eigenvector in the layer
     (:func:`hvp.tree.layer_norms`);
   * derived figures (:func:`derived_figures`, one zero threshold
     :math:`\epsilon = \max(\mathrm{tol}, f)\cdot\max|\lambda|` for all, :math:`f` the
     accuracy of :func:`hvp.linalg.eigsh` near zero): :math:`\lambda_{\max}`,
     :math:`\lambda_{\min}`, the condition estimate of :func:`hvp.linalg.condition_estimate`,
     the definition that :func:`hvp.linalg.spectrum_summary` uses too
     (:math:`\lambda_{\max}/\lambda_{\min}` when :math:`A` is positive definite, ``inf``
     when an extreme eigenvalue is within :math:`\epsilon` of 0, and for an indefinite
     :math:`A` :math:`\max|\lambda|` over the smallest SLQ Ritz value magnitude above
     :math:`\epsilon`, a rough figure), the negative ratio
     :math:`|\lambda_{\min}| / \lambda_{\max}` (when :math:`\lambda_{\min} < -\epsilon`)
     and the negative mass (the fraction of eigenvalues below :math:`-\epsilon`, so that
     round-off around a null space does not count as negative curvature);
5. optionally write ``report.json``, ``density.png`` and ``layers.png``.

Seeds: ``key = jax.random.PRNGKey(seed)`` is split with
``jax.random.split(key, 5)`` into the keys of the top eigenpairs, the bottom
eigenpairs, the trace, the density and the per-layer trace (in that order),
so the same checkpoint, data, settings and seed give the same figures.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import importlib.util
import json
import pickle
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp._io import atomic_open, atomic_write_text, check_writable_dir
from hvp._version import __version__
from hvp.analysis import _interrupt
from hvp.analysis._checkpoint import read_checkpoint, resolve_checkpoint, restore_into
from hvp.analysis._data import check_model_on_data, load_data
from hvp.analysis._distributed import (
    agreed,
    data_mesh,
    is_multiprocess,
    is_writer,
    replicate_restored,
    shard_batches,
)
from hvp.analysis._errors import FLAGS, AnalysisError, AnalysisTypeError, setting_int
from hvp.analysis._layer_report import block_groups
from hvp.analysis._progress import Stages, stage_products
from hvp.analysis._specs import load_model
from hvp.linalg._checks import check_finite_float
from hvp.operators import NonFiniteError

__all__ = [
    "analyze",
    "AnalysisSettings",
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
    "FLAGS",
    "check_dependencies",
    "derived_figures",
    "zero_threshold",
]

#: Version of the ``report.json`` schema (see ``docs/analyze.md``).
SCHEMA_VERSION = 1
OPERATORS = ("hessian", "ggn")
TRACE_METHODS = ("hutch++", "hutchinson", "xtrace")
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
      negative_mass: estimated fraction of the eigenvalues below ``-zero_threshold``: the SLQ
        Gauss estimate, raised to ``negative_count_eigsh / n`` when that is larger.
      zero_threshold: ``max(tol, hvp.linalg.zero_floor(dtype, tol)) * max|lambda|``; Ritz values closer to 0 count as zero (round-off, null space).
      num_probes, num_iters, num_matvecs, seconds: settings and cost.
      negative_mass_std_error: the probe standard error of the SLQ estimate.
      negative_mass_lower, negative_mass_upper: the quadrature bracket
        (:class:`hvp.linalg.SpectralMassEstimate`: every probe's exact mass lies in its own
        bracket; these are the probe means), the lower end raised to
        ``negative_count_eigsh / n``. The fraction lies in ``[lower - 2 b, upper + 2 b]``
        with about 95% confidence, ``b`` = ``negative_mass_bracket_std_error``; a wide
        bracket narrows with more Lanczos steps (``num_iters``), not more probes.
      negative_count_eigsh: how many eigenvalues are certainly below ``-zero_threshold``
        by the converged bottom eigenpairs (Ritz value plus the residual norm of the
        converged set, Kahan's theorem): a hard lower bound of the count.

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
    negative_mass_std_error: float = float("nan")
    negative_mass_lower: float = float("nan")
    negative_mass_upper: float = float("nan")
    negative_mass_bracket_std_error: float = float("nan")
    negative_count_eigsh: int = 0


@tu.result(static=("layers", "labels", "block", "kind"))
class LayerSection:
    """Per-layer breakdown (layers in parameter order).

    Attributes:
      layers: layer names (module paths).
      labels, block, kind: each layer's short unique label, its block and its kind within the
        block (:func:`hvp.tree.layer_labels`: ``block_7/attn/query``, ``block_7``, ``attn/query``).
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
    ``lambda_max_converged`` / ``lambda_min_converged``: whether the eigenpair that gives
    ``lambda_max`` / ``lambda_min`` met eigsh's tolerance (``None`` in reports written before
    they were recorded); an unconverged value is a Ritz value within its residual of *an*
    eigenvalue, not necessarily the extreme one.

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
    lambda_max_converged: bool | None = None
    lambda_min_converged: bool | None = None


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
      critical: :class:`~hvp.analysis.CriticalSection`: what kind of point the parameters are
        at (gradient norm and the extreme eigenvalues above; always computed).
      compression: :class:`~hvp.analysis.CompressionSection` with ``compression=True``
        (``--compression``), else ``None``.
      landscape: ``{"eigen": ..., "random": ...}`` loss landscapes with ``landscape=True``
        (``--landscape``), else ``None``.
      influence: :class:`~hvp.analysis.InfluenceSection` with ``influence=True``
        (``--influence``), else ``None``.

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
    critical: Any = None
    compression: Any = None
    landscape: dict | None = None
    influence: Any = None

    def write(self, out_dir, *, plots: bool = True) -> dict[str, str]:
        """Write ``report.json`` (and ``density.png``, ``layers.png``) into ``out_dir``; return the paths."""
        from hvp.analysis._report import write_outputs

        return write_outputs(self, out_dir, plots=plots)


#: Points of the density grid in the report.
DENSITY_GRID_SIZE = 1000


def _setting_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise AnalysisError(
            f"`{name}` ({FLAGS[name]}) must be one of {', '.join(choices)}, got {value!r}."
        )
    return value


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    r"""Every option of an analysis, validated once when the settings are made.

    :func:`analyze` takes these as keywords (or a whole ``settings=`` object); ``hvp analyze``
    sets them with the flags of :data:`FLAGS`. The report's ``settings`` field is
    :meth:`to_dict`.

    Attributes:
      data: data spec (``"digits"``, ``"digits:images"``, a ``.npz`` path, ``"module:function"``;
        see :func:`load_data`), or batches from Python.
      operator: ``"hessian"`` or ``"ggn"`` (:data:`OPERATORS`).
      k: number of largest and of smallest eigenvalues (>= 1).
      num_probes: SLQ probes of the density (>= 2).
      num_iters: Lanczos steps per SLQ probe (>= 2).
      eig_iters: Lanczos basis size for the eigenvalues (>= 2; ``None``: eigsh's default).
      tol: eigenpair residual tolerance relative to each eigenvalue,
        ``||r_i|| <= tol * |lambda_i|`` floored at round-off (as :func:`hvp.linalg.eigsh`);
        ``None``: ``1e-6`` in float64, ``1e-4`` in float32 (:attr:`eig_tol`). It also sets
        the zero threshold of the derived figures.
      trace_method: ``"hutch++"``, ``"hutchinson"`` or ``"xtrace"`` (:data:`TRACE_METHODS`).
      trace_matvecs: products of the trace estimate (>= 3).
      layer_matvecs: Hutchinson probes of the per-layer traces (>= 2).
      batch_size: examples per batch when cutting arrays (``None``: one batch).
      num_batches: use only the first batches (``None``: all).
      seed: the seed of every random choice (>= 0; see "Seeds" in :mod:`hvp.analysis._analyze`).
      x64: compute in float64 (``jax_enable_x64`` is on for the call only); float32 otherwise.
      chunk_size: at most this many products at once in the trace, the density and the
        per-layer traces (``None``: the library's default).
      step: the step of a ``CheckpointManager`` root or Flax workdir (``None``: the latest).
      item: the item of a step directory, or the top-level key of the saved tree that holds the
        model state (``None``: found automatically).
      layer_view: ``"grouped"`` (one row per block) or ``"all"`` (one per layer) in the
        terminal table and ``layers.png``.
      top_layers: rows of the terminal's per-layer table (>= 1).
      compression: add the compression section (HAWQ per-layer quantisation sensitivity, a bit
        allocation, OBD saliency; ``layer_matvecs`` probes plus one Lanczos run per layer) and
        ``compression.png`` (see :mod:`hvp.analysis._compression_critical`).
      landscape: add the loss landscapes (``--landscape``).
      influence: add the influence section (Koh & Liang, 2017) and ``influence.png``: the most
        helpful and harmful training examples of a few test examples and the largest
        self-influences (see :mod:`hvp.analysis._influence_section`).
      influence_test: data spec of held-out test examples (``None``: the last
        ``influence_num_test`` examples of ``data``).
      influence_num_test: test examples (>= 1).
      influence_top: entries per list (>= 1).
      influence_method: ``"auto"`` (dense up to 1000 parameters, else Arnoldi), ``"arnoldi"``,
        ``"solve"`` or ``"dense"``.
      influence_rank: eigenpairs of the Arnoldi variant (>= 1).
      influence_damping: damping (>= 0; ``None``: ``max(0, -lambda_min) + 1e-3 * lambda_max``,
        which makes the damped operator positive definite).

    Raises:
      AnalysisTypeError: a setting of the wrong type (also a ``TypeError``).
      AnalysisError: a setting out of range or not among its choices (a ``ValueError``); the
        message names the setting and its ``hvp analyze`` flag.

    Examples:
        >>> from hvp.analysis import AnalysisSettings
        >>> s = AnalysisSettings(k=3, x64=True)
        >>> s.k, s.eig_tol, s.dtype.name
        (3, 1e-06, 'float64')
        >>> AnalysisSettings(num_probes=1)
        Traceback (most recent call last):
        ...
        hvp.analysis._errors.AnalysisError: `num_probes` (--probes) must be an integer >= 2, got 1.
    """

    data: Any = "digits"
    operator: str = "hessian"
    k: int = 5
    num_probes: int = 16
    num_iters: int = 64
    eig_iters: int | None = None
    tol: float | None = None
    trace_method: str = "hutch++"
    trace_matvecs: int = 99
    layer_matvecs: int = 64
    batch_size: int | None = 2048
    num_batches: int | None = None
    seed: int = 0
    x64: bool = False
    chunk_size: int | None = None
    step: int | None = None
    item: str | None = None
    layer_view: str = "grouped"
    top_layers: int = 10
    compression: bool = False
    landscape: bool = False
    influence: bool = False
    influence_test: str | None = None
    influence_num_test: int = 3
    influence_top: int = 5
    influence_method: str = "auto"
    influence_rank: int = 20
    influence_damping: float | None = None

    def __post_init__(self):
        checked = dict(
            operator=_setting_choice("operator", self.operator, OPERATORS),
            trace_method=_setting_choice("trace_method", self.trace_method, TRACE_METHODS),
            layer_view=_setting_choice("layer_view", self.layer_view, ("grouped", "all")),
            k=setting_int("k", self.k, 1),
            num_probes=setting_int("num_probes", self.num_probes, 2),
            num_iters=setting_int("num_iters", self.num_iters, 2),
            eig_iters=setting_int("eig_iters", self.eig_iters, 2, optional=True),
            trace_matvecs=setting_int("trace_matvecs", self.trace_matvecs, 3),
            layer_matvecs=setting_int("layer_matvecs", self.layer_matvecs, 2),
            batch_size=setting_int("batch_size", self.batch_size, 1, optional=True),
            num_batches=setting_int("num_batches", self.num_batches, 1, optional=True),
            seed=setting_int("seed", self.seed, 0),
            chunk_size=setting_int("chunk_size", self.chunk_size, 1, optional=True),
            step=setting_int("step", self.step, 0, optional=True),
            top_layers=setting_int("top_layers", self.top_layers, 1),
            influence_num_test=setting_int("influence_num_test", self.influence_num_test, 1),
            influence_top=setting_int("influence_top", self.influence_top, 1),
            influence_rank=setting_int("influence_rank", self.influence_rank, 1),
        )
        checked.update(self._influence_checks())
        if self.tol is not None:
            try:
                checked["tol"] = check_finite_float("tol", self.tol)
            except TypeError as e:
                raise AnalysisTypeError(f"{e} (--tol)") from None
            except ValueError as e:
                raise AnalysisError(f"{e} (--tol)") from None
        if not isinstance(self.landscape, (bool, np.bool_)):
            raise AnalysisTypeError(
                f"`landscape` (--landscape) must be a bool, got {self.landscape!r}."
            )
        checked["landscape"] = bool(self.landscape)
        if not isinstance(self.x64, (bool, np.bool_)):
            raise AnalysisTypeError(f"`x64` (--x64) must be a bool, got {self.x64!r}.")
        checked["x64"] = bool(self.x64)
        if not isinstance(self.compression, (bool, np.bool_)):
            raise AnalysisTypeError(
                f"`compression` (--compression) must be a bool, got {self.compression!r}."
            )
        checked["compression"] = bool(self.compression)
        if self.item is not None and not isinstance(self.item, str):
            raise AnalysisTypeError(f"`item` (--item) must be a string, got {self.item!r}.")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def _influence_checks(self) -> dict:
        from hvp.analysis._influence_section import INFLUENCE_METHODS

        if not isinstance(self.influence, (bool, np.bool_)):
            raise AnalysisTypeError(
                f"`influence` (--influence) must be a bool, got {self.influence!r}."
            )
        out = {
            "influence": bool(self.influence),
            "influence_method": _setting_choice(
                "influence_method", self.influence_method, INFLUENCE_METHODS
            ),
        }
        if self.influence_test is not None and not isinstance(self.influence_test, str):
            raise AnalysisTypeError(
                "`influence_test` (--influence-test) must be a data spec string, got "
                f"{type(self.influence_test).__name__}."
            )
        if self.influence_damping is not None:
            try:
                out["influence_damping"] = check_finite_float(
                    "influence_damping", self.influence_damping
                )
            except TypeError as e:
                raise AnalysisTypeError(f"{e} (--influence-damping)") from None
            except ValueError as e:
                raise AnalysisError(f"{e} (--influence-damping)") from None
        if not out["influence"]:
            given = [
                FLAGS[name]
                for name in INFLUENCE_OPTIONS
                if getattr(self, name) != _FIELD_DEFAULTS[name]
            ]
            if given:
                raise AnalysisError(
                    f"{', '.join(given)} set{'s' if len(given) == 1 else ''} up the influence "
                    "section, which is off: add --influence (influence=True)."
                )
        return out

    @property
    def dtype(self) -> np.dtype:
        """``float64`` with :attr:`x64`, else ``float32``."""
        return np.dtype(np.float64 if self.x64 else np.float32)

    @property
    def eig_tol(self) -> float:
        """:attr:`tol`, or its default for the dtype (``1e-6`` in float64, ``1e-4`` in float32)."""
        if self.tol is not None:
            return float(self.tol)
        return 1e-6 if self.x64 else 1e-4

    def replace(self, **changes) -> AnalysisSettings:
        """A copy with some settings changed (validated again); unknown names are refused."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise AnalysisTypeError(
                f"Unknown analysis setting(s) {', '.join(unknown)}; the settings are "
                f"{', '.join(f.name for f in dataclasses.fields(self))}."
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The report's ``settings``: every setting (``tol`` resolved), the dtype, the grid size."""
        return dict(
            operator=self.operator,
            k=self.k,
            num_probes=self.num_probes,
            num_iters=self.num_iters,
            eig_iters=self.eig_iters,
            tol=self.eig_tol,
            trace_method=self.trace_method,
            trace_matvecs=self.trace_matvecs,
            layer_matvecs=self.layer_matvecs,
            batch_size=self.batch_size,
            num_batches=self.num_batches,
            seed=self.seed,
            x64=self.x64,
            chunk_size=self.chunk_size,
            dtype=str(self.dtype),
            density_grid_size=DENSITY_GRID_SIZE,
            step=self.step,
            item=self.item,
            layer_view=self.layer_view,
            top_layers=self.top_layers,
            compression=self.compression,
            landscape=self.landscape,
            influence=self.influence,
            influence_test=self.influence_test,
            influence_num_test=self.influence_num_test,
            influence_top=self.influence_top,
            influence_method=self.influence_method,
            influence_rank=self.influence_rank,
            influence_damping=self.influence_damping,
        )


#: The settings of the influence section (valid only with ``influence=True``).
INFLUENCE_OPTIONS = (
    "influence_test",
    "influence_num_test",
    "influence_top",
    "influence_method",
    "influence_rank",
    "influence_damping",
)
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AnalysisSettings)}


#: Default settings, shared by :func:`analyze`, ``hvp analyze`` and ``hvp demo``
#: (the defaults of :class:`AnalysisSettings`, and the density grid size).
DEFAULTS = {
    **{
        f.name: f.default
        for f in dataclasses.fields(AnalysisSettings)
        if f.name not in ("step", "item")
    },
    "grid_size": DENSITY_GRID_SIZE,
}


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
        "process_count": jax.process_count(),
    }


def _f(x) -> float:
    return float(np.asarray(x))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    return out, time.perf_counter() - t0


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
    if settings.get("compression"):
        parts.append("--compression")
    if settings.get("landscape"):
        parts.append("--landscape")
    if settings.get("influence"):
        parts.append("--influence")
        for key in INFLUENCE_OPTIONS:
            v = settings.get(key)
            if v is not None and v != _FIELD_DEFAULTS[key]:
                parts += [FLAGS[key], str(v)]
    return " ".join(parts)


def _density_grid(lo: float, hi: float, num: int):
    width = hi - lo
    if not np.isfinite(width) or width <= 0:
        width = max(abs(hi), abs(lo), 1.0)
    pad = 0.05 * width
    return np.linspace(lo - pad, hi + pad, num)


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
    settings: AnalysisSettings | None = None,
    out_dir=None,
    plots: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    console=None,
    extra: dict | None = None,
    resume_dir=None,
    **options,
) -> AnalysisReport:
    r"""Curvature report of a model stored in an Orbax checkpoint (see the module docstring).

    Three steps: the settings are validated once (:class:`AnalysisSettings`), the algorithms
    run (model, checkpoint, data, operator, then the figures), and the report is assembled
    from their results (the derived figures as :func:`derived_figures` defines them).

    Args:
      checkpoint: directory written by ``ocp.StandardCheckpointer`` or a
        ``CheckpointManager`` (root or step); opened read-only.
      model: model spec ``"module.path:factory"`` / ``"path/file.py:factory"``
        (the factory returns ``(model, loss)``; see :mod:`hvp.analysis._specs`),
        or from Python the factory itself.
      settings: an :class:`AnalysisSettings` (``None``: the defaults).
      out_dir: if given, write ``report.json``, ``density.png``, ``layers.png`` there
        (each atomically). The directory is checked writable before any work.
      plots: write the PNGs (with ``out_dir``).
      overwrite: replace the outputs of an earlier run in ``out_dir`` (the whole
        set: PNGs not written again are removed). Without it an ``out_dir``
        that already holds outputs is refused before any work.
      progress: show rich progress bars (stderr); the algorithms' own progress displays stay
        off (this one shows every stage).
      console: a ``rich.console.Console`` for the progress bars.
      extra: free-form dict stored in the report's ``extra`` field.
      resume_dir: a directory that keeps each finished stage (the top and bottom eigenpairs,
        the trace, the density, the per-layer traces) as soon as it ends; a run interrupted
        (Ctrl-C, SIGTERM, a crash) and started again with the same directory and the same
        checkpoint, model, data and settings skips the finished stages and gives the same
        report numbers as an uninterrupted run. A directory of another analysis is refused;
        its files are removed once the report is complete. Needs ``model`` and ``data`` as
        spec strings. The files are pickles: use a directory only you write to.
        (``hvp analyze --resume DIR``.)
      **options: settings by name (``data``, ``operator``, ``k``, ``num_probes``, ``num_iters``,
        ``eig_iters``, ``tol``, ``trace_method``, ``trace_matvecs``, ``layer_matvecs``,
        ``batch_size``, ``num_batches``, ``seed``, ``x64``, ``chunk_size``, ``step``, ``item``,
        ``layer_view``, ``top_layers``, ``compression``, ``landscape``, ``influence`` and the
        ``influence_*`` settings; see :class:`AnalysisSettings`), applied on top of
        ``settings``.

    Returns:
      An :class:`AnalysisReport`.

    Raises:
      AnalysisError: any problem with the inputs (missing or unreadable
        checkpoint, structure mismatch, NaN parameters, bad spec, empty data,
        invalid setting, unwritable or already used ``out_dir``, a missing
        optional package), with a message that names the fix.
      AnalysisTypeError: a setting of the wrong type or an unknown setting (an
        ``AnalysisError`` and a ``TypeError``).
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
    if settings is None:
        settings = AnalysisSettings()
    elif not isinstance(settings, AnalysisSettings):
        raise AnalysisTypeError(
            f"`settings` must be an hvp.analysis.AnalysisSettings, got {type(settings).__name__}."
        )
    if options:
        settings = settings.replace(**options)
    # Several processes (jax.distributed): process 0 alone shows progress and writes outputs.
    multi = is_multiprocess()
    writer = is_writer()
    progress = progress and writer
    # Cheap checks before any heavy work: packages, the checkpoint path, the output directory
    # (on several processes: if one fails, all stop, before any collective program).
    with agreed("checking the settings, the checkpoint and the output directory"):
        if multi and resume_dir is not None:
            raise AnalysisError(
                "--resume (resume_dir=) is not supported when several processes run: the "
                "finished stages are global arrays that one directory per host cannot hold. "
                "Run without --resume, or resume on one host."
            )
        check_dependencies(plots=plots and out_dir is not None and writer)
        resolve_checkpoint(checkpoint, step=settings.step, item=settings.item)
        if out_dir is not None and writer:
            from hvp.analysis._report import prepare_output_dir

            prepare_output_dir(out_dir, overwrite=overwrite)
        store = (
            None
            if resume_dir is None
            else _StageStore(resume_dir, _fingerprint(checkpoint, model, settings))
        )
    if settings.x64 and not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)  # restored by @_restoring_x64

    computed = _compute(
        checkpoint, model, settings, progress=progress, console=console, store=store
    )
    if store is not None and store.resumed:
        extra = {**(extra or {}), "resumed_stages": list(store.resumed)}
    report = _assemble(checkpoint, model, settings, computed, extra=extra, t_start=t_start)
    _interrupt.check()
    if out_dir is not None:
        # process 0 writes; on several processes every one then learns whether that worked
        with agreed("writing the report"), _interrupt.deferred():
            if writer:  # a signal here is raised once every file is complete
                report.write(out_dir, plots=plots)
    if store is not None:
        store.clear()
    return report


# ------------------------------------------------------------------------------------------------
# resuming: finished stages kept in a state directory
# ------------------------------------------------------------------------------------------------
#: Stages whose results a state directory keeps (the algorithms, in the order they run).
STAGES = ("top", "bottom", "trace", "density", "layers")
_STATE_FILE = "state.json"


class _StageStore:
    """The finished stages of one analysis, kept in ``resume_dir`` to resume an interrupted run.

    ``state.json`` records what the stages depend on (the checkpoint item and step, the model and
    data specs, every setting that changes a figure, the hvp version); a directory of another
    analysis is refused. Each finished stage is written atomically as ``<stage>.pkl`` (its
    algorithm's result and seconds) right after it ends, so that an interruption (Ctrl-C,
    SIGTERM, a killed process) loses at most the stage in flight. The files are removed once the
    report is complete.
    """

    def __init__(self, path, fingerprint: dict):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AnalysisError(f"Cannot create the --resume directory '{path}': {e}.") from None
        check_writable_dir(self.path, what="--resume directory")
        state = self.path / _STATE_FILE
        self.resumed: list[str] = []
        if state.exists():
            try:
                before = json.loads(state.read_text())
            except (OSError, ValueError):
                before = None
            if before != fingerprint:
                diff = (
                    sorted(k for k in fingerprint if before.get(k) != fingerprint[k])
                    if isinstance(before, dict)
                    else ["state.json is unreadable"]
                )
                raise AnalysisError(
                    f"The --resume directory '{path}' holds the state of another analysis "
                    f"(differs in: {', '.join(diff)}); use another directory, or remove it to "
                    "start over."
                )
        else:
            atomic_write_text(state, json.dumps(fingerprint, indent=1, sort_keys=True))

    def load(self, name: str):
        """``(result, seconds)`` of a finished stage, or ``None``."""
        f = self.path / f"{name}.pkl"
        if not f.exists():
            return None
        try:
            with open(f, "rb") as fh:
                result, seconds = pickle.load(fh)
        except Exception:  # a damaged file: run the stage again
            return None
        self.resumed.append(name)
        return result, seconds

    def save(self, name: str, result, seconds: float) -> None:
        payload = pickle.dumps((jax.device_get(result), float(seconds)))
        with atomic_open(self.path / f"{name}.pkl", "wb") as fh:
            fh.write(payload)

    def clear(self) -> None:
        """Remove the files of this analysis (and the directory when nothing else is left)."""
        for name in STAGES:
            (self.path / f"{name}.pkl").unlink(missing_ok=True)
            (self.path / f"{name}.npz").unlink(missing_ok=True)  # an algorithm's checkpoint
        (self.path / _STATE_FILE).unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass


def _fingerprint(checkpoint, model, settings: AnalysisSettings) -> dict:
    """What the figures of an analysis depend on (``state.json`` of a resume directory)."""
    if not isinstance(model, str) or not isinstance(settings.data, str):
        raise AnalysisError(
            "Resuming (--resume, resume_dir=) needs the model and the data as spec strings "
            "(e.g. model='models.py:factory', data='digits'): Python objects cannot be "
            "recognised again in a later run."
        )
    item_dir, step, item = resolve_checkpoint(checkpoint, step=settings.step, item=settings.item)
    figures = {k: v for k, v in settings.to_dict().items() if k not in ("layer_view", "top_layers")}
    return {
        "hvp": __version__,
        "checkpoint": str(Path(item_dir).resolve()),
        "step": step,
        "item": item,
        "model": model,
        "data": settings.data,
        "settings": figures,
    }


# ------------------------------------------------------------------------------------------------
# computation: run the algorithms
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Computed:
    """What the algorithms produced, before any report is assembled."""

    spec: Any  # ModelSpec
    ckpt: Any  # the checkpoint read
    restored: Any  # its arrays in place
    params: Any
    data: Any  # LoadedData
    top: Any  # EigshResult
    bottom: Any  # EigshResult
    trace: Any  # TraceResult
    density: Any  # SpectralDensity
    layers: Any  # LayerTrace
    timings: dict
    gradient: Any = None  # the data-set gradient (critical-point section)
    compression: Any = None  # CompressionSection, with --compression
    landscape: dict | None = None  # {"eigen": LandscapeResult, "random": LandscapeResult}
    influence: Any = None  # InfluenceSection, with --influence


def _compute(
    checkpoint, model, settings: AnalysisSettings, *, progress, console, store=None
) -> _Computed:
    """Build the model, read the checkpoint and the data, build the operator, run the algorithms."""
    from hvp import flax as hflax
    from hvp import linalg

    s = settings
    dtype = jnp.float64 if s.x64 else jnp.float32
    timings: dict[str, float] = {}
    stages = Stages(enabled=progress, console=console)
    multi = is_multiprocess()
    mesh = data_mesh() if multi else None
    with stages:
        # 1. model + checkpoint ------------------------------------------------------------
        with stages.stage("Building the model") as st, agreed("building the model"):
            t0 = time.perf_counter()
            spec = load_model(model)
            timings["load_model"] = time.perf_counter() - t0
            st.done(spec.kind)
        with stages.stage("Reading the checkpoint") as st, agreed("reading the checkpoint"):
            t0 = time.perf_counter()
            ckpt = read_checkpoint(checkpoint, step=s.step, item=s.item)
            restored = restore_into(spec, ckpt, dtype=dtype)
            timings["load_checkpoint"] = time.perf_counter() - t0
            where = f" under key '{restored.key}'" if restored.key is not None else ""
            st.done(f"{len(restored.restored)} arrays{where}")
        if multi:  # every process read the same arrays: one copy per device of the global mesh
            restored = replicate_restored(restored, mesh)
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
        with (
            stages.stage("Reading the data", total=s.num_batches) as st,
            agreed("reading the data"),
        ):
            t0 = time.perf_counter()
            ds = load_data(
                s.data,
                batch_size=s.batch_size,
                num_batches=s.num_batches,
                dtype=dtype,
                progress=st.advance_to,
            )
            batches = ds.batches
            if multi:  # this process's rows of every batch, as global arrays
                batches = shard_batches(batches, mesh)
            timings["load_data"] = time.perf_counter() - t0
            st.done(
                f"{ds.num_examples} examples in {ds.num_batches} batch{'es' if ds.num_batches > 1 else ''}"
            )

        _interrupt.check()
        # 3. operator ------------------------------------------------------------------------
        t0 = time.perf_counter()
        # the model's first call on the data, by shape: a clear error before any long work
        check_model_on_data(
            problem.model_fn, params, batches[0], unpack=problem.unpack, spec=s.data
        )
        try:
            op = problem.hessian(batches) if s.operator == "hessian" else problem.ggn(batches)
            jax.eval_shape(op.matvec, params)
        except AnalysisError:
            raise
        except NonFiniteError as e:  # NaN/Inf in the data: the message names batch and leaf
            raise AnalysisError(f"--data '{ds.spec}': {e}") from e
        except Exception as e:
            raise AnalysisError(
                f"The model and loss cannot be evaluated on the data '{ds.spec}': {_one_line(e)}"
            ) from e
        timings["operator"] = time.perf_counter() - t0
        influence_test = _influence_test_data(op, params, s, dtype) if s.influence else None
        if 2 * s.k > n:
            raise AnalysisError(
                f"-k {s.k} asks for {2 * s.k} eigenvalues but the model has only {n} parameters."
            )
        if s.influence:
            from hvp.analysis._influence_section import check_settings

            check_settings(s.influence_method, s.influence_rank, n)

        keys = dict(
            zip(_SEED_ORDER, jax.random.split(jax.random.PRNGKey(s.seed), len(_SEED_ORDER)))
        )
        # (on several processes: skipped, the timing products would run on process 0 only)
        if not multi:
            stages.estimate(  # expected products and seconds per stage (only with the display on)
                op,
                stage_products(
                    n=n,
                    k=s.k,
                    eig_iters=s.eig_iters,
                    trace_matvecs=s.trace_matvecs,
                    num_probes=s.num_probes,
                    num_iters=s.num_iters,
                    layer_matvecs=s.layer_matvecs,
                ),
                block_size=s.num_probes,
            )

        # 4. figures (the stage display replaces the algorithms' own progress) ---------------
        # With a resume directory each stage also saves its state as it runs, so that a stage
        # in flight resumes from its last save (the file is removed when the stage finishes).
        def quiet_for(name: str) -> dict:
            if store is None:
                return dict(progress=False)
            return dict(progress=False, checkpoint=linalg.Checkpoint(store.path / f"{name}.npz"))

        eig_kw = dict(tol=s.eig_tol)
        if s.eig_iters is not None:
            eig_kw["num_iters"] = s.eig_iters
        # one function per stage; each is skipped when a resume directory holds its result
        algorithms = {
            "top": lambda: _quiet_eigsh(
                linalg.eigsh,
                op,
                s.k,
                which="largest",
                key=keys["top"],
                **eig_kw,
                **quiet_for("top"),
            ),
            "bottom": lambda: _quiet_eigsh(
                linalg.eigsh,
                op,
                s.k,
                which="smallest",
                key=keys["bottom"],
                **eig_kw,
                **quiet_for("bottom"),
            ),
            "trace": lambda: linalg.trace(
                op,
                key=keys["trace"],
                num_matvecs=s.trace_matvecs,
                method=s.trace_method,
                chunk_size=s.chunk_size,
                **quiet_for("trace"),
            ),
            "density": lambda: linalg.spectral_density(
                op,
                key=keys["density"],
                num_probes=s.num_probes,
                num_iters=s.num_iters,
                chunk_size=s.chunk_size,
                **quiet_for("density"),
            ),
            "layers": lambda: linalg.layer_trace(
                op,
                key=keys["layers"],
                num_matvecs=s.layer_matvecs,
                chunk_size=s.chunk_size,
                **quiet_for("layers"),
            ),
        }
        titles = {
            "top": f"Top-{s.k} eigenvalues (Lanczos)",
            "bottom": f"Bottom-{s.k} eigenvalues (Lanczos)",
            "trace": f"Trace ({s.trace_method})",
            "density": f"Spectral density (SLQ, {s.num_probes} x {s.num_iters})",
            "layers": "Per-layer trace and eigenvector mass",
        }
        results = {}
        for name in STAGES:
            _interrupt.check()
            with stages.stage(titles[name], expect=name) as st:
                results[name], timings[name], resumed = _stage(store, name, algorithms[name])
                st.done(_done(results[name], resumed))

        # 5. the gradient (critical-point section) and, with --compression, compression
        extras = _critical_and_compression(op, s, stages, timings)
        # 5. loss landscape (--landscape) ---------------------------------------------------
        if s.landscape:
            _interrupt.check()
            with stages.stage("Loss landscape (1-D eigen, 2-D random)") as st:
                results["landscape"], timings["landscape"] = _timed(
                    lambda: landscape_sections(
                        op, results["top"], seed=s.seed, chunk_size=s.chunk_size
                    )
                )
                st.done(
                    f"{sum(r.num_evaluations for r in results['landscape'].values())} loss evaluations"
                )
        # 6. influence (--influence) ----------------------------------------------------------
        if s.influence:
            from hvp.analysis._influence_section import (
                INFLUENCE_KEY,
                concat_batches,
                influence_section,
            )

            _interrupt.check()
            with stages.stage("Influence functions (Koh & Liang)") as st:
                t0 = time.perf_counter()
                results["influence"] = influence_section(
                    op,
                    concat_batches(ds.batches),
                    test=influence_test,
                    test_spec=s.influence_test,
                    data_spec=s.data,
                    num_test=s.influence_num_test,
                    top=s.influence_top,
                    method=s.influence_method,
                    rank=s.influence_rank,
                    damping=s.influence_damping,
                    lambda_max=float(np.max(np.asarray(results["top"].eigenvalues))),
                    lambda_min=float(np.min(np.asarray(results["bottom"].eigenvalues))),
                    key=jax.random.fold_in(jax.random.PRNGKey(s.seed), INFLUENCE_KEY),
                    chunk_size=s.chunk_size,
                    eigsh=results["top"],
                )
                timings["influence"] = time.perf_counter() - t0
                st.done(
                    f"{results['influence'].method}, {results['influence'].num_matvecs} products"
                )

    return _Computed(
        spec=spec,
        ckpt=ckpt,
        restored=restored,
        params=params,
        data=ds,
        timings=timings,
        **results,
        **extras,
    )


def _influence_test_data(op, params, s: AnalysisSettings, dtype):
    """The ``--influence-test`` examples as one batch (``None`` without the flag), checked early."""
    from hvp.analysis._influence_section import concat_batches
    from hvp.operators import batch_loss

    if s.influence_test is None:
        return None
    test = load_data(s.influence_test, batch_size=None, dtype=dtype)
    batch = concat_batches(test.batches)
    try:
        jax.eval_shape(batch_loss(op), params, batch)
    except Exception as e:
        raise AnalysisError(
            f"The model and loss cannot be evaluated on the --influence-test data "
            f"'{test.spec}' ({_one_line(e).rstrip('.')}); it must have the layout of --data."
        ) from e
    return batch


#: The compression section's key: ``fold_in(PRNGKey(seed), COMPRESSION_KEY)`` (outside the
#: split of :data:`_SEED_ORDER`, so the other figures do not change with ``--compression``).
COMPRESSION_KEY = 15


def _critical_and_compression(op, s: AnalysisSettings, stages, timings: dict) -> dict:
    """The data-set gradient and, with ``s.compression``, the compression section (not resumable)."""
    from hvp.analysis._compression_critical import compression_section
    from hvp.operators import data_gradient

    out = {}
    _interrupt.check()
    with stages.stage("Gradient over the data set (critical point)") as st:
        t0 = time.perf_counter()
        out["gradient"] = data_gradient(op)
        timings["gradient"] = time.perf_counter() - t0
        st.done(f"norm {float(tu.norm(out['gradient'])):.3g}")
    if s.compression:
        _interrupt.check()
        with stages.stage("Compression sensitivity (HAWQ, OBD)") as st:
            t0 = time.perf_counter()
            out["compression"] = compression_section(
                op,
                key=jax.random.fold_in(jax.random.PRNGKey(s.seed), COMPRESSION_KEY),
                num_matvecs=s.layer_matvecs,
                chunk_size=s.chunk_size,
                operator=s.operator,
                gradient_norm=float(tu.norm(out["gradient"])),
            )
            timings["compression"] = time.perf_counter() - t0
            st.done(f"{out['compression'].num_matvecs} products")
    return out


# ------------------------------------------------------------------------------------------------
# report assembly: sections and derived figures from the results
# ------------------------------------------------------------------------------------------------
def _assemble(
    checkpoint, model, settings: AnalysisSettings, c: _Computed, *, extra, t_start
) -> AnalysisReport:
    """The report from the algorithms' results (no operator products)."""
    s = settings
    dtype = jnp.float64 if s.x64 else jnp.float32
    timings = c.timings
    top_sec = _eigen_section(c.top, "largest", timings["top"])
    bot_sec = _eigen_section(c.bottom, "smallest", timings["bottom"])
    sd = c.density

    lam_lo = min(float(np.min(np.asarray(sd.nodes))), bot_sec.eigenvalues[0])
    lam_hi = max(float(np.max(np.asarray(sd.nodes))), top_sec.eigenvalues[-1])
    grid = _density_grid(lam_lo, lam_hi, DENSITY_GRID_SIZE)
    sigma = float(sd.default_sigma())
    dens = np.asarray(sd.density(jnp.asarray(grid, dtype=dtype), sigma), dtype=np.float64)
    zero = zero_threshold(top_sec, bot_sec, tol=s.eig_tol, dtype=dtype)
    dens_sec = DensitySection(
        grid=grid,
        density=dens,
        sigma=sigma,
        nodes=np.asarray(sd.nodes, np.float64),
        weights=np.asarray(sd.weights, np.float64),
        zero_threshold=zero,
        num_probes=s.num_probes,
        num_iters=s.num_iters,
        num_matvecs=int(sd.num_matvecs),
        seconds=float(timings["density"]),
        **negative_mass_fields(sd, bot_sec, zero, size=int(tu.size(c.params))),
    )
    tr_sec = TraceSection(
        estimate=_f(c.trace.estimate),
        std_error=_f(c.trace.std_error),
        num_matvecs=int(c.trace.num_matvecs),
        seconds=float(timings["trace"]),
        method=s.trace_method,
    )

    lt = c.layers
    groups = tu.group_by_layer(c.params)
    sizes = dict(
        zip(tu.leaf_paths(c.params), (int(np.size(x)) for x in jax.tree_util.tree_leaves(c.params)))
    )
    mass = tu.layer_norms(c.top.eigenvectors)
    layers = tuple(lt.layers)
    labels = tu.layer_labels(layers)
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
    derived = derived_figures(top_sec, bot_sec, dens_sec, size=int(tu.size(c.params)))
    critical = None
    if c.gradient is not None:
        from hvp.analysis._compression_critical import critical_section

        critical = critical_section(
            None,
            top_sec,
            bot_sec,
            operator=s.operator,
            zero_threshold=zero,
            seconds=timings.get("gradient", 0.0),
            gradient=c.gradient,
        )

    settings_dict = s.to_dict()
    model_name = c.spec.spec
    data_name = c.data.spec
    total_mv = sum(sec.num_matvecs for sec in (top_sec, bot_sec, tr_sec, dens_sec, layer_sec))
    if c.compression is not None:
        total_mv += c.compression.num_matvecs
    if c.influence is not None:
        total_mv += c.influence.num_matvecs
    timings["total"] = time.perf_counter() - t_start
    return AnalysisReport(
        schema_version=SCHEMA_VERSION,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        settings=settings_dict,
        seeds={
            "seed": s.seed,
            "derivation": f"jax.random.split(jax.random.PRNGKey(seed), {len(_SEED_ORDER)})",
            "order": list(_SEED_ORDER),
        },
        versions=versions(),
        device=device_info(),
        checkpoint={
            "path": str(Path(c.ckpt.requested)),
            "item_dir": c.ckpt.path,
            "step": c.ckpt.step,
            "item": c.ckpt.item,
            "key": c.restored.key,
            "restored": list(c.restored.restored),
            "ignored": list(c.restored.ignored),
        },
        model={
            "spec": model_name,
            "framework": c.restored.kind,
            "num_params": int(tu.size(c.params)),
            "num_layers": len(layers),
            "operator": s.operator,
            "dtype": str(np.dtype(dtype)),
        },
        data={
            "spec": data_name,
            "num_examples": int(c.data.num_examples),
            "num_batches": int(c.data.num_batches),
            "batch_size": s.batch_size,
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
            _command_line(checkpoint, model_name, data_name, {**settings_dict, "tol": s.tol})
            if isinstance(s.data, str) and isinstance(model, str)
            else ""
        ),
        extra=dict(extra or {}),
        critical=critical,
        compression=c.compression,
        landscape=c.landscape,
        influence=c.influence,
    )


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


def zero_threshold(top: EigenSection, bottom: EigenSection, *, tol: float, dtype) -> float:
    r"""Eigenvalues with :math:`|\lambda|` at most this count as zero in a report.

    :math:`\max(\mathrm{tol}, f)\cdot\max|\lambda|` over the computed extreme eigenvalues, with
    :math:`f` the accuracy of :func:`hvp.linalg.eigsh` near zero (:func:`hvp.linalg.zero_floor`):
    the threshold of :func:`hvp.linalg.spectrum_summary` with ``zero_tol = tol``.

    Examples:
        >>> import numpy as np
        >>> from hvp.analysis import EigenSection
        >>> from hvp.analysis._analyze import zero_threshold
        >>> sec = lambda lam: EigenSection(eigenvalues=np.array(lam), residuals=np.zeros(1),
        ...                                converged=np.ones(1, bool), num_matvecs=1, num_restarts=0, seconds=0.0)
        >>> zero_threshold(sec([4.0]), sec([-2.0]), tol=1e-3, dtype=np.float64)
        0.004
    """
    from hvp import linalg

    scale = float(max(np.abs(top.eigenvalues).max(), np.abs(bottom.eigenvalues).max()))
    return max(float(tol), linalg.zero_floor(dtype, tol)) * scale


def negative_mass_fields(sd, bottom: EigenSection, zero: float, *, size: int) -> dict:
    r"""The density section's negative-mass fields: SLQ estimate, error, bracket, eigsh bound.

    From ``sd.negative_mass(zero)`` (:class:`hvp.linalg.SpectralMassEstimate`: Gauss
    estimate, probe standard error, Chebyshev-Markov-Stieltjes bracket) and the bottom
    eigenpairs: by Kahan's theorem (Parlett, *The Symmetric Eigenvalue Problem*, 1998,
    thm. 11.5.1) the ``c`` converged orthonormal Ritz pairs have ``c`` distinct eigenvalues
    within :math:`\lVert R \rVert_2 \le (\sum_i r_i^2)^{1/2}` of their Ritz values
    (:math:`r_i` the residual norms), so those with :math:`\theta_i + \lVert R\rVert <
    -\epsilon` count certainly: ``negative_count_eigsh / size`` is a hard lower bound of
    the fraction, which raises the estimate and the bracket's lower end when larger.

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np, hvp
        >>> from hvp.analysis import EigenSection
        >>> from hvp.analysis._analyze import negative_mass_fields
        >>> sd = hvp.spectral_density(hvp.from_dense(jnp.diag(jnp.arange(-2.0, 6.0))),
        ...                           key=jax.random.key(0), num_probes=4, num_iters=8)
        >>> bottom = EigenSection(eigenvalues=np.array([-2.0, -1.0]), residuals=np.array([1e-9, 1e-9]),
        ...                       converged=np.array([True, True]), num_matvecs=9, num_restarts=0,
        ...                       seconds=0.0)
        >>> f = negative_mass_fields(sd, bottom, 1e-6, size=8)
        >>> f["negative_count_eigsh"], f["negative_mass_lower"], round(f["negative_mass"], 6)
        (2, 0.25, 0.25)
    """
    m = sd.negative_mass(zero)
    lam = np.asarray(bottom.eigenvalues, np.float64)
    res = np.asarray(bottom.residuals, np.float64)
    ok = np.asarray(bottom.converged, bool) & np.isfinite(lam) & np.isfinite(res)
    r = float(np.sqrt(np.sum(res[ok] ** 2)))
    count = int(np.sum(lam[ok] + r < -zero))
    floor = count / size if size > 0 else 0.0
    return dict(
        negative_mass=max(float(m.estimate), floor),
        negative_mass_std_error=float(m.std_error),
        negative_mass_lower=max(float(m.lower), floor),
        negative_mass_upper=max(float(m.upper), floor),
        negative_mass_bracket_std_error=float(m.bracket_std_error),
        negative_count_eigsh=count,
    )


def derived_figures(
    top: EigenSection, bottom: EigenSection, dens: DensitySection, *, size: int | None = None
) -> DerivedSection:
    r"""The report's derived figures, from the eigenvalue and density sections (no products).

    * :math:`\lambda_{\max}`, :math:`\lambda_{\min}` over the :math:`2k` computed eigenvalues;
    * the condition estimate of :func:`hvp.linalg.condition_estimate` (the definition of
      :func:`hvp.linalg.spectrum_summary`): :math:`\lambda_{\max}/\lambda_{\min}` for a
      definite spectrum, ``inf`` for a singular semi-definite one, and for an indefinite one
      :math:`\max|\lambda|` over the smallest non-zero SLQ Ritz value magnitude (rough; Ritz
      values weighing less than ``0.1 / size`` are ignored, ``size`` the number of parameters);
    * the negative ratio :math:`|\lambda_{\min}|/\lambda_{\max}` (when
      :math:`\lambda_{\min} < -\epsilon < \epsilon < \lambda_{\max}`, else 0) and the negative
      mass of the density section;

    with one zero threshold :math:`\epsilon` = ``dens.zero_threshold`` (:func:`zero_threshold`)
    for all of them.

    Examples:
        >>> import numpy as np
        >>> from hvp.analysis import DensitySection, EigenSection
        >>> from hvp.analysis._analyze import derived_figures
        >>> sec = lambda lam: EigenSection(eigenvalues=np.array(lam), residuals=np.zeros(1),
        ...                                converged=np.ones(1, bool), num_matvecs=10, num_restarts=0, seconds=0.0)
        >>> dens = DensitySection(grid=np.zeros(1), density=np.zeros(1), sigma=0.1,
        ...                       nodes=np.array([[-2.0, 0.5, 3.0]]), weights=np.array([[0.2, 0.5, 0.3]]),
        ...                       negative_mass=0.2, zero_threshold=1e-6, num_probes=1, num_iters=3,
        ...                       num_matvecs=3, seconds=0.0)
        >>> d = derived_figures(sec([3.0]), sec([-2.0]), dens)
        >>> d.condition_estimate, round(d.negative_ratio, 4), d.positive_definite
        (6.0, 0.6667, False)
    """
    from hvp import linalg

    lam = np.concatenate([top.eigenvalues, bottom.eigenvalues])
    lam_max, lam_min = float(lam.max()), float(lam.min())
    conv = np.concatenate([np.asarray(top.converged, bool), np.asarray(bottom.converged, bool)])
    zero = float(dens.zero_threshold)
    label, _, _ = linalg.definiteness(lam_min, lam_max, zero)
    cond = linalg.condition_estimate(
        lam_min, lam_max, zero, nodes=dens.nodes, weights=dens.weights, size=size
    )
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
        lambda_max_converged=bool(conv[int(np.argmax(lam))]),
        lambda_min_converged=bool(conv[int(np.argmin(lam))]),
    )


#: Points of the report's 1-D landscape (along the top eigenvector) and per axis of the 2-D one.
LANDSCAPE_POINTS = (21, 11)
#: The landscape's key: ``jax.random.fold_in(jax.random.PRNGKey(seed), LANDSCAPE_KEY)`` (kept
#: apart from the other stages' keys so that ``--landscape`` changes none of their figures).
LANDSCAPE_KEY = 0x4C53


def landscape_sections(op, top, *, seed: int, chunk_size=None) -> dict:
    r"""The report's loss landscapes (``--landscape``): ``{"eigen": ..., "random": ...}``.

    * ``"eigen"``: the 1-D slice along the top eigenvector of the analysis (its ``top``
      eigenpairs are reused: no new products) with the second-order model overlaid, on
      ``[-a, a]`` where the model's curvature term reaches the loss,
      :math:`a = \sqrt{2 \max(L, 10^{-3}) / \lambda_{\max}}` (``a = 1`` when
      :math:`\lambda_{\max} \le 0`);
    * ``"random"``: the 2-D slice along two filter-normalised random directions (Li et al.,
      2018) on ``[-1, 1]^2``, the convention of their plots.

    Both are :class:`hvp.landscape.LandscapeResult`; :data:`LANDSCAPE_POINTS` points.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> from hvp.analysis._analyze import landscape_sections
      >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p["w"] - b[1]) ** 2), {"w": jnp.ones((2, 2))},
      ...                 (jnp.eye(2), jnp.zeros((2, 2))))
      >>> out = landscape_sections(H, hvp.eigsh(H, 1, key=jax.random.key(0)), seed=0)
      >>> sorted(out), out["random"].losses.shape
      (['eigen', 'random'], (11, 11))
    """
    from hvp.landscape import landscape
    from hvp.operators import data_loss

    key = jax.random.fold_in(jax.random.PRNGKey(seed), LANDSCAPE_KEY)
    lam = float(np.max(np.asarray(top.eigenvalues)))
    loss0 = float(data_loss(op))
    span = float(np.sqrt(2.0 * max(loss0, 1e-3) / lam)) if lam > 0 and np.isfinite(lam) else 1.0
    n1, n2 = LANDSCAPE_POINTS
    return {
        "eigen": landscape(op, directions=top, span=span, num_points=n1, chunk_size=chunk_size),
        "random": landscape(
            op, directions="random", dims=2, key=key, num_points=n2, chunk_size=chunk_size
        ),
    }


def _stage(store: _StageStore | None, name: str, fn):
    """``(result, seconds, resumed)``: the stage's saved result, or ``fn()`` run (and saved)."""
    saved = store.load(name) if store is not None else None
    if saved is not None:
        return (*saved, True)
    result, seconds = _timed(fn)
    if store is not None:
        store.save(name, result, seconds)
    return result, seconds, False


def _done(result, resumed: bool) -> str:
    return f"{int(result.num_matvecs)} matvecs" + (" (resumed)" if resumed else "")
