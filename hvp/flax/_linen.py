"""Adapter for Flax Linen modules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import core as flax_core
from flax import errors as flax_errors

from hvp.flax._problem import FlaxProblem, resolve_loss
from hvp.operators import default_unpack

__all__ = ["from_linen"]


def _plain(tree):
    """``FrozenDict`` -> ``dict`` recursively (plain dicts pass through)."""
    return flax_core.unfreeze(tree) if isinstance(tree, flax_core.FrozenDict) else tree


def from_linen(
    module,
    variables,
    loss,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    unpack: Callable | None = None,
) -> FlaxProblem:
    """Curvature problem of a Flax Linen module over ``variables["params"]``.

    The model function is

    .. math:: f_\\theta(x) = \\texttt{module.apply}(\\{\\texttt{"params"}: \\theta, \\dots\\}, x, **\\texttt{apply\\_kwargs})

    with every other collection (``batch_stats``, ...) held fixed at its value
    in ``variables``; collections are never mutable, so nothing is updated.

    Args:
      module: a ``flax.linen.Module``.
      variables: its variables, e.g. ``module.init(key, x)`` or
        ``{"params": state.params, "batch_stats": state.batch_stats}`` of a
        ``TrainState``. Must contain ``"params"``.
      loss: ``loss(outputs, targets) -> scalar`` (a mean over the examples), or
        ``"cross_entropy"`` / ``"mse"`` (see :func:`hvp.flax.from_nnx`).
      apply_kwargs: keyword arguments for ``module.apply``, e.g.
        ``{"train": False}`` or ``{"deterministic": True}`` (evaluation mode is
        the caller's choice in Linen: pass it here). ``rngs=`` may be given for
        stochastic layers (then every product uses the same random draw).
        ``mutable`` is refused.
      unpack: ``batch -> (inputs, targets)``; default
        :func:`hvp.operators.default_unpack`.

    Returns:
      A :class:`~hvp.flax.FlaxProblem` whose ``params`` is the plain nested
      dict ``variables["params"]`` (paths like ``Dense_0/kernel``) and whose
      ``merge(params)`` returns the full variables dict with new parameters.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> import hvp
        >>> module = nn.Dense(1)
        >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
        >>> variables = module.init(jax.random.PRNGKey(0), x)
        >>> problem = hvp.flax.from_linen(module, variables, "mse")
        >>> G = problem.ggn((x, jnp.ones((2, 1))))
        >>> G.shape, problem.framework
        ((3, 3), 'linen')
    """
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"from_linen expects a flax.linen.Module, got {type(module).__name__}. For NNX "
            "modules use hvp.flax.from_nnx(model, loss)."
        )
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = f" (keys {sorted(variables)})" if isinstance(variables, Mapping) else ""
        raise ValueError(
            f"`variables` must be a dict with a 'params' collection{keys}, e.g. `module.init(key, x)` "
            "or `{'params': state.params, 'batch_stats': state.batch_stats}`."
        )
    apply_kwargs = dict(apply_kwargs or {})
    if "mutable" in apply_kwargs:
        raise ValueError(
            "`apply_kwargs` must not contain 'mutable': the curvature is taken with every "
            "non-parameter collection fixed. Use evaluation mode (e.g. {'train': False})."
        )
    output_loss = resolve_loss(loss)
    unpack = default_unpack if unpack is None else unpack
    if not callable(unpack):
        raise TypeError(
            f"`unpack` must be a callable batch -> (inputs, targets), got {type(unpack).__name__}."
        )

    params = _plain(variables["params"])
    rest = {k: _plain(v) for k, v in variables.items() if k != "params"}
    if not jax.tree_util.tree_leaves(params):
        raise ValueError("variables['params'] has no arrays: there is nothing to differentiate.")

    def model_fn(p, inputs):
        try:
            return module.apply({**rest, "params": p}, inputs, **apply_kwargs)
        except flax_errors.ModifyScopeVariableError as err:
            raise ValueError(
                f"The module tried to update a variable collection ({err}). hvp never makes collections "
                "mutable; run the module in evaluation mode through `apply_kwargs`, e.g. "
                "{'train': False} or {'use_running_average': True}."
            ) from None

    def loss_fn(p, batch):
        inputs, targets = unpack(batch)
        return output_loss(model_fn(p, inputs), targets)

    def merge(p):
        return {**rest, "params": p}

    return FlaxProblem(
        loss_fn=loss_fn,
        params=params,
        model_fn=model_fn,
        output_loss=output_loss,
        unpack=unpack,
        framework="linen",
        train=False,
        _merge=merge,
    )
