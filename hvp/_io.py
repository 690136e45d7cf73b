"""Atomic file output shared by every layer that writes files (analysis, monitor, CLI).

A reader of a file written here always sees either the previous complete file or the new
complete one, never a half-written file: the content goes to a temporary file in the same
directory (same file system), is flushed and ``fsync``-ed, and then replaces the target with
:func:`os.replace`, which is atomic on POSIX and Windows. An interruption (``SIGINT``,
``SIGTERM``, an exception) removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "atomic_write_text", "atomic_savefig", "check_writable_dir"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it atomically replaces ``path``.

    Args:
      path: the final file name.
      mode: ``"w"`` (text) or ``"wb"`` (binary); other modes are refused.
      **kwargs: passed to :func:`open` (``newline=``, ``encoding=``).

    Raises:
      ValueError: for a mode other than ``"w"``/``"wb"``.

    Examples:
      >>> import tempfile, os
      >>> from hvp._io import atomic_open
      >>> d = tempfile.mkdtemp()
      >>> with atomic_open(os.path.join(d, "a.txt")) as f:
      ...     _ = f.write("hello")
      >>> open(os.path.join(d, "a.txt")).read()
      'hello'
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600: give it the mode an ordinary open() would (the existing
        # file's mode, else 0666 minus the umask), so a report stays readable by others.
        os.chmod(tmp, _target_mode(path))
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _target_mode(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> None:
    """``fig.savefig`` into a temporary file, then rename it to ``path`` (format from the suffix)."""
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, **kwargs)


def check_writable_dir(path: str | os.PathLike, *, what: str = "output directory") -> Path:
    """Create ``path`` if needed and check that files can be created in it, before heavy work.

    Raises:
      PermissionError: naming the directory, when it cannot be created or written to.
      NotADirectoryError: when ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # An anonymous file (O_TMPFILE on Linux: never a name in the directory), so that a
        # signal arriving during the check cannot leave a probe file behind.
        with tempfile.TemporaryFile(prefix=".hvp-write-check.", dir=path):
            pass
    except OSError as e:
        raise PermissionError(
            f"{what} {str(path)!r} is not writable ({e.strerror or e}); "
            "choose another location or fix its permissions"
        ) from None
    return path
