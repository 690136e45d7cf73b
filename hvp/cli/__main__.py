"""``python -m hvp.cli``: the ``hvp`` command."""

import sys

from hvp.cli._main import main

sys.exit(main())
