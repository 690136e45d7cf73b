"""Tree utilities: pytree arithmetic, random probes and validation (layer 0).

Every other layer reuses these helpers; see :mod:`hvp.tree._tree` for details.
"""

from hvp.tree._results import result, to_jsonable  # noqa: E402,F401
from hvp.tree._tree import *  # noqa: F401,F403
from hvp.tree._tree import __all__  # noqa: F401
