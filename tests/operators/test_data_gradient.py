"""`hvp.operators.data_gradient` on the shared data loop, against `jax.grad` of the full loss.

In memory (uneven batches: one scanned group and a ragged batch; weighted batches; the GGN's
output loss; a `wrt=` block) and streamed (`stream=True`, read in one pass), all in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hvp
from hvp.operators import ArrayBatches, NonFiniteError, data_gradient


def _problem():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(11, 3)), rng.normal(size=(11, 2))
    params = {"w": jnp.asarray(rng.normal(size=(3, 2))), "b": jnp.asarray(rng.normal(size=2))}

    def loss(p, batch):
        return jnp.mean(jnp.tanh(batch[0] @ p["w"] + p["b"] - batch[1]) ** 2)

    return loss, params, x, y


def _close(got, ref):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-13), got, ref)


def test_in_memory_and_streamed_match_jax_grad():
    loss, params, x, y = _problem()
    ref = jax.grad(loss)(params, (x, y))
    batches = ArrayBatches((x, y), 4)  # 4, 4, 3: a scanned group and a ragged batch
    for stream in (False, True):
        H = hvp.hessian(loss, params, batches, stream=stream)
        assert H.streaming is stream
        passes = H.dataset.passes if stream else None
        _close(data_gradient(H), ref)
        if stream:  # one pass over the data, as one product
            assert H.dataset.passes == passes + 1


@pytest.mark.slow  # by default: the in-memory and streamed cases above
def test_weighted_batches_ggn_wrt_and_jit():
    loss, params, x, y = _problem()
    ref = jax.grad(loss)(params, (x, y))
    # weighted batches: the gradient of sum_i w_i l_i / sum_i w_i
    w = np.linspace(0.5, 2.0, 11)

    def wloss(p, b):
        r = jnp.tanh(b[0] @ p["w"] + p["b"] - b[1]) ** 2
        return jnp.sum(b[2][:, None] * r) / (2 * jnp.sum(b[2]))

    H = hvp.hessian(wloss, params, [(x[:6], y[:6], w[:6]), (x[6:], y[6:], w[6:])])
    _close(data_gradient(H), jax.grad(wloss)(params, (x, y, w)))
    # the GGN's loss is output_loss(model(params, x), y); wrt= keeps the other leaves fixed
    model = lambda p, xb: xb @ p["w"] + p["b"]  # noqa: E731
    G = hvp.ggn(model, hvp.losses.mean_squared_error, params, ArrayBatches((x, y), 5), wrt="w")
    ref_w = jax.grad(lambda q: hvp.losses.mean_squared_error(model({**params, "w": q}, x), y))
    np.testing.assert_allclose(data_gradient(G)["w"], ref_w(params["w"]), atol=1e-13)
    # inside jit (in-memory operator) the same numbers
    H = hvp.hessian(loss, params, [(x[:4], y[:4]), (x[4:], y[4:])])
    _close(jax.jit(data_gradient)(H), ref)


def test_errors():
    loss, params, x, y = _problem()
    with pytest.raises(TypeError, match="curvature operator"):
        data_gradient(hvp.from_dense(jnp.eye(2)))
    H = hvp.hessian(loss, params, ArrayBatches((x, y), 4), stream=True)
    with pytest.raises(ValueError, match="streams its data set"):
        jax.jit(data_gradient)(H)
    # sqrt at 0: a finite loss, an infinite gradient
    sqrt_loss = lambda p, b: jnp.mean(jnp.sqrt(jnp.abs(b[0] @ p["w"])))  # noqa: E731
    zero = {"w": jnp.zeros((3, 2)), "b": params["b"]}
    with pytest.raises(NonFiniteError, match="data-set gradient"):
        data_gradient(hvp.hessian(sqrt_loss, zero, (x, y)))
