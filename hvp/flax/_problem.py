"""The model-agnostic result of a Flax adapter: a loss on a plain parameter pytree.

:class:`FlaxProblem` is what :func:`hvp.flax.from_nnx` and
:func:`hvp.flax.from_linen` return. It carries everything the curvature
operators of :mod:`hvp.operators` need, as pure functions of a plain nested
dict of parameter arrays, so that nothing downstream knows about Flax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from hvp import operators as _ops
from hvp.operators import losses as _losses

__all__ = ["FlaxProblem", "resolve_loss"]

_LOSS_NAMES = {
    "cross_entropy": _losses.softmax_cross_entropy,
    "softmax_cross_entropy": _losses.softmax_cross_entropy,
    "mse": _losses.mean_squared_error,
    "mean_squared_error": _losses.mean_squared_error,
}


def resolve_loss(loss) -> Callable:
    """Map ``"cross_entropy"`` / ``"mse"`` to :mod:`hvp.losses`; pass callables through.

    Examples:
        >>> import hvp
        >>> hvp.flax.resolve_loss("mse") is hvp.losses.mean_squared_error
        True
    """
    if isinstance(loss, str):
        try:
            return _LOSS_NAMES[loss]
        except KeyError:
            raise ValueError(
                f"Unknown loss {loss!r}. Use one of {sorted(_LOSS_NAMES)} or pass a callable "
                "`loss(outputs, targets) -> scalar` (a mean over the examples)."
            ) from None
    if not callable(loss):
        raise TypeError(
            f"`loss` must be a callable `loss(outputs, targets) -> scalar` or one of "
            f"{sorted(_LOSS_NAMES)}, got {type(loss).__name__}."
        )
    return loss


@dataclasses.dataclass(frozen=True)
class FlaxProblem:
    """A Flax model and a loss, as pure functions of a plain parameter pytree.

    Attributes:
      loss_fn: ``loss_fn(params, batch) -> scalar``, equal to
        ``output_loss(model_fn(params, inputs), targets)`` with
        ``(inputs, targets) = unpack(batch)``.
      params: the model's trainable parameters as a plain nested dict of
        arrays (paths read like ``Dense_0/kernel`` or ``layers/0/kernel``).
      model_fn: ``model_fn(params, inputs) -> outputs`` with every other
        variable (batch statistics, RNG state, ...) held fixed.
      output_loss: ``output_loss(outputs, targets) -> scalar``.
      unpack: ``unpack(batch) -> (inputs, targets)``.
      framework: ``"nnx"`` or ``"linen"``.
      train: whether the model runs in training mode (dropout on, batch
        statistics from the batch); see :func:`hvp.flax.from_nnx`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import hvp
        >>> problem = hvp.flax.from_nnx(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), "mse")
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones((2, 1)))
        >>> float(problem.loss_fn(problem.params, batch)) >= 0.0
        True
        >>> problem.operator("ggn", batch).kind
        'ggn'
    """

    loss_fn: Callable
    params: Any
    model_fn: Callable
    output_loss: Callable
    unpack: Callable
    framework: str
    train: bool
    _merge: Callable = dataclasses.field(repr=False)

    def hessian(self, data, *, params=None, **kwargs) -> _ops.CurvatureOperator:
        """:func:`hvp.hessian` of :attr:`loss_fn` at ``params`` (default :attr:`params`) over ``data``."""
        return _ops.hessian(self.loss_fn, self.params if params is None else params, data, **kwargs)

    def ggn(self, data, *, params=None, **kwargs) -> _ops.CurvatureOperator:
        """:func:`hvp.ggn` of :attr:`model_fn` and :attr:`output_loss` at ``params`` over ``data``."""
        kwargs.setdefault("unpack", self.unpack)
        return _ops.ggn(
            self.model_fn,
            self.output_loss,
            self.params if params is None else params,
            data,
            **kwargs,
        )

    def empirical_fisher(self, data, *, params=None, **kwargs) -> _ops.CurvatureOperator:
        """:func:`hvp.empirical_fisher` of :attr:`loss_fn` at ``params`` over ``data``."""
        return _ops.empirical_fisher(
            self.loss_fn, self.params if params is None else params, data, **kwargs
        )

    def operator(self, kind: str, data, *, params=None, **kwargs) -> _ops.CurvatureOperator:
        """``kind`` in ``{"hessian", "ggn", "empirical_fisher"}``: the matching method."""
        fns = {
            "hessian": self.hessian,
            "ggn": self.ggn,
            "empirical_fisher": self.empirical_fisher,
            "fisher": self.empirical_fisher,
        }
        if kind not in fns:
            raise ValueError(
                f"Unknown operator kind {kind!r}; use 'hessian', 'ggn' or 'empirical_fisher'."
            )
        return fns[kind](data, params=params, **kwargs)

    def merge(self, params):
        """The model with ``params`` put in (the user's model is not changed).

        NNX: a new module (same configuration and non-parameter state as the
        original). Linen: the full ``variables`` dict with ``"params"`` replaced.
        """
        return self._merge(params)
