"""The matvec is compiled once: repeated products and new operators of the same shapes do not retrace."""

import jax
import numpy as np
import pytest
from problems import build, reference, relative_error

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


def _counting(loss_fn, traces):
    def counted(params, batch):
        traces["n"] += 1  # once per trace of the user's loss
        return loss_fn(params, batch)

    return counted


def test_loss_traced_once_for_every_product_block_size_driver_and_rebuild():
    # One trace of the product (the loss once per batch shape) for mv, matvec, @, matmat of 1, 2 and 3 vectors, both drivers of an
    # algorithm, and an operator rebuilt with the same loss at a new point: the single product is
    # traced once into a jaxpr that every block size (vmap or map) and every caller reuses.
    p = build("nested")
    ref = reference("nested", "hessian")
    traces = {"n": 0}
    loss_fn = _counting(p.loss_fn, traces)
    op = hvp.hessian(loss_fn, p.params, p.batches, linearize=False)
    assert not op.linearized
    built = traces["n"]  # validation traces the loss on the data when the operator is built
    vs = [tu.normal_like(jax.random.PRNGKey(i), p.params) for i in range(3)]
    want = [ref @ np.asarray(tu.ravel(v)) for v in vs]
    outs = [op.mv(vs[0]), op @ vs[1], op.matvec(vs[2])]
    for b in (1, 2, 3, 2):
        block = op.matmat(tu.stack(vs[:b]))
        outs += [tu.index(block, i) for i in range(b)]
    per_trace = len(op.dataset.groups)  # the product traces the loss once per batch shape
    assert per_trace == 2
    assert traces["n"] - built == per_trace, "the products retraced the loss"
    got = np.stack([np.asarray(tu.ravel(o)) for o in outs])
    expect = np.stack(want + [want[i] for b in (1, 2, 3, 2) for i in range(b)])
    assert relative_error(got, expect) < 1e-12  # float64 reference (jax.hessian)

    kw = dict(key=jax.random.key(0), num_iters=3, tol=0.0)
    host = hvp.linalg.power_iteration(op, driver="host", progress=False, **kw)
    compiled = hvp.linalg.power_iteration(op, driver="compiled", **kw)
    assert host.num_matvecs == compiled.num_matvecs == 3
    assert abs(float(host.eigenvalue) - float(compiled.eigenvalue)) < 1e-12
    assert traces["n"] - built == per_trace, "an algorithm retraced the loss"

    op2 = hvp.hessian(loss_fn, tu.scale(0.5, p.params), p.batches, linearize=False)
    rebuilt = traces["n"]
    op2 @ vs[0]
    op2.matmat(tu.stack(vs))
    assert traces["n"] == rebuilt, "an operator rebuilt with the same loss retraced it"


def test_linearized_operator_products_never_trace_the_loss():
    p = build("nested")
    traces = {"n": 0}
    loss_fn = _counting(p.loss_fn, traces)
    op = hvp.hessian(loss_fn, p.params, p.batches, linearize=True)
    assert op.linearized
    before = traces["n"]
    v = tu.normal_like(jax.random.PRNGKey(0), p.params)
    op @ v
    op.matmat(tu.stack([v, v]))
    # rebuilt at a new point: the linearisation is compiled once per loss and shapes
    op2 = hvp.hessian(loss_fn, tu.scale(0.5, p.params), p.batches, linearize=True)
    op2.matmat(tu.stack([v, v]))
    assert traces["n"] - before <= len(op.dataset.groups)  # the rebuilt operator's validation
    ref = reference("nested", "hessian")
    assert relative_error(tu.ravel(op @ v), ref @ np.asarray(tu.ravel(v))) < 1e-12
