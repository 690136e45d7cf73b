"""Layers of a parameter pytree (hvp.tree): group_by_layer, layer_norms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import layered_params, random_symmetric

from hvp import tree as tu


def test_group_by_layer_paths():
    groups = tu.group_by_layer(layered_params())
    assert groups == {
        "Dense_0": ["Dense_0/bias", "Dense_0/kernel"],
        "blocks/0": ["blocks/0/w"],
        "blocks/1": ["blocks/1/w"],
        "scale": ["scale"],
    }
    top = tu.group_by_layer(layered_params(), layer_fn=lambda p: p.split("/")[0])
    assert list(top) == ["Dense_0", "blocks", "scale"] and len(top["blocks"]) == 2


def test_layer_norms_sum_to_one_and_match_manual():
    params = layered_params()
    n = tu.size(params)
    _, vecs = np.linalg.eigh(random_symmetric(n))
    top = vecs[:, -3:].T  # 3 eigenvectors, rows
    block = jax.vmap(tu.unravel_fn(params))(jnp.asarray(top))
    shares = tu.layer_norms(block)
    total = sum(shares.values())
    np.testing.assert_allclose(total, np.ones(3), rtol=1e-12)
    # Dense_0 is the first 3 + 12 = 15 coordinates in ravel order (bias then kernel)
    np.testing.assert_allclose(shares["Dense_0"], np.sum(top[:, :15] ** 2, axis=1), rtol=1e-12)
    assert all(s.shape == (3,) for s in shares.values())
    # an eigsh-like result is accepted as well (its `eigenvectors` field)
    from types import SimpleNamespace

    again = tu.layer_norms(SimpleNamespace(eigenvectors=block))
    np.testing.assert_allclose(again["blocks/1"], shares["blocks/1"], rtol=1e-12)
    with pytest.raises(ValueError, match="stacked block"):
        tu.layer_norms({"a": jnp.ones(3), "b": jnp.ones((2, 2))})
