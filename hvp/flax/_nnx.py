"""Adapter for Flax NNX modules."""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from hvp.flax._problem import FlaxProblem, resolve_loss
from hvp.operators import default_unpack

__all__ = ["from_nnx", "nnx_params"]


def _eval_view(model):
    """A copy of ``model`` in evaluation mode (dropout off, BatchNorm on running averages).

    Uses ``nnx.view`` when available (shares the arrays, new static attributes),
    otherwise ``nnx.clone`` + ``eval()``. The user's model is not modified.
    """
    if hasattr(nnx, "view"):
        return nnx.view(
            model, deterministic=True, use_running_average=True, raise_if_not_found=False
        )
    copy = nnx.clone(model)  # pragma: no cover - older flax
    copy.eval()  # pragma: no cover
    return copy  # pragma: no cover


def _fresh(state):
    """A copy of an ``nnx.State`` with new Variable objects (safe to mutate inside a trace)."""
    return jax.tree_util.tree_map(lambda x: x, state)


def _pure(state):
    """``nnx.State`` -> plain nested dict of arrays."""
    if hasattr(nnx, "to_pure_dict"):
        return nnx.to_pure_dict(state)
    return state.to_pure_dict()  # pragma: no cover - older flax


def nnx_params(model_or_state):
    """The ``nnx.Param`` variables of an NNX module (or an ``nnx.State``) as a plain nested dict.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import hvp
        >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        >>> params = hvp.flax.nnx_params(model)
        >>> sorted(params), params["kernel"].shape
        (['bias', 'kernel'], (2, 1))
    """
    if isinstance(model_or_state, nnx.Module):
        return _pure(nnx.state(model_or_state, nnx.Param))
    if isinstance(model_or_state, nnx.State):
        return _pure(model_or_state)
    raise TypeError(f"Expected an nnx.Module or nnx.State, got {type(model_or_state).__name__}.")


def from_nnx(model, loss, *, train: bool = False, unpack: Callable | None = None) -> FlaxProblem:
    """Curvature problem of a Flax NNX module: a loss over its ``nnx.Param`` state.

    The module is split with ``nnx.split(model, nnx.Param, ...)``; the
    parameters become a plain nested dict (``nnx.State.to_pure_dict()``, paths
    like ``layers/0/kernel``) and every other variable (``BatchStat``, RNG
    state, custom variables) is held fixed at its current value. The returned
    functions merge the state back inside the loss, so they are pure and can
    be traced, differentiated twice and compiled:

    .. math::

       \\ell(\\theta, B) = \\mathrm{loss}(f_\\theta(x_B), y_B), \\qquad
       (x_B, y_B) = \\mathrm{unpack}(B).

    Args:
      model: an ``nnx.Module``. It is never modified: products do not update
        batch statistics, RNG counters or parameters.
      loss: ``loss(outputs, targets) -> scalar`` (a mean over the examples), or
        ``"cross_entropy"`` / ``"mse"`` for :data:`hvp.losses.softmax_cross_entropy`
        / :data:`hvp.losses.mean_squared_error` (closed-form output Hessians used
        by :func:`hvp.ggn`).
      train: ``False`` (default): evaluation mode on a view of the model
        (``deterministic=True``, ``use_running_average=True``: dropout off,
        BatchNorm with running statistics), the curvature of the model you
        evaluate. ``True``: the model as it is (training mode). Dropout then
        draws its mask from the RNG state frozen at this call, so every product
        uses the same mask and the operator is still one fixed symmetric
        matrix; BatchNorm normalises with the statistics of each batch, so the
        operator of a list of batches is an average of per-batch operators, not
        the curvature of a data-set loss. Running statistics are NOT updated.
      unpack: ``batch -> (inputs, targets)``; default
        :func:`hvp.operators.default_unpack` (``(x, y)`` tuples, common dict keys).

    Returns:
      A :class:`~hvp.flax.FlaxProblem`; ``problem.hessian(data)``,
      ``problem.ggn(data)``, ``problem.empirical_fisher(data)`` build operators,
      ``problem.merge(params)`` returns a new module with those parameters.

    Example::

      problem = hvp.flax.from_nnx(model, "cross_entropy")
      top = hvp.eigsh(problem.hessian((x, y)), k=5, key=jax.random.key(0))

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import hvp
        >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        >>> problem = hvp.flax.from_nnx(model, "mse")
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones((2, 1)))
        >>> H = problem.hessian(batch)  # the loss is quadratic: H = G
        >>> H.shape, hvp.tree.leaf_paths(problem.params)
        ((3, 3), ['bias', 'kernel'])
    """
    if not isinstance(model, nnx.Module):
        hint = ""
        if isinstance(model, nnx.State):
            hint = " To get parameters from a state use `hvp.flax.nnx_params(state)`."
        raise TypeError(
            f"from_nnx expects an nnx.Module, got {type(model).__name__}.{hint} For Linen "
            "modules use hvp.flax.from_linen(module, variables, loss)."
        )
    output_loss = resolve_loss(loss)
    unpack = default_unpack if unpack is None else unpack
    if not callable(unpack):
        raise TypeError(
            f"`unpack` must be a callable batch -> (inputs, targets), got {type(unpack).__name__}."
        )

    # The user's graph (for merge) and the graph the loss runs (eval view unless train=True).
    user_graph, _, _ = nnx.split(model, nnx.Param, ...)
    run_model = model if train else _eval_view(model)
    graphdef, param_state, rest = nnx.split(run_model, nnx.Param, ...)
    params = _pure(param_state)
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(
            "The NNX model has no nnx.Param variables: there is nothing to differentiate."
        )

    def to_state(p):
        state = _fresh(param_state)
        nnx.replace_by_pure_dict(state, p)
        return state

    def model_fn(p, inputs):
        module = nnx.merge(graphdef, to_state(p), _fresh(rest), copy=True)
        return module(inputs)

    def loss_fn(p, batch):
        inputs, targets = unpack(batch)
        return output_loss(model_fn(p, inputs), targets)

    def merge(p):
        return nnx.merge(user_graph, to_state(p), _fresh(rest), copy=True)

    return FlaxProblem(
        loss_fn=loss_fn,
        params=params,
        model_fn=model_fn,
        output_loss=output_loss,
        unpack=unpack,
        framework="nnx",
        train=bool(train),
        _merge=merge,
    )
