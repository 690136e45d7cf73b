"""Adapter for Flax NNX modules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from hvp.flax._problem import FlaxProblem, eval_mode_errors, resolve_loss
from hvp.operators import Composed, default_unpack

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


def _structure(state):
    return jax.tree_util.tree_structure(_pure(state))


def _describe(state) -> str:
    """``'bn/mean, bn/var, ...'``: the paths of a state (at most 6 shown)."""
    paths = ["/".join(str(k) for k in path) for path, _ in nnx.to_flat_state(state)]
    return ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")


def from_nnx(
    model,
    loss,
    *,
    train: bool = False,
    unpack: Callable | None = None,
    call_kwargs: Mapping[str, Any] | None = None,
) -> FlaxProblem:
    """Curvature problem of a Flax NNX module: a loss over its ``nnx.Param`` state.

    The module is split with ``nnx.split(model, nnx.Param, ...)``; the
    parameters become a plain nested dict (``nnx.State.to_pure_dict()``, paths
    like ``layers/0/kernel``) and every other variable (``BatchStat``, RNG
    state, custom variables) is held fixed: at its value in ``model`` now, or
    in the module given later to :meth:`~hvp.flax.FlaxProblem.at` (do that
    after training steps: BatchNorm statistics move during training). The
    returned functions merge the state back inside the loss, so they are pure
    and can be traced, differentiated twice and compiled:

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
      unpack: ``batch -> (inputs, targets)`` or ``(inputs, targets, weights)``;
        default :func:`hvp.operators.default_unpack` (``(x, y)`` and
        ``(x, y, weights)`` tuples, common dict keys with an optional
        ``"weights"`` key, language-model batches ``{"inputs": tokens}``).
      call_kwargs: keyword arguments of every call ``model(inputs, **call_kwargs)``,
        for a ``__call__`` with more arguments than the inputs (as Linen's
        ``apply_kwargs``), e.g. ``{"rngs": nnx.Rngs(0)}`` for
        ``__call__(self, x, rngs)`` or ``{"deterministic": True}``. NNX objects
        among them (``nnx.Rngs``, modules) are split and merged like the model:
        each call starts from their state at this call, so random draws are the
        same in every product and the objects are never modified.

    Returns:
      A :class:`~hvp.flax.FlaxProblem`; ``problem.hessian(data)``,
      ``problem.ggn(data)``, ``problem.empirical_fisher(data)`` build operators,
      ``problem.merge(params)`` returns a new module with those parameters,
      ``problem.at(model)`` takes the module's current parameters and state.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``, ``call_kwargs`` not a mapping.
      ValueError: the model has no ``nnx.Param``; (when called) the model in
        training mode needs a device axis (``BatchNorm(axis_name=...)``): use
        ``train=False``.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp, hvp.flax
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.dense = nnx.Linear(3, 2, rngs=rngs)
      ...         self.drop = nnx.Dropout(0.1)
      ...     def __call__(self, x, rngs):
      ...         return self.drop(self.dense(x), rngs=rngs)
      >>> problem = hvp.flax.from_nnx(Net(nnx.Rngs(0)), "mse", call_kwargs={"rngs": nnx.Rngs(1)})
      >>> H = problem.hessian((jnp.ones((4, 3)), jnp.zeros((4, 2))))
      >>> H.shape
      (8, 8)
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
    if call_kwargs is not None and not isinstance(call_kwargs, Mapping):
        raise TypeError(
            "`call_kwargs` must be a dict of keyword arguments for model(inputs, **call_kwargs), "
            f"got {type(call_kwargs).__name__}."
        )
    call_kwargs = dict(call_kwargs or {})
    if not all(isinstance(k, str) for k in call_kwargs):
        raise TypeError(f"`call_kwargs` keys must be argument names, got {list(call_kwargs)}.")
    kw_graph, kw_state = nnx.split(call_kwargs)

    # The user's graph (for merge) and the graph the loss runs (eval view unless train=True).
    user_graph, _, _ = nnx.split(model, nnx.Param, ...)
    run_model = model if train else _eval_view(model)
    graphdef, param_state, rest = nnx.split(run_model, nnx.Param, ...)
    # Snapshots: the split state shares Variable objects with the live model, whose values
    # training (nnx.jit, in-place `[...] =`) replaces; the problem holds the values of now.
    param_state, rest = _fresh(param_state), _fresh(rest)
    params = _pure(param_state)
    if not jax.tree_util.tree_leaves(params):
        raise ValueError(
            "The NNX model has no nnx.Param variables: there is nothing to differentiate."
        )
    rest_structure = _structure(rest)
    fix = "the default `from_nnx(model, loss, train=False)`" if train else "`train=False`"

    def to_state(p):
        state = _fresh(param_state)
        nnx.replace_by_pure_dict(state, p)
        return state

    def split(source, current):
        """(params, state, missing) of a module / nnx.State / parameter dict."""
        if isinstance(source, nnx.Module):
            _, p_state, other = nnx.split(source, nnx.Param, ...)
        elif isinstance(source, nnx.State):
            p_state = nnx.filter_state(source, nnx.Param)
            other = nnx.filter_state(source, nnx.Not(nnx.Param))
            if not jax.tree_util.tree_leaves(other):
                other = None
        else:
            p_state, other = None, None
        new_params = source if p_state is None else _pure(p_state)
        if other is not None and _structure(other) != rest_structure:
            raise ValueError(
                f"The module given has other non-parameter variables ({_describe(other) or 'none'}) "
                f"than the model this problem was built from ({_describe(rest) or 'none'}). "
                "Pass the same model (or build a new problem with hvp.flax.from_nnx)."
            )
        if other is None:
            missing = (
                (f"nnx variables {_describe(current)}",)
                if jax.tree_util.tree_leaves(current)
                else ()
            )
            return new_params, None, missing
        return new_params, _fresh(other), ()

    def build(state) -> FlaxProblem:
        def model_fn(p, inputs):
            module = nnx.merge(graphdef, to_state(p), _fresh(state), copy=True)
            kwargs = nnx.merge(kw_graph, _fresh(kw_state), copy=True)
            with eval_mode_errors(fix):
                return module(inputs, **kwargs)

        # output_loss(model_fn(p, inputs), targets[, weights]); weighted batches pass their weights
        loss_fn = Composed(model_fn, output_loss, unpack, origin="hvp.flax.from_nnx")

        def merge(p):
            return nnx.merge(user_graph, to_state(p), _fresh(state), copy=True)

        return FlaxProblem(
            loss_fn=loss_fn,
            params=params,
            model_fn=model_fn,
            output_loss=output_loss,
            unpack=unpack,
            framework="nnx",
            train=bool(train),
            _merge=merge,
            state=state,
            _rebind=build,
            _split=split,
        )

    return build(rest)
