"""The matvec is compiled once: repeated products and new operators of the same shapes do not retrace."""

import jax
import numpy as np
import pytest
from problems import build

import hvp
from hvp import tree as tu


@pytest.mark.parametrize("kind", ["hessian", "ggn", "empirical_fisher"])
def test_products_do_not_retrace(kind):
    p = build("nested")
    traces = {"n": 0}

    def model_fn(params, x):
        traces["n"] += 1  # Python side effect: runs once per trace, never in compiled code
        return p.model_fn(params, x)

    def loss_fn(params, batch):
        x, y = batch
        return p.output_loss(model_fn(params, x), y)

    def build_op(params):
        if kind == "hessian":
            return hvp.hessian(loss_fn, params, p.batches)
        if kind == "ggn":
            return hvp.ggn(model_fn, p.output_loss, params, p.batches)
        return hvp.empirical_fisher(loss_fn, params, p.batches)

    op = build_op(p.params)
    v = tu.normal_like(jax.random.PRNGKey(0), p.params)
    first = op @ v
    after_first = traces["n"]
    assert after_first >= 1
    for i in range(10):
        out = op @ tu.scale(float(i), v)
    np.testing.assert_allclose(tu.ravel(out), 9.0 * tu.ravel(first), rtol=1e-12)
    assert traces["n"] == after_first, "op @ v retraced the loss"
    # a new operator at another point with the same shapes reuses the compiled matvec
    op2 = build_op(tu.scale(0.5, p.params))
    after_build = traces["n"]
    second = op2 @ v
    assert traces["n"] == after_build, "a new operator of the same shapes retraced the matvec"
    assert not np.allclose(tu.ravel(second), tu.ravel(first))
    if kind != "hessian":
        return
    # block products: compiled once too
    vs = tu.stack([v, v])
    op.matmat(vs)
    after_matmat = traces["n"]
    op.matmat(vs)
    op2.matmat(vs)
    assert traces["n"] == after_matmat
