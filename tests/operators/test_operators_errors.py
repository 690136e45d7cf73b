"""Bad inputs raise early, with the error type and a message that names the problem and the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import build, operator

import hvp
from hvp import tree as tu


@pytest.fixture(scope="module")
def prob():
    return build("nested")


def test_non_scalar_loss(prob):
    def per_example(params, batch):
        return (prob.model_fn(params, batch[0]) - batch[1]).sum(axis=1)

    with pytest.raises(ValueError, match=r"must return a scalar.*shape \(24,\).*jnp.mean"):
        hvp.hessian(per_example, prob.params, prob.batches)
    with pytest.raises(ValueError, match="must return a scalar"):
        hvp.ggn(prob.model_fn, lambda out, y: (out - y) ** 2, prob.params, prob.batches)
    with pytest.raises(TypeError, match="floating-point scalar"):
        hvp.hessian(lambda p, b: jnp.sum(b[0] > 0), prob.params, prob.batches)
    with pytest.raises(TypeError, match=r"returned tuple \(\w+\[\], \{\}\).*loss_fn\(p, b\)\[0\]"):
        hvp.hessian(lambda p, b: (per_example(p, b).mean(), {}), prob.params, prob.batches)


def test_vector_wrong_structure_shape_dtype(prob):
    op = operator("nested", "hessian")
    v = tu.normal_like(jax.random.PRNGKey(0), prob.params)
    with pytest.raises(ValueError, match="same pytree structure") as info:
        op @ {"scale": v["scale"]}
    assert "normal_like" in str(info.value)  # the fix
    bad_shape = {**v, "scale": jnp.ones((2,))}
    with pytest.raises(ValueError, match=r"Leaf 'scale' of `v` has shape \(2,\) but .* has \(1,\)"):
        op @ bad_shape
    with pytest.raises(ValueError, match=r"Leaf 'extra/0' of `v` has dtype float32.*hvp.tree.cast"):
        op @ tu.cast(v, jnp.float32)
    with pytest.raises(ValueError, match="leading batch axis"):
        op.matmat(v)  # a single vector is not a block


def test_integer_params(prob):
    params = {**prob.params, "scale": jnp.array([1], jnp.int32)}
    with pytest.raises(TypeError, match=r"'scale' \(int32\).*floating.*wrt="):
        hvp.hessian(prob.loss_fn, params, prob.batches)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_params(prob, value):
    params = {**prob.params, "scale": jnp.array([value])}
    for make in (
        lambda: hvp.hessian(prob.loss_fn, params, prob.batches),
        lambda: hvp.ggn(prob.model_fn, prob.output_loss, params, prob.batches),
        lambda: hvp.empirical_fisher(prob.loss_fn, params, prob.batches),
    ):
        with pytest.raises(ValueError, match=r"NaN or Inf in leaf\(s\) 'scale'"):
            make()


def test_empty_data_set(prob):
    with pytest.raises(ValueError, match="data set is empty"):
        hvp.hessian(prob.loss_fn, prob.params, [])
    with pytest.raises(ValueError, match="data set is empty"):
        hvp.hessian(prob.loss_fn, prob.params, (b for b in []))


def test_batch_leaves_disagree(prob):
    x, y = prob.batches[0]
    with pytest.raises(
        ValueError, match=r"leaves of batch 1 disagree.*leading axis\): 23: 1; 24: 0"
    ):
        hvp.hessian(prob.loss_fn, prob.params, [prob.batches[0], (x, y[:23])])
    with pytest.raises(ValueError, match=r"The leaves of the batch disagree"):
        hvp.hessian(prob.loss_fn, prob.params, (x, y[:23]))


def test_scalar_leaf_in_batch(prob):
    x, y = prob.batches[0]
    batch = {"x": x, "y": y, "weight": jnp.float64(2.0)}
    with pytest.raises(ValueError, match=r"Leaf 'weight' of the batch is a scalar.*x\[None\]"):
        hvp.hessian(lambda p, b: prob.loss_fn(p, (b["x"], b["y"])), prob.params, batch)


def test_zero_example_batch(prob):
    x, y = prob.batches[0]
    with pytest.raises(ValueError, match="zero examples"):
        hvp.hessian(prob.loss_fn, prob.params, [prob.batches[0], (x[:0], y[:0])])


def _exploding_loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] - y) ** 2) + jnp.exp(1000.0 * params["c"][0])


def test_nonfinite_matvec_raises_naming_the_leaf():
    params = {"c": jnp.array([1.0]), "w": jnp.ones((3, 2))}  # exp(1000) overflows float64
    data = (jnp.ones((4, 3)), jnp.zeros((4, 2)))
    v = tu.ones_like(params)
    op = hvp.hessian(_exploding_loss, params, data)
    with pytest.raises(
        hvp.NonFiniteError, match=r"NaN or Inf in leaf\(s\) 'c'\..*check_finite=False"
    ) as info:
        op @ v
    assert "'w'" not in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FloatingPointError)
    with pytest.raises(hvp.NonFiniteError, match="matmat"):
        op.matmat(tu.stack([v]))
    raw = hvp.hessian(_exploding_loss, params, data, check_finite=False) @ v
    assert not np.isfinite(np.asarray(raw["c"])).any()
    assert np.isfinite(np.asarray(raw["w"])).all()


def test_dense_refuses_above_max_size():
    op = operator("nested", "hessian")
    with pytest.raises(ValueError, match=r"30 x 30 .*above max_size=10.*wrt="):
        op.dense(max_size=10)


def test_ggn_batch_that_cannot_be_unpacked(prob):
    x, y = prob.batches[0]
    with pytest.raises(TypeError, match=r"keys \['a', 'b'\].*unpack=lambda batch"):
        hvp.ggn(prob.model_fn, prob.output_loss, prob.params, {"a": x, "b": y})
    with pytest.raises(TypeError, match=r"Building the ggn operator.*into \(inputs, targets\)"):
        hvp.ggn(prob.model_fn, prob.output_loss, prob.params, (x, y, y, y))
    # a 3-tuple is (inputs, targets, weights): negative weights are refused by name
    with pytest.raises(ValueError, match="weights of the batch must be finite and >= 0"):
        hvp.ggn(prob.model_fn, prob.output_loss, prob.params, (x, y, y))
    op = hvp.ggn(
        prob.model_fn,
        prob.output_loss,
        prob.params,
        {"a": x, "b": y},
        unpack=lambda b: (b["a"], b["b"]),
    )
    assert op.num_examples == 24


def test_bad_reduction(prob):
    with pytest.raises(ValueError, match=r"`reduction` must be one of \('mean', 'sum'\)"):
        hvp.hessian(prob.loss_fn, prob.params, prob.batches, reduction="avg")
