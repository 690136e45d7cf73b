"""Flax integration: curvature of NNX and Linen models, and per-layer breakdowns.

* :func:`from_nnx` / :func:`from_linen` turn a model and a loss on its
  outputs into a :class:`FlaxProblem`: a loss over a plain parameter pytree,
  a model function, and ``hessian`` / ``ggn`` / ``empirical_fisher`` methods;
  ``problem.at(model_or_train_state)`` takes the current parameters *and*
  non-parameter state (BatchNorm statistics, ...) after training steps.
* :func:`group_by_layer`, :func:`layer_norms`, :func:`layer_trace` break
  curvature down by layer (model-agnostic, from parameter paths);
  :func:`layer_labels` gives deep models' layers short unique labels and blocks.

See ``docs/flax.md``.
"""

from hvp.flax._layers import (
    LayerLabels,
    LayerTrace,
    group_by_layer,
    layer_labels,
    layer_norms,
    layer_of,
    layer_trace,
)
from hvp.flax._linen import from_linen
from hvp.flax._nnx import from_nnx, nnx_params
from hvp.flax._problem import FlaxProblem, StaleStateWarning, resolve_loss

__all__ = [
    "FlaxProblem",
    "LayerLabels",
    "LayerTrace",
    "StaleStateWarning",
    "from_linen",
    "from_nnx",
    "group_by_layer",
    "layer_labels",
    "layer_norms",
    "layer_of",
    "layer_trace",
    "nnx_params",
    "resolve_loss",
]
