"""The package version, derived from git tags by setuptools-scm when the package is installed.

``vX.Y.Z`` tags give ``X.Y.Z``; commits after a tag give ``X.Y.(Z+1).devN+g<hash>``; a clone
without tags gives ``0.1.devN+g<hash>``, and a source tree without git metadata the fallback
version of pyproject.toml. An editable install reads the version recorded at install time; a
source tree that was never installed reports ``0.0.0+unknown``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hvp-jax")
except PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0.0.0+unknown"
