"""Loss landscapes (a use of the curvature): slices of the data-set loss around the parameters.

``hvp.landscape(op, ...)`` (this module is callable: it runs :func:`landscape`) returns a
:class:`LandscapeResult`; :func:`plot_landscape` draws it (line with the second-order model
overlaid, or contour and surface). See :mod:`hvp.landscape._landscape` for the math.
"""

import sys
import types

from hvp.landscape._landscape import LandscapeResult, filter_normalized, landscape
from hvp.landscape._plot import plot_landscape

__all__ = ["LandscapeResult", "filter_normalized", "landscape", "plot_landscape"]


class _CallableModule(types.ModuleType):
    """``hvp.landscape(...)`` runs :func:`landscape` whether ``hvp.landscape`` is this module or the function."""

    def __call__(self, *args, **kwargs):
        return landscape(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
