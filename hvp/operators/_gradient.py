r"""The gradient of a curvature operator's data-set loss, through the operator's own data loop.

A :class:`~hvp.operators.CurvatureOperator` knows its loss, its point and its data set with the
exact batch weights (:meth:`hvp.operators.Dataset.weights`: :math:`n_b/N`, :math:`W_b/W` or 1).
:func:`data_gradient` computes

.. math:: \nabla L(\theta) = \sum_b w_b \nabla \ell_b(\theta)

with that same reduction: the operator is rebuilt with a per-batch product that returns the
batch gradient (the tangent is ignored) and applied once, so the gradient goes through the
very loop (one ``lax.scan`` per group of equally shaped batches) that the curvature products
use; there is no second data loop to drift from it.
"""

from __future__ import annotations

import jax

from hvp import tree as tu
from hvp.operators._curvature import (
    CurvatureOperator,
    _call_output_loss,
    _product_of,
)
from hvp.operators._data import split_batch
from hvp.typing import PyTree

__all__ = ["data_gradient"]


def _batch_loss(op: CurvatureOperator, q, batch):
    """The loss of one batch at the parameter block ``q`` (the loss the operator was built from)."""
    if len(op._fns) == 3:  # hvp.ggn: (model_fn, output_loss, unpack)
        model_fn, loss_fn, unpack = op._fns
        x, y, w = split_batch(batch, unpack)
        return _call_output_loss(loss_fn, model_fn(op.full_params(q), x), y, w)
    (loss_fn,) = op._fns
    return loss_fn(op.full_params(q), batch)


@_product_of("gradient")
def _gradient_product(op: CurvatureOperator, batch, v):  # noqa: ARG001 - v is only the shape
    return jax.grad(lambda q: _batch_loss(op, q, batch))(op.params)


def data_gradient(op: CurvatureOperator) -> PyTree:
    r"""Gradient of the data-set loss behind a curvature operator, at the operator's point.

    :math:`\nabla L(\theta) = \sum_b w_b \nabla_\theta \ell_b(\theta)` over the operator's data
    set, with the batch weights of its products (``reduction="mean"``: the gradient of the
    data-set mean loss, exact for batches of different sizes and for weighted batches), taken
    with respect to the operator's parameter block (``wrt=``) with the other parameters fixed.
    For :func:`hvp.hessian` and :func:`hvp.empirical_fisher` the loss is ``loss_fn(params,
    batch)``; for :func:`hvp.ggn` it is ``output_loss(model_fn(params, inputs), targets)``.
    Cost: one gradient per batch (forward and backward pass), compiled once per operator
    structure.

    Args:
      op: a :class:`~hvp.operators.CurvatureOperator` (from :func:`hvp.hessian`,
        :func:`hvp.ggn` or :func:`hvp.empirical_fisher`).

    Returns:
      A pytree like ``op.params`` (the dtype of the parameters).

    Raises:
      TypeError: ``op`` is not a curvature operator (a dense or matvec operator has no loss).
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
    grad_op = CurvatureOperator(
        product=_gradient_product,
        fns=op._fns,
        params=op.params,
        full=op._full,
        mask=op._mask,
        dataset=op.dataset,
        reduction=op.reduction,
        lins=None,  # the linearised products keep no loss; the gradient needs the batches
        check_finite=op.check_finite,
        name=f"gradient of the {op.name} loss",
        shardings=op._shardings,
        mode=op.mode,
        block=op.block,
    )
    return grad_op.mv(tu.zeros_like(op.params))
