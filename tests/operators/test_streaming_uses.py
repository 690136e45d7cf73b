"""The tools built on a curvature operator's data set, on a streamed operator (issue 13).

The data-set loss and gradient, the loss landscape, the critical-point check, the compression
sensitivities and the Flax adapter either work on a streamed operator, with the results of the
in-memory operator (float64, 1e-12), or refuse it with an error naming the fix. The Monte-Carlo
Fisher's data set is the data itself (its sampled labels live next to it), so the same tools see
the data's targets on it, streamed or not.
"""

import jax
import numpy as np
import pytest
from problems import build

import hvp

KEY = jax.random.key(0)


class _Loader:
    def __init__(self, batches):
        self.batches = [jax.tree_util.tree_map(np.asarray, b) for b in batches]
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def _close(a, b, tol=1e-12):
    a, b = np.asarray(hvp.tree.ravel(a)), np.asarray(hvp.tree.ravel(b))
    assert np.linalg.norm(a - b) <= tol * max(np.linalg.norm(b), 1e-300), (a, b)


def test_loss_gradient_and_landscape_on_a_streamed_operator():
    p = build("linear_regression")
    loss = hvp.operators.compose(p.model_fn, p.output_loss)
    loader = _Loader(p.batches)
    mem = hvp.hessian(loss, p.params, p.batches, stream=False)
    st = hvp.hessian(loss, p.params, loader, stream=True)
    assert st.streaming
    # nothing of the data set stays on the device: the probe batches are the host arrays
    assert not any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(st.dataset.probe))
    ops = hvp.operators
    _close(ops.data_loss(st), ops.data_loss(mem))
    (l1, g1), (l2, g2) = ops.data_loss_and_grad(st), ops.data_loss_and_grad(mem)
    _close(l1, l2)
    _close(g1, g2)
    _close(ops.data_gradient(st), g2)
    # the landscape: the whole grid in one pass (+ the loss and gradient, + one product)
    before = loader.passes
    r1 = hvp.landscape(st, directions="random", key=KEY, num_points=5, chunk_size=2)
    assert loader.passes - before == 3
    r2 = hvp.landscape(mem, directions="random", key=KEY, num_points=5, chunk_size=2)
    _close(r1.losses, r2.losses)
    _close(r1.quadratic, r2.quadratic)
    with pytest.raises(ValueError, match="top_eigenvalue=False"):
        hvp.compression.quantization_sensitivity(st, key=KEY, num_matvecs=4)


@pytest.mark.slow  # data_gradient and eigsh/diagonal on streamed operators are tested by default
def test_critical_point_and_compression_on_a_streamed_operator():
    p = build("linear_regression")
    loss = hvp.operators.compose(p.model_fn, p.output_loss)
    mem = hvp.hessian(loss, p.params, p.batches, stream=False)
    st = hvp.hessian(loss, p.params, _Loader(p.batches), stream=True)
    c1, c2 = (hvp.critical.classify_critical_point(o, key=KEY, tol=1e-8) for o in (st, mem))
    assert c1.kind == c2.kind == "not critical"
    np.testing.assert_allclose(c1.gradient_norm, c2.gradient_norm, rtol=1e-12)
    np.testing.assert_allclose(c1.lambda_max, c2.lambda_max, rtol=1e-8)
    q1, q2 = (
        hvp.compression.quantization_sensitivity(o, key=KEY, num_matvecs=4, top_eigenvalue=False)
        for o in (st, mem)
    )
    _close(q1.omega, q2.omega)


def test_the_fisher_data_set_is_the_data():
    """data_loss / data_gradient of the Fisher: the output loss on the data's targets (the GGN's)."""
    p = build("linear_regression")
    g = hvp.ggn(p.model_fn, p.output_loss, p.params, p.batches)
    for stream, data in ((False, p.batches), (True, _Loader(p.batches))):
        F = hvp.fisher(p.model_fn, p.output_loss, p.params, data, key=KEY, stream=stream)
        assert F.streaming is stream and F.num_examples == g.num_examples
        _close(hvp.operators.data_loss(F), hvp.operators.data_loss(g))
        _close(hvp.operators.data_gradient(F), hvp.operators.data_gradient(g))


def test_flax_operator_with_state_refuses_a_streamed_data_set():
    nnx = pytest.importorskip("flax.nnx")
    problem = hvp.flax.from_nnx(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), "mse")
    rng = np.random.default_rng(0)
    data = [(rng.normal(size=(4, 3)), rng.normal(size=(4, 2))) for _ in range(2)]
    assert problem.operator("ggn", data, stream=True).streaming  # without state: streamed
    with pytest.raises(ValueError, match=r"with_state\(state\)\.operator"):
        problem.operator("ggn", data, state=problem.state, stream=True)


def test_operator_algebra_with_a_streamed_term():
    """``op + c``, ``a * op``, ``op1 + op2`` of a streamed operator: host products, term by term."""
    p = build("linear_regression")
    loss = hvp.operators.compose(p.model_fn, p.output_loss)
    loader = _Loader(p.batches)
    st = hvp.hessian(loss, p.params, loader, stream=True)
    mem = hvp.hessian(loss, p.params, p.batches, stream=False)
    a, b = 2.0 * st + 0.5, 2.0 * mem + 0.5
    assert a.streaming and not b.streaming
    before = loader.passes
    _close(a.dense(), b.dense())  # one block: one pass
    assert loader.passes - before == 1
    v = hvp.tree.normal_like(KEY, p.params)
    _close((st + mem).mv(v), (2.0 * mem).mv(v))
    # the host driver is chosen for the sum: the in-memory sum's run on the host driver
    t1, t2 = (
        hvp.trace(o, key=KEY, num_matvecs=4, method="hutchinson", driver=d)
        for o, d in ((a, "auto"), (b, "host"))
    )
    np.testing.assert_allclose(float(t1.estimate), float(t2.estimate), rtol=1e-12)
    with pytest.raises(ValueError, match="driver='host'"):
        jax.jit(a.mv)(v)
