"""hvp.landscape: slices of the data-set loss, against direct evaluations and exact models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import build, concat_batches, make_operator

import hvp
from hvp import tree as tu


@pytest.fixture(scope="module")
def mlp():
    # two of the shared MLP's batches (24 and 13 examples: two shape groups, exact weights)
    full = build("mlp")
    problem = dataclasses.replace(full, batches=full.batches[2:])
    return problem, make_operator(problem, "hessian", linearize=False)


_direct = {}


def _loss_direct(problem, p):
    """The mean loss over all examples at ``p`` (one concatenated batch, no operator)."""
    if problem.name not in _direct:
        _direct[problem.name] = jax.jit(problem.loss_fn)
    return float(_direct[problem.name](p, concat_batches(problem.batches)))


def _normal_like(seed, like):
    rng = np.random.default_rng(seed)
    return tu.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), like)


def test_data_loss_is_the_mean_over_all_examples(mlp):
    problem, H = mlp
    L, g = hvp.operators.data_loss_and_grad(H)
    assert abs(float(L) - _loss_direct(problem, problem.params)) < 1e-13
    g_ref = jax.grad(problem.loss_fn)(problem.params, concat_batches(problem.batches))
    assert float(tu.norm(tu.sub(g, g_ref))) < 1e-13
    assert abs(float(hvp.operators.data_loss(H)) - float(L)) < 1e-13


def test_quadratic_loss_model_is_exact():
    # L(p) = 1/2 p^T A p - b^T p over two weighted-equal batches: the model is exact everywhere
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3))
    y = rng.normal(size=7)
    params = {"w": jnp.asarray(rng.normal(size=2)), "v": jnp.asarray(rng.normal(size=(1,)))}

    def loss(p, b):
        w = jnp.concatenate([p["w"], p["v"]])
        return jnp.mean((b[0] @ w - b[1]) ** 2)

    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    H = hvp.hessian(loss, params, data)
    key = jax.random.key(0)
    for kwargs in (
        dict(directions="eigen", dims=2),  # runs hvp.eigsh itself
        dict(directions="random", dims=2, zero_1d=False),  # model from d_i^T H d_j (2 products)
    ):
        r = hvp.landscape(H, key=key, num_points=4, span=2.0, **kwargs)
        np.testing.assert_allclose(r.losses, r.quadratic, rtol=1e-10, atol=1e-10)
        if kwargs["directions"] == "eigen":
            assert r.num_matvecs > 0
            r_eig = r
    # eigenvalues of the top directions are those of the dense Hessian, in descending order
    r = r_eig
    eig = np.linalg.eigvalsh(np.asarray(H.dense()))[::-1][:2]
    got = [d["eigenvalue"] for d in r.directions]
    np.testing.assert_allclose(got, eig, rtol=1e-8)


def test_eigen_slice_agrees_with_second_order_model_to_third_order(mlp):
    _, H = mlp
    top = hvp.eigsh(H, 1, key=jax.random.key(1))
    errs = []
    for s in (0.4, 0.2, 0.1, 0.05):
        rs = hvp.landscape(H, directions=top, span=s, num_points=3)  # reuses the eigenpairs
        assert rs.num_matvecs == 0
        errs.append(np.max(np.abs(rs.losses - rs.quadratic)))  # at a = +-s: O(s^3)
    d = rs.directions[0]
    assert d["kind"] == "eigenvector" and d["converged"]
    assert abs(d["norm"] - 1.0) < 1e-10
    assert d["eigenvalue"] == float(top.eigenvalues[0])
    # the curvature along the vector equals the Ritz value (the model's lambda)
    v = tu.index(top.eigenvectors, 0)
    assert abs(float(tu.dot(v, H.mv(v))) - d["eigenvalue"]) < 1e-8
    errs = np.array(errs)
    assert errs[-1] < 1e-4
    rates = np.log2(errs[:-1] / errs[1:])  # 3 for an O(a^3) error
    assert np.all(rates > 2.7), rates


def test_filter_normalized_norms():
    rng = np.random.default_rng(2)
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4))), "bias": jnp.ones(4)},
        "dense": {"kernel": jnp.asarray(rng.normal(size=(5, 3))), "bias": jnp.ones(3)},
    }
    d = hvp.landscape.filter_normalized(_normal_like(0, params), params)
    for layer in ("conv", "dense"):
        k, dk = np.asarray(params[layer]["kernel"]), np.asarray(d[layer]["kernel"])
        axes = tuple(range(k.ndim - 1))
        np.testing.assert_allclose(
            np.sqrt((dk**2).sum(axis=axes)), np.sqrt((k**2).sum(axis=axes)), rtol=1e-12
        )
        assert np.all(np.asarray(d[layer]["bias"]) == 0)  # biases zeroed (ignore="biasbn")
    # PyTorch layout: filters on axis 0; and 1-D leaves kept (rescaled as one filter)
    d0 = hvp.landscape.filter_normalized(
        _normal_like(1, params), params, filter_axis=0, zero_1d=False
    )
    k, dk = np.asarray(params["dense"]["kernel"]), np.asarray(d0["dense"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(dk, axis=1), np.linalg.norm(k, axis=1), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(d0["dense"]["bias"]), np.sqrt(3.0), rtol=1e-12)


def test_compiled_grid_equals_naive_loop(mlp):
    problem, H = mlp
    key = jax.random.key(3)
    r = hvp.landscape(H, directions="random", dims=2, key=key, num_points=3, span=0.5, chunk_size=4)
    d1 = hvp.landscape.filter_normalized(
        tu.normal_like(jax.random.fold_in(key, 0), H.params), H.params
    )
    d2 = hvp.landscape.filter_normalized(
        tu.normal_like(jax.random.fold_in(key, 1), H.params), H.params
    )
    a = r.coordinates[0]
    naive = np.array(
        [
            [_loss_direct(problem, tu.axpy(bj, d2, tu.axpy(ai, d1, problem.params))) for bj in a]
            for ai in a
        ]
    )
    np.testing.assert_allclose(r.losses, naive, rtol=1e-12)
    assert r.num_evaluations == 9 and r.losses.shape == (3, 3)
    assert abs(float(r.loss0) - _loss_direct(problem, problem.params)) < 1e-13
    # chunking does not change the values
    r1 = hvp.landscape(
        H, directions="random", dims=2, key=key, num_points=3, span=0.5, chunk_size=9
    )
    np.testing.assert_array_equal(r1.losses, r.losses)


def test_towards_target_interpolates(mlp):
    problem, H = mlp
    target = tu.scale(0.5, problem.params)
    r = hvp.landscape(H, directions="towards", target=target, num_points=3, span=(0.0, 1.0))
    assert abs(r.losses[-1] - _loss_direct(problem, target)) < 1e-12
    assert abs(r.losses[0] - _loss_direct(problem, problem.params)) < 1e-12
    assert r.directions[0]["kind"] == "towards_target"


def test_json_and_plots(tmp_path, mlp):
    _, H = mlp
    r1 = hvp.landscape(H, key=jax.random.key(0), num_points=5, span=0.5)
    r2 = hvp.landscape(H, directions="random", dims=2, key=jax.random.key(0), num_points=4)
    import json

    d = json.loads(r2.to_json())
    assert d["kind"] == "random" and len(d["losses"]) == 4 and len(d["coordinates"]) == 2
    out = hvp.landscape.plot_landscape(r1, tmp_path / "line.png")
    out += hvp.landscape.plot_landscape(
        d, tmp_path / "contour.png", surface_path=tmp_path / "surface.png"
    )
    for p in out:
        assert p.exists() and p.stat().st_size > 1000
        assert p.read_bytes()[:4] == b"\x89PNG"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["contour.png", "line.png", "surface.png"]


def test_errors(mlp):
    _, H = mlp
    with pytest.raises(ValueError, match="target"):
        hvp.landscape(H, directions="towards")
    with pytest.raises(ValueError, match="directions"):
        hvp.landscape(H, directions="pca", key=jax.random.key(0))
    with pytest.raises(TypeError, match="key"):
        hvp.landscape(H, directions="random")
    with pytest.raises(ValueError, match="dims"):
        hvp.landscape(H, dims=3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="span"):
        hvp.landscape(H, key=jax.random.key(0), span=(1.0, -1.0))
    with pytest.raises(TypeError, match="curvature operator"):
        hvp.landscape(hvp.from_dense(jnp.eye(2)))
