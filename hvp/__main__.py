"""``python -m hvp``: the ``hvp`` command (the same as the console script)."""

import sys

from hvp.cli import main

if __name__ == "__main__":
    sys.exit(main())
