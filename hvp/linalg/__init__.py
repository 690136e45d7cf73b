"""Matrix-free algorithms (layer 2).

They take any :class:`hvp.operators.LinearOperator` (or a matvec with an example pytree) and
know nothing of models or data.
"""

from hvp.linalg._checks import ConvergenceWarning, DtypePolicy
from hvp.linalg._condition import condition_estimate
from hvp.linalg._diagonal import DiagonalResult, LeafTraces, diagonal
from hvp.linalg._driver import Checkpoint, CheckpointMismatchError, Progress
from hvp.linalg._frobenius import FrobeniusResult, frobenius_norm
from hvp.linalg._lanczos import EigshResult, eigsh, zero_floor
from hvp.linalg._layers import LayerTrace, layer_trace
from hvp.linalg._lean import LeanEigshResult
from hvp.linalg._power import PowerResult, power_iteration
from hvp.linalg._precond import Preconditioner
from hvp.linalg._slq import (
    SpectralDensity,
    SpectralMassEstimate,
    TraceFnEstimate,
    spectral_density,
    wasserstein1,
)
from hvp.linalg._solve import (
    SOLVE_METHODS,
    ConvergenceError,
    InverseOperator,
    SolveResult,
    inverse,
    resolve_solve_method,
    solve,
)
from hvp.linalg._solvers import default_rtol
from hvp.linalg._summary import SpectrumSummary, definiteness, spectrum_summary
from hvp.linalg._trace import TRACE_METHODS, TraceResult, resolve_trace_method, trace

__all__ = [
    # eigenvalues and spectra
    "eigsh",
    "EigshResult",
    "LeanEigshResult",
    "power_iteration",
    "PowerResult",
    "spectral_density",
    "SpectralDensity",
    "SpectralMassEstimate",
    "TraceFnEstimate",
    "wasserstein1",
    "spectrum_summary",
    "SpectrumSummary",
    "definiteness",
    "condition_estimate",
    "zero_floor",
    # estimators
    "trace",
    "TraceResult",
    "TRACE_METHODS",
    "resolve_trace_method",
    "diagonal",
    "DiagonalResult",
    "LeafTraces",
    "layer_trace",
    "LayerTrace",
    "frobenius_norm",
    "FrobeniusResult",
    # damped solves
    "solve",
    "SolveResult",
    "SOLVE_METHODS",
    "resolve_solve_method",
    "default_rtol",
    "Preconditioner",
    "inverse",
    "InverseOperator",
    "ConvergenceError",
    # non-convergence outside jit
    "ConvergenceWarning",
    # the precision policy of every result
    "DtypePolicy",
    # drivers: progress, checkpoints and resume
    "Checkpoint",
    "CheckpointMismatchError",
    "Progress",
]
