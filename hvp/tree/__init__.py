"""Tree utilities: pytree arithmetic, random probes, validation and layers (layer 0).

Every other layer reuses these helpers; see :mod:`hvp.tree._tree` for the arithmetic and
:mod:`hvp.tree._layers` for grouping parameter leaves into layers by module path
(:func:`layer_of`, :func:`group_by_layer`, :func:`layer_norms`, :func:`layer_labels`).
"""

from hvp.tree._layers import *  # noqa: F401,F403
from hvp.tree._layers import __all__ as _layers_all
from hvp.tree._results import result, to_jsonable  # noqa: F401
from hvp.tree._tree import *  # noqa: F401,F403
from hvp.tree._tree import __all__ as _tree_all

__all__ = [*_tree_all, *_layers_all]
