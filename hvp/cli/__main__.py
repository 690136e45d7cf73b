"""``python -m hvp.cli``: the ``hvp`` command."""

import sys

from hvp.cli._main import main

if __name__ == "__main__":
    sys.exit(main())
