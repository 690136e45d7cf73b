"""The ``hvp`` command line (top layer)."""

from hvp.cli._main import main

__all__ = ["main"]
