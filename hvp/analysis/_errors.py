"""The error type of :mod:`hvp.analysis`: a user-facing problem with the inputs."""

from __future__ import annotations

import numpy as np

__all__ = ["AnalysisError", "AnalysisTypeError", "StructureMismatchError"]


class AnalysisError(ValueError):
    """A problem with the inputs of an analysis (checkpoint, model spec, data spec, settings).

    The message says what is wrong and how to fix it; the ``hvp`` command prints
    it on one line (without a traceback unless ``--debug``) and exits with
    status 1.

    Examples:
        >>> import hvp
        >>> try:
        ...     hvp.analysis.load_model("no_such_module_xyz:factory")
        ... except hvp.analysis.AnalysisError as e:
        ...     print(type(e).__name__, isinstance(e, ValueError))
        AnalysisError True
    """


class StructureMismatchError(AnalysisError):
    """The checkpoint's arrays do not match the model's variables.

    Attributes:
      missing: paths the model needs that the checkpoint lacks.
      unexpected: paths in the checkpoint that the model does not have.
      mismatched: ``(path, checkpoint_shape, model_shape)`` for arrays of the wrong shape.

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import flax.linen as nn
        >>> import orbax.checkpoint as ocp
        >>> import hvp
        >>> def tiny():  # a model factory: ((Linen module, variables), loss)
        ...     net = nn.Dense(2)
        ...     return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse"
        >>> ckpt = os.path.join(tempfile.mkdtemp(), "ckpt")
        >>> checkpointer = ocp.StandardCheckpointer()
        >>> checkpointer.save(ckpt, tiny()[0][1])
        >>> checkpointer.wait_until_finished(); checkpointer.close()
        >>> wide = lambda: ((nn.Dense(5), nn.Dense(5).init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse")
        >>> try:
        ...     hvp.analysis.restore_into(hvp.analysis.load_model(wide), hvp.analysis.read_checkpoint(ckpt))
        ... except hvp.analysis.StructureMismatchError as e:
        ...     print(e.mismatched)
        [('params/bias', (2,), (5,)), ('params/kernel', (3, 2), (3, 5))]
    """

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class AnalysisTypeError(AnalysisError, TypeError):
    """A setting of the wrong type (e.g. ``k=2.5``): a :class:`TypeError`, as in :mod:`hvp.linalg`.

    Also an :class:`AnalysisError`, so that the ``hvp`` command prints it on one line; a value of
    the right type out of range is a plain :class:`AnalysisError` (a :class:`ValueError`).

    Examples:
        >>> import hvp
        >>> try:
        ...     hvp.analysis.AnalysisSettings(k=2.5)
        ... except TypeError as e:
        ...     print(type(e).__name__, isinstance(e, hvp.analysis.AnalysisError))
        AnalysisTypeError True
    """


#: ``hvp analyze`` flag of each setting (error messages name both, and the reproducing command).
FLAGS = {
    "data": "--data",
    "operator": "--operator",
    "k": "-k",
    "num_probes": "--probes",
    "num_iters": "--iters",
    "eig_iters": "--eig-iters",
    "tol": "--tol",
    "trace_method": "--trace-method",
    "trace_matvecs": "--trace-matvecs",
    "layer_matvecs": "--layer-matvecs",
    "batch_size": "--batch-size",
    "num_batches": "--num-batches",
    "seed": "--seed",
    "x64": "--x64",
    "chunk_size": "--chunk-size",
    "step": "--step",
    "item": "--item",
    "layer_view": "--layers",
    "top_layers": "--top-layers",
    "compression": "--compression",
    "landscape": "--landscape",
    "influence": "--influence",
    "influence_test": "--influence-test",
    "influence_num_test": "--influence-num-test",
    "influence_top": "--influence-top",
    "influence_method": "--influence-method",
    "influence_rank": "--influence-rank",
    "influence_damping": "--influence-damping",
}


def setting_int(
    name: str, value, minimum: int, *, optional: bool = False, flag: str | None = None
) -> int | None:
    """``value`` as an int ``>= minimum`` (``None`` passes with ``optional``), else an error naming it.

    The exception types of :func:`hvp.linalg._checks.check_int` (``TypeError`` for a wrong type,
    ``ValueError`` for a value out of range), as analysis errors naming the setting and its flag.
    """
    if value is None and optional:
        return None
    what = f"`{name}` ({flag or FLAGS[name]})"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise AnalysisTypeError(
            f"{what} must be an integer >= {minimum}, got {type(value).__name__} ({value!r})."
        )
    if value < minimum:
        raise AnalysisError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return int(value)
