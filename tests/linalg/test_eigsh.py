"""Lanczos eigenpairs (hvp.linalg.eigsh) against dense float64 references."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import sym

import hvp
from hvp import tree as tu
from hvp.linalg import eigsh

N = 60  # one size for the dense tests, so that the compiled Lanczos is reused


SPECTRA = {
    "separated": np.geomspace(1e-2, 10.0, N),
    "clustered": np.concatenate([1.0 + 1e-3 * np.arange(N - 4), [3.0, 3.01, 5.0, 8.0]]),
    "negatives": np.concatenate([np.linspace(-4.0, -0.5, 15), np.linspace(0.1, 2.0, N - 15)]),
}


def expected(ev, k, which):
    ev = np.sort(ev)
    return {"largest": ev[-k:], "smallest": ev[:k], "both": np.concatenate([ev[:k], ev[-k:]])}[
        which
    ]


def check_pairs(res, a, k, which, *, rtol=1e-10):
    ev = np.linalg.eigvalsh(a)
    lam = np.asarray(res.eigenvalues)
    scale = np.abs(ev).max()
    np.testing.assert_allclose(lam, expected(ev, k, which), atol=rtol * scale, rtol=0)
    assert np.all(np.diff(lam) >= 0), "eigenvalues must be ascending"
    vecs = np.asarray(jax.vmap(tu.ravel)(res.eigenvectors))
    assert vecs.shape == (lam.size, a.shape[0])
    true_res = np.linalg.norm(vecs @ a - lam[:, None] * vecs, axis=1)
    np.testing.assert_allclose(np.asarray(res.residuals), true_res, atol=1e-12 * scale)
    assert np.all(true_res <= 1e-6 * scale)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-10)
    assert bool(np.all(np.asarray(res.converged)))


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_known_spectra(name, which):
    a = sym(SPECTRA[name], seed=1)
    # tol is relative to each eigenvalue (ARPACK convention): 1e-7 of the smallest ones here
    res = eigsh(
        hvp.from_dense(a), 4, which=which, key=jax.random.PRNGKey(0), tol=1e-7, max_restarts=100
    )
    check_pairs(res, a, 4, which)
    assert res.which == which
    assert int(res.num_matvecs) >= 4
    d = res.to_dict()
    assert set(d) >= {
        "eigenvalues",
        "eigenvectors",
        "residuals",
        "converged",
        "num_matvecs",
        "num_restarts",
    }


def test_rank_deficient_finds_repeated_eigenvalues_without_nan():
    eigs = np.zeros(N)
    eigs[:3] = 5.0  # a triple eigenvalue: one Krylov sequence sees it once
    eigs[3:5] = -2.0
    a = sym(eigs, seed=2)
    for which, want in (("largest", [0.0, 5.0, 5.0, 5.0]), ("smallest", [-2.0, -2.0, 0.0, 0.0])):
        res = eigsh(hvp.from_dense(a), 4, which=which, key=jax.random.PRNGKey(0), tol=1e-9)
        np.testing.assert_allclose(np.asarray(res.eigenvalues), want, atol=1e-9)
        assert np.all(np.isfinite(np.asarray(res.residuals)))
        assert np.all(np.asarray(res.residuals) < 1e-8)


def test_zero_operator():
    res = eigsh(hvp.from_dense(np.zeros((N, N))), 4, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(res.eigenvalues), 0.0)
    assert tu.all_finite(res.eigenvectors)
    vecs = np.asarray(jax.vmap(tu.ravel)(res.eigenvectors))
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(4), atol=1e-10)  # still an orthonormal basis
    assert bool(np.all(np.asarray(res.converged)))


def test_pytree_like_mixed_shapes():
    params = {"w": jnp.zeros((3, 4)), "b": [jnp.zeros((2,)), jnp.zeros((1,))], "s": jnp.zeros(())}
    n = tu.size(params)  # 15
    a = sym(np.linspace(-3, 7, n) + 0.1 * np.arange(n) ** 1.5, seed=3)
    res = eigsh(
        hvp.from_dense(a, like=params), 3, which="both", key=jax.random.PRNGKey(4), tol=1e-10
    )
    tu.assert_same_structure(res.eigenvectors, params, leading=1)
    assert jax.tree_util.tree_leaves(res.eigenvectors)[0].shape[0] == 6
    check_pairs(res, a, 3, "both")


def test_callable_matvec_with_like():
    a = sym(SPECTRA["separated"], seed=5)
    mat = jnp.asarray(a)
    res = eigsh(lambda v: mat @ v, 2, like=jnp.zeros(N), key=jax.random.PRNGKey(0), tol=1e-9)
    check_pairs(res, a, 2, "largest")
    with pytest.raises(TypeError, match="like="):
        eigsh(lambda v: mat @ v, 2)


def test_mlp_hessian_top_and_bottom_five():
    from problems import operator, reference

    h = operator("mlp", "hessian")
    ev = np.linalg.eigvalsh(reference("mlp", "hessian"))
    res = eigsh(h, 5, which="both", key=jax.random.PRNGKey(0), tol=1e-10)
    lam = np.asarray(res.eigenvalues)
    want = np.concatenate([ev[:5], ev[-5:]])
    rel = np.abs(lam - want) / np.abs(want)
    print(
        f"mlp hessian (n={h.size}): both ends k=5, {int(res.num_matvecs)} matvecs, "
        f"{int(res.num_restarts)} restarts, max rel err {rel.max():.2e}, max residual "
        f"{np.asarray(res.residuals).max():.2e}"
    )
    assert rel.max() < 1e-8
    assert np.asarray(res.residuals).max() < 1e-6
    assert bool(np.all(np.asarray(res.converged)))
    assert int(res.num_matvecs) < h.size  # far fewer products than a dense Hessian needs
    tu.assert_same_structure(res.eigenvectors, h.like, leading=1)


def test_warm_start_reduces_matvecs():
    rng = np.random.default_rng(6)
    a = sym(SPECTRA["negatives"], seed=6)
    e = rng.normal(size=(N, N))
    b = a + 1e-4 * (e + e.T)  # the "next training step": a nearby operator
    cold_a = eigsh(hvp.from_dense(a), 4, key=jax.random.PRNGKey(0), tol=1e-9)
    cold_b = eigsh(hvp.from_dense(b), 4, key=jax.random.PRNGKey(1), tol=1e-9)
    warm_b = eigsh(
        hvp.from_dense(b), 4, key=jax.random.PRNGKey(1), tol=1e-9, v0=cold_a.eigenvectors
    )
    check_pairs(warm_b, b, 4, "largest")
    print(
        f"warm start: cold {int(cold_b.num_matvecs)} matvecs, warm {int(warm_b.num_matvecs)} matvecs"
    )
    assert int(warm_b.num_matvecs) < int(cold_b.num_matvecs)
    # a single pytree start vector is accepted too
    single = eigsh(
        hvp.from_dense(b),
        4,
        key=jax.random.PRNGKey(1),
        tol=1e-9,
        v0=tu.index(cold_a.eigenvectors, 0),
    )
    check_pairs(single, b, 4, "largest")


def test_not_converged_is_flagged():
    a = sym(SPECTRA["clustered"], seed=7)
    with pytest.warns(RuntimeWarning, match="eigenpairs reached"):
        res = eigsh(
            hvp.from_dense(a), 4, key=jax.random.PRNGKey(0), num_iters=6, max_restarts=0, tol=1e-10
        )
    conv = np.asarray(res.converged)
    assert not conv.all()
    assert int(res.num_matvecs) == 6 + 4  # 6 Lanczos steps + 4 residual products, reported honestly
    # the flags agree with the residuals
    scale = np.abs(np.linalg.eigvalsh(a)).max()
    assert np.all(np.asarray(res.residuals)[conv] <= 1e-10 * scale * 1.001)
    assert np.all(
        np.asarray(res.residuals)[~conv] > 1e-10 * np.abs(np.asarray(res.eigenvalues)).max()
    )


def test_deterministic_for_a_key():
    op = hvp.from_dense(sym(SPECTRA["negatives"], seed=8))
    r1 = eigsh(op, 4, key=jax.random.PRNGKey(3), tol=1e-9)
    r2 = eigsh(op, 4, key=jax.random.PRNGKey(3), tol=1e-9)
    np.testing.assert_array_equal(np.asarray(r1.eigenvalues), np.asarray(r2.eigenvalues))
    np.testing.assert_array_equal(
        np.asarray(tu.ravel(r1.eigenvectors)), np.asarray(tu.ravel(r2.eigenvectors))
    )
    assert int(r1.num_matvecs) == int(r2.num_matvecs)


def test_lower_precision_basis():
    a = sym(SPECTRA["separated"], seed=9)
    res = eigsh(hvp.from_dense(a), 4, key=jax.random.PRNGKey(0), tol=1e-5, basis_dtype=jnp.float32)
    ev = np.linalg.eigvalsh(a)
    np.testing.assert_allclose(np.asarray(res.eigenvalues), ev[-4:], rtol=1e-5)
    assert jax.tree_util.tree_leaves(res.eigenvectors)[0].dtype == jnp.float64


def test_float32_operator():
    a = sym(SPECTRA["separated"], seed=10).astype(np.float32)
    res = eigsh(hvp.from_dense(jnp.asarray(a)), 2, key=jax.random.PRNGKey(0), tol=1e-4)
    assert res.eigenvalues.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(res.eigenvalues), np.linalg.eigvalsh(a.astype(np.float64))[-2:], rtol=1e-4
    )


def test_nonfinite_operator_raises():
    a = sym(SPECTRA["separated"], seed=11)
    a[3, 5] = a[5, 3] = np.nan
    with pytest.raises(hvp.NonFiniteError, match="dense"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eigsh(hvp.from_dense(a), 4, key=jax.random.PRNGKey(0), tol=1e-9)


def test_errors():
    op = hvp.from_dense(np.eye(N))
    with pytest.raises(ValueError, match=f"n={N}"):
        eigsh(op, N + 1)
    with pytest.raises(ValueError, match="2k"):
        eigsh(op, N // 2 + 1, which="both")
    with pytest.raises(ValueError, match="at least 1"):
        eigsh(op, 0)
    with pytest.raises(ValueError, match="which"):
        eigsh(op, 2, which="top")
    with pytest.raises(ValueError, match="v0"):
        eigsh(op, 2, v0={"a": jnp.ones(N)})
    with pytest.raises(ValueError, match="v0"):
        eigsh(op, 2, v0=jnp.ones(N + 1))
    with pytest.raises(ValueError, match="zero"):
        eigsh(op, 2, v0=jnp.zeros(N))
    with pytest.raises(ValueError, match="reorthogonalize"):
        eigsh(op, 2, reorthogonalize="none")
    with pytest.raises(ValueError, match="num_iters"):
        eigsh(op, 4, num_iters=3)
