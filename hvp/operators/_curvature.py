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

import jax
import jax.numpy as jnp
import numpy as np

from hvp import tree as tu
from hvp.operators import _blocks
from hvp.operators._base import LinearOperator, _has_primitive, check_block
from hvp.operators._data import (
    Dataset,
    UnpackError,
    as_dataset,
    batch_weights,
    default_unpack,
    split_batch,
    tuple_of_batches_hint,
    weighted_sum,
)
from hvp.typing import PyTree

__all__ = [
    "CurvatureOperator",
    "hessian",
    "ggn",
    "empirical_fisher",
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
      kind: ``"hessian"``, ``"ggn"`` or ``"empirical_fisher"`` (read-only).
      reduction: ``"mean"`` or ``"sum"``.
      num_examples, num_batches: size of the data set.
      linearized: whether products apply stored linearisations.
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

    # public attributes -------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"hessian"``, ``"ggn"`` or ``"empirical_fisher"``: the curvature's name."""
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
        sources = self._lins if linear else self.dataset.groups

        def mv(src):
            return src(v) if linear else self._product(self, src, v)

        total = weighted_sum(mv, self.dataset, self.reduction, sources=sources, zeros=v)
        return tu.like_sharding(_constrain(total, self._shardings), self.params)


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


def _prepare(params, data, *, wrt, reduction):
    _check_params(params)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
    tu.check_mesh_context(params)
    dataset = as_dataset(data)
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


class _Context:
    """Turns errors raised while an operator is built on concrete data into ones that say what to do."""

    def __init__(self, name: str, data, dataset: Dataset, origin: str):
        self.name, self.data, self.dataset, self.origin = name, data, dataset, origin
        self.index = None

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
        if (
            type(err) in (ValueError, TypeError)
            and self.dataset.num_batches > 1
            and self.index is not None
        ):
            raise type(err)(f"{where} of the data: {err}") from err
        return False


def _check_targets(model_fn, output_loss, unpack, params, dataset, ctx: _Context) -> None:
    """Trace the output loss on every batch with concrete targets (checks labels against the outputs)."""
    out, shapes = None, None
    for k, batch in _batches(dataset):
        ctx.index = k
        with ctx:
            x, y, w = split_batch(batch, unpack)
            key = jax.tree_util.tree_map(lambda a: (np.shape(a), str(jnp.result_type(a))), x)
            if out is None or key != shapes:
                out, shapes = jax.eval_shape(model_fn, params, x), key
            res = jax.eval_shape(lambda o, y=y, w=w: _call_output_loss(output_loss, o, y, w), out)
            _check_scalar(res, "`loss_fn(model_fn(params, inputs), targets)`")


def _has_custom_vjp(jaxpr) -> bool:
    """Whether a jaxpr (or any jaxpr nested in its equations) calls a ``jax.custom_vjp`` function."""
    return _has_primitive(jaxpr, "custom_vjp_call")


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
      check_finite: raise :class:`~hvp.operators.NonFiniteError` when a product
        computed outside ``jit`` contains NaN/Inf.
      block: how ``op.matmat`` runs a block of vectors: ``"auto"``, ``"vmap"``
        or ``"map"`` (see :meth:`~hvp.operators.LinearOperator.block_mode`).

    Returns:
      A :class:`CurvatureOperator`: ``op @ v``, ``op.matmat(vs)``, ``op.dense()``.

    Raises:
      TypeError: ``params`` is a Flax module / state, a ``TrainState`` or an
        optax state (the message names the adapter or field to use); non-floating
        parameters; a batch that cannot be unpacked (naming the operator).
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
    dataset, block, full, mask = _prepare(params, data, wrt=wrt, reduction=reduction)
    name = "hessian" if wrt is None else f"hessian[{wrt}]"
    _once(
        dataset,
        ("hessian", loss_fn),
        params,
        lambda: _check_loss_fn(loss_fn, params, data, dataset, name, per_example=False),
    )
    lins = None
    if linearize is True or (
        linearize == "auto" and not tu.is_traced(block, full, dataset.groups, dataset.totals)
    ):
        lin = functools.partial(_linearize_groups, loss_fn, mask=mask, meta=dataset.meta)
        budget = DEFAULT_LINEARIZE_BUDGET if linearize_budget is None else linearize_budget
        if linearize is True or _residual_bytes(lin, block, full, dataset.groups) <= budget:
            lins = lin(block, full, dataset.groups)
    return CurvatureOperator(
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
    ctx = _Context(name, data, dataset, origin)
    for k, batch in _first_of_groups(dataset):
        ctx.index = k
        concrete = True
        if per_example:
            batch, concrete = _first_example(batch)
        with ctx:
            if concrete:  # the data stay concrete, so the built-in losses check the targets
                out = jax.eval_shape(lambda p, b=batch: loss_fn(p, b), params)
            else:
                out = jax.eval_shape(loss_fn, params, batch)
            _check_scalar(out, "`loss_fn(params, batch)`")
    if isinstance(loss_fn, Composed):
        _check_targets(loss_fn.model_fn, loss_fn.output_loss, loss_fn.unpack, params, dataset, ctx)


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
    dataset, block, full, mask = _prepare(params, data, wrt=wrt, reduction=reduction)
    name = "ggn" if wrt is None else f"ggn[{wrt}]"
    ctx = _Context(name, data, dataset, "hvp.ggn")

    def validate():
        _check_targets(model_fn, loss_fn, unpack, params, dataset, ctx)
        return _choose_mode(
            mode, lambda q, b: model_fn(q, split_batch(b, unpack)[0]), params, dataset, ctx
        )

    model_mode = _once(dataset, ("ggn", model_fn, loss_fn, unpack, mode), params, validate)
    return CurvatureOperator(
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
) -> CurvatureOperator:
    """The empirical Fisher ``(1/N) sum_i g_i g_i^T`` (``sum_i`` with ``reduction="sum"``).

    ``g_i`` is the gradient of ``loss_fn(params, example_batch)`` on a batch
    holding example ``i`` alone (``loss_fn`` is evaluated under ``vmap`` on
    single-example batches). Positive semi-definite by construction. With
    weighted batches example ``i`` enters with weight ``W_i / W`` (its sum of
    weights over the data set's), the empirical Fisher of the weighted mean
    loss. ``mode`` as in :func:`ggn` (``"auto"`` falls back to reverse mode
    when the model or the loss is a ``jax.custom_vjp`` function); other
    arguments (``block`` included) as in :func:`hessian`.

    Examples:
        >>> import jax.numpy as jnp, hvp
        >>> loss = hvp.operators.compose(lambda p, x: x @ p, hvp.losses.mean_squared_error)
        >>> F = hvp.empirical_fisher(loss, jnp.ones((2, 1)), (jnp.eye(2), jnp.zeros((2, 1))))
        >>> F.dense().tolist()  # g_i = 2 x_i (x_i . p), F = (1/2) sum_i g_i g_i^T
        [[2.0, 0.0], [0.0, 2.0]]
    """
    _check_mode(mode)
    block_mode = check_block(block)
    dataset, block, full, mask = _prepare(params, data, wrt=wrt, reduction=reduction)
    name = "empirical_fisher" if wrt is None else f"empirical_fisher[{wrt}]"
    ctx = _Context(name, data, dataset, getattr(loss_fn, "origin", "your loss_fn"))

    def validate():
        try:
            _check_loss_fn(loss_fn, params, data, dataset, name, per_example=True)
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
        return _choose_mode(mode, loss_fn, params, dataset, ctx)

    fisher_mode = _once(dataset, ("empirical_fisher", loss_fn, mode), params, validate)
    return CurvatureOperator(
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
