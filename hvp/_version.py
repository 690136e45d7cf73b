"""The version of the code that is running, derived from git tags by setuptools-scm.

``vX.Y.Z`` tags give ``X.Y.Z``; commits after a tag give ``X.Y.(Z+1).devN+g<hash>``; a clone
without tags gives ``0.1.devN+g<hash>``, and a source tree without git metadata the fallback
version of pyproject.toml.

The installed distribution's version (``importlib.metadata``) is used only when that
distribution is the code actually imported: its files (a regular install) or its source directory
(an editable install) hold this module. Code imported from elsewhere (another checkout on
``PYTHONPATH``, a git worktree) reports the version of its own source tree, found by
setuptools-scm when it is installed, else ``0.0.0+unknown``: a report then never names the version
of a different checkout.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

_DIST = "hvp-jax"
_UNKNOWN = "0.0.0+unknown"


def _provides(dist, package_dir: Path) -> bool:
    """Whether the distribution ``dist`` is the one whose ``hvp`` package lives in ``package_dir``."""
    try:
        url = json.loads(dist.read_text("direct_url.json") or "{}")
    except (OSError, ValueError):
        url = {}
    if url.get("dir_info", {}).get("editable") and str(url.get("url", "")).startswith("file://"):
        source = Path(url["url"][len("file://") :])
        return _same(source / package_dir.name, package_dir)
    try:
        return _same(Path(dist.locate_file(f"{package_dir.name}/__init__.py")).parent, package_dir)
    except Exception:  # noqa: BLE001 - a distribution without files: not provably ours
        return False


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:  # pragma: no cover - unresolvable paths
        return False


def _source_version(root: Path) -> str:
    """The setuptools-scm version of the source tree ``root`` (``0.0.0+unknown`` without it)."""
    if not (root / "pyproject.toml").is_file():
        return _UNKNOWN
    try:
        import tomllib

        import setuptools_scm

        config = tomllib.loads((root / "pyproject.toml").read_text())
        fallback = config["tool"]["setuptools_scm"].get("fallback_version", _UNKNOWN)
        return setuptools_scm.get_version(root=str(root), fallback_version=fallback)
    except Exception:  # noqa: BLE001 - setuptools-scm missing, no git: unknown
        return _UNKNOWN


def running_version(package_dir: Path | None = None, dist=None) -> str:
    """The version of the ``hvp`` package in ``package_dir`` (default: the one running).

    ``dist`` is the installed distribution to compare with (default: ``hvp-jax``'s, if any).
    """
    package_dir = Path(__file__).parent if package_dir is None else Path(package_dir)
    if dist is None:
        try:
            dist = distribution(_DIST)
        except PackageNotFoundError:
            dist = None
    if dist is not None and _provides(dist, package_dir):
        return dist.version
    return _source_version(package_dir.parent)


__version__ = running_version()
