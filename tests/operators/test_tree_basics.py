"""Tree utilities: deterministic random probes, shapes and dtypes preserved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import build

from hvp import tree as tu


@pytest.fixture(scope="module")
def mixed():
    """Nested params with a float32 leaf among float64 ones."""
    p = build("nested").params
    return {**p, "f32": jnp.ones((2, 3), jnp.float32)}


@pytest.mark.parametrize("fn", [tu.rademacher_like, tu.normal_like])
def test_random_probes_deterministic_and_shaped(fn, mixed):
    a = fn(jax.random.PRNGKey(3), mixed)
    b = fn(jax.random.PRNGKey(3), mixed)
    c = fn(jax.random.PRNGKey(4), mixed)
    tu.assert_same_structure(a, mixed)  # structure, shapes and dtypes (float32 stays float32)
    np.testing.assert_array_equal(tu.ravel(a), tu.ravel(b))
    assert not np.array_equal(tu.ravel(a), tu.ravel(c))
    # leaves get independent draws (not one stream reused for every leaf): compare 6 entries
    assert not np.array_equal(np.ravel(a["f32"]), np.ravel(a["layers"][0]["w"])[:6])
    assert not np.array_equal(np.ravel(a["layers"][0]["w"])[:6], np.ravel(a["layers"][0]["w"])[6:])


def test_rademacher_values(mixed):
    r = tu.ravel(tu.cast(tu.rademacher_like(jax.random.PRNGKey(0), mixed), jnp.float64))
    assert set(np.unique(np.asarray(r)).tolist()) == {-1.0, 1.0}
    # mean of n = 37 signs: within 4 standard errors of 0
    assert abs(float(r.mean())) < 4 / np.sqrt(r.size)


def test_ravel_unravel_roundtrip(mixed):
    flat = tu.ravel(mixed)
    assert flat.shape == (tu.size(mixed),) == (30 + 6,)
    back = tu.unravel_fn(mixed)(flat)
    tu.assert_same_structure(back, mixed)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(mixed)):
        np.testing.assert_array_equal(x, y)


def test_arithmetic_keeps_dtypes_and_matches_flat(mixed):
    key1, key2 = jax.random.split(jax.random.PRNGKey(1))
    a, b = tu.normal_like(key1, mixed), tu.normal_like(key2, mixed)
    for out in (tu.add(a, b), tu.sub(a, b), tu.scale(2.0, a), tu.axpy(0.5, a, b), tu.zeros_like(a)):
        tu.assert_same_structure(out, mixed)
    fa, fb = np.asarray(tu.ravel(a), np.float64), np.asarray(tu.ravel(b), np.float64)
    np.testing.assert_allclose(float(tu.dot(a, b)), fa @ fb, rtol=1e-6)
    np.testing.assert_allclose(float(tu.norm(a)), np.linalg.norm(fa), rtol=1e-6)
    np.testing.assert_allclose(tu.ravel(tu.axpy(0.5, a, b)), 0.5 * fa + fb, rtol=1e-6)


def test_stack_index_and_batched_dots(mixed):
    vs = [tu.normal_like(k, mixed) for k in jax.random.split(jax.random.PRNGKey(2), 3)]
    block = tu.stack(vs)
    tu.assert_same_structure(block, mixed, leading=1)
    for i, v in enumerate(vs):
        np.testing.assert_array_equal(tu.ravel(tu.index(block, i)), tu.ravel(v))
    dots = tu.vdot_batched(block, vs[0])
    np.testing.assert_allclose(dots, [float(tu.dot(v, vs[0])) for v in vs], rtol=1e-6)
    with pytest.raises(ValueError, match="leading"):
        tu.assert_same_structure(mixed, mixed, leading=1)


def test_paths_and_nonfinite_leaves(mixed):
    assert tu.leaf_paths(mixed) == [
        "extra/0",
        "extra/1",
        "f32",
        "layers/0/b",
        "layers/0/w",
        "layers/1/0",
        "layers/1/1",
        "scale",
    ]
    bad = {**mixed, "scale": jnp.array([jnp.nan])}
    assert tu.nonfinite_leaves(bad) == ["scale"]
    assert bool(tu.all_finite(mixed)) and not bool(tu.all_finite(bad))
