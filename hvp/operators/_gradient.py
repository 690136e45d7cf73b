r"""The gradient of a curvature operator's data-set loss, through the shared data loop.

A :class:`~hvp.operators.CurvatureOperator` knows its loss, its point and its data set with the
exact batch weights (:meth:`hvp.operators.Dataset.weights`: :math:`n_b/N`, :math:`W_b/W` or 1).
:func:`data_gradient` computes

.. math:: \nabla L(\theta) = \sum_b w_b \nabla \ell_b(\theta)

with that same reduction, :func:`~hvp.operators.weighted_sum` (one ``lax.scan`` per group of
equally shaped batches), the one data loop that the curvature products and
:func:`~hvp.operators.data_loss_and_grad` go through; a streamed operator's data set
(:class:`~hvp.operators.StreamingDataset`) is read in one pass of its own
:meth:`~hvp.operators.StreamingDataset.reduce`, with the same weights, as its products are.
"""

from __future__ import annotations

from typing import Any

import jax

from hvp import tree as tu
from hvp.operators._curvature import CurvatureOperator
from hvp.operators._data import _axpy, weighted_sum
from hvp.operators._value import batch_loss
from hvp.typing import PyTree

__all__ = ["data_gradient"]


def _batch_grad(op: CurvatureOperator, batch):
    """The gradient of one batch's loss at the operator's point (w.r.t. its parameter block)."""
    return jax.grad(batch_loss(op))(op.params, batch)


@jax.jit
def _in_memory(op: CurvatureOperator):
    """``sum_b w_b grad l_b`` through :func:`weighted_sum`: compiled once per operator structure."""
    total = weighted_sum(lambda b: _batch_grad(op, b), op.dataset, op.reduction)
    return tu.like_sharding(total, op.params)


@jax.jit
def _stream_step(op: CurvatureOperator, batch, w, acc):
    """``acc + w grad l_b`` for one streamed batch (compiled once per batch shape)."""
    return _axpy(w, _batch_grad(op, batch), acc)


def data_gradient(op: CurvatureOperator) -> PyTree:
    r"""Gradient of the data-set loss behind a curvature operator, at the operator's point.

    :math:`\nabla L(\theta) = \sum_b w_b \nabla_\theta \ell_b(\theta)` over the operator's data
    set, with the batch weights of its products (``reduction="mean"``: the gradient of the
    data-set mean loss, exact for batches of different sizes and for weighted batches), taken
    with respect to the operator's parameter block (``wrt=``) with the other parameters fixed.
    For :func:`hvp.hessian` and :func:`hvp.empirical_fisher` the loss is ``loss_fn(params,
    batch)``; for :func:`hvp.ggn` it is ``output_loss(model_fn(params, inputs), targets)``
    (:func:`hvp.operators.batch_loss`). The reduction is :func:`hvp.operators.weighted_sum`,
    the data loop of the products and of :func:`hvp.operators.data_loss_and_grad`; a streamed
    operator (``op.streaming``) reads its data set in one pass, as one of its products does.
    Cost: one gradient per batch (forward and backward pass), compiled once per operator
    structure (per batch shape when streamed).

    Args:
      op: a :class:`~hvp.operators.CurvatureOperator` (from :func:`hvp.hessian`,
        :func:`hvp.ggn` or :func:`hvp.empirical_fisher`), in memory or streamed.

    Returns:
      A pytree like ``op.params`` (the dtype of the parameters).

    Raises:
      TypeError: ``op`` is not a curvature operator (a dense or matvec operator has no loss).
      ValueError: a streamed operator inside ``jax.jit`` (the host reads its batches).
      NonFiniteError: the gradient has NaN or Inf (with ``check_finite``, outside ``jit``).

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> from hvp.operators import data_gradient
      >>> loss = lambda p, b: jnp.mean((b[0] * p - b[1]) ** 2)  # gradient 2 mean(x (x p - y))
      >>> H = hvp.hessian(loss, jnp.array(0.0), [(jnp.array([1.0, 1.0]), jnp.array([1.0, 1.0])),
      ...                                      (jnp.array([2.0]), jnp.array([0.0]))])
      >>> float(data_gradient(H))  # (2 / 3) * (-1 - 1 + 0)
      -1.3333333333333333
    """
    if not isinstance(op, CurvatureOperator):
        raise TypeError(
            f"`op` must be a curvature operator (hvp.hessian, hvp.ggn or hvp.empirical_fisher), "
            f"got {type(op).__name__}: a dense or matvec operator has no loss to differentiate. "
            "Pass the gradient yourself where a function accepts `gradient=`."
        )
    traced = tu.is_traced(op.params)
    if op.streaming:
        if traced:
            from hvp.operators._curvature import _streaming_in_jit_error

            raise _streaming_in_jit_error(op)
        ds: Any = op.dataset  # a StreamingDataset
        out = ds.reduce(
            op.params,
            lambda batch, w, acc: _stream_step(op, batch, w, acc),
            tu.zeros_like(op.params),
            ds.weights(op.reduction),
        )
        out = tu.like_sharding(out, op.params)
    else:
        out = _in_memory(op)
    if op.check_finite and not traced:
        op._raise_if_nonfinite(out, "data-set gradient")
    return out
