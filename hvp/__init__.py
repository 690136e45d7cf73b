"""hvp: Hessian-vector products at scale, and the curvature tools around them, in JAX.

Layers (each imports only from the ones before it):

* :mod:`hvp.tree` - pytree arithmetic, random probes, validation.
* :mod:`hvp.operators` - Hessian / GGN / empirical Fisher operators over data sets.
* :mod:`hvp.linalg` - matrix-free algorithms (Lanczos, SLQ, trace, diagonal).
* uses - :mod:`hvp.flax`, :mod:`hvp.monitor`, :mod:`hvp.analysis`, :mod:`hvp.optim`,
  :mod:`hvp.critical`, :mod:`hvp.compression`, :mod:`hvp.landscape`, :mod:`hvp.influence`.
* :mod:`hvp.cli` - the ``hvp`` command.
"""

from hvp import tree
from hvp._version import __version__
from hvp.linalg import (
    ConvergenceWarning,
    DiagonalResult,
    EigshResult,
    FrobeniusResult,
    LeafTraces,
    PowerResult,
    SolveResult,
    SpectralDensity,
    SpectrumSummary,
    TraceResult,
    diagonal,
    eigsh,
    frobenius_norm,
    inverse,
    power_iteration,
    solve,
    spectral_density,
    spectrum_summary,
    trace,
    wasserstein1,
)
from hvp.operators import (
    CurvatureOperator,
    LinearOperator,
    NonFiniteError,
    empirical_fisher,
    fisher,
    from_dense,
    from_diagonal,
    from_matvec,
    ggn,
    hessian,
    hvp,
    losses,
)

_LAZY = {
    "flax": ("hvp.flax", None),
    "monitor": ("hvp.monitor", None),
    "analysis": ("hvp.analysis", None),
    "optim": ("hvp.optim", None),
    "CurvatureMonitor": ("hvp.monitor", "CurvatureMonitor"),
    "analyze": ("hvp.analysis", "analyze"),
    "critical": ("hvp.critical", None),
    "classify_critical_point": ("hvp.critical", "classify_critical_point"),
    "CriticalPointResult": ("hvp.critical", "CriticalPointResult"),
    "compression": ("hvp.compression", None),
    "landscape": ("hvp.landscape", None),  # a callable module: hvp.landscape(op, ...)
    "influence": ("hvp.influence", None),
}


def __getattr__(name):
    # Integrations import Flax/Orbax/matplotlib: load them on first use so `import hvp` stays light.
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hvp' has no attribute {name!r}")


__all__ = [
    "__version__",
    "tree",
    "CurvatureOperator",
    "LinearOperator",
    "NonFiniteError",
    "empirical_fisher",
    "fisher",
    "from_dense",
    "from_diagonal",
    "from_matvec",
    "ggn",
    "hessian",
    "hvp",
    "losses",
    "DiagonalResult",
    "ConvergenceWarning",
    "SolveResult",
    "solve",
    "inverse",
    "EigshResult",
    "FrobeniusResult",
    "LeafTraces",
    "PowerResult",
    "SpectralDensity",
    "SpectrumSummary",
    "TraceResult",
    "diagonal",
    "eigsh",
    "frobenius_norm",
    "power_iteration",
    "spectral_density",
    "spectrum_summary",
    "trace",
    "wasserstein1",
    "CurvatureMonitor",
    "analyze",
    "flax",
    "monitor",
    "analysis",
    "optim",
    "critical",
    "classify_critical_point",
    "CriticalPointResult",
    "compression",
    "landscape",
    "influence",
]
