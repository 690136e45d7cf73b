"""Standard losses on model outputs, with closed-form output-space Hessians.

Each loss is a callable ``loss(outputs, targets) -> scalar`` (a **mean** over
the examples, matching ``reduction="mean"`` of the operators) that also has an
``output_hvp(outputs, targets, u)`` method returning ``H_L u``, the Hessian of
the loss with respect to ``outputs`` applied to ``u``. :func:`hvp.ggn` uses
``output_hvp`` when present instead of differentiating the loss twice.

* Softmax cross-entropy, with ``p = softmax(z)`` for one example:
  ``H_L = (diag(p) - p p^T) / M`` where ``M`` is the number of examples (and
  positions) averaged over. It is positive semi-definite, so the GGN is too.
* Mean squared error ``mean((o - t)^2)`` over all ``M`` entries:
  ``H_L = (2 / M) I``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["softmax_cross_entropy", "mean_squared_error", "SoftmaxCrossEntropy", "MeanSquaredError"]


class SoftmaxCrossEntropy:
    """Mean softmax cross-entropy of logits ``(..., C)`` against labels or probabilities.

    The targets are integer labels ``(...)`` or probability/one-hot targets ``(..., C)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> loss = hvp.losses.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, 2]))
        >>> round(float(loss), 4)  # log 3
        1.0986
    """

    name = "softmax_cross_entropy"

    @staticmethod
    def _probs_targets(logits, targets):
        if targets.shape == logits.shape and jnp.issubdtype(targets.dtype, jnp.floating):
            return targets
        if targets.shape != logits.shape[:-1]:
            raise ValueError(
                f"softmax_cross_entropy: integer labels must have shape {logits.shape[:-1]} (the logits "
                f"{logits.shape} without the class axis), got {targets.shape}."
            )
        return jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)

    def __call__(self, logits, targets):
        t = self._probs_targets(logits, targets)
        logp = jax.nn.log_softmax(logits, axis=-1)
        m = math.prod(logits.shape[:-1])
        return -jnp.sum(t * logp) / m

    def output_hvp(self, logits, targets, u):
        t = self._probs_targets(logits, targets)
        p = jax.nn.softmax(logits, axis=-1)
        mass = jnp.sum(t, axis=-1, keepdims=True)
        m = math.prod(logits.shape[:-1])
        pu = p * u
        return mass * (pu - p * jnp.sum(pu, axis=-1, keepdims=True)) / m

    def __repr__(self):
        return "hvp.losses.softmax_cross_entropy"


class MeanSquaredError:
    """``mean((outputs - targets) ** 2)`` over all entries (PyTorch's ``MSELoss()``).

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> float(hvp.losses.mean_squared_error(jnp.array([1.0, 3.0]), jnp.array([0.0, 1.0])))
        2.5
    """

    name = "mean_squared_error"

    def __call__(self, outputs, targets):
        return jnp.mean((outputs - targets) ** 2)

    def output_hvp(self, outputs, targets, u):  # noqa: ARG002 (the loss interface's signature)
        return (2.0 / outputs.size) * u

    def __repr__(self):
        return "hvp.losses.mean_squared_error"


softmax_cross_entropy = SoftmaxCrossEntropy()
mean_squared_error = MeanSquaredError()
