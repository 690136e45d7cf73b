"""Critical points (use layer): is the point a local minimum, a saddle, a maximum, or not critical?

:func:`classify_critical_point` applies the second-derivative test to a Hessian operator with
its tolerances stated: the gradient norm over the data set, the extreme eigenvalues with their
residual bounds, and optionally the negative mass of the spectrum.
"""

from hvp.critical._critical import (
    VERDICTS,
    CriticalPointResult,
    classify_critical_point,
    critical_verdict,
)

__all__ = ["VERDICTS", "CriticalPointResult", "classify_critical_point", "critical_verdict"]
