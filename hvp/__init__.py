"""hvp: Hessian-vector products at scale, and the curvature tools around them, in JAX.

Layers (each imports only from the ones before it):

* :mod:`hvp.tree` - pytree arithmetic, random probes, validation.
* :mod:`hvp.operators` - Hessian / GGN / empirical Fisher operators over data sets.
* :mod:`hvp.linalg` - matrix-free algorithms (Lanczos, SLQ, trace, diagonal).
* integrations - :mod:`hvp.flax`, :mod:`hvp.monitor`, :mod:`hvp.analysis`.
* :mod:`hvp.cli` - the ``hvp`` command.
"""

from hvp import tree
from hvp._version import __version__
from hvp.operators import (
    CurvatureOperator,
    LinearOperator,
    NonFiniteError,
    empirical_fisher,
    from_dense,
    from_matvec,
    ggn,
    hessian,
    hvp,
    losses,
)

__all__ = [
    "__version__",
    "tree",
    "CurvatureOperator",
    "LinearOperator",
    "NonFiniteError",
    "empirical_fisher",
    "from_dense",
    "from_matvec",
    "ggn",
    "hessian",
    "hvp",
    "losses",
]
