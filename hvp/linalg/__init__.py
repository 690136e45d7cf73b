"""Matrix-free algorithms (layer 2).

They take any :class:`hvp.operators.LinearOperator` (or a matvec with an example pytree) and
know nothing of models or data.
"""

# --- eigen: Lanczos / power iteration / spectral density (owned by the eigen work) ---
from hvp.linalg._lanczos import EigshResult, eigsh, zero_floor  # noqa: E402
from hvp.linalg._power import PowerResult, power_iteration  # noqa: E402
from hvp.linalg._slq import SpectralDensity, TraceFnEstimate, spectral_density, wasserstein1  # noqa: E402
from hvp.linalg._summary import SpectrumSummary, definiteness, spectrum_summary  # noqa: E402

__all__ = [
    "eigsh",
    "EigshResult",
    "power_iteration",
    "PowerResult",
    "spectral_density",
    "SpectralDensity",
    "TraceFnEstimate",
    "wasserstein1",
    "spectrum_summary",
    "SpectrumSummary",
    "definiteness",
    "zero_floor",
]
# --- end eigen ---

# --- estimators: trace / diagonal / Frobenius (owned by the estimator work) ---
from hvp.linalg._checks import DtypePolicy  # noqa: E402
from hvp.linalg._diagonal import DiagonalResult, LeafTraces, diagonal  # noqa: E402
from hvp.linalg._frobenius import FrobeniusResult, frobenius_norm  # noqa: E402
from hvp.linalg._trace import TraceResult, trace  # noqa: E402

__all__ += [
    "trace",
    "TraceResult",
    "diagonal",
    "DiagonalResult",
    "LeafTraces",
    "frobenius_norm",
    "FrobeniusResult",
]
# --- end estimators ---
