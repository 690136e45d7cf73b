r"""The loss and its gradient over an operator's data set.

A :class:`~hvp.operators.CurvatureOperator` holds a loss (``loss_fn(params, batch)`` for the
Hessian and the empirical Fisher, ``loss(model_fn(params, inputs), targets[, weights])`` for
the GGN) and a data set. :func:`data_loss` and :func:`data_loss_and_grad` evaluate the data-set
loss :math:`L(\theta) = \sum_b w_b L_{B_b}(\theta)` the operator is the curvature of (the same
weights :math:`w_b = n_b/N`, :math:`W_b/W` or 1, through the same data loop,
:func:`~hvp.operators.weighted_sum`), at the operator's parameters or at any other point of the
same shape: the loss-landscape and influence tools evaluate it on grids of points under
``vmap``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from hvp import tree as tu
from hvp.operators._curvature import CurvatureOperator, _call_output_loss
from hvp.operators._data import split_batch, weighted_sum

__all__ = ["batch_loss", "data_loss", "data_loss_and_grad"]


def _check_op(op, what: str) -> None:
    if not isinstance(op, CurvatureOperator):
        raise TypeError(
            f"{what} needs a curvature operator over a data set (hvp.hessian, hvp.ggn or "
            f"hvp.empirical_fisher), got {type(op).__name__}: a matrix-free operator knows no loss."
        )


def batch_loss(op: CurvatureOperator) -> Callable:
    """``f(params, batch) -> scalar``: the loss of one batch that ``op`` is the curvature of.

    ``params`` is shaped like ``op.params`` (the ``wrt`` block when the operator has one; the
    other leaves stay at the operator's point). For :func:`hvp.ggn` and :func:`hvp.fisher` it is
    ``loss_fn(model_fn(params, inputs), targets[, weights])``; for :func:`hvp.hessian` and
    :func:`hvp.empirical_fisher` the ``loss_fn`` they were given.

    Raises:
      TypeError: ``op`` is not a :class:`CurvatureOperator`.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2), jnp.ones(2),
      ...                 (jnp.eye(2), jnp.zeros(2)))
      >>> float(hvp.operators.batch_loss(H)(jnp.ones(2), (jnp.eye(2), jnp.zeros(2))))
      1.0
    """
    _check_op(op, "batch_loss")
    fns, kind = op._fns, op.kind
    if kind in ("ggn", "fisher"):  # the Fisher's loss: the output loss on the data's targets
        model_fn, loss_fn, unpack = fns

        def f(params, batch):
            x, y, w = split_batch(batch, unpack)
            return _call_output_loss(loss_fn, model_fn(op.full_params(params), x), y, w)

        return f
    (loss_fn,) = fns
    return lambda params, batch: loss_fn(op.full_params(params), batch)


def data_loss(op: CurvatureOperator, params=None):
    r"""The data-set loss :math:`L(\theta)` of ``op`` at ``params`` (default ``op.params``).

    :math:`L = \sum_b w_b L_{B_b}` with the operator's batch weights (``reduction="mean"``:
    exactly the mean loss of the concatenated data set). A scalar array of the loss's dtype;
    works under ``jit`` and ``vmap`` (over ``params``).

    Raises:
      TypeError: ``op`` is not a :class:`CurvatureOperator`.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> loss = lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2)
      >>> H = hvp.hessian(loss, jnp.ones(2), [(jnp.eye(2), jnp.zeros(2)), (jnp.ones((1, 2)), jnp.zeros(1))])
      >>> float(hvp.operators.data_loss(H))  # (1 + 1 + 4) / 3
      2.0
    """
    f = batch_loss(op)
    p = op.params if params is None else params
    return weighted_sum(lambda b: f(p, b), op.dataset, op.reduction)


def data_loss_and_grad(op: CurvatureOperator, params=None):
    r"""``(L, grad L)`` over the data set at ``params`` (default ``op.params``), in one pass.

    The gradient is a pytree like ``op.params`` (with respect to the ``wrt`` block when the
    operator has one), keeping each leaf's sharding.

    Raises:
      TypeError: ``op`` is not a :class:`CurvatureOperator`.

    Examples:
      >>> import jax.numpy as jnp, hvp
      >>> H = hvp.hessian(lambda p, b: jnp.mean((b[0] @ p - b[1]) ** 2), jnp.ones(2),
      ...                 (jnp.eye(2), jnp.zeros(2)))
      >>> L, g = hvp.operators.data_loss_and_grad(H)
      >>> float(L), g.tolist()
      (1.0, [1.0, 1.0])
    """
    f = batch_loss(op)
    p = op.params if params is None else params
    vg = jax.value_and_grad(f)
    total = weighted_sum(lambda b: vg(p, b), op.dataset, op.reduction)
    return total[0], tu.like_sharding(total[1], p)
