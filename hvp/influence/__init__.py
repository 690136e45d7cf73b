"""Influence functions (a use of the curvature): which training examples drove a prediction.

``hvp.influence(op, test, train, ...)`` (this module is callable: it runs :func:`influence`)
returns an :class:`InfluenceResult` of pairwise scores; :func:`self_influence` the
self-influence of training examples; :func:`per_example_grads` the per-example gradients. See
:mod:`hvp.influence._influence` for the math, the methods and the references.
"""

import sys
import types

from hvp.influence._influence import (
    InfluenceResult,
    influence,
    per_example_grads,
    self_influence,
)

__all__ = ["InfluenceResult", "influence", "per_example_grads", "self_influence"]


class _CallableModule(types.ModuleType):
    """``hvp.influence(...)`` runs :func:`influence`."""

    def __call__(self, *args, **kwargs):
        return influence(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
