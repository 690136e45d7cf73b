"""hvp.flax adapters: NNX and Linen models against hand-written float64 references."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax
from problems import Problem, dense_fisher, dense_ggn, dense_hessian, digits

import hvp
import hvp.flax as hf
from hvp import tree as tu

F64 = jnp.float64
CE = hvp.losses.softmax_cross_entropy
EPS = 1e-5


def _batches(pooled: bool, sizes=(16, 16, 9), seed=0):
    """Digits batches (a list of several, the last smaller, exercises the data-set weighting)."""
    x, y = digits(sum(sizes), pooled=pooled, seed=seed)
    out, s = [], 0
    for n in sizes:
        out.append((jnp.asarray(x[s : s + n], F64), jnp.asarray(y[s : s + n])))
        s += n
    return out


def _probes(params, k=3, seed=1):
    return jax.vmap(lambda key: tu.normal_like(key, params))(
        jax.random.split(jax.random.key(seed), k)
    )


def _check_products(problem, ref_model, batches, *, hess=True, ggn=True, fisher=False):
    """Adapter operators vs dense float64 references of a hand-written model function."""
    ref = Problem(
        "ref",
        problem.params,
        lambda p, b: CE(ref_model(p, b[0]), b[1]),
        batches,
        model_fn=ref_model,
        output_loss=CE,
    )
    vs = _probes(problem.params)
    flat_vs = jax.vmap(tu.ravel)(vs)
    checks = []
    if hess:
        checks.append((problem.hessian(batches), dense_hessian(ref)))
    if ggn:
        checks.append((problem.ggn(batches), dense_ggn(ref)))
    if fisher:
        checks.append((problem.empirical_fisher(batches), dense_fisher(ref)))
    for op, dense in checks:
        got = jax.vmap(tu.ravel)(op.matmat(vs))
        want = flat_vs @ dense.T
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * np.abs(dense).max())
        assert np.abs(want).max() > 1e-3  # the check is not vacuous


def _state_snapshot(model):
    return jax.tree_util.tree_map(
        lambda x: np.array(
            jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        ),
        nnx.to_pure_dict(nnx.state(model)),
    )


def _assert_same_snapshot(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# NNX models
# --------------------------------------------------------------------------------------------
class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(16, 8, param_dtype=F64, dtype=F64, rngs=rngs),
                nnx.Linear(8, 10, param_dtype=F64, dtype=F64, rngs=rngs),
            ]
        )

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x)))


def ref_nnx_mlp(p, x):
    h = jnp.tanh(x @ p["layers"][0]["kernel"] + p["layers"][0]["bias"])
    return h @ p["layers"][1]["kernel"] + p["layers"][1]["bias"]


class NnxCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), padding="SAME", param_dtype=F64, dtype=F64, rngs=rngs)
        self.bn = nnx.BatchNorm(3, param_dtype=F64, dtype=F64, epsilon=EPS, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(48, 10, param_dtype=F64, dtype=F64, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.bn(self.conv(x)))
        h = self.drop(h)
        n = h.shape[0]  # 2x2 average pooling
        h = h.reshape(n, 4, 2, 4, 2, 3).mean(axis=(2, 4))
        return self.head(h.reshape(n, -1))


def _cnn_ref(mean, var):
    def ref(p, x):
        h = (
            lax.conv_general_dilated(
                x, p["conv"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            + p["conv"]["bias"]
        )
        h = (h - mean) / jnp.sqrt(var + EPS) * p["bn"]["scale"] + p["bn"]["bias"]
        h = jnp.tanh(h)
        n = h.shape[0]
        h = h.reshape(n, 4, 2, 4, 2, 3).mean(axis=(2, 4)).reshape(n, -1)
        return h @ p["head"]["kernel"] + p["head"]["bias"]

    return ref


def _nnx_cnn():
    model = NnxCNN(nnx.Rngs(0, dropout=1))
    # Non-trivial running statistics and BatchNorm parameters, so that using batch statistics
    # (or ignoring the scale) would be caught.
    # (float64 statistics: NNX stores them in float32 by default)
    model.bn.mean = nnx.BatchStat(jnp.array([0.05, -0.1, 0.2], F64))
    model.bn.var = nnx.BatchStat(jnp.array([0.5, 1.5, 0.8], F64))
    model.bn.scale[...] = jnp.array([1.2, 0.7, 1.1], F64)
    model.bn.bias[...] = jnp.array([0.1, -0.2, 0.05], F64)
    return model


def test_nnx_mlp_products_match_dense_reference():
    model = NnxMLP(nnx.Rngs(0))
    problem = hf.from_nnx(model, "cross_entropy")
    assert problem.framework == "nnx" and not problem.train
    assert tu.leaf_paths(problem.params) == [
        "layers/0/bias",
        "layers/0/kernel",
        "layers/1/bias",
        "layers/1/kernel",
    ]
    batches = _batches(pooled=True)
    x, y = batches[0]
    np.testing.assert_allclose(
        problem.loss_fn(problem.params, batches[0]), CE(model(x), y), rtol=1e-12
    )
    _check_products(problem, ref_nnx_mlp, batches, fisher=True)


def test_nnx_cnn_batchnorm_dropout_eval_mode_and_state_untouched():
    model = _nnx_cnn()
    before = _state_snapshot(model)
    problem = hf.from_nnx(model, CE)
    batches = _batches(pooled=False, sizes=(24,))
    ref = _cnn_ref(model.bn.mean[...], model.bn.var[...])
    x, y = batches[0]
    # dropout off and running averages used: equal to the reference, and to itself on a second call
    l1 = problem.loss_fn(problem.params, batches[0])
    l2 = problem.loss_fn(problem.params, batches[0])
    assert float(l1) == float(l2)
    np.testing.assert_allclose(l1, CE(ref(problem.params, x), y), rtol=1e-12)
    _check_products(problem, ref, batches)
    # the user's model: same mode, same BatchNorm statistics, RNG counters and parameters
    assert model.drop.deterministic is False and model.bn.use_running_average is False
    _assert_same_snapshot(before, _state_snapshot(model))


def test_nnx_train_mode_is_fixed_and_does_not_update_model():
    model = _nnx_cnn()
    before = _state_snapshot(model)
    problem = hf.from_nnx(model, "cross_entropy", train=True)
    assert problem.train
    batch = _batches(pooled=False, sizes=(12,))[0]
    l_train = problem.loss_fn(problem.params, batch)
    assert float(l_train) == float(problem.loss_fn(problem.params, batch))  # one fixed dropout mask
    l_eval = hf.from_nnx(model, "cross_entropy").loss_fn(problem.params, batch)
    assert abs(float(l_train) - float(l_eval)) > 1e-6  # training mode really differs
    v = tu.normal_like(jax.random.key(3), problem.params)
    hv1, hv2 = problem.hessian(batch) @ v, problem.hessian(batch) @ v
    np.testing.assert_array_equal(tu.ravel(hv1), tu.ravel(hv2))
    _assert_same_snapshot(before, _state_snapshot(model))


def test_nnx_merge_returns_new_module():
    model = NnxMLP(nnx.Rngs(0))
    problem = hf.from_nnx(model, "mse")
    new_params = tu.scale(2.0, problem.params)
    new = problem.merge(new_params)
    assert new is not model
    x = _batches(pooled=True)[0][0]
    np.testing.assert_allclose(new(x), ref_nnx_mlp(new_params, x), rtol=1e-12)
    np.testing.assert_allclose(model(x), ref_nnx_mlp(problem.params, x), rtol=1e-12)
    assert hf.nnx_params(new)["layers"][0]["kernel"].shape == (16, 8)


# --------------------------------------------------------------------------------------------
# Linen models
# --------------------------------------------------------------------------------------------
class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(8, param_dtype=F64, dtype=F64)(x))
        return nn.Dense(10, param_dtype=F64, dtype=F64)(h)


def ref_linen_mlp(p, x):
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Conv(3, (3, 3), padding="SAME", param_dtype=F64, dtype=F64)(x)
        h = nn.BatchNorm(
            use_running_average=not train,
            epsilon=EPS,
            param_dtype=F64,
            dtype=F64,
            force_float32_reductions=False,
        )(h)
        h = jnp.tanh(h)
        h = nn.Dropout(0.5, deterministic=not train)(h)
        n = h.shape[0]  # 2x2 average pooling
        h = h.reshape(n, 4, 2, 4, 2, 3).mean(axis=(2, 4))
        return nn.Dense(10, param_dtype=F64, dtype=F64)(h.reshape(n, -1))


def test_linen_mlp_products_match_dense_reference():
    module = LinenMLP()
    batches = _batches(pooled=True)
    variables = module.init(jax.random.key(0), batches[0][0])
    problem = hf.from_linen(module, variables, "cross_entropy")
    assert tu.leaf_paths(problem.params) == [
        "Dense_0/bias",
        "Dense_0/kernel",
        "Dense_1/bias",
        "Dense_1/kernel",
    ]
    _check_products(problem, ref_linen_mlp, batches)
    merged = problem.merge(tu.zeros_like(problem.params))
    assert float(module.apply(merged, batches[0][0]).sum()) == 0.0


def test_linen_cnn_batchnorm_matches_reference_and_never_mutates():
    module = LinenCNN()
    batches = _batches(pooled=False, sizes=(24,))
    variables = module.init(jax.random.key(0), batches[0][0], train=False)
    stats = {
        "BatchNorm_0": {
            "mean": jnp.array([0.05, -0.1, 0.2], F64),
            "var": jnp.array([0.5, 1.5, 0.8], F64),
        }
    }
    params = jax.tree_util.tree_map(lambda a: a, dict(variables["params"]))
    params["BatchNorm_0"] = {
        "scale": jnp.array([1.2, 0.7, 1.1], F64),
        "bias": jnp.array([0.1, -0.2, 0.05], F64),
    }
    variables = {"params": params, "batch_stats": stats}
    problem = hf.from_linen(module, variables, CE, apply_kwargs={"train": False})
    p = problem.params
    translated = {"conv": p["Conv_0"], "bn": p["BatchNorm_0"], "head": p["Dense_0"]}
    ref = _cnn_ref(stats["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["var"])

    def ref_model(q, x):
        return ref({"conv": q["Conv_0"], "bn": q["BatchNorm_0"], "head": q["Dense_0"]}, x)

    x, y = batches[0]
    np.testing.assert_allclose(
        problem.loss_fn(p, batches[0]), CE(ref(translated, x), y), rtol=1e-12
    )
    _check_products(problem, ref_model, batches)
    np.testing.assert_array_equal(
        variables["batch_stats"]["BatchNorm_0"]["mean"], stats["BatchNorm_0"]["mean"]
    )
    # training mode would update batch_stats: refused with a clear message
    bad = hf.from_linen(
        module, variables, CE, apply_kwargs={"train": True, "rngs": {"dropout": jax.random.key(1)}}
    )
    with pytest.raises(ValueError, match="evaluation mode"):
        bad.loss_fn(bad.params, batches[0])


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------
def test_adapter_errors():
    model = NnxMLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="Unknown loss"):
        hf.from_nnx(model, "hinge")
    with pytest.raises(TypeError, match="nnx.Module"):
        hf.from_nnx({"w": jnp.ones(3)}, "mse")
    with pytest.raises(TypeError, match="linen"):
        hf.from_linen(model, {"params": {}}, "mse")
    with pytest.raises(ValueError, match="'params'"):
        hf.from_linen(LinenMLP(), {"batch_stats": {}}, "mse")
    with pytest.raises(ValueError, match="mutable"):
        hf.from_linen(
            LinenMLP(), {"params": {"a": jnp.ones(2)}}, "mse", apply_kwargs={"mutable": True}
        )
    with pytest.raises(ValueError, match="operator kind"):
        hf.from_nnx(model, "mse").operator("hessian2", _batches(pooled=True)[0])


# --------------------------------------------------------------------------------------------
# model state from each call (issue 17 §1) and NNX call_kwargs (issue 18)
# --------------------------------------------------------------------------------------------
def test_at_takes_current_state_and_warns_once_given_only_parameters():
    import warnings

    model = _nnx_cnn()
    problem = hf.from_nnx(model, CE)
    batch = _batches(pooled=False, sizes=(12,))[0]
    v = _probes(problem.params, k=1)
    v = jax.tree_util.tree_map(lambda a: a[0], v)
    model.bn.mean[...] = jnp.array([0.3, 0.1, -0.4], F64)  # training moved them (in place)
    assert float(problem.state["bn"]["mean"][...][0]) == 0.05  # the problem holds a snapshot
    want = hf.from_nnx(model, CE)
    for source in (model, nnx.state(model)):
        now = problem.at(source)
        np.testing.assert_array_equal(now.state["bn"]["mean"][...], model.bn.mean[...])
        np.testing.assert_allclose(
            now.loss_fn(now.params, batch), want.loss_fn(want.params, batch), rtol=1e-14
        )
    # state as an argument of the compiled products: same products as a fresh problem
    _, state, missing = problem.split(model)
    assert missing == ()
    op = problem.operator("hessian", batch, state=state)
    assert op.name == "hessian" and op.shape == want.hessian(batch).shape
    np.testing.assert_allclose(
        tu.ravel(op @ v), tu.ravel(want.hessian(batch) @ v), rtol=1e-12, atol=1e-14
    )
    old = problem.loss_fn(problem.params, batch)
    assert abs(float(old - want.loss_fn(want.params, batch))) > 1e-4  # the state matters
    # only parameters: a warning naming the state, and the state held is kept
    with pytest.warns(hf.StaleStateWarning, match="bn/mean.*NNX module"):
        stale = problem.at(hf.nnx_params(model))
    assert stale.state is problem.state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        problem.at(hf.nnx_params(model), warn=False)
        stateless = hf.from_nnx(NnxMLP(nnx.Rngs(0)), CE)  # no state: nothing to warn about
        assert not stateless.has_state
        stateless.at(hf.nnx_params(NnxMLP(nnx.Rngs(1))))
    with pytest.raises(ValueError, match="other non-parameter variables"):
        problem.at(NnxMLP(nnx.Rngs(0)))


def test_linen_at_trainstate_variables_and_params():
    from flax.training import train_state

    module = LinenCNN()
    batch = _batches(pooled=False, sizes=(12,))[0]
    variables = module.init(jax.random.key(0), batch[0], train=False)
    problem = hf.from_linen(module, variables, CE, apply_kwargs={"train": False})
    assert sorted(problem.state) == ["batch_stats"] and problem.has_state
    new_stats = jax.tree_util.tree_map(lambda a: a + 0.25, variables["batch_stats"])
    state = train_state.TrainState.create(
        apply_fn=module.apply, params=variables["params"], tx=optax.sgd(0.1)
    )

    class BNState(train_state.TrainState):
        batch_stats: object

    bn_state = BNState.create(
        apply_fn=module.apply, params=variables["params"], tx=optax.sgd(0.1), batch_stats=new_stats
    )
    want = hf.from_linen(
        module,
        {"params": variables["params"], "batch_stats": new_stats},
        CE,
        apply_kwargs={"train": False},
    )
    for source in (bn_state, {"params": variables["params"], "batch_stats": new_stats}):
        now = problem.at(source)
        np.testing.assert_allclose(
            now.loss_fn(now.params, batch), want.loss_fn(want.params, batch), rtol=1e-14
        )
    for source in (state, variables["params"]):  # a TrainState without batch_stats, params only
        with pytest.warns(hf.StaleStateWarning, match="'batch_stats'.*TrainState"):
            assert problem.at(source).state is problem.state


class NnxDropoutNet(nnx.Module):
    """``__call__(x, rngs)`` as in the NNX MNIST tutorial: the RNGs are an argument."""

    def __init__(self, rngs):
        self.dense = nnx.Linear(16, 10, param_dtype=F64, dtype=F64, rngs=rngs)
        self.drop = nnx.Dropout(0.5)

    def __call__(self, x, rngs):
        return self.drop(self.dense(x), rngs=rngs)


def test_nnx_call_kwargs_for_extra_call_arguments():
    model = NnxDropoutNet(nnx.Rngs(0))
    x, y = batch = _batches(pooled=True, sizes=(12,))[0]
    with pytest.raises(TypeError, match="rngs"):  # what a missing argument looked like
        hf.from_nnx(model, CE).hessian(batch)
    with pytest.raises(TypeError, match="call_kwargs"):
        hf.from_nnx(model, CE, call_kwargs=[("rngs", None)])
    rngs = nnx.Rngs(7)
    ev = hf.from_nnx(model, CE, call_kwargs={"rngs": rngs})
    p = ev.params
    plain = CE(x @ p["dense"]["kernel"] + p["dense"]["bias"], y)  # dropout off
    np.testing.assert_allclose(ev.loss_fn(p, batch), plain, rtol=1e-13)
    # training mode: the draw of the RNGs as given, the same in every product
    tr = hf.from_nnx(model, CE, train=True, call_kwargs={"rngs": rngs})
    want = CE(model(x, nnx.clone(rngs)), y)
    np.testing.assert_allclose(tr.loss_fn(p, batch), want, rtol=1e-13)
    assert abs(float(want - plain)) > 1e-3
    flat, unravel = tu.ravel(p), tu.unravel_fn(p)
    dense = jax.hessian(lambda f: tr.loss_fn(unravel(f), batch))(flat)
    np.testing.assert_allclose(tr.hessian(batch).dense(), dense, rtol=1e-10, atol=1e-13)
    assert int(rngs.default.count[...]) == 0  # the user's RNGs were not advanced
