"""The error type of :mod:`hvp.analysis`: a user-facing problem with the inputs."""

from __future__ import annotations

__all__ = ["AnalysisError", "StructureMismatchError"]


class AnalysisError(ValueError):
    """A problem with the inputs of an analysis (checkpoint, model spec, data spec, settings).

    The message says what is wrong and how to fix it; the ``hvp`` command prints
    it on one line (without a traceback unless ``--debug``) and exits with
    status 1.
    """


class StructureMismatchError(AnalysisError):
    """The checkpoint's arrays do not match the model's variables.

    Attributes:
      missing: paths the model needs that the checkpoint lacks.
      unexpected: paths in the checkpoint that the model does not have.
      mismatched: ``(path, checkpoint_shape, model_shape)`` for arrays of the wrong shape.
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
