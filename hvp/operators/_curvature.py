r"""Curvature operators of a loss over a data set: Hessian, GGN, empirical Fisher.

For a data set split into batches :math:`B_1, \dots, B_m` with
:math:`n_b = |B_b|` and :math:`N = \sum_b n_b`, and a loss that is the **mean**
over the examples of a batch (``reduction="mean"``, the default), the
operators are the curvature of the data-set mean loss

.. math::

   L(\theta) = \frac1N \sum_{i=1}^N \ell_i(\theta)
             = \sum_b \frac{n_b}{N} \, L_{B_b}(\theta),

so each batch's operator enters with weight :math:`n_b / N`, which is exact
for a last batch of a different size. With ``reduction="sum"`` the loss is a
sum over examples and batches are added with weight 1.

* Hessian: :math:`H v = \partial_\theta (\nabla L \cdot v)` by
  forward-over-reverse (``jax.jvp`` of ``jax.grad``), Pearlmutter (1994).
* Generalised Gauss-Newton: :math:`G v = J^\top H_\ell J v` with ``J`` the
  Jacobian of the model outputs and :math:`H_\ell` the Hessian of the loss in
  output space (Schraudolph, 2002; Martens, 2010). One forward pass is
  linearised (``jax.linearize``), giving ``Jv``; the output-space product
  uses the loss's closed form when it has one (``output_hvp``), and the
  transpose (``jax.linear_transpose``) gives :math:`J^\top u`. It is positive
  semi-definite whenever the loss is convex in the outputs.
* Empirical Fisher: :math:`F v = \frac1N \sum_i g_i (g_i^\top v)` with
  per-example gradients :math:`g_i`, computed as :math:`J^\top J v` for the
  Jacobian ``J`` of the vector of per-example losses, never forming the
  :math:`g_i` (Kunstner et al., 2019, discuss when it differs from the Fisher).

The GGN and the empirical Fisher need only first derivatives of the model.
By default (``mode="auto"``) ``Jv`` is taken in forward mode
(``jax.linearize``) and, when the model or the loss has no forward mode
(``jax.custom_vjp``: fused kernels, T5X-style cross-entropy), in reverse mode
only: with ``u -> J^T u`` from ``jax.vjp``, ``J v`` is its transpose
(``jax.linear_transpose`` of the VJP), which is exact and costs about one more
backward pass. ``mode="forward"`` / ``"reverse"`` force one path.

Weighted batches (``(inputs, targets, weights)`` or a ``"weights"`` key, see
:mod:`hvp.operators._data`) enter the data-set mean with the sum of their
weights :math:`W_b / W` instead of :math:`n_b / N`; the GGN passes the weights
to the output loss (``loss(outputs, targets, weights)``) and the empirical
Fisher weights example ``i`` by :math:`W_i / W` (its share of the weights).

Batches of equal shape are stacked and reduced inside one compiled
``lax.scan``; the matvec is compiled once per operator (the operator is a
pytree whose arrays are jit arguments, not constants), and the loss is traced
once for all products, block sizes and operators rebuilt with the same
functions (see :class:`~hvp.operators.LinearOperator`).

Linearisation (:func:`hessian`, ``linearize="auto"`` by default): the
gradient of every batch is linearised once when the operator is built, and
products apply the stored linear maps, when the data and parameters are
concrete and the maps' residuals (estimated by tracing the linearisation with
``jax.eval_shape``, without running it) fit in ``linearize_budget`` bytes
(default :data:`DEFAULT_LINEARIZE_BUDGET`, 1 GiB). Otherwise, and always for
the GGN and the empirical Fisher, each product recomputes the forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp.operators import _blocks
from hvp.operators._base import (
    LinearOperator,
    _apply_cached,
    _has_primitive,
    _rows,
    _stack_rows,
    check_block,
)
from hvp.operators._data import (
    Dataset,
    GroupMeta,
    StreamingDataset,
    UnpackError,
    as_data,
    batch_weights,
    default_unpack,
    split_batch,
    tuple_of_batches_hint,
    weighted_sum,
)
from hvp.typing import PyTree

__all__ = [
    "CurvatureOperator",
    "StreamingCurvatureOperator",
    "hessian",
    "ggn",
    "empirical_fisher",
    "fisher",
    "hvp",
    "default_unpack",
    "compose",
    "DEFAULT_LINEARIZE_BUDGET",
]

#: Memory budget of ``linearize="auto"`` (bytes): :func:`hessian` linearises when the
#: estimated residuals of all batches fit in it (1 GiB).
DEFAULT_LINEARIZE_BUDGET = 1 << 30

_REDUCTIONS = ("mean", "sum")
_MODES = ("auto", "forward", "reverse")


def _framework_object_hint(params) -> str | None:
    """A message for Flax/optax objects passed as ``params`` (checked by type, without importing flax)."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None:
        if isinstance(params, nnx.Module):
            return (
                f"`params` is an NNX module ({type(params).__name__}), not a parameter pytree: its "
                "non-parameter state (batch statistics, RNG counters) would be differentiated as if it "
                "were parameters and layers would run in training mode. Use the adapter: "
                "`problem = hvp.flax.from_nnx(model, loss)` then `problem.hessian(data)` (or "
                "`hvp.flax.nnx_params(model)` for the parameter dict)."
            )
        if isinstance(params, nnx.State):
            return (
                "`params` is an nnx.State; pass a plain parameter dict: `hvp.flax.nnx_params(state)` "
                "(only the nnx.Param variables), or build the problem with `hvp.flax.from_nnx(model, loss)`."
            )
    ts = sys.modules.get("flax.training.train_state")
    is_train_state = ts is not None and isinstance(params, ts.TrainState)
    if is_train_state or (
        hasattr(params, "params") and hasattr(params, "opt_state") and hasattr(params, "apply_fn")
    ):
        return (
            f"`params` is a training state ({type(params).__name__}) holding the step, the optimizer "
            "state and the parameters; pass its parameters: `state.params` (with a Linen module, "
            "`hvp.flax.from_linen(module, {'params': state.params, ...}, loss)`)."
        )
    nodes = (
        params
        if isinstance(params, (tuple, list)) and not hasattr(params, "_fields")
        else (params,)
    )
    for node in nodes:
        if type(node).__module__.split(".")[0] == "optax":
            return (
                f"`params` is an optax optimizer state ({type(node).__name__}), not the model's "
                "parameters: pass the parameter pytree the optimizer was initialised with (for a "
                "TrainState, `state.params`)."
            )
    return None


def _check_params(params, *, name="params") -> None:
    hint = _framework_object_hint(params)
    if hint is not None:
        raise TypeError(hint)
    tu.assert_floating(params, name=name)
    if not tu.is_traced(params):
        bad = tu.nonfinite_leaves(params)
        if bad:
            raise ValueError(
                f"`{name}` contain NaN or Inf in leaf(s) {', '.join(repr(b) for b in bad)}; curvature at "
                "such a point is meaningless. Check the checkpoint or the training run that produced them."
            )


def _check_scalar(out, what: str) -> None:
    if not hasattr(out, "shape"):  # a tuple (loss, aux), a dict, None
        raise TypeError(
            f"{what} must return a floating-point scalar, but it returned "
            f"{type(out).__name__} {tu.shape_summary(out)}. Return the loss alone (for a loss "
            "with auxiliary outputs `(loss, aux)`, pass `lambda p, b: loss_fn(p, b)[0]`)."
        )
    shape = getattr(out, "shape", None)
    if shape != ():
        hint = ""
        if shape:
            hint = " Reduce it over the batch, e.g. `jnp.mean(per_example_losses)`."
        raise ValueError(f"{what} must return a scalar, but it returned shape {shape}.{hint}")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{what} must return a floating-point scalar, got dtype {out.dtype}.")


def hvp(fun: Callable, params: PyTree, v: PyTree, *args, **kwargs):
    """Hessian-vector product of a scalar function, by forward-over-reverse.

    Returns :math:`\\nabla^2_\\theta f(\\theta) \\, v` for
    ``f = fun(params, *args, **kwargs)`` as ``jax.jvp(jax.grad(f), (params,), (v,))[1]``
    (Pearlmutter, 1994): one forward and one reverse pass with forward-mode
    tangents, about 2-3 gradients. Works under ``jit`` and ``vmap``.

    Args:
      fun: scalar function of ``params`` (first argument).
      params: pytree of floating arrays.
      v: pytree with the same structure, shapes and dtypes as ``params``.
      *args: passed to ``fun`` unchanged (not differentiated).
      **kwargs: passed to ``fun`` unchanged (not differentiated).

    Raises:
      TypeError: non-floating parameters.
      ValueError: ``v`` not shaped like ``params``; ``fun`` not scalar.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> f = lambda p: jnp.sum(p ** 3)  # Hessian diag(6 p)
        >>> hvp.hvp(f, jnp.array([1.0, 2.0]), jnp.array([1.0, 1.0]))
        Array([ 6., 12.], dtype=float64)
    """
    hint = _framework_object_hint(params)
    if hint is not None:
        raise TypeError(hint)
    tu.assert_floating(params)
    tu.assert_same_structure(v, params)
    _check_scalar(jax.eval_shape(lambda p: fun(p, *args, **kwargs), params), "`fun`")
    v = tu.like_sharding(v, params)  # explicit mesh: the tangent takes each leaf's sharding type
    return jax.jvp(jax.grad(lambda p: fun(p, *args, **kwargs)), (params,), (v,))[1]


def _call_output_loss(loss_fn, outputs, targets, weights):
    if weights is None:
        return loss_fn(outputs, targets)
    return loss_fn(outputs, targets, weights)


def _output_hvp(loss_fn, outputs, targets, weights, u):
    """``H_L u`` in output space: the loss's closed form when it has one, else forward-over-reverse."""
    if hasattr(loss_fn, "output_hvp"):
        if weights is None:
            return loss_fn.output_hvp(outputs, targets, u)
        return loss_fn.output_hvp(outputs, targets, u, weights)
    grad = jax.grad(lambda o: _call_output_loss(loss_fn, o, targets, weights))
    return jax.jvp(grad, (outputs,), (u,))[1]


class Composed:
    """``loss_fn(params, batch) = output_loss(model_fn(params, inputs), targets[, weights])``.

    Built by :func:`compose`; the Flax adapters' ``loss_fn``. The operators
    recognise it and check the targets of every batch against the model's
    outputs when they are built.

    Examples:
        >>> import jax.numpy as jnp, hvp
        >>> loss_fn = hvp.operators.compose(lambda p, x: x @ p, hvp.losses.mean_squared_error)
        >>> isinstance(loss_fn, hvp.operators.Composed)
        True
        >>> float(loss_fn(jnp.ones((2, 1)), (jnp.ones((3, 2)), jnp.ones((3, 1)))))  # outputs 2, targets 1
        1.0
    """

    def __init__(self, model_fn, output_loss, unpack=None, origin="hvp.operators.compose"):
        self.model_fn = model_fn
        self.output_loss = output_loss
        self.unpack = unpack
        self.origin = origin

    def __call__(self, params, batch):
        inputs, targets, weights = split_batch(batch, self.unpack)
        return _call_output_loss(self.output_loss, self.model_fn(params, inputs), targets, weights)


def compose(model_fn: Callable, output_loss: Callable, unpack: Callable | None = None) -> Composed:
    """The batch loss ``loss_fn(params, batch)`` of a model and a loss on its outputs.

    ``(inputs, targets[, weights]) = unpack(batch)`` (default: the batch
    conventions of :func:`default_unpack`, weighted batches included), then
    ``output_loss(model_fn(params, inputs), targets[, weights])``. Use it with
    :func:`hessian` and :func:`empirical_fisher`: the operators then check the
    targets of every batch against the outputs when they are built.

    Examples:
        >>> import jax.numpy as jnp, hvp
        >>> loss_fn = hvp.operators.compose(lambda p, x: x @ p, hvp.losses.mean_squared_error)
        >>> float(loss_fn(jnp.ones((2, 1)), (jnp.ones((3, 2)), jnp.zeros((3, 1)))))
        4.0
    """
    if not callable(model_fn) or not callable(output_loss):
        raise TypeError("`model_fn` and `output_loss` must be callables.")
    if unpack is not None and not callable(unpack):
        raise TypeError(
            f"`unpack` must be a callable batch -> (inputs, targets), got {type(unpack).__name__}."
        )
    return Composed(model_fn, output_loss, unpack)


def _jv_and_transpose(f, p, v, reverse: bool):
    """``(f(p), J v, u -> J^T u)`` for the Jacobian ``J`` of ``f`` at ``p``.

    Forward mode: ``jax.linearize`` and its transpose. Reverse mode (no JVP
    rule needed, e.g. ``jax.custom_vjp``): ``jax.vjp`` gives ``u -> J^T u`` and
    ``J v`` is the transpose of that linear map.
    """
    if reverse:
        out, vjp = jax.vjp(f, p)
        jv = jax.linear_transpose(vjp, out)((v,))[0]
        return out, jv, lambda u: vjp(u)[0]
    # With a `jax.custom_vjp` function in the way, JAX raises its forward-mode TypeError while
    # tracing (under vmap) or only when the product is compiled (a `custom_lin` equation in the
    # linear map): both are turned into one error here, when the product is first traced.
    try:
        out, f_jvp = jax.linearize(f, p)
        jv = f_jvp(v)
    except TypeError as err:
        if "custom_vjp" not in str(err):
            raise
        raise _no_forward_mode() from err
    if _has_primitive(jax.make_jaxpr(f_jvp)(v), "custom_lin"):
        raise _no_forward_mode()
    return out, jv, lambda u: jax.linear_transpose(f_jvp, p)(u)[0]


def _no_forward_mode() -> TypeError:
    return TypeError(
        'This operator was built with mode="forward", but the function calls a `jax.custom_vjp` '
        "function (a fused kernel or a hand-written backward pass), which has no forward mode "
        '(JAX: "can\'t apply forward-mode autodiff (jvp) to a custom_vjp function"). Build the '
        'operator with mode="auto" (it chooses reverse mode for such functions) or mode="reverse".'
    )


def _replace_weights(batch, weights):
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return type(batch)((batch[0], batch[1], weights))
    if isinstance(batch, dict) and "weights" in batch:
        return {**batch, "weights": weights}
    return batch


class CurvatureOperator(LinearOperator):
    """Curvature (Hessian, GGN or empirical Fisher) of a loss over a data set.

    Build with :func:`hessian`, :func:`ggn` or :func:`empirical_fisher`. Each
    curvature is its own per-batch product function (``op.kind`` names it);
    the operator sums the per-batch products with the data set's weights (one
    ``lax.scan`` per group of equally shaped batches). A linearised operator
    (``op.linearized``) was given the linearised gradient of every batch when
    it was built and applies those linear maps instead.

    Attributes:
      params: the point (or the parameter block, see ``wrt``) the curvature is
        taken at; vectors are pytrees like it.
      kind: ``"hessian"``, ``"ggn"``, ``"empirical_fisher"`` or ``"fisher"`` (read-only).
      psd: whether the curvature is PSD by construction: ``False`` for the
        Hessian, ``True`` for the empirical Fisher and the Fisher, and for the
        GGN ``True`` when the output loss is known to be convex in the outputs
        (the :mod:`hvp.losses`, or a loss with the attribute ``convex = True``).
      reduction: ``"mean"`` or ``"sum"``.
      num_examples, num_batches: size of the data set.
      linearized: whether products apply stored linearisations.
      streaming: whether every product reads the data set from its source
        (:class:`StreamingCurvatureOperator`).
      size, shape, dtype, block: see :class:`~hvp.operators.LinearOperator`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import hvp
        >>> def loss_fn(params, batch):  # least squares: the Hessian is 2 X^T X / n
        ...     x, y = batch
        ...     return jnp.mean((x @ params["w"] - y) ** 2)
        >>> params = {"w": jnp.zeros(2)}
        >>> batch = (jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.ones(2))
        >>> H = hvp.hessian(loss_fn, params, [batch, batch])
        >>> H.kind, H.reduction, H.num_examples, H.num_batches, H.shape
        ('hessian', 'mean', 4, 2, (2, 2))
    """

    #: whether products stream the data set from the host (:class:`StreamingCurvatureOperator`)
    streaming = False

    def __new__(cls, *args, **kwargs):  # noqa: ARG004 - the arguments go to __init__
        # Over a streamed data set a curvature operator is a StreamingCurvatureOperator, also
        # when built from another operator's parts (as hvp.operators.data_gradient does).
        if cls is CurvatureOperator and isinstance(kwargs.get("dataset"), StreamingDataset):
            cls = StreamingCurvatureOperator
        return super().__new__(cls)

    def __init__(
        self,
        *,
        product,
        fns,
        params,
        full,
        mask,
        dataset: Dataset,
        reduction,
        lins,
        check_finite,
        name,
        shardings=None,
        mode="forward",
        block="auto",
    ):
        self._product = product
        self.mode = mode
        # Per-leaf shardings of the parameters (None for single-device leaves), applied to every
        # product so that matvecs keep each leaf's sharding, also inside compiled algorithms.
        self._shardings = _leaf_shardings(params) if shardings is None else shardings
        self._fns = fns
        self.params = params
        self._full = full
        self._mask = mask
        self.dataset = dataset
        self.reduction = reduction
        self._lins = lins
        self.check_finite = check_finite
        self.name = name
        self.block = block
        self.psd = _is_psd(product.kind, fns)

    # pytree protocol -------------------------------------------------------
    def _children(self):
        return (self.params, self._full, self.dataset.groups, self.dataset.totals, self._lins)

    def _static(self):
        return (
            self._product,
            self._fns,
            self._mask,
            self.dataset.meta,
            self.dataset.num_examples,
            self.reduction,
            self.check_finite,
            self.name,
            self._shardings,
            self.mode,
            self.dataset.weighted,
            self.block,
        )

    @classmethod
    def _rebuild(cls, static, children):
        product, fns, mask, meta, n, reduction, check, name, shardings, mode, weighted, block = (
            static
        )
        params, full, groups, totals, lins = children
        return cls(
            product=product,
            fns=fns,
            params=params,
            full=full,
            mask=mask,
            dataset=Dataset(
                groups=groups, meta=meta, num_examples=n, totals=totals, weighted=weighted
            ),
            reduction=reduction,
            lins=lins,
            check_finite=check,
            name=name,
            shardings=shardings,
            mode=mode,
            block=block,
        )

    def _sources(self) -> tuple:
        """Per group, what the per-batch product is applied to (the batches; see :func:`fisher`)."""
        return self.dataset.groups

    # public attributes -------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"hessian"``, ``"ggn"``, ``"empirical_fisher"`` or ``"fisher"``: the curvature's name."""
        return self._product.kind

    @property
    def like(self):
        return self.params

    @property
    def num_examples(self) -> int:
        return self.dataset.num_examples

    @property
    def num_batches(self) -> int:
        return self.dataset.num_batches

    @property
    def linearized(self) -> bool:
        return self._lins is not None

    def full_params(self, block=None):
        """The model's full parameter pytree with ``block`` (default: :attr:`params`) put in place."""
        return _merge(self.params if block is None else block, self._full, self._mask)

    # products ----------------------------------------------------------------
    def _apply(self, v):
        # Under an explicit mesh the tangents must carry the parameters' sharding types.
        tu.check_mesh_context(self.params, what=f"the {self.name} operator's parameters")
        v = tu.like_sharding(v, self.params)
        linear = self._lins is not None
        sources = self._lins if linear else self._sources()

        def mv(src):
            return src(v) if linear else self._product(self, src, v)

        total = weighted_sum(mv, self.dataset, self.reduction, sources=sources, zeros=v)
        return tu.like_sharding(_constrain(total, self._shardings), self.params)


def _is_psd(kind: str, fns: tuple) -> bool:
    """Whether a curvature is positive semi-definite by construction (``op.psd``).

    ``False`` for the Hessian (indefinite in general); ``True`` for the
    empirical Fisher and the Fisher (sums of outer products); for the GGN
    ``True`` when the output loss is convex in the outputs, which is known for
    the :mod:`hvp.losses` and for a loss declaring it with an attribute
    ``convex = True`` (``my_loss.convex = True``), else ``False``.
    """
    if kind in ("empirical_fisher", "fisher"):
        return True
    if kind == "ggn":
        return getattr(fns[1], "convex", False) is True
    return False


class StreamingCurvatureOperator(CurvatureOperator):
    """A :class:`CurvatureOperator` over a streamed data set (:class:`~hvp.operators.StreamingDataset`).

    Built by :func:`hessian`, :func:`ggn`, :func:`empirical_fisher` and :func:`fisher` when the data set is
    streamed (``stream=True``, or ``stream="auto"`` for a re-iterable data set of more bytes
    than ``stream_budget``). Every product (:meth:`mv`, and :meth:`matmat` for a whole block
    of vectors) is **one pass** over the data: each batch is moved to the device (prefetched,
    at most ``prefetch + 1`` batches there at once), its product computed by one compiled
    program per batch shape and block size (a ragged last batch adds one), and the products
    added with the in-memory operator's weights (:math:`n_b/N`, or :math:`W_b/W` for weighted
    batches; 1 with ``reduction="sum"``), so results equal the in-memory operator's up to
    rounding. The host drives the data, so the operator cannot run inside ``jax.jit``: the
    algorithms of :mod:`hvp.linalg` pick their host driver for it (``driver="auto"``) and
    ``driver="compiled"`` raises. ``op.dataset.passes`` counts the passes read.

    Examples:
        >>> import numpy as np, jax.numpy as jnp, hvp
        >>> x = np.arange(12.0).reshape(6, 2)
        >>> loss = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2)
        >>> H = hvp.hessian(loss, jnp.zeros(2), hvp.operators.ArrayBatches((x, np.zeros(6)), 4),
        ...                 stream=True)
        >>> H.streaming, H.num_batches, np.allclose(H.dense(), 2 * x.T @ x / 6)
        (True, 2, True)
    """

    streaming = True

    def _children(self):
        return (self.params, self._full)

    def _static(self):
        return (
            self._product,
            self._fns,
            self._mask,
            self.dataset,
            self.reduction,
            self.check_finite,
            self.name,
            self._shardings,
            self.mode,
            self.block,
        )

    @classmethod
    def _rebuild(cls, static, children):
        product, fns, mask, dataset, reduction, check, name, shardings, mode, block = static
        params, full = children
        return cls(
            product=product,
            fns=fns,
            params=params,
            full=full,
            mask=mask,
            dataset=dataset,
            reduction=reduction,
            lins=None,
            check_finite=check,
            name=name,
            shardings=shardings,
            mode=mode,
            block=block,
        )

    @property
    def _stream(self) -> StreamingDataset:
        ds = self.dataset
        assert isinstance(ds, StreamingDataset)
        return ds

    def _apply(self, v):  # noqa: ARG002 - reached only under a trace
        raise _streaming_in_jit_error(self)

    def mv(self, v):
        """``A v`` in one pass over the data set (see the class docstring).

        Raises:
          ValueError: called inside ``jax.jit``/``jax.vmap`` (the host reads the data).
          NonDeterministicDataError: the data differ from the first pass.
          NonFiniteError: a non-finite result with ``check_finite``.

        Examples:
            >>> import numpy as np, jax.numpy as jnp, hvp
            >>> b = (np.eye(2), np.zeros(2))
            >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2), jnp.zeros(2),
            ...                 [b, b], stream=True)
            >>> H.mv(jnp.ones(2)).tolist()
            [1.0, 1.0]
        """
        if self._traced(v):
            raise _streaming_in_jit_error(self)
        self._check_vectors(v, "v", leading=0)
        return self._pass(v, block=False, what="matvec")

    def matmat(self, vs):
        """``A`` applied to every row of the block ``vs`` in **one** pass over the data set.

        Examples:
            >>> import numpy as np, jax.numpy as jnp, hvp
            >>> b = (np.eye(2), np.zeros(2))
            >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2), jnp.zeros(2),
            ...                 [b, b], stream=True)
            >>> H.matmat(jnp.eye(2)).tolist(), H.dataset.passes  # the building pass + one
            ([[1.0, 0.0], [0.0, 1.0]], 2)
        """
        if self._traced(vs):
            raise _streaming_in_jit_error(self)
        self._check_vectors(vs, "vs", leading=1)
        return self._pass(vs, block=True, what="matmat")

    def block_mode(self) -> str:
        if self.block != "auto":
            return self.block
        mode = self.__dict__.get("_block_mode")
        if mode is None:  # the rule of LinearOperator.block_mode on the first batch's product
            _, batch = next(_first_of_groups(self._stream.probe))
            mode = self.__dict__["_block_mode"] = self._batch_operator(batch).block_mode()
        return mode

    def _batch_operator(self, batch, index: int = 0) -> CurvatureOperator:  # noqa: ARG002
        """The in-memory operator of batch ``index`` (its weight in the data set is applied by the pass)."""
        n = int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])
        return CurvatureOperator(
            product=self._product,
            fns=self._fns,
            params=self.params,
            full=self._full,
            mask=self._mask,
            dataset=Dataset(
                groups=(batch,),
                meta=(GroupMeta(num_batches=1, batch_size=n, stacked=False),),
                num_examples=n,
                totals=(),
                weighted=self.dataset.weighted,
            ),
            reduction=self.reduction,
            lins=None,
            check_finite=False,
            name=self.name,
            shardings=self._shardings,
            mode=self.mode,
            block=self.block,
        )

    def _pass(self, v, *, block: bool, what: str):
        tu.check_mesh_context(self.params, what=f"the {self.name} operator's parameters")
        v = tu.stacked_like(v, self.params) if block else tu.like_sharding(v, self.params)
        # "map" (convolutions on CPU): the single compiled product on each row, in the same pass
        rows = block and self.block_mode() == "map"
        vecs = [tu.like_sharding(r, self.params) for r in _rows(v)] if rows else []
        acc = [tu.zeros_like(r) for r in vecs] if rows else tu.zeros_like(v)

        def step(i, batch, w, acc):
            op1 = self._batch_operator(batch, i)
            if rows:
                return [_stream_step(op1, r, w, a, block=False) for r, a in zip(vecs, acc)]
            return _stream_step(op1, v, w, acc, block=block)

        ds = self._stream
        out = ds.reduce(self.params, step, acc, ds.weights(self.reduction), indexed=True)
        if rows:
            out = _stack_rows(out)
        if self.check_finite and not bool(tu.all_finite(out)):
            self._raise_if_nonfinite(out, what)
        return out


def _streaming_in_jit_error(op) -> ValueError:
    return ValueError(
        f"The {op.name} operator streams its data set (stream=True, or stream='auto' for data "
        "larger than the budget): the host reads the batches on every product, so it cannot run "
        "inside jax.jit/jax.vmap or a compiled loop (driver='compiled'). Call the algorithm "
        "outside jit with driver='host' (driver='auto' picks it for streamed operators), or build "
        "the operator with stream=False if the data fit on the device."
    )


@functools.partial(jax.jit, static_argnames=("block",))
def _stream_step(op1, v, w, acc, *, block: bool):
    """``acc + w A_b v`` for one batch's operator: one compiled program per batch shape and block size."""
    av = jax.vmap(lambda x: _apply_cached(op1, x))(v) if block else _apply_cached(op1, v)
    return _axpy(w, av, acc)


def _merge(block, full, mask):
    """The full parameter pytree from a parameter block (``block`` itself without ``wrt``)."""
    return block if mask is None else _blocks.merge(block, full, mask)


def _product_of(kind: str):
    """Marks a per-batch product function ``(op, batch, v) -> A_batch v`` with its curvature name."""

    def mark(fn):
        fn.kind = kind
        return fn

    return mark


@_product_of("hessian")
def _hessian_product(op: CurvatureOperator, batch, v):
    """``H_b v`` by forward-over-reverse (Pearlmutter, 1994)."""
    (loss_fn,) = op._fns
    grad = jax.grad(lambda q: loss_fn(op.full_params(q), batch))
    return jax.jvp(grad, (op.params,), (v,))[1]


@_product_of("ggn")
def _ggn_product(op: CurvatureOperator, batch, v):
    """``J_b^T H_L J_b v`` (Schraudolph, 2002)."""
    model_fn, loss_fn, unpack = op._fns
    x, y, w = split_batch(batch, unpack)
    out, jv, jt = _jv_and_transpose(
        lambda q: model_fn(op.full_params(q), x), op.params, v, op.mode == "reverse"
    )
    return jt(_output_hvp(loss_fn, out, y, w, jv))


@_product_of("empirical_fisher")
def _fisher_product(op: CurvatureOperator, batch, v):
    """``J_b^T D J_b v`` for the Jacobian of the per-example losses (weights ``D``: 1/n_b or W_i/W_b)."""
    (loss_fn,) = op._fns
    w = batch_weights(batch) if op.dataset.weighted else None
    if w is not None:
        acc = tu.accumulation_dtype(op.dtype)
        w_ex = jnp.sum(jnp.reshape(w, (w.shape[0], -1)).astype(acc), axis=1)
        # examples with zero weight enter with factor 0; give them unit weights so that a
        # loss normalised by its weights stays finite on them
        batch = _replace_weights(
            batch, jnp.where(jnp.reshape(w_ex > 0, w_ex.shape + (1,) * (w.ndim - 1)), w, 1)
        )

    def per_example(q):
        full = op.full_params(q)
        return jax.vmap(lambda ex: loss_fn(full, tu.map(lambda a: a[None], ex)))(batch)

    losses, jv, jt = _jv_and_transpose(per_example, op.params, v, op.mode == "reverse")
    if op.reduction == "mean":
        if w is None:
            jv = jv / losses.shape[0]
        else:
            jv = jv * (w_ex / jnp.sum(w_ex)).astype(jv.dtype)
    return jt(jv)


@_product_of("fisher")
def _mc_fisher_product(op: CurvatureOperator, batch, v):
    """``J_b^T F_out J_b v`` with the output-space Monte-Carlo Fisher of the samples drawn at build time."""
    model_fn, loss_fn, unpack = op._fns
    data, samples = batch
    x, _, w = split_batch(data, unpack)
    out, jv, jt = _jv_and_transpose(
        lambda q: model_fn(op.full_params(q), x), op.params, v, op.mode == "reverse"
    )
    if w is None:
        fu = loss_fn.fisher_output_hvp(out, samples, jv)
    else:
        fu = loss_fn.fisher_output_hvp(out, samples, jv, w)
    return jt(fu)


@functools.cache
def _mc_fisher_stream_product(num_samples: int):
    """The per-batch product of a streamed Fisher: targets sampled in the product itself.

    A streamed batch arrives as ``(batch, key_k)`` with ``key_k = fold_in(key, k)`` for its
    in-memory index ``k``; the targets are drawn from the model's outputs at the operator's
    point with that key, exactly as :func:`fisher` draws them for the in-memory data set when
    it is built, so every pass applies the same matrix. One function per ``num_samples``
    (cached: operators rebuilt with the same settings share its compiled programs).
    """

    @_product_of("fisher")
    def product(op: CurvatureOperator, batch, v):
        model_fn, loss_fn, unpack = op._fns
        data, key = batch
        x, _, w = split_batch(data, unpack)
        out, jv, jt = _jv_and_transpose(
            lambda q: model_fn(op.full_params(q), x), op.params, v, op.mode == "reverse"
        )
        samples = loss_fn.sample(out, key, num_samples)
        if w is None:
            return jt(loss_fn.fisher_output_hvp(out, samples, jv))
        return jt(loss_fn.fisher_output_hvp(out, samples, jv, w))

    return product


class _StreamingFisher(StreamingCurvatureOperator):
    """The Monte-Carlo Fisher over a streamed data set (:func:`fisher` with a streamed ``data``).

    Carries the sampling key: batch ``i`` of every pass is given ``fold_in(key, k)`` with ``k``
    its index in the in-memory data set (:meth:`StreamingDataset.in_memory_index`), so its
    targets are the in-memory operator's, redrawn identically on every pass.
    """

    sample_key: Any = None

    def _children(self):
        return (*super()._children(), self.sample_key)

    @classmethod
    def _rebuild(cls, static, children):
        *rest, key = children
        op = super()._rebuild(static, tuple(rest))
        op.sample_key = key
        return op

    def _batch_operator(self, batch, index: int = 0) -> CurvatureOperator:
        order = self.__dict__.get("_order")
        if order is None:
            order = self.__dict__["_order"] = self._stream.in_memory_index()
        return super()._batch_operator((batch, jax.random.fold_in(self.sample_key, order[index])))


def _scale(w, x):
    """``w x`` with a (possibly array) weight cast to each leaf's dtype."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(w, a.dtype) * a, x)


def _axpy(w, x, y):
    """``w x + y`` with a (possibly array) weight cast to each leaf's dtype."""
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(w, a.dtype) * a + b, x, y)


def _leaf_shardings(params) -> tuple:
    """Shardings of the concrete, multi-device leaves of ``params`` (``None`` elsewhere)."""
    out = []
    for x in jax.tree_util.tree_leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(x, jax.core.Tracer) or s is None or len(s.device_set) <= 1:
            out.append(None)
        elif tu.explicit_sharding(x) is not None:
            out.append(None)  # explicit mesh: the sharding is in the type (``like_sharding``)
        else:
            out.append(s)
    return tuple(out)


def _constrain(tree, shardings: tuple):
    if not any(s is not None for s in shardings):
        return tree
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [
        x if s is None else jax.lax.with_sharding_constraint(x, s)
        for x, s in zip(leaves, shardings)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _prepare(
    params,
    data,
    *,
    wrt,
    reduction,
    stream="auto",
    stream_budget=None,
    prefetch=1,
    check_finite=True,
):
    _check_params(params)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
    tu.check_mesh_context(params)
    dataset = as_data(
        data,
        stream=stream,
        budget=stream_budget,
        prefetch=prefetch,
        check_finite=bool(check_finite),
    )
    if not isinstance(dataset, StreamingDataset):
        # Host or single-device batches join the explicit mesh of the parameters (no-op otherwise).
        dataset = dataclasses.replace(
            dataset,
            groups=tuple(
                tu.place_batch(g, params, leading=int(m.stacked))
                for g, m in zip(dataset.groups, dataset.meta)
            ),
        )
    if wrt is None:
        block, full, mask = params, None, None
    else:
        block, mask = _blocks.select(params, wrt)
        full = params
    return dataset, block, full, mask


def _probe(dataset):
    """The batches the builders check the loss on: a streamed data set's first batch of each shape."""
    return dataset.probe if isinstance(dataset, StreamingDataset) else dataset


def _operator_class(dataset):
    return (
        StreamingCurvatureOperator if isinstance(dataset, StreamingDataset) else CurvatureOperator
    )


def _once(dataset: Dataset, key: tuple, params, fn):
    """``fn()`` once per data set, key and parameter shapes; later calls return the first result.

    Operators rebuilt at new parameters on the same :class:`Dataset` (the
    monitor does this at every evaluation) are validated only the first time.
    """
    memo = dataset.__dict__.setdefault("_validated", {})  # frozen dataclass: bypass setattr
    shapes = jax.tree_util.tree_map(lambda a: (np.shape(a), str(jnp.result_type(a))), params)
    full_key = (
        *key,
        jax.tree_util.tree_structure(params),
        tuple(jax.tree_util.tree_leaves(shapes)),
    )
    if full_key not in memo:
        memo[full_key] = fn()
    return memo[full_key]


def _check_mode(mode) -> None:
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")


def _batches(dataset: Dataset):
    """``(index, batch)`` for every batch of the data set, in order of the groups."""
    k = 0
    for group, meta in zip(dataset.groups, dataset.meta):
        for j in range(meta.num_batches):
            yield k, (tu.index(group, j) if meta.stacked else group)
            k += 1


def _first_of_groups(dataset: Dataset):
    """``(index, batch)`` of the first batch of each shape group."""
    k = 0
    for group, meta in zip(dataset.groups, dataset.meta):
        yield k, (tu.index(group, 0) if meta.stacked else group)
        k += meta.num_batches


_HVP_DIR = str(Path(__file__).resolve().parents[1])


def _raised_by_hvp(err: BaseException) -> bool:
    """Whether ``err`` was raised by hvp's own code (a check with its own message)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(
        _HVP_DIR
    )


class _Context:
    """Turns errors raised while an operator is built on concrete data into ones that say what to do.

    ``call`` (the signature being traced, e.g. ``"loss_fn(params, batch)"``) and ``arg`` (the
    argument given in the place of the data) are set by the checks before each call: an error of
    the user's function (a loss that unpacks a bare array, indexes a tuple with a key, reads a
    parameter that is not there) is raised again with the structure of the batch and of the
    parameters and the expected signature.
    """

    def __init__(self, name: str, data, dataset: Dataset, origin: str, params=None):
        self.name, self.data, self.dataset, self.origin = name, data, dataset, origin
        self.index = None
        self.params = params
        self.call: str | None = None
        self.arg: Any = None
        self.note = ""

    def __enter__(self):
        return self

    def __exit__(self, typ, err, tb):
        if err is None or not isinstance(err, Exception):
            return False
        where = "the batch" if self.dataset.num_batches == 1 else f"batch {self.index}"
        if isinstance(err, UnpackError):
            raise TypeError(
                f"Building the {self.name} operator: {where}: {err} to {self.origin}."
            ) from None
        hint = tuple_of_batches_hint(self.data)
        if hint:
            raise ValueError(
                f"Building the {self.name} operator failed on the data: {type(err).__name__}: {err}{hint}"
            ) from err
        if isinstance(err, TypeError) and "missing" in str(err) and "required" in str(err):
            raise TypeError(
                f"Building the {self.name} operator: calling the model or the loss on {where} "
                f"failed: {err}. If the model's `__call__` takes more than the inputs (e.g. "
                "`__call__(self, x, rngs)`), pass them with `call_kwargs=` to hvp.flax.from_nnx "
                "(`apply_kwargs=` to hvp.flax.from_linen); if the loss does, wrap it."
            ) from err
        if (
            self.dataset.weighted
            and isinstance(err, TypeError)
            and ("were given" in str(err) or "weights" in str(err))
        ):
            raise TypeError(
                f"Building the {self.name} operator: the batches carry weights (a 3-tuple (inputs, "
                "targets, weights), a 'weights' key, or language-model tokens whose padding mask is "
                "their weight) and the loss was called with them, but it failed: "
                f"{type(err).__name__}: {err}. Use a loss that takes `weights` (hvp.losses."
                "softmax_cross_entropy, hvp.losses.mean_squared_error, or your own "
                "`loss(outputs, targets, weights)` normalised by `weights.sum()`), or pass an "
                "`unpack` returning (inputs, targets) for unweighted data."
            ) from err
        if self.call is not None and not _raised_by_hvp(err):
            raise self._structure_error(err, where) from err
        if (
            type(err) in (ValueError, TypeError)
            and self.dataset.num_batches > 1
            and self.index is not None
        ):
            raise type(err)(f"{where} of the data: {err}") from err
        return False

    def _structure_error(self, err: Exception, where: str) -> Exception:
        """``err`` of the user's function, with the structures it was called on and the signature."""
        call = self.call or ""
        lines = [
            f"Building the {self.name} operator: `{call}` failed on {where} of the data "
            f"with {type(err).__name__}: {err}",
            f"  {call.split('(')[1].split(',')[-1].strip(' )')}: "
            f"{tu.shape_summary(self.arg)}{self.note}",
        ]
        if self.params is not None:
            lines.append(f"  params: {tu.shape_summary(self.params)}")
        if call.startswith("model_fn"):
            lines.append(
                f"The model is called as `{call}` on the inputs of each batch (dtype[shape] "
                "per leaf above): give the data the layout the model expects (e.g. NHWC images "
                "(N, H, W, C) for a convolution, not flat vectors), or pass an `unpack` returning "
                "the right inputs; a parameter it reads must exist in `params` with that shape."
            )
        else:
            lines.append(
                f"The function is called as `{call}` with each batch exactly as the data give "
                "it (dtype[shape] per leaf above): make it read that structure (e.g. `x, y = "
                "batch` needs batches `(inputs, targets)`, `batch['x']` needs dict batches), or "
                "pass the data in the structure it expects; a parameter it reads must exist in "
                "`params` with that shape."
            )
        kind = type(err) if type(err) in (ValueError, TypeError) else TypeError
        return kind("\n".join(lines))


def _check_targets(model_fn, output_loss, unpack, params, dataset, ctx: _Context) -> None:
    """Trace the output loss on every batch with concrete targets (checks labels against the outputs)."""
    out, shapes = None, None
    ctx.params = params
    for k, batch in _batches(dataset):
        ctx.index = k
        ctx.call = None
        with ctx:
            x, y, w = split_batch(batch, unpack)
            key = jax.tree_util.tree_map(lambda a: (np.shape(a), str(jnp.result_type(a))), x)
            if out is None or key != shapes:
                ctx.call, ctx.arg = "model_fn(params, inputs)", x
                out, shapes = jax.eval_shape(model_fn, params, x), key
            ctx.call, ctx.arg = "output_loss(outputs, targets)", y
            ctx.note = f" (outputs: {tu.shape_summary(out)})"
            res = jax.eval_shape(lambda o, y=y, w=w: _call_output_loss(output_loss, o, y, w), out)
            ctx.call, ctx.note = None, ""
            _check_scalar(res, "`loss_fn(model_fn(params, inputs), targets)`")


def _has_custom_vjp(jaxpr) -> bool:
    """Whether a jaxpr (or any jaxpr nested in its equations) calls a ``jax.custom_vjp`` function."""
    return _has_primitive(jaxpr, "custom_vjp_call")


def _model_mode_once(
    kind: str, model_fn, loss_fn, unpack, mode: str, params, dataset, probe, ctx: _Context
) -> str:
    """The GGN's and Fisher's checks of the model and targets, and their product mode.

    Run once per data set, model, loss and mode (:func:`_once`).
    """

    def validate():
        _check_targets(model_fn, loss_fn, unpack, params, probe, ctx)
        return _choose_mode(
            mode, lambda q, b: model_fn(q, split_batch(b, unpack)[0]), params, probe, ctx
        )

    return _once(dataset, (kind, model_fn, loss_fn, unpack, mode), params, validate)


def _choose_mode(mode: str, f_of_batch, params, dataset: Dataset, ctx: _Context) -> str:
    """``"forward"``, or ``"reverse"`` when the function has no forward mode.

    That is when it calls a ``jax.custom_vjp`` function, whose forward-mode
    error JAX raises only when the product is compiled. The function is traced
    (not run) on the first batch of each shape group.
    """
    if mode != "auto":
        return mode
    for k, batch in _first_of_groups(dataset):
        ctx.index = k
        with ctx:
            jaxpr = jax.make_jaxpr(lambda q, b=batch: f_of_batch(q, b))(params)
        if _has_custom_vjp(jaxpr):
            return "reverse"
    return "forward"


def hessian(
    loss_fn: Callable,
    params: PyTree,
    data,
    *,
    wrt=None,
    reduction: str = "mean",
    linearize: bool | str = "auto",
    linearize_budget: int | None = None,
    check_finite: bool = True,
    block: str = "auto",
    stream: bool | str = "auto",
    stream_budget: int | None = None,
    prefetch: int = 1,
) -> CurvatureOperator:
    """The Hessian of ``loss_fn(params, batch) -> scalar`` over a data set, as an operator.

    Args:
      loss_fn: scalar loss of one batch (a mean over its examples when
        ``reduction="mean"``).
      params: pytree of floating arrays (the point the Hessian is taken at).
      data: one batch (pytree of arrays with a leading example axis) or a list
        / iterable of batches; see :mod:`hvp.operators._data`.
      wrt: optional parameter filter (regex string, list of them, or
        ``(path, leaf) -> bool``) giving the Hessian block of those leaves.
      reduction: ``"mean"`` (batches weighted by size: the Hessian of the
        data-set mean loss) or ``"sum"``.
      linearize: ``"auto"`` (default), ``True`` or ``False``. ``True``
        linearises the gradient of every batch once, when the operator is
        built (``jax.linearize``, one compiled call), and every product then
        applies these linear maps: on CPU 1.2-1.6x faster per product than
        forward-over-reverse on an MLP, a CNN and a small transformer
        (``benchmarks/results/cpu/hvp_modes.md``), at the price of keeping the
        forward and backward residuals of every batch in memory (about one
        backward pass's activations per batch) and of one linearisation per
        operator. ``"auto"`` linearises when the parameters and the data are
        concrete (not inside ``jit``/``vmap``) and the estimated residuals
        (the constants of the linearised maps, found by tracing them without
        running: ``jax.eval_shape``) fit in ``linearize_budget``; otherwise the
        products use forward-over-reverse, which keeps nothing between them.
        ``op.linearized`` says which was chosen.
      linearize_budget: bytes the residuals may take with ``linearize="auto"``;
        default :data:`DEFAULT_LINEARIZE_BUDGET` (1 GiB).
      check_finite: check the data for NaN/Inf when the operator is built (in
        memory: one reduction per leaf; streamed: every batch as the first pass
        reads it; :func:`~hvp.operators.check_finite_data`) and raise
        :class:`~hvp.operators.NonFiniteError` naming the batch, the leaf path and
        the count of non-finite values; and raise it when a product computed
        outside ``jit`` contains NaN/Inf. ``False`` skips both checks.
      block: how ``op.matmat`` runs a block of vectors: ``"auto"``, ``"vmap"``
        or ``"map"`` (see :meth:`~hvp.operators.LinearOperator.block_mode`).
      stream: ``"auto"`` (default), ``True`` or ``False``: read the data set one
        batch at a time on every product instead of keeping it on the device (see
        :func:`hvp.operators.as_data` for the memory rule of ``"auto"``: a re-iterable data
        set of more bytes than ``stream_budget`` is streamed). A streamed operator
        (``op.streaming``) runs only outside ``jit``, with the host driver.
      stream_budget: bytes of data ``stream="auto"`` keeps on the device; default
        :func:`hvp.operators.default_stream_budget` (2 GiB on the CPU, a quarter of an
        accelerator's memory).
      prefetch: streamed data sets: batches moved to the device ahead of the one computing
        (default 1: double buffering; at most ``prefetch + 1`` batches are on the device).

    Returns:
      A :class:`CurvatureOperator`: ``op @ v``, ``op.matmat(vs)``, ``op.dense()``.

    Raises:
      NonFiniteError: the data hold NaN or Inf (with ``check_finite=True``).
      TypeError: ``params`` is a Flax module / state, a ``TrainState`` or an
        optax state (the message names the adapter or field to use); non-floating
        parameters; a batch that cannot be unpacked (naming the operator); a loss
        that fails on the batches as given (a bare array unpacked as ``x, y =
        batch``, a tuple indexed by key, a parameter it reads missing: the message
        shows the batch's and the parameters' structure, ``dtype[shape]`` per leaf,
        and the signature it is called with).
      ValueError: an empty data set, batches of different structure (naming the
        index), a tuple of batches (pass a list), bad weights, a loss that is not
        scalar, targets that do not fit the outputs; ``linearize``, ``block`` or
        ``linearize_budget`` not one of their allowed values. The loss is traced on the
        first batch of each shape group with the data concrete, so the
        :mod:`hvp.losses` check the labels there (every batch for a
        :func:`compose` loss and the Flax adapters).

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2), jnp.ones(2),
      ...                 (jnp.eye(2), jnp.zeros(2)))
      >>> H.dense().tolist()
      [[1.0, 0.0], [0.0, 1.0]]
    """
    block_mode = check_block(block)
    _check_linearize(linearize, linearize_budget)
    dataset, block, full, mask = _prepare(
        params,
        data,
        wrt=wrt,
        reduction=reduction,
        stream=stream,
        stream_budget=stream_budget,
        prefetch=prefetch,
        check_finite=check_finite,
    )
    streaming = isinstance(dataset, StreamingDataset)
    if streaming and linearize is True:
        raise ValueError(
            "linearize=True keeps the linearised gradient of every batch in memory, which a "
            "streamed data set cannot: use linearize='auto' or False with a streamed data set "
            "(or stream=False if the data fit on the device)."
        )
    name = "hessian" if wrt is None else f"hessian[{wrt}]"
    _once(
        dataset,
        ("hessian", loss_fn),
        params,
        lambda: _check_loss_fn(loss_fn, params, data, _probe(dataset), name, per_example=False),
    )
    lins = None
    if not streaming and (
        linearize is True
        or (linearize == "auto" and not tu.is_traced(block, full, dataset.groups, dataset.totals))
    ):
        lin = functools.partial(_linearize_groups, loss_fn, mask=mask, meta=dataset.meta)
        budget = DEFAULT_LINEARIZE_BUDGET if linearize_budget is None else linearize_budget
        if linearize is True or _residual_bytes(lin, block, full, dataset.groups) <= budget:
            lins = lin(block, full, dataset.groups)
    return _operator_class(dataset)(
        product=_hessian_product,
        fns=(loss_fn,),
        params=block,
        full=full,
        mask=mask,
        dataset=dataset,
        reduction=reduction,
        lins=lins,
        check_finite=check_finite,
        name=name,
        block=block_mode,
    )


def _check_linearize(linearize, budget) -> None:
    if not (linearize is True or linearize is False or linearize == "auto"):
        raise ValueError(f'`linearize` must be "auto", True or False, got {linearize!r}.')
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 0
    ):
        raise ValueError(
            f"`linearize_budget` must be a number of bytes (an int >= 0) or None for the default "
            f"({DEFAULT_LINEARIZE_BUDGET} bytes), got {budget!r}."
        )


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mask", "meta"))
def _linearize_groups(loss_fn, block, full, groups, *, mask, meta):
    """The gradient of every batch linearised at ``block``, in one compiled call (``Partial``s).

    Stacked groups give one linear map with stacked residuals (applied under ``lax.scan``).
    Compiled once per loss function and shapes: operators rebuilt at new parameters reuse it
    and get linear maps of the same structure (so their products reuse the compiled product).
    """

    def lin(batch):
        grad = jax.grad(lambda q: loss_fn(_merge(q, full, mask), batch))
        return jax.linearize(grad, block)[1]

    return tuple(
        jax.vmap(lin)(group) if m.stacked else lin(group) for group, m in zip(groups, meta)
    )


def _residual_bytes(lin, block, full, groups) -> int:
    """Bytes of the arrays the linearised maps keep (traced without running, shared with the call)."""
    shapes = jax.eval_shape(lin, block, full, groups)
    return int(
        sum(
            int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
            for x in jax.tree_util.tree_leaves(shapes)
        )
    )


def _check_loss_fn(loss_fn, params, data, dataset, name, *, per_example: bool) -> None:
    """Trace ``loss_fn`` on the first batch of each shape group with the data concrete.

    The built-in losses then see concrete targets and check them (labels in
    range, widths); a :class:`Composed` loss has the targets of every batch
    checked. Errors name the operator, the batch and the fix.
    """
    origin = getattr(loss_fn, "origin", "your loss_fn (it could not split the batch)")
    ctx = _Context(name, data, dataset, origin, params=params)
    if isinstance(loss_fn, Composed):  # the model first: its errors then name the model
        _check_targets(loss_fn.model_fn, loss_fn.output_loss, loss_fn.unpack, params, dataset, ctx)
        ctx.call, ctx.note = None, ""
    for k, batch in _first_of_groups(dataset):
        ctx.index = k
        concrete = True
        if per_example:
            batch, concrete = _first_example(batch)
            ctx.note = " (its first example: the empirical Fisher evaluates the loss per example)"
        ctx.call, ctx.arg = "loss_fn(params, batch)", batch
        with ctx:
            if concrete:  # the data stay concrete, so the built-in losses check the targets
                out = jax.eval_shape(lambda p, b=batch: loss_fn(p, b), params)
            else:
                out = jax.eval_shape(loss_fn, params, batch)
            ctx.call = None
            _check_scalar(out, "`loss_fn(params, batch)`")
        if not per_example:
            _check_example_axis(loss_fn, params, batch, name)


def _check_example_axis(loss_fn, params, batch, name: str) -> None:
    """Catch a loss that unpacks a bare array batch of 2 or 3 examples (``x, y = batch``).

    Such a loss traces without error (it reads the first rows as inputs and targets) and gives a
    wrong curvature; it fails on one more example, which a loss of the examples never does.
    """
    if not isinstance(batch, (jax.Array, np.ndarray)) or np.ndim(batch) == 0:
        return
    n = np.shape(batch)[0]
    if n > 3:  # `x, y[, w] = batch` fails on more rows, and was caught above
        return
    more = jax.ShapeDtypeStruct((n + 1, *np.shape(batch)[1:]), jnp.result_type(batch))
    try:
        jax.eval_shape(loss_fn, params, more)
    except (ValueError, TypeError) as err:
        if "unpack" not in str(err):
            return
        raise TypeError(
            f"Building the {name} operator: `loss_fn(params, batch)` runs on the batch "
            f"{tu.shape_summary(batch)} ({n} examples) but fails on {n + 1} examples with "
            f"{type(err).__name__}: {err}. The batch is a bare array and the loss unpacks its "
            "example axis (e.g. `x, y = batch` reads its first rows as inputs and targets). Pass "
            "batches `(inputs, targets)` (a tuple of arrays with a leading example axis), or "
            "make the loss read one array."
        ) from err


def _first_example(batch):
    """The first example of ``batch`` and whether it is concrete.

    ``(batch[:1], True)``, or shape-only ``(ShapeDtypeStruct batch, False)`` when a leaf cannot
    be sliced as it is (a batch sharded over an explicit mesh axis needs an output sharding).
    """
    try:
        return tu.map(lambda a: a[:1], batch), True
    except Exception:  # noqa: BLE001 - any slicing failure: fall back to shapes
        return (
            tu.map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(a.shape[1:]), a.dtype), batch),
            False,
        )


def ggn(
    model_fn: Callable,
    loss_fn: Callable,
    params: PyTree,
    data,
    *,
    unpack: Callable | None = None,
    wrt=None,
    reduction: str = "mean",
    check_finite: bool = True,
    mode: str = "auto",
    block: str = "auto",
    stream: bool | str = "auto",
    stream_budget: int | None = None,
    prefetch: int = 1,
) -> CurvatureOperator:
    """The generalised Gauss-Newton matrix ``J^T H_L J`` over a data set, matrix-free.

    Args:
      model_fn: ``model_fn(params, inputs) -> outputs`` (any pytree of outputs).
      loss_fn: ``loss_fn(outputs, targets) -> scalar``, or
        ``loss_fn(outputs, targets, weights)`` for weighted batches; if it has an
        ``output_hvp(outputs, targets, u[, weights])`` method (as
        :data:`hvp.losses.softmax_cross_entropy` and
        :data:`hvp.losses.mean_squared_error` do) the output-space Hessian is
        applied in closed form, otherwise by forward-over-reverse on ``loss_fn``.
      params: as in :func:`hessian`.
      data: as in :func:`hessian`; batches may carry weights.
      wrt: as in :func:`hessian`.
      reduction: as in :func:`hessian`.
      check_finite: as in :func:`hessian`.
      unpack: ``batch -> (inputs, targets)`` or ``(inputs, targets, weights)``;
        the default accepts ``(inputs, targets[, weights])`` tuples, common dict
        keys and ``{"inputs": tokens}`` (:func:`default_unpack`).
      mode: ``"auto"`` (forward-mode ``J v`` unless the model has no forward
        mode, e.g. a ``jax.custom_vjp`` layer: then reverse mode), ``"forward"``
        or ``"reverse"`` (``J v`` as the transpose of the VJP; see the module
        docstring). The mode used is ``op.mode``.
      block: as in :func:`hessian`.
      stream: as in :func:`hessian`.
      stream_budget: as in :func:`hessian`.
      prefetch: as in :func:`hessian`.

    The GGN is positive semi-definite when ``loss_fn`` is convex in the
    outputs (cross-entropy, squared error).

    Raises:
      TypeError: a batch cannot be unpacked (the message says how), weighted
        batches with a loss that takes no weights.
      ValueError: targets that do not fit the outputs (checked on every batch
        for the :mod:`hvp.losses`: labels out of range, widths), a loss that
        is not scalar.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> w = jnp.ones((3, 2))
      >>> x, y = jnp.ones((4, 3)), jnp.array([0, 1, 1, 0])
      >>> G = hvp.ggn(lambda p, x: x @ p, hvp.losses.softmax_cross_entropy, w, (x, y))
      >>> G.mode, G.dense().shape
      ('forward', (6, 6))
    """
    _check_mode(mode)
    block_mode = check_block(block)
    dataset, block, full, mask = _prepare(
        params,
        data,
        wrt=wrt,
        reduction=reduction,
        stream=stream,
        stream_budget=stream_budget,
        prefetch=prefetch,
        check_finite=check_finite,
    )
    name = "ggn" if wrt is None else f"ggn[{wrt}]"
    probe = _probe(dataset)
    ctx = _Context(name, data, probe, "hvp.ggn")

    model_mode = _model_mode_once(
        "ggn", model_fn, loss_fn, unpack, mode, params, dataset, probe, ctx
    )
    return _operator_class(dataset)(
        product=_ggn_product,
        fns=(model_fn, loss_fn, unpack),
        params=block,
        full=full,
        mask=mask,
        dataset=dataset,
        reduction=reduction,
        lins=None,
        check_finite=check_finite,
        name=name,
        mode=model_mode,
        block=block_mode,
    )


def _check_fisher_loss(loss_fn) -> None:
    missing = [
        m for m in ("sample", "fisher_output_hvp") if not callable(getattr(loss_fn, m, None))
    ]
    if missing:
        raise TypeError(
            f"hvp.fisher needs an output loss that can sample targets from the model, but "
            f"{loss_fn!r} has no {' or '.join(f'`{m}`' for m in missing)} method. Use "
            "hvp.losses.softmax_cross_entropy or hvp.losses.mean_squared_error, use hvp.ggn (equal "
            "to the Fisher in expectation for these losses), or give your loss (the negative "
            "log-likelihood of p(y | outputs), up to scale) the two methods: "
            "`sample(outputs, key, num_samples)` returning targets of shape (num_samples, "
            "*targets.shape) drawn from p(y | outputs), and `fisher_output_hvp(outputs, samples, u, "
            "weights=None)` returning sum_i c_i mean_s g_is (g_is . u_i) for the per-position "
            "gradients g_is of the loss at the sampled targets (c_i: the position's weight in the "
            "loss); see hvp.losses.MeanSquaredError for an example."
        )


def _check_fisher_key(key):
    """A typed PRNG key (old-style ``uint32[2]`` keys are wrapped), or a clear error."""
    if key is None or not hasattr(key, "dtype"):
        raise TypeError(
            f"`key` must be a JAX PRNG key (pass key=jax.random.key(seed)), got {type(key).__name__}."
        )
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"`key` must be a single PRNG key, got a batch of shape {key.shape}.")
        return key
    if key.dtype == jnp.uint32 and key.shape == (2,):
        return jax.random.wrap_key_data(key)
    raise TypeError(
        f"`key` must be a JAX PRNG key (pass key=jax.random.key(seed)), got an array of dtype "
        f"{key.dtype} and shape {key.shape}."
    )


@functools.partial(
    jax.jit, static_argnums=(0, 1, 2), static_argnames=("mask", "meta", "num_samples")
)
def _sample_groups(model_fn, loss_fn, unpack, block, full, groups, key, *, mask, meta, num_samples):
    """Targets sampled from the model for every batch (batch ``k`` uses ``fold_in(key, k)``)."""
    params = _merge(block, full, mask)

    def one(batch, k):
        x, _, _ = split_batch(batch, unpack)
        return loss_fn.sample(model_fn(params, x), jax.random.fold_in(key, k), num_samples)

    out: list = []
    start = 0
    for group, m in zip(groups, meta):
        if m.stacked:
            out.append(jax.vmap(one)(group, start + jnp.arange(m.num_batches)))
        else:
            out.append(one(group, start))
        start += m.num_batches
    return tuple(out)


def fisher(
    model_fn: Callable,
    loss_fn: Callable,
    params: PyTree,
    data,
    *,
    key,
    mc_samples: int = 1,
    unpack: Callable | None = None,
    wrt=None,
    reduction: str = "mean",
    check_finite: bool = True,
    mode: str = "auto",
    block: str = "auto",
    stream: bool | str = "auto",
    stream_budget: int | None = None,
    prefetch: int = 1,
) -> CurvatureOperator:
    r"""The Monte-Carlo Fisher ``J^T E_{y~p(y|x)}[g g^T] J`` over a data set, matrix-free.

    The Fisher information of the model's predictive distribution
    :math:`p(y \mid z)` (the likelihood whose negative log is ``loss_fn``),
    with labels sampled from the model, not taken from the data (that is the
    empirical Fisher, :func:`empirical_fisher`; Kunstner et al., 2019):

    .. math::

       F = \sum_b \frac{n_b}{N} J_b^\top \Big( \sum_i c_i \frac1S \sum_{s=1}^S
           g_{is} g_{is}^\top \Big) J_b, \qquad
       g_{is} = \nabla_{z_i} \ell(z_i, y_{is}), \quad y_{is} \sim p(y \mid z_i),

    with ``S = mc_samples`` samples per position (example, or token), ``c_i``
    the position's weight in the loss (``1/n_b``, or ``w_i / sum(w)`` for
    weighted batches) and ``J_b`` the Jacobian of the model's outputs. Since
    :math:`\mathbb E[g g^\top] = \nabla^2_z \ell` for these losses, the
    expectation of ``F`` is the GGN (:func:`ggn`; Martens, 2014, "New insights
    and perspectives on the natural gradient method"), and ``F`` converges to it
    as :math:`1/\sqrt S`. Each sample term is an outer product, so ``F`` is
    positive semi-definite (``op.psd`` is ``True``); its rank is at most
    ``S`` times the number of positions.

    The labels are drawn **once, when the operator is built** (one forward
    pass over the data set; batch ``k`` uses ``jax.random.fold_in(key, k)``),
    so the operator is a fixed matrix: the same ``key`` gives the same
    operator, and every algorithm sees one consistent PSD matrix. A product
    costs what a GGN product costs (``S`` only enlarges the output-space step).

    A **streamed** data set (``stream=True``, or ``stream="auto"`` above ``stream_budget``,
    as in :func:`hessian`) keeps no labels between products: each product draws batch ``k``'s
    labels again from the model's outputs at the operator's point with the same
    ``fold_in(key, k)`` (``k`` the batch's index in the in-memory data set), so every pass
    applies the same matrix, equal to the in-memory Fisher's up to rounding; the sampling is
    then part of every product (a draw per output position and sample, next to the model's
    forward pass).

    Args:
      model_fn: as in :func:`ggn`.
      loss_fn: as in :func:`ggn`, and it must have ``sample(outputs, key,
        num_samples)`` and ``fisher_output_hvp(outputs, samples, u,
        weights=None)`` (the :mod:`hvp.losses` do: categorical labels for
        softmax cross-entropy, Gaussian targets with variance 1/2 for squared
        error, see :mod:`hvp.operators._losses`).
      params: as in :func:`ggn`.
      data: as in :func:`ggn`.
      unpack: as in :func:`ggn`.
      wrt: as in :func:`ggn`.
      reduction: as in :func:`ggn`.
      check_finite: as in :func:`ggn`.
      mode: as in :func:`ggn`.
      block: as in :func:`ggn`.
      key: a JAX PRNG key (``jax.random.key(seed)``), required.
      mc_samples: ``S``, the number of sampled labels per position (``>= 1``).
      stream: as in :func:`hessian`.
      stream_budget: as in :func:`hessian`.
      prefetch: as in :func:`hessian`.

    Raises:
      TypeError: a loss without ``sample``/``fisher_output_hvp`` (the message
        says what to implement), a missing or invalid ``key``, the errors of
        :func:`ggn`.
      ValueError: ``mc_samples`` not a positive int, the errors of :func:`ggn`.

    Examples:
      >>> import jax, jax.numpy as jnp, hvp
      >>> x, y = jnp.eye(3), jnp.array([0, 1, 1])
      >>> F = hvp.fisher(lambda p, x: x @ p, hvp.losses.softmax_cross_entropy, jnp.zeros((3, 2)),
      ...                (x, y), key=jax.random.key(0), mc_samples=4)
      >>> F.kind, F.psd, F.dense().shape
      ('fisher', True, (6, 6))
    """
    _check_fisher_loss(loss_fn)
    key = _check_fisher_key(key)
    if (
        isinstance(mc_samples, bool)
        or not isinstance(mc_samples, (int, np.integer))
        or mc_samples < 1
    ):
        raise ValueError(
            f"`mc_samples` must be a positive int (labels sampled per example), got {mc_samples!r}."
        )
    _check_mode(mode)
    block_mode = check_block(block)
    dataset, block, full, mask = _prepare(
        params,
        data,
        wrt=wrt,
        reduction=reduction,
        stream=stream,
        stream_budget=stream_budget,
        prefetch=prefetch,
        check_finite=check_finite,
    )
    name = "fisher" if wrt is None else f"fisher[{wrt}]"
    probe = _probe(dataset)
    ctx = _Context(name, data, probe, "hvp.fisher")

    model_mode = _model_mode_once(
        "fisher", model_fn, loss_fn, unpack, mode, params, dataset, probe, ctx
    )
    common: dict[str, Any] = dict(
        fns=(model_fn, loss_fn, unpack),
        params=block,
        full=full,
        mask=mask,
        dataset=dataset,
        reduction=reduction,
        lins=None,
        check_finite=check_finite,
        name=name,
        mode=model_mode,
        block=block_mode,
    )
    if isinstance(dataset, StreamingDataset):
        streamed = _StreamingFisher(product=_mc_fisher_stream_product(int(mc_samples)), **common)
        streamed.sample_key = key
        return streamed
    samples = _sample_groups(
        model_fn,
        loss_fn,
        unpack,
        block,
        full,
        dataset.groups,
        key,
        mask=mask,
        meta=dataset.meta,
        num_samples=int(mc_samples),
    )
    sampled = _SampledFisher(product=_mc_fisher_product, **common)
    sampled.samples = samples
    return sampled


class _SampledFisher(CurvatureOperator):
    """The Monte-Carlo Fisher over an in-memory data set, with the targets sampled when built.

    ``op.dataset`` is the data set itself (so :func:`hvp.operators.data_loss`,
    :func:`hvp.operators.data_gradient` and the tools built on them see the data's targets);
    the products scan every batch together with its sampled targets, ``(batch, samples)``.
    """

    samples: tuple = ()

    def _sources(self) -> tuple:
        return tuple(zip(self.dataset.groups, self.samples))

    def _children(self):
        return (*super()._children(), self.samples)

    @classmethod
    def _rebuild(cls, static, children):
        *rest, samples = children
        op = super()._rebuild(static, tuple(rest))
        op.samples = samples
        return op


def empirical_fisher(
    loss_fn: Callable,
    params,
    data,
    *,
    wrt=None,
    reduction: str = "mean",
    check_finite: bool = True,
    mode: str = "auto",
    block: str = "auto",
    stream: bool | str = "auto",
    stream_budget: int | None = None,
    prefetch: int = 1,
) -> CurvatureOperator:
    """The empirical Fisher ``(1/N) sum_i g_i g_i^T`` (``sum_i`` with ``reduction="sum"``).

    ``g_i`` is the gradient of ``loss_fn(params, example_batch)`` on a batch
    holding example ``i`` alone (``loss_fn`` is evaluated under ``vmap`` on
    single-example batches). Positive semi-definite by construction. With
    weighted batches example ``i`` enters with weight ``W_i / W`` (its sum of
    weights over the data set's), the empirical Fisher of the weighted mean
    loss. ``mode`` as in :func:`ggn` (``"auto"`` falls back to reverse mode
    when the model or the loss is a ``jax.custom_vjp`` function); other
    arguments (``block``, ``stream``, ``stream_budget`` and ``prefetch`` included) as in
    :func:`hessian`.

    Examples:
        >>> import jax.numpy as jnp, hvp
        >>> loss = hvp.operators.compose(lambda p, x: x @ p, hvp.losses.mean_squared_error)
        >>> F = hvp.empirical_fisher(loss, jnp.ones((2, 1)), (jnp.eye(2), jnp.zeros((2, 1))))
        >>> F.dense().tolist()  # g_i = 2 x_i (x_i . p), F = (1/2) sum_i g_i g_i^T
        [[2.0, 0.0], [0.0, 2.0]]
    """
    _check_mode(mode)
    block_mode = check_block(block)
    dataset, block, full, mask = _prepare(
        params,
        data,
        wrt=wrt,
        reduction=reduction,
        stream=stream,
        stream_budget=stream_budget,
        prefetch=prefetch,
        check_finite=check_finite,
    )
    name = "empirical_fisher" if wrt is None else f"empirical_fisher[{wrt}]"
    probe = _probe(dataset)
    ctx = _Context(name, data, probe, getattr(loss_fn, "origin", "your loss_fn"))

    def validate():
        try:
            _check_loss_fn(loss_fn, params, data, probe, name, per_example=True)
        except Exception as err:
            if not any(
                tu.explicit_sharding(x) is not None for x in jax.tree_util.tree_leaves(params)
            ):
                raise
            raise ValueError(
                "The empirical Fisher evaluates the loss on one example at a time (under `vmap`), "
                f"and this model failed on a one-example batch under its explicit mesh ({err}). A "
                "model that shards its activations' example axis (e.g. `out_sharding=P('batch', "
                "...)`) cannot run on one example: use `hvp.ggn` or `hvp.hessian`, or take the "
                "activation shardings from the inputs (`jax.typeof(x).sharding`) instead of fixing "
                "them."
            ) from err
        # A custom_vjp in the loss shows in its trace on a whole batch as on one example (and a
        # batch sharded over an explicit mesh axis cannot be sliced inside the trace).
        return _choose_mode(mode, loss_fn, params, probe, ctx)

    fisher_mode = _once(dataset, ("empirical_fisher", loss_fn, mode), params, validate)
    return _operator_class(dataset)(
        product=_fisher_product,
        fns=(loss_fn,),
        params=block,
        full=full,
        mask=mask,
        dataset=dataset,
        reduction=reduction,
        lins=None,
        check_finite=check_finite,
        name=name,
        mode=fisher_mode,
        block=block_mode,
    )
