"""``hvp.hvp(fun, params, v, *args)``: the raw forward-over-reverse product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import build, reference, relative_error

import hvp
from hvp import tree as tu


@pytest.fixture(scope="module")
def nested():
    p = build("nested")
    return p, p.data, reference("nested", "hessian")


def _vs(params, k):
    return [tu.normal_like(key, params) for key in jax.random.split(jax.random.PRNGKey(5), k)]


def test_hvp_matches_dense(nested):
    p, data, ref = nested
    (v,) = _vs(p.params, 1)
    hv = hvp.hvp(p.loss_fn, p.params, v, data)
    tu.assert_same_structure(hv, p.params)
    assert relative_error(tu.ravel(hv), ref @ np.asarray(tu.ravel(v))) < 1e-10


def test_hvp_under_jit(nested):
    p, data, ref = nested
    f = jax.jit(lambda params, v, batch: hvp.hvp(p.loss_fn, params, v, batch))
    for v in _vs(p.params, 2):
        assert relative_error(tu.ravel(f(p.params, v, data)), ref @ np.asarray(tu.ravel(v))) < 1e-10


def test_hvp_under_vmap(nested):
    p, data, ref = nested
    vs = _vs(p.params, 3)
    out = jax.jit(jax.vmap(lambda v: hvp.hvp(p.loss_fn, p.params, v, data)))(tu.stack(vs))
    tu.assert_same_structure(out, p.params, leading=1)
    for i, v in enumerate(vs):
        assert relative_error(tu.ravel(tu.index(out, i)), ref @ np.asarray(tu.ravel(v))) < 1e-10


def test_hvp_kwargs_and_quadratic():
    a = jnp.array([[2.0, -1.0], [-1.0, -3.0]])

    def fun(x, *, scale):
        return 0.5 * scale * x @ a @ x

    v = jnp.array([1.0, 2.0])
    np.testing.assert_allclose(
        hvp.hvp(fun, jnp.array([0.3, -0.2]), v, scale=2.0), 2.0 * a @ v, rtol=1e-14
    )


def test_hvp_errors(nested):
    p, data, _ = nested
    (v,) = _vs(p.params, 1)
    with pytest.raises(ValueError, match=r"must return a scalar.*shape \(85, 2\).*jnp.mean"):
        hvp.hvp(lambda q, b: p.model_fn(q, b[0]), p.params, v, data)
    with pytest.raises(ValueError, match="same pytree structure"):
        hvp.hvp(p.loss_fn, p.params, {"scale": v["scale"]}, data)
    with pytest.raises(TypeError, match="floating-point"):
        hvp.hvp(lambda x: jnp.sum(x**2), jnp.arange(3), jnp.ones(3, jnp.int64))
