"""Parameter blocks (``wrt=``): the operator equals the matching sub-block of the dense matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import build, make_operator, reference, relative_error

from hvp import tree as tu

# leaf paths of the "nested" problem, in ravel order:
# extra/0 (1,), extra/1 (2, 1), layers/0/b (4,), layers/0/w (3, 4), layers/1/0 (4, 2), layers/1/1 (2,), scale (1,)


def _indices(params, mask):
    """Ravel-order indices of the leaves flagged in ``mask``."""
    idx, start = [], 0
    for leaf, m in zip(jax.tree_util.tree_leaves(params), mask):
        if m:
            idx.extend(range(start, start + leaf.size))
        start += leaf.size
    return np.asarray(idx)


FILTERS = {
    "regex": ("layers/0", [False, False, True, True, False, False, False]),
    "regex_anchor": ("^extra|scale$", [True, True, False, False, False, False, True]),
    "list": (["scale", "layers/1/0"], [False, False, False, False, True, False, True]),
    "callable": (lambda path, leaf: leaf.ndim == 2, [False, True, False, True, True, False, False]),
}


@pytest.mark.parametrize(
    "filt,kind",
    [(f, "hessian") for f in sorted(FILTERS)] + [("regex", "ggn"), ("regex", "empirical_fisher")],
)
def test_block_equals_dense_sub_block(filt, kind):
    p = build("nested")
    wrt, mask = FILTERS[filt]
    op = make_operator(p, kind, wrt=wrt)
    leaves = jax.tree_util.tree_leaves(op.params)  # unselected leaves are None (empty subtrees)
    idx = _indices(p.params, mask)
    assert len(leaves) == sum(mask)
    assert op.size == len(idx)
    ref = reference("nested", kind)[np.ix_(idx, idx)]
    if filt == "regex":  # the whole block once; products (one compile less) for the other filters
        assert relative_error(op.dense(chunk_size=op.size), ref) < 1e-10
    for seed in (0, 1):
        v = tu.normal_like(jax.random.PRNGKey(seed), op.params)
        hv = op @ v
        tu.assert_same_structure(hv, op.params)
        assert relative_error(tu.ravel(hv), ref @ np.asarray(tu.ravel(v))) < 1e-10


def test_block_full_params_puts_block_in_place():
    p = build("nested")
    op = make_operator(p, "hessian", wrt="scale")
    assert op.size == 1
    full = op.full_params(
        {
            "extra": (None, None),
            "layers": [{"b": None, "w": None}, (None, None)],
            "scale": p.params["scale"] * 0 + 7.0,
        }
    )
    assert float(full["scale"][0]) == 7.0
    np.testing.assert_array_equal(full["layers"][0]["w"], p.params["layers"][0]["w"])
    # the 1 x 1 block is the last diagonal entry of the full Hessian
    ref = reference("nested", "hessian")
    n = p.size
    h = op @ {
        "extra": (None, None),
        "layers": [{"b": None, "w": None}, (None, None)],
        "scale": jnp.ones(1),
    }
    assert abs(float(h["scale"][0]) - ref[n - 1, n - 1]) <= 1e-10 * abs(ref[n - 1, n - 1])


@pytest.mark.parametrize("wrt", ["no_such_layer", ["nope", "neither"], lambda path, leaf: False])
def test_filter_matching_nothing_lists_the_paths(wrt):
    p = build("nested")
    with pytest.raises(ValueError, match="selects no parameter") as info:
        make_operator(p, "hessian", wrt=wrt)
    for path in tu.leaf_paths(p.params):
        assert path in str(info.value)


def test_bad_filter_type():
    p = build("nested")
    with pytest.raises(TypeError, match="`wrt` must be a regular expression"):
        make_operator(p, "hessian", wrt=3)
