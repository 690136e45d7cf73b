"""Flax integration: curvature of NNX and Linen models.

* :func:`from_nnx` / :func:`from_linen` turn a model and a loss on its
  outputs into a :class:`FlaxProblem`: a loss over a plain parameter pytree,
  a model function, and ``hessian`` / ``ggn`` / ``empirical_fisher`` methods;
  ``problem.at(model_or_train_state)`` takes the current parameters *and*
  non-parameter state (BatchNorm statistics, ...) after training steps.

Per-layer breakdowns work on any parameter pytree and live outside this module:
:func:`hvp.tree.group_by_layer`, :func:`hvp.tree.layer_norms`, :func:`hvp.tree.layer_labels`
and :func:`hvp.linalg.layer_trace`.

See ``docs/flax.md``.
"""

from hvp.flax._linen import from_linen
from hvp.flax._nnx import from_nnx, nnx_params
from hvp.flax._problem import FlaxProblem, StaleStateWarning, resolve_loss

__all__ = [
    "FlaxProblem",
    "StaleStateWarning",
    "from_linen",
    "from_nnx",
    "nnx_params",
    "resolve_loss",
]
