"""Block products (vmap or sequential map, chosen per operator) and linearize="auto", against
dense float64 references (tests/problems.py)."""

import jax
import numpy as np
import pytest
from problems import build, make_operator, reference, relative_error

import hvp
from hvp import tree as tu


def _block(op, count, seed=0):
    vs = [tu.normal_like(jax.random.PRNGKey(seed + i), op.params) for i in range(count)]
    return vs, tu.stack(vs)


@pytest.mark.parametrize("name,kind", [("cnn", "hessian"), ("nested", "ggn")])
def test_block_modes_agree_with_reference(name, kind):
    problem, ref = build(name), reference(name, kind)
    extra = {"linearize": False} if kind == "hessian" else {}
    vmap = make_operator(problem, kind, block="vmap", **extra)
    smap = make_operator(problem, kind, block="map", **extra)
    auto = make_operator(problem, kind, **extra)
    assert (vmap.block_mode(), smap.block_mode()) == ("vmap", "map")
    # the documented rule: a convolution on the CPU backend -> sequential map, else vmap
    conv_on_cpu = name == "cnn" and jax.default_backend() == "cpu"
    assert auto.block_mode() == ("map" if conv_on_cpu else "vmap")
    vs, block = _block(vmap, 3)
    want = np.stack([ref @ np.asarray(tu.ravel(v)) for v in vs])
    traced = jax.jit(lambda op, vs: op.matmat(vs))  # in a trace: a vmap, or a lax.map for "map"
    for out in (vmap.matmat(block), smap.matmat(block), traced(vmap, block), traced(smap, block)):
        got = np.stack([np.asarray(tu.ravel(tu.index(out, i))) for i in range(3)])
        assert relative_error(got, want) < 1e-12


def test_block_mode_is_validated_everywhere():
    p = build("quadratic")
    with pytest.raises(ValueError, match="`block` must be one of"):
        hvp.hessian(p.loss_fn, p.params, p.batches, block="vectorize")
    with pytest.raises(ValueError, match="`block` must be one of"):
        hvp.empirical_fisher(p.loss_fn, p.params, p.batches, block=None)
    with pytest.raises(ValueError, match="`block` must be one of"):
        hvp.from_matvec(lambda v: v, p.params, block="vmap ")
    m = build("nested")
    with pytest.raises(ValueError, match="`block` must be one of"):
        hvp.ggn(m.model_fn, m.output_loss, m.params, m.batches, block="loop")
    op = hvp.from_matvec(lambda v: 2.0 * v, np.zeros(3), block="map")
    assert op.block_mode() == "map"
    np.testing.assert_array_equal(op.matmat(np.eye(3)), 2.0 * np.eye(3))


def test_linearize_auto_follows_the_memory_budget():
    p = build("mlp")
    ref = reference("mlp", "hessian")
    auto = hvp.hessian(p.loss_fn, p.params, p.batches)  # residuals of a few kB: linearised
    tight = hvp.hessian(p.loss_fn, p.params, p.batches, linearize_budget=1000)
    assert auto.linearized and not tight.linearized
    v = tu.normal_like(jax.random.PRNGKey(0), p.params)
    want = ref @ np.asarray(tu.ravel(v))
    for op in (auto, tight):
        assert relative_error(tu.ravel(op @ v), want) < 1e-12

    # inside jit (traced parameters) "auto" does not linearise; the product is the same
    seen = []

    @jax.jit
    def traced(params, v):
        op = hvp.hessian(p.loss_fn, params, p.batches)
        seen.append(op.linearized)
        return op @ v

    assert relative_error(tu.ravel(traced(p.params, v)), want) < 1e-12
    assert seen == [False]


@pytest.mark.parametrize(
    "kwargs", [{"linearize": "yes"}, {"linearize": None}, {"linearize_budget": -1}]
)
def test_linearize_arguments_are_validated(kwargs):
    p = build("quadratic")
    with pytest.raises(ValueError, match="linearize"):
        hvp.hessian(p.loss_fn, p.params, p.batches, **kwargs)
