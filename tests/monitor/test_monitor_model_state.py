"""The monitor measures the model as it is at each step, BatchNorm statistics included (issue 17 §1).

Two official Flax training loops in miniature, float64:

* Linen: the ImageNet example's ``ResNet`` (``ResNetBlock``, ``BatchNorm(axis_name="batch")``),
  its ``TrainState`` with ``batch_stats`` and its ``train_step`` (``mutable=["batch_stats"]``,
  ``lax.pmean`` over ``"batch"``; ``vmap`` with ``axis_name="batch"`` stands in for ``pmap``);
  the monitor is fed ``monitor(step, state)`` as the docs say.
* NNX: the MNIST tutorial's CNN with BatchNorm and Dropout whose ``__call__(x, rngs)`` takes
  the RNGs (``call_kwargs``), trained with ``nnx.Optimizer``; the monitor is fed the module.

Each record must equal the top eigenvalues of a dense Hessian of a *fresh* ``from_linen`` /
``from_nnx`` problem at that step; the problem the monitor was built from (statistics at
step 0) must give different values (so the check is not vacuous).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from problems import digits

import hvp
import hvp.flax as hf
from hvp import tree as tu
from hvp.monitor import CurvatureMonitor

F64 = jnp.float64
CE = hvp.losses.softmax_cross_entropy
_x, _y = digits(48, pooled=False, seed=3)
TRAIN = (jnp.asarray(_x[:32], F64), jnp.asarray(_y[:32]))
PROBE = (jnp.asarray(_x[32:], F64), jnp.asarray(_y[32:]))


def dense_top(problem, k=2):
    """Top-``k`` eigenvalues (descending) of the dense float64 Hessian of ``problem`` on PROBE."""
    unravel = tu.unravel_fn(problem.params)
    dense = jax.hessian(lambda f: problem.loss_fn(unravel(f), PROBE))(tu.ravel(problem.params))
    assert dense.dtype == F64
    return jnp.linalg.eigvalsh(dense)[::-1][:k]


def _check(record, want, old, rtol=1e-9):
    np.testing.assert_allclose(record.eigenvalues, want, rtol=rtol)
    assert np.abs(old - want).max() > 1e-3 * np.abs(want).max(), (old, want)  # stats moved


# --------------------------------------------------------------------------------------------
# Linen: the ImageNet example (models.py / train.py), in miniature
# --------------------------------------------------------------------------------------------
ModuleDef = Any


class ResNetBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.ones_init())(y)  # example: zeros_init
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    block_cls: ModuleDef
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            param_dtype=self.dtype,
            axis_name="batch",
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = self.block_cls(
                    self.num_filters * 2**i, strides=strides, conv=conv, norm=norm, act=self.act
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.dtype)(x)
        return jnp.asarray(x, self.dtype)


TinyResNet = functools.partial(
    ResNet, stage_sizes=[1], block_cls=ResNetBlock, num_filters=2, num_classes=10, dtype=F64
)


class TrainState(train_state.TrainState):
    batch_stats: Any


def create_train_state(rng, model, learning_rate):
    variables = model.init(rng, TRAIN[0][:2], train=False)  # example: jax.jit(model.init)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(learning_rate, momentum=0.9),
        batch_stats=variables["batch_stats"],
    )


def train_step(state, batch):
    """The ImageNet example's train_step (weight decay and the learning-rate schedule left out)."""

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            batch["image"],
            mutable=["batch_stats"],
        )
        loss = CE(logits, batch["label"])
        return loss, (new_model_state, logits)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    aux, grads = grad_fn(state.params)
    grads = jax.lax.pmean(grads, axis_name="batch")
    new_model_state, _ = aux[1]
    return state.apply_gradients(grads=grads, batch_stats=new_model_state["batch_stats"])


def test_linen_resnet_trainstate_monitor_follows_batch_stats():
    model = TinyResNet()
    state = create_train_state(jax.random.key(0), model, 0.05)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    problem = hf.from_linen(model, variables, "cross_entropy", apply_kwargs={"train": False})
    monitor = CurvatureMonitor.from_flax(
        problem, PROBE, every=3, k=2, tol=1e-10, trace=False, key=jax.random.key(0)
    )
    # one device: vmap over a leading axis of size 1 binds "batch" as pmap does in the example
    p_train_step = jax.jit(jax.vmap(train_step, axis_name="batch"))
    rstate = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], state)
    batch = {"image": TRAIN[0][None], "label": TRAIN[1][None]}

    @jax.jit  # a fresh from_linen problem per step, compiled once
    def reference(params, batch_stats, stale_stats):
        def fresh(stats):
            variables = {"params": params, "batch_stats": stats}
            return hf.from_linen(model, variables, CE, apply_kwargs={"train": False})

        return dense_top(fresh(batch_stats)), dense_top(fresh(stale_stats))

    checked = 0
    for step in range(7):
        rstate = p_train_step(rstate, batch)
        state = jax.tree_util.tree_map(lambda a: a[0], rstate)  # jax_utils.unreplicate
        record = monitor(step, state)
        if record is None:
            continue
        _check(record, *reference(state.params, state.batch_stats, problem.state["batch_stats"]))
        checked += 1
    assert checked == 3 and [r.step for r in monitor.history] == [0, 3, 6]
    assert monitor.failures == []

    # Only parameters for a model with batch_stats: one warning, and the state it holds is used.
    with pytest.warns(hf.StaleStateWarning, match="'batch_stats'.*TrainState"):
        monitor.update(7, state.params)
    with_stats = monitor.history[-1].eigenvalues
    np.testing.assert_allclose(with_stats, monitor.history[-2].eigenvalues, rtol=1e-9)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        monitor.update(8, state.params)
        monitor.update(9, {"params": state.params, "batch_stats": state.batch_stats})


def test_linen_resnet_in_training_mode_says_use_evaluation_mode():
    model = TinyResNet()
    variables = model.init(jax.random.key(0), TRAIN[0][:2], train=False)
    problem = hf.from_linen(model, variables, "cross_entropy")  # no {"train": False}
    with pytest.raises(ValueError, match=r"unbound axis.*evaluation mode.*'train': False"):
        problem.hessian(PROBE)


# --------------------------------------------------------------------------------------------
# NNX: the MNIST tutorial's CNN (BatchNorm, Dropout, __call__(x, rngs)), in miniature
# --------------------------------------------------------------------------------------------
class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        kw = {"param_dtype": F64, "dtype": F64, "rngs": rngs}
        self.conv1 = nnx.Conv(1, 3, kernel_size=(3, 3), **kw)
        self.batch_norm1 = nnx.BatchNorm(3, **kw)
        # float64 statistics (NNX keeps them in float32 whatever the parameters' dtype)
        self.batch_norm1.mean = nnx.BatchStat(jnp.zeros(3, F64))
        self.batch_norm1.var = nnx.BatchStat(jnp.ones(3, F64))
        self.dropout1 = nnx.Dropout(rate=0.1)
        self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(48, 10, **kw)

    def __call__(self, x, rngs: nnx.Rngs):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        return self.linear1(x.reshape(x.shape[0], -1))


@nnx.jit
def nnx_train_step(model, optimizer, batch, rngs):
    def loss_fn(model, rngs):
        return CE(model(batch[0], rngs), batch[1])

    grads = nnx.grad(loss_fn)(model, rngs)
    optimizer.update(model, grads)


def test_nnx_cnn_batchnorm_monitor_follows_statistics():
    model = CNN(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    rngs = nnx.Rngs(dropout=1)
    eval_rngs = nnx.Rngs(2)  # unused in evaluation mode (dropout off), but a required argument
    problem = hf.from_nnx(model, "cross_entropy", call_kwargs={"rngs": eval_rngs})
    before = np.asarray(model.batch_norm1.mean[...])
    monitor = CurvatureMonitor.from_flax(
        problem, PROBE, every=3, k=2, tol=1e-10, trace=False, key=jax.random.key(0)
    )
    graphdef, _ = nnx.split(model)
    stale = nnx.clone(model)  # statistics of step 0

    @jax.jit  # a fresh from_nnx problem per step, compiled once
    def reference(state, stale_state):
        def fresh(st):
            return hf.from_nnx(nnx.merge(graphdef, st), CE, call_kwargs={"rngs": nnx.Rngs(5)})

        return dense_top(fresh(state)), dense_top(fresh(stale_state))

    for step in range(7):
        nnx_train_step(model, optimizer, TRAIN, rngs)
        record = monitor(step, model)
        if record is None:
            continue
        nnx.update(stale, nnx.state(model, nnx.Param))  # current parameters, old statistics
        _check(record, *reference(nnx.state(model), nnx.state(stale)))
    assert [r.step for r in monitor.history] == [0, 3, 6]
    assert np.abs(np.asarray(model.batch_norm1.mean[...]) - before).max() > 1e-3
    # the monitor never changed the model's or the RNGs' state
    assert int(eval_rngs.default.count[...]) == 0
    assert model.batch_norm1.use_running_average is False
