"""Per-layer traces (hvp.linalg.layer_trace) against dense float64 references."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import digits, layered_params, random_symmetric

import hvp
import hvp.flax as hf
from hvp import tree as tu

F64 = jnp.float64


def test_layer_trace_exact_and_hutchinson_on_dense():
    params = layered_params()
    n = tu.size(params)
    a = random_symmetric(n, seed=1)
    op = hvp.from_dense(a, like=params)
    exact = hvp.linalg.layer_trace(op, key=jax.random.key(1), method="exact", chunk_size=7)
    d = np.diag(a)
    np.testing.assert_allclose(
        exact.estimate, [d[:15].sum(), d[15:21].sum(), d[21:23].sum(), d[23]], rtol=1e-12
    )
    np.testing.assert_allclose(exact.total, np.trace(a), rtol=1e-12)
    assert exact.num_matvecs == n and exact.layers == ("Dense_0", "blocks/0", "blocks/1", "scale")
    est = hvp.linalg.layer_trace(
        op, key=jax.random.key(0), num_matvecs=20, chunk_size=8
    )  # 20 < n = 24
    assert est.num_matvecs == 20 and est.method == "hutchinson"
    z = np.abs(est.estimate - exact.estimate) / np.maximum(est.std_error, 1e-300)
    assert np.all(z < 4), z
    assert abs(est.total - np.trace(a)) < 4 * est.total_std_error
    assert est.std_error[0] > 0  # a layer with several coordinates has sampling error
    np.testing.assert_allclose(sum(est.fractions().values()), 1.0, rtol=1e-12)
    assert set(est.as_dict()) == set(est.layers)
    # deterministic for a given key
    again = hvp.linalg.layer_trace(op, key=jax.random.key(0), num_matvecs=20)
    np.testing.assert_allclose(again.estimate, est.estimate, rtol=1e-12)
    d = est.to_dict()
    assert d["method"] == "hutchinson" and len(d["estimate"]) == 4
    # a budget of at least n probes is spent on the exact answer instead
    assert hvp.linalg.layer_trace(op, key=jax.random.key(0), num_matvecs=200).method == "exact"


def test_layer_trace_on_linen_hessian_and_errors():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jnp.tanh(nn.Dense(3, param_dtype=F64)(x))  # Dense_0
            return nn.Dense(10, param_dtype=F64)(h)  # Dense_1

    x, y = digits(40, seed=3)
    batch = (jnp.asarray(x), jnp.asarray(y))
    module = MLP()
    problem = hf.from_linen(module, module.init(jax.random.key(0), batch[0]), "cross_entropy")
    op = problem.hessian(batch)
    exact = hvp.linalg.layer_trace(op, key=jax.random.PRNGKey(1), method="exact")  # old-style key
    dense = np.asarray(op.dense())
    np.testing.assert_allclose(exact.total, np.trace(dense), rtol=1e-10)
    n0 = 3 + 16 * 3
    np.testing.assert_allclose(exact.estimate[0], np.trace(dense[:n0, :n0]), rtol=1e-10)
    # the same exception types as every estimator (hvp.linalg._checks)
    with pytest.raises(TypeError, match="key"):
        hvp.linalg.layer_trace(op)
    with pytest.raises(TypeError, match="key=jax.random.key"):
        hvp.linalg.layer_trace(op, key=0)
    with pytest.raises(ValueError, match="num_matvecs"):
        hvp.linalg.layer_trace(op, key=jax.random.key(0), num_matvecs=1)
    with pytest.raises(TypeError, match="num_matvecs"):
        hvp.linalg.layer_trace(op, key=jax.random.key(0), num_matvecs=2.5)
    with pytest.raises(ValueError, match="Unknown method"):
        hvp.linalg.layer_trace(op, key=jax.random.key(0), method="hutch++")
