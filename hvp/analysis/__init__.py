"""Curvature reports of checkpointed models: ``hvp analyze`` and ``hvp demo`` as Python functions.

* :func:`analyze`: with :class:`AnalysisSettings` (every option, validated once), read an Orbax checkpoint (read-only) into a Flax model built
  from a spec, compute extreme eigenvalues, trace, spectral density and a
  per-layer breakdown over a data set, and return an :class:`AnalysisReport`
  (written as ``report.json`` plus ``density.png`` and ``layers.png``).
* :func:`run_demo`: train a small NNX MLP on the bundled digits, checkpoint it
  and analyse it with the same code path.

See ``docs/analyze.md`` for the specs, the flags and the ``report.json`` schema.
"""

from hvp.analysis._analyze import (
    DEFAULTS,
    FLAGS,
    OPERATORS,
    SCHEMA_VERSION,
    TRACE_METHODS,
    AnalysisReport,
    AnalysisSettings,
    DensitySection,
    DerivedSection,
    EigenSection,
    LayerSection,
    TraceSection,
    analyze,
    check_dependencies,
)
from hvp.analysis._checkpoint import (
    LoadedCheckpoint,
    read_checkpoint,
    resolve_checkpoint,
    restore_into,
)
from hvp.analysis._compression_critical import (
    CompressionSection,
    CriticalSection,
    plot_compression,
)
from hvp.analysis._data import LoadedData, check_model_on_data, digits, load_data
from hvp.analysis._demo import DEMO_MODEL_SPEC, digits_mlp, run_demo
from hvp.analysis._errors import AnalysisError, AnalysisTypeError, StructureMismatchError
from hvp.analysis._influence_section import InfluenceSection, plot_influence
from hvp.analysis._plots import plot_density, plot_layers
from hvp.analysis._report import (
    REPORT_SCHEMA,
    load_report,
    print_summary,
    summary_table,
    validate_report,
)
from hvp.analysis._specs import ModelSpec, load_model, resolve_callable

__all__ = [
    "DEFAULTS",
    "DEMO_MODEL_SPEC",
    "FLAGS",
    "OPERATORS",
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "TRACE_METHODS",
    "AnalysisError",
    "AnalysisReport",
    "AnalysisSettings",
    "AnalysisTypeError",
    "LoadedCheckpoint",
    "DensitySection",
    "DerivedSection",
    "EigenSection",
    "LayerSection",
    "CriticalSection",
    "CompressionSection",
    "plot_compression",
    "InfluenceSection",
    "plot_influence",
    "LoadedData",
    "ModelSpec",
    "StructureMismatchError",
    "TraceSection",
    "analyze",
    "check_dependencies",
    "digits",
    "digits_mlp",
    "load_data",
    "check_model_on_data",
    "load_model",
    "load_report",
    "plot_density",
    "plot_layers",
    "print_summary",
    "read_checkpoint",
    "resolve_callable",
    "resolve_checkpoint",
    "restore_into",
    "run_demo",
    "summary_table",
    "validate_report",
]
