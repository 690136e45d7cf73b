"""SIGINT / SIGTERM during an analysis: recorded, answered at once, never half-writing a file.

Python's default SIGINT handler raises :class:`KeyboardInterrupt` wherever the main thread happens
to be, and only when it runs Python code: not during a long XLA compilation or computation, and
inside a garbage-collection callback (JAX's ``_xla_gc_callback``) or a ``__del__`` the exception
is printed as "Exception ignored in ..." and swallowed, so the run carries on to the end. Here:

* :func:`handle_signals` installs handlers that *record* the signal (:func:`pending`) and raise
  :class:`Interrupted` (a ``KeyboardInterrupt``);
* :func:`call` runs the work in a worker thread while the main thread waits in short, interruptible
  joins, so a signal is answered within a fraction of a second even while XLA runs, and a swallowed
  one is raised again from the record;
* the outputs are written inside :func:`deferred`: :func:`call` waits for a write in progress to
  finish, and the worker does not start one once a signal is recorded, so every file is either
  the previous complete one or the new complete one (the files are written atomically too);
* :func:`check` raises a recorded signal at a safe point of the worker (between stages).

The ``hvp`` command then ends the process with exit status 130 (SIGINT) or 143 (SIGTERM), the
shell's ``128 + signal number``, without waiting for the worker (see :mod:`hvp.cli._main`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

__all__ = [
    "Interrupted",
    "handle_signals",
    "check",
    "deferred",
    "pending",
    "finish",
    "exit_status",
    "call",
]

_SIGNALS = ("SIGINT", "SIGTERM")
_pending: int | None = None
_deferred = 0
_finished = False
_writing = threading.Lock()  # held by the worker while it writes outputs


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM received during an analysis.

    Attributes:
      signum: the signal number.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def exit_status(signum: int) -> int:
    """The exit status of a process ended by ``signum`` (``128 + signum``: 130 for SIGINT).

    Example:
      >>> import signal
      >>> from hvp.analysis._interrupt import exit_status
      >>> exit_status(signal.SIGINT), exit_status(signal.SIGTERM)
      (130, 143)
    """
    return 128 + int(signum)


def pending() -> int | None:
    """The number of the signal received inside :func:`handle_signals` (``None`` if none)."""
    return _pending


def _handler(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
    global _pending
    if _pending is None:
        _pending = int(signum)
    if _deferred == 0 and not _finished:
        raise Interrupted(signum)


def finish() -> None:
    """From now on signals are only recorded (the run is ending: its clean-up must not be cut)."""
    global _finished
    _finished = True


def check() -> None:
    """Raise :class:`Interrupted` if a signal was received (a safe point of a long run).

    Example:
      >>> from hvp.analysis._interrupt import check
      >>> check()  # nothing received: returns
    """
    if _pending is not None and _deferred == 0:
        raise Interrupted(_pending)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside the block a signal is only recorded; it is raised when the block ends.

    Used around the writing of the outputs so that an interrupt leaves a complete set of files.

    Example:
      >>> from hvp.analysis._interrupt import deferred
      >>> with deferred():
      ...     pass
    """
    global _deferred
    with _writing:
        check()  # interrupted before the write began: write nothing
        _deferred += 1
        try:
            yield
        finally:
            _deferred -= 1
    check()


def call(fn, *, wait: bool = True):
    """Run ``fn()`` in a worker thread while the main thread waits, answering signals at once.

    Returns ``fn()``'s value or raises its exception. Inside :func:`handle_signals`, a signal
    raises :class:`Interrupted` here as soon as no output is being written (a write in progress
    is finished first; none starts afterwards). With ``wait`` the worker is then also left to
    reach its next safe point (:func:`check`) and end; without it the worker may still be
    running (the ``hvp`` command then ends the process).

    Example:
      >>> from hvp.analysis._interrupt import call
      >>> call(lambda: 6 * 7)
      42
    """
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the main thread
            out["error"] = e

    worker = threading.Thread(target=target, name="hvp-worker", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)  # interruptible: the signal handler runs here
            if _pending is not None and not _finished:
                raise Interrupted(_pending)  # a signal whose exception was swallowed
    except KeyboardInterrupt as e:
        finish()  # further signals are only recorded
        signum = getattr(e, "signum", None) or _pending or signal.SIGINT
        with _writing:  # let a write in progress complete; none starts after this
            pass
        if wait:
            worker.join()
        raise Interrupted(signum) from None
    if "error" in out:
        raise out["error"]
    return out.get("value")


@contextlib.contextmanager
def handle_signals(*, restore: bool = True) -> Iterator[None]:
    """Record SIGINT and SIGTERM and raise :class:`Interrupted` for them (see the module docstring).

    With ``restore`` the previous handlers are restored when the block ends; without it the
    handlers stay (they only record signals after :func:`finish`), for a program that ends the
    process itself and must not meet a default handler on its way out. Outside the main thread
    (where Python cannot install handlers) the block does nothing.

    Example:
      >>> from hvp.analysis._interrupt import handle_signals, pending
      >>> with handle_signals():
      ...     pending() is None
      True
    """
    global _pending, _finished
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [getattr(signal, name) for name in _SIGNALS if hasattr(signal, name)]
    previous = {s: signal.getsignal(s) for s in sigs}
    _pending, _finished = None, False
    old_hook = sys.unraisablehook

    def hook(unraisable):
        # An interrupt raised inside a gc callback or __del__ is "ignored" by Python: it stays
        # recorded and check() raises it again, so the "Exception ignored in ..." note is noise.
        if not isinstance(unraisable.exc_value, Interrupted):
            old_hook(unraisable)

    sys.unraisablehook = hook
    for s in sigs:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        if restore:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            sys.unraisablehook = old_hook
            # The signal has been answered (or there was none): a later analysis in the same
            # process (a notebook after Ctrl-C, the next test) must not see it again.
            _pending, _finished = None, False
        else:
            finish()
