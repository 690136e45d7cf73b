"""Adapter for Flax Linen modules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import core as flax_core

from hvp.flax._problem import FlaxProblem, eval_mode_errors, resolve_loss
from hvp.operators import Composed, default_unpack

__all__ = ["from_linen"]


def _plain(tree):
    """``FrozenDict`` -> ``dict`` recursively, as new containers.

    A later in-place change of the user's dicts does not reach the problem.
    """
    tree = flax_core.unfreeze(tree) if isinstance(tree, flax_core.FrozenDict) else tree
    return jax.tree_util.tree_map(lambda x: x, tree)


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
    in ``variables``, or in the ``TrainState`` given later to
    :meth:`~hvp.flax.FlaxProblem.at` (do that after training steps: batch
    statistics move during training); collections are never mutable, so
    nothing is updated.

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
      unpack: ``batch -> (inputs, targets)`` or ``(inputs, targets, weights)``;
        default :func:`hvp.operators.default_unpack` (also weighted batches and
        language-model batches ``{"inputs": tokens}``).

    Returns:
      A :class:`~hvp.flax.FlaxProblem` whose ``params`` is the plain nested
      dict ``variables["params"]`` (paths like ``Dense_0/kernel``), whose
      ``merge(params)`` returns the full variables dict with new parameters,
      and whose ``at(train_state)`` takes the current parameters and
      collections of a ``TrainState`` (attributes named like the collections,
      e.g. ``state.batch_stats``) or of a variables dict.

    Raises:
      TypeError: ``module`` is not a Linen module.
      ValueError: ``variables`` has no ``"params"``; ``apply_kwargs`` has
        ``mutable``; (when called) the module runs in training mode: it updates
        a collection, or its ``BatchNorm(axis_name="batch")`` needs a device
        axis (``NameError: unbound axis name``): pass evaluation mode, e.g.
        ``apply_kwargs={"train": False}``.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, hvp.flax
      >>> module = nn.Sequential([nn.Dense(3), nn.BatchNorm(use_running_average=True)])
      >>> x = jnp.ones((4, 2))
      >>> problem = hvp.flax.from_linen(module, module.init(jax.random.key(0), x), "mse")
      >>> sorted(problem.state), problem.hessian((x, jnp.zeros((4, 3)))).shape
      (['batch_stats'], (15, 15))
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
    fix = "e.g. `apply_kwargs={'train': False}` or {'use_running_average': True}"

    def split(source, current):
        """(params, state, missing) of a TrainState / variables dict / params dict."""
        if isinstance(source, Mapping) and "params" in source:
            get = source.get
            new_params = source["params"]
        elif not isinstance(source, Mapping) and hasattr(source, "params"):

            def get(name):
                return getattr(source, name, None)

            new_params = source.params
        else:
            return _plain(source), None, tuple(f"collection {c!r}" for c in current)
        found = {c: get(c) for c in current}
        missing = tuple(f"collection {c!r}" for c, v in found.items() if v is None)
        if len(missing) == len(current):
            return _plain(new_params), None, missing
        state = {c: current[c] if v is None else _plain(v) for c, v in found.items()}
        for c in current:
            if jax.tree_util.tree_structure(state[c]) != jax.tree_util.tree_structure(current[c]):
                raise ValueError(
                    f"Collection {c!r} given has another structure than in the variables this "
                    "problem was built from; pass the same model's state (or build a new problem "
                    "with hvp.flax.from_linen)."
                )
        return _plain(new_params), state, missing

    def build(state) -> FlaxProblem:
        def model_fn(p, inputs):
            with eval_mode_errors(fix):
                return module.apply({**state, "params": p}, inputs, **apply_kwargs)

        # output_loss(model_fn(p, inputs), targets[, weights]); weighted batches pass their weights
        loss_fn = Composed(model_fn, output_loss, unpack, origin="hvp.flax.from_linen")

        def merge(p):
            return {**state, "params": p}

        return FlaxProblem(
            loss_fn=loss_fn,
            params=params,
            model_fn=model_fn,
            output_loss=output_loss,
            unpack=unpack,
            framework="linen",
            train=False,
            _merge=merge,
            state=state,
            _rebind=build,
            _split=split,
        )

    return build(rest)
