"""The model-agnostic result of a Flax adapter: a loss on a plain parameter pytree.

:class:`FlaxProblem` is what :func:`hvp.flax.from_nnx` and
:func:`hvp.flax.from_linen` return. It carries everything the curvature
operators of :mod:`hvp.operators` need, as pure functions of a plain nested
dict of parameter arrays, so that nothing downstream knows about Flax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import errors as flax_errors

from hvp import operators as _ops
from hvp.operators import losses as _losses

__all__ = ["FlaxProblem", "StaleStateWarning", "resolve_loss"]


class StaleStateWarning(UserWarning):
    """Only parameters were given for a model that also reads non-parameter state.

    The curvature then uses the state (BatchNorm statistics, ...) held by the
    problem, which may be older than the parameters.

    Examples:
      >>> import warnings, hvp.flax
      >>> from flax import nnx
      >>> model = nnx.BatchNorm(2, rngs=nnx.Rngs(0))  # running mean and variance
      >>> problem = hvp.flax.from_nnx(model, "mse")
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     _ = problem.at(hvp.flax.nnx_params(model))  # parameters only
      >>> caught[0].category.__name__
      'StaleStateWarning'
    """


@contextlib.contextmanager
def eval_mode_errors(fix: str):
    """Turn the errors of a model run in training mode into one clear ``ValueError``.

    Two errors mean that the model runs in training mode although the curvature
    is taken with every non-parameter collection fixed:

    * ``NameError: Found an unbound axis name: batch``: a BatchNorm with
      ``axis_name=`` (as in the Flax ImageNet example) averages its batch
      statistics across devices, which only works inside ``pmap``/``shard_map``;
    * ``ModifyScopeVariableError``: a Linen module tries to update ``batch_stats``.

    ``fix`` says how to choose evaluation mode for the adapter in use.
    """
    try:
        yield
    except NameError as err:
        if "unbound axis name" not in str(err):
            raise
        raise ValueError(
            f"The model ran a collective over an unbound axis ({err}): a layer such as "
            "BatchNorm(axis_name=...) computes batch statistics across devices, which means the "
            "model runs in training mode. hvp takes the curvature of the model with its running "
            f"statistics fixed: run it in evaluation mode, {fix}."
        ) from None
    except flax_errors.ModifyScopeVariableError as err:
        raise ValueError(
            f"The module tried to update a variable collection ({err}). hvp never makes "
            f"collections mutable; run the module in evaluation mode, {fix}."
        ) from None


def _same_leaves(a, b) -> bool:
    """Whether two pytrees have the same structure and the very same leaf objects."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(x is y for x, y in zip(la, lb))


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
        ``(inputs, targets) = unpack(batch)``, or
        ``output_loss(model_fn(params, inputs), targets, weights)`` for a
        weighted batch (an :class:`hvp.operators.Composed`).
      params: the model's trainable parameters as a plain nested dict of
        arrays (paths read like ``Dense_0/kernel`` or ``layers/0/kernel``).
      model_fn: ``model_fn(params, inputs) -> outputs`` with every other
        variable (batch statistics, RNG state, ...) held fixed.
      output_loss: ``output_loss(outputs, targets) -> scalar``.
      unpack: ``unpack(batch) -> (inputs, targets)``.
      framework: ``"nnx"`` or ``"linen"``.
      train: whether the model runs in training mode (dropout on, batch
        statistics from the batch); see :func:`hvp.flax.from_nnx`.
      state: the non-parameter state that :attr:`loss_fn` and :attr:`model_fn`
        hold fixed: the Linen collections other than ``"params"`` (a dict such
        as ``{"batch_stats": ...}``) or the NNX variables that are not
        ``nnx.Param`` (an ``nnx.State``: BatchNorm statistics, RNG state, custom
        variables). Empty when the model has none. Take it from the current
        model with :meth:`at` (or :meth:`with_state`).

    Examples:
      >>> import hvp.flax
      >>> from flax import nnx
      >>> problem = hvp.flax.from_nnx(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), "mse")
      >>> isinstance(problem, hvp.flax.FlaxProblem), problem.framework, sorted(problem.params)
      (True, 'nnx', ['bias', 'kernel'])
    """

    loss_fn: Callable
    params: Any
    model_fn: Callable
    output_loss: Callable
    unpack: Callable
    framework: str
    train: bool
    _merge: Callable = dataclasses.field(repr=False)
    state: Any = dataclasses.field(default=None, repr=False)
    _rebind: Callable | None = dataclasses.field(default=None, repr=False)
    _split: Callable | None = dataclasses.field(default=None, repr=False)

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

    def fisher(self, data, *, key, params=None, **kwargs) -> _ops.CurvatureOperator:
        """:func:`hvp.fisher` (Monte-Carlo Fisher, labels sampled with ``key``) of :attr:`model_fn` and :attr:`output_loss`."""
        kwargs.setdefault("unpack", self.unpack)
        return _ops.fisher(
            self.model_fn,
            self.output_loss,
            self.params if params is None else params,
            data,
            key=key,
            **kwargs,
        )

    def operator(self, kind: str, data, *, params=None, state=None, **kwargs):
        """``kind`` in ``{"hessian", "ggn", "empirical_fisher", "fisher"}``: the matching method.

        ``"fisher"`` is the Monte-Carlo Fisher (:meth:`fisher`, needs ``key=``),
        not the empirical Fisher.

        With ``state`` (non-parameter state shaped like :attr:`state`, e.g. from
        :meth:`split`), the operator is that of ``self.with_state(state)``, but
        the state is an argument of its compiled products instead of a constant:
        operators built this way for new parameters *and* new state (a training
        loop) reuse one compilation. It is a
        :class:`~hvp.operators.LinearOperator` with the same products, ``name``
        and ``like``.
        """
        if state is not None:
            if kind == "fisher":
                raise ValueError(
                    "operator('fisher', ..., state=...) is not supported (its sampled labels are "
                    "drawn when it is built); use `problem.with_state(state).fisher(data, key=key)`."
                )
            return _StateOperator.build(self, kind, data, params, state, kwargs)
        fns = {
            "hessian": self.hessian,
            "ggn": self.ggn,
            "empirical_fisher": self.empirical_fisher,
            "fisher": self.fisher,
        }
        if kind not in fns:
            raise ValueError(
                f"Unknown operator kind {kind!r}; use 'hessian', 'ggn', 'empirical_fisher' or "
                "'fisher'."
            )
        return fns[kind](data, params=params, **kwargs)

    def merge(self, params):
        """The model with ``params`` put in (the user's model is not changed).

        NNX: a new module (same configuration and non-parameter state as the
        original). Linen: the full ``variables`` dict with ``"params"`` replaced.
        """
        return self._merge(params)

    # ------------------------------------------------------------------ model state
    @property
    def has_state(self) -> bool:
        """Whether the model reads non-parameter state (BatchNorm statistics, RNG state, ...)."""
        return bool(jax.tree_util.tree_leaves(self.state))

    def with_state(self, state) -> FlaxProblem:
        """The same problem with the non-parameter state ``state`` (same structure as :attr:`state`).

        Returns ``self`` when ``state`` holds the very same arrays (nothing to
        rebuild, so compiled products are reused). Otherwise the new problem's
        functions close over the new arrays: operators built from it compile
        anew (once per distinct state).

        Example:
          >>> import jax, hvp.flax
          >>> from flax import nnx
          >>> problem = hvp.flax.from_nnx(nnx.BatchNorm(2, rngs=nnx.Rngs(0)), "mse")
          >>> doubled = jax.tree_util.tree_map(lambda a: 2 * a, problem.state)
          >>> problem.with_state(problem.state) is problem, problem.with_state(doubled) is problem
          (True, False)
        """
        if state is None or _same_leaves(state, self.state):
            return self
        if self._rebind is None:  # pragma: no cover - problems built by hand
            raise ValueError("This FlaxProblem was not built by from_nnx/from_linen.")
        return dataclasses.replace(self._rebind(state), params=self.params)

    def split(self, source):
        """``(params, state, missing)`` of a model, a ``TrainState`` or a parameter tree.

        ``source`` may be (NNX) the module or ``nnx.state(model)``; (Linen) a
        ``TrainState`` (``state.params`` and the collections it holds as
        attributes, e.g. ``state.batch_stats``) or a variables dict
        ``{"params": ..., "batch_stats": ...}``; or only the parameters.
        ``state`` is the non-parameter state found in ``source``, completed by
        :attr:`state` for the parts it does not hold (``None`` when it holds
        none); ``missing`` names those parts (empty when everything was given,
        or when the model has no such state).

        Raises:
          ValueError: when ``source`` holds state of another structure
            (another model).

        Example:
          >>> import hvp.flax
          >>> from flax import nnx
          >>> model = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
          >>> problem = hvp.flax.from_nnx(model, "mse")
          >>> params, state, missing = problem.split(model)
          >>> sorted(params), missing
          (['bias', 'scale'], ())
          >>> problem.split(params)[2]
          ('nnx variables mean, var',)
        """
        if self._split is None:  # pragma: no cover - problems built by hand
            raise ValueError("This FlaxProblem was not built by from_nnx/from_linen.")
        return self._split(source, self.state)

    def stale_state_message(self, missing) -> str:
        """The warning text for :meth:`split`'s ``missing`` (parts of the state that were not given)."""
        names = ", ".join(missing)
        if self.framework == "linen":
            how = (
                "pass the TrainState (e.g. `monitor(step, state)`, `problem.at(state)`) or the "
                "variables dict {'params': ..., 'batch_stats': ...}"
            )
        else:
            how = "pass the NNX module itself (e.g. `monitor(step, model)`, `problem.at(model)`)"
        return (
            f"Only parameters were given, but the model also reads non-parameter state ({names}). "
            "The curvature uses that state as the problem holds it (from when it was built or "
            f"last given), which is stale if training has changed it: {how}."
        )

    def at(self, source, *, warn: bool = True) -> FlaxProblem:
        """The problem at the parameters and non-parameter state of ``source`` (see :meth:`split`).

        Use it whenever the model has changed since the problem was built, e.g.
        after training steps: ``problem.at(model).hessian(data)`` (NNX) or
        ``problem.at(train_state).hessian(data)`` (Linen). When ``source`` holds
        only parameters but the model has other state, a
        :class:`StaleStateWarning` says so (unless ``warn=False``) and the
        current :attr:`state` is kept.

        Examples:
          >>> import jax, jax.numpy as jnp, hvp.flax
          >>> from flax import nnx
          >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
          >>> problem = hvp.flax.from_nnx(model, "mse")
          >>> model.layers[1].mean[...] = jnp.ones(3, jnp.float32)  # training moved the statistics
          >>> now = problem.at(model)
          >>> float(now.state["layers"][1]["mean"][...][0]), float(problem.state["layers"][1]["mean"][...][0])
          (1.0, 0.0)
        """
        params, state, missing = self.split(source)
        if missing and warn:
            warnings.warn(StaleStateWarning(self.stale_state_message(missing)), stacklevel=2)
        return dataclasses.replace(self.with_state(state), params=params)


def _hashable(value):
    """Lists (e.g. ``wrt=[...]``) as tuples, so that operator options can be static."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    return value


def _shapes(tree):
    """Structure, shapes and dtypes of a pytree's leaves (hashable; values play no part)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)

    def leaf(x):  # RNG keys (nnx.RngState) have a dtype that numpy cannot interpret
        dtype = x.dtype if hasattr(x, "dtype") else jax.numpy.result_type(x)
        return tuple(np.shape(x)), str(dtype)

    return treedef, tuple(leaf(x) for x in leaves)


#: The last operator validated by :meth:`_StateOperator.build` per adapter (``problem._rebind``):
#: ``(signature, data, (name, check_finite, psd))``.
_VALIDATED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _StateOperator(_ops.LinearOperator):
    """``problem.with_state(state).operator(kind, data, params=params)`` with ``state`` dynamic.

    The products rebuild the adapter's functions from the (traced) state inside
    the compiled function, so the compiled code depends only on the adapter
    (``problem._rebind``), the kind and the options, not on the state values.
    """

    def __init__(
        self, *, rebind, kind, options, params, state, data, name, check_finite, psd=False
    ):
        self.psd = psd
        self._rebind_fn = rebind
        self.kind = kind
        self._options = options
        self.params = params
        self.state = state
        self.data = data
        self.name = name
        self.check_finite = check_finite

    @classmethod
    def build(cls, problem, kind, data, params, state, options):
        params = problem.params if params is None else params
        if isinstance(data, _ops.Dataset):
            raise TypeError(
                "With `state=`, pass the batches themselves (one batch or a list of batches), "
                "not an hvp.operators.Dataset: they become an argument of the compiled products."
            )
        if isinstance(data, Iterator):
            data = list(data)
        options = tuple(sorted((k, _hashable(v)) for k, v in options.items()))
        # Built once concretely: validates kind, data and shapes now, and gives the name. The
        # inner problem closes over `state`, so building its operator compiles anew for every
        # new state (its linearisation is keyed by the loss function): a training loop that
        # builds an operator at each step (CurvatureMonitor) would compile at every step. The
        # check is done once per adapter, kind, options, data object and shapes of the
        # parameters and state; later builds with new values of the same shapes reuse it.
        signature = (kind, options, _shapes(params), _shapes(state))
        last = _VALIDATED.get(problem._rebind)
        if last is not None and last[0] == signature and last[1] is data:
            facts = last[2]
        else:
            inner = problem.with_state(state).operator(kind, data, params=params, **dict(options))
            if getattr(inner, "streaming", False):
                raise ValueError(
                    "operator(kind, data, state=...) makes the batches an argument of compiled "
                    "products, which a streamed data set (stream=True, or more bytes than "
                    "stream_budget) cannot be: it is read from the host on every product. Use "
                    "`problem.with_state(state).operator(kind, data)` (a streamed operator at "
                    "that state), or stream=False if the data fit on the device."
                )
            facts = (inner.name, inner.check_finite, inner.psd)
            if problem._rebind is not None:
                _VALIDATED[problem._rebind] = (signature, data, facts)
        name, check_finite, psd = facts
        return cls(
            rebind=problem._rebind,
            kind=kind,
            options=options,
            params=params,
            state=state,
            data=data,
            name=name,
            check_finite=check_finite,
            psd=psd,
        )

    @property
    def like(self):
        return self.params

    def _apply(self, v):
        problem = self._rebind_fn(self.state)
        op = problem.operator(self.kind, self.data, params=self.params, **dict(self._options))
        return op.matvec(v)

    def _children(self):
        return (self.params, self.state, self.data)

    def _static(self):
        return (self._rebind_fn, self.kind, self._options, self.name, self.check_finite, self.psd)

    @classmethod
    def _rebuild(cls, static, children):
        rebind, kind, options, name, check, psd = static
        params, state, data = children
        return cls(
            rebind=rebind,
            kind=kind,
            options=options,
            params=params,
            state=state,
            data=data,
            name=name,
            check_finite=check,
            psd=psd,
        )
