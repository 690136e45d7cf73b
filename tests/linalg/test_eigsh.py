"""Lanczos eigenpairs (hvp.linalg.eigsh) against dense float64 references."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from driver_checks import assert_drivers_agree, assert_resume_bitwise
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
        eigsh(lambda v: mat @ v, 2, key=jax.random.key(0))


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
    with pytest.warns(RuntimeWarning, match="eigenpairs converged") as rec:
        res = eigsh(
            hvp.from_dense(a), 4, key=jax.random.PRNGKey(0), num_iters=6, max_restarts=0, tol=1e-10
        )
    conv = np.asarray(res.converged)
    assert not conv.all()
    assert "near 0" not in str(rec[0].message) and "accept tol=" in str(rec[0].message)
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
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=f"n={N}"):
        eigsh(op, N + 1, key=key)
    with pytest.raises(ValueError, match="2k"):
        eigsh(op, N // 2 + 1, which="both", key=key)
    with pytest.raises(ValueError, match="at least 1"):
        eigsh(op, 0, key=key)
    with pytest.raises(ValueError, match="which"):
        eigsh(op, 2, which="top", key=key)
    with pytest.raises(ValueError, match="v0"):
        eigsh(op, 2, v0={"a": jnp.ones(N)}, key=key)
    with pytest.raises(ValueError, match="v0"):
        eigsh(op, 2, v0=jnp.ones(N + 1), key=key)
    with pytest.raises(ValueError, match="zero"):
        eigsh(op, 2, v0=jnp.zeros(N), key=key)
    with pytest.raises(ValueError, match="reorthogonalize=True"):
        eigsh(op, 2, reorthogonalize=False, key=key)
    with pytest.raises(TypeError, match="reorthogonalize"):
        eigsh(op, 2, reorthogonalize="full", key=key)
    with pytest.raises(ValueError, match="num_iters"):
        eigsh(op, 4, num_iters=3, key=key)
    # the key is required, and an int is refused with the fix
    with pytest.raises(TypeError, match="key"):
        eigsh(op, 2)
    with pytest.raises(TypeError, match=r"jax.random.key\(seed\)"):
        eigsh(op, 2, key=0)
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="finite number"):
            eigsh(op, 2, tol=bad, key=key)
        with pytest.raises(ValueError, match="zero_tol"):
            hvp.spectrum_summary(op, key=jax.random.PRNGKey(0), zero_tol=bad)


# ------------------------------------------------------------------------------------------
# Issue 9 §1: repeated eigenvalues and null spaces, against numpy.linalg.eigh and ARPACK.
# Every case runs several seeds in a Python loop (one compile per shape/k/which).
# ------------------------------------------------------------------------------------------

NM = 40  # size of the multiplicity problems (one compile per (k, which, dtype))
SEEDS = range(8)
#: The sweeps run many tiny problems: the compiled driver (one XLA program, no per-step
#: dispatch) keeps them fast; test_drivers_agree shows that both drivers give the same numbers.
SWEEP = dict(driver="compiled")


def arpack(a, k, which, tol=0.0):
    """scipy's ARPACK (which="LA"/"SA"), counting products; ``which="both"`` is two runs."""
    import scipy.sparse.linalg as sla

    count = [0]

    def mv(x):
        count[0] += 1
        return a @ x

    op = sla.LinearOperator(a.shape, matvec=mv, dtype=a.dtype)
    ends = {"largest": ["LA"], "smallest": ["SA"], "both": ["SA", "LA"]}[which]
    vals = [np.sort(sla.eigsh(op, k, which=w, tol=tol, v0=np.ones(len(a)))[0]) for w in ends]
    return np.sort(np.concatenate(vals)), count[0]


def errors(res, a, k, which):
    """Max |lambda_i - exact_i| / ||A||, and whether the returned vectors are honest pairs."""
    ev = np.linalg.eigvalsh(np.asarray(a, np.float64))
    lam = np.asarray(res.eigenvalues, np.float64)
    scale = np.abs(ev).max()
    err = np.abs(lam - expected(ev, k, which)).max() / scale
    vecs = np.asarray(jax.vmap(tu.ravel)(res.eigenvectors), np.float64)
    true_res = np.linalg.norm(vecs @ a - lam[:, None] * vecs, axis=1)
    thr = np.asarray(res.thresholds)
    conv = np.asarray(res.converged)
    honest = bool(np.all(true_res[conv] <= 1.01 * thr[conv] + 1e-12 * scale))
    return err, honest


def spectrum_with_copies(rng, mult, where, n=NM, value=3.0):
    """Random spectrum in [-1, 1] plus ``mult`` copies of +-value at the wanted end(s)."""
    eigs = rng.uniform(-1.0, 1.0, n)
    if where in ("largest", "both"):
        eigs[:mult] = value
    if where in ("smallest", "both"):
        eigs[n - mult :] = -value
    return eigs


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_multiplicities_one_to_six(which, seeds=SEEDS):
    """Multiplicity 1-6 at the top, bottom or both ends: every copy comes back, as by eigh."""
    k = 3 if which == "both" else 6
    worst, worst_arpack, mv, mv_arpack = 0.0, 0.0, [], []
    for mult in range(1, 7):
        for seed in seeds:
            rng = np.random.default_rng(100 * mult + seed)
            a = sym(spectrum_with_copies(rng, mult, which), seed=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no "not converged" warning either
                res = eigsh(
                    hvp.from_dense(a), k, which=which, key=jax.random.PRNGKey(seed), **SWEEP
                )
            err, honest = errors(res, a, k, which)
            assert honest
            assert bool(np.all(np.asarray(res.converged))), (mult, seed)
            assert err < 1e-10, (mult, seed, np.asarray(res.eigenvalues))
            ref, count = arpack(a, k, which)
            err_ref = np.abs(ref - expected(np.linalg.eigvalsh(a), k, which)).max() / 3.0
            worst, worst_arpack = max(worst, err), max(worst_arpack, err_ref)
            mv.append(int(res.num_matvecs))
            mv_arpack.append(count)
    print(
        f"{which}: max error / ||A||: eigsh {worst:.1e}, ARPACK {worst_arpack:.1e}; "
        f"mean matvecs eigsh {np.mean(mv):.0f}, ARPACK {np.mean(mv_arpack):.0f}"
    )
    assert worst <= max(worst_arpack, 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_multiplicities_many_more_seeds(which):
    """The same with 24 further seeds per multiplicity (a method right "most of the time" fails)."""
    test_multiplicities_one_to_six(which, seeds=range(8, 32))


@pytest.mark.parametrize("rank", [NM - 2, NM - 5, 20, 4, 1])
def test_null_spaces(rank):
    """PSD operators with null spaces of dimension 2 .. n-1: the zeros come back as zeros."""
    k = 6
    for seed in range(4):
        rng = np.random.default_rng(seed)
        eigs = np.zeros(NM)
        eigs[:rank] = rng.uniform(0.5, 4.0, rank)
        a = sym(eigs, seed=seed)
        nulls = NM - rank
        for which in ("smallest", "largest"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                res = eigsh(
                    hvp.from_dense(a), k, which=which, key=jax.random.PRNGKey(seed), **SWEEP
                )
            err, honest = errors(res, a, k, which)
            assert honest and bool(np.all(np.asarray(res.converged)))
            assert err < 1e-10, (rank, seed, which, np.asarray(res.eigenvalues))
            if which == "smallest":
                lam = np.asarray(res.eigenvalues)
                assert np.all(np.abs(lam[: min(k, nulls)]) < 1e-12 * 4.0)


def test_issue_rank4_n64_smallest_vs_arpack():
    """The issue's case: U = qr(normal(64, 4)), A = U diag(1,2,3,4) U^T, k=3 smallest -> 0,0,0."""
    for seed in range(10):
        rng = np.random.default_rng(seed)
        u, _ = np.linalg.qr(rng.normal(size=(64, 4)))
        a = (u * np.array([1.0, 2.0, 3.0, 4.0])) @ u.T
        res = eigsh(hvp.from_dense(a), 3, which="smallest", key=jax.random.PRNGKey(seed), **SWEEP)
        lam = np.asarray(res.eigenvalues)
        assert np.abs(lam).max() < 1e-12, (seed, lam)
        assert bool(np.all(np.asarray(res.converged)))
        ref, _ = arpack(a, 3, "smallest")
        assert np.abs(lam).max() <= max(np.abs(ref).max(), 1e-12)


def test_float32_multiplicities_and_nulls():
    """float32: copies and zeros within the float32 tolerance floor (64 eps ||A||)."""
    eps32 = float(np.finfo(np.float32).eps)
    for seed in range(6):
        rng = np.random.default_rng(seed)
        eigs = spectrum_with_copies(rng, 3, "largest")
        eigs[-5:] = 0.0  # and a null space
        a = sym(eigs, seed=seed)
        op = hvp.from_dense(jnp.asarray(a, jnp.float32))
        for which in ("largest", "smallest"):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                res = eigsh(op, 4, which=which, key=jax.random.PRNGKey(seed), tol=1e-5, **SWEEP)
            assert res.eigenvalues.dtype == jnp.float32
            assert (
                res.dtype_policy.compute == "float32" and res.dtype_policy.accumulate == "float32"
            )
            err, honest = errors(res, a, 4, which)
            assert honest and bool(np.all(np.asarray(res.converged)))
            assert err < 100 * eps32, (seed, which, np.asarray(res.eigenvalues))


def _small_mlp_ggn(num_examples=2, classes=3):
    from problems import Problem, _loss_from_model, _mlp_params, dense_ggn, digits, mlp_apply

    rng = np.random.default_rng(7)
    x, y = digits(num_examples, seed=7)
    params = _mlp_params(rng, (16, 6, classes))
    loss = hvp.losses.softmax_cross_entropy
    batch = (jnp.asarray(x), jnp.asarray(y % classes))
    prob = Problem(
        "mlp2",
        params,
        _loss_from_model(mlp_apply, loss),
        [batch],
        model_fn=mlp_apply,
        output_loss=loss,
    )
    return hvp.ggn(mlp_apply, loss, params, [batch]), dense_ggn(prob)


def test_mlp_ggn_on_two_examples_rank_four():
    """GGN of an MLP on 2 examples, 3 classes: rank 2 x (3 - 1) = 4, every other eigenvalue 0."""
    op, g = _small_mlp_ggn()
    ev = np.linalg.eigvalsh(g)
    assert np.sum(np.abs(ev) > 1e-10 * ev.max()) == 4  # the reference itself
    res = eigsh(op, 3, which="smallest", key=jax.random.PRNGKey(0))
    lam = np.asarray(res.eigenvalues)
    assert np.abs(lam).max() < 1e-12 * ev.max(), lam
    assert bool(np.all(np.asarray(res.converged)))
    s = hvp.spectrum_summary(op, key=jax.random.PRNGKey(2), num_probes=2, num_iters=10)
    assert s.definiteness == "positive semi-definite, singular"
    assert not s.positive_definite and s.singular is True
    assert s.condition_number == float("inf")
    assert s.negative_mass == 0.0


def test_mse_last_layer_kronecker_fourfold():
    """Linear model, 4 outputs, MSE: H = (X^T X / N) kron I_4, every eigenvalue exactly 4-fold."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 40)) * np.linspace(0.5, 2.0, 40)
    y = rng.normal(size=(50, 4))
    w = jnp.zeros((40, 4))

    def loss(w, batch):
        xb, yb = batch
        return 0.5 * jnp.mean(jnp.sum((xb @ w - yb) ** 2, axis=1))

    op = hvp.hessian(loss, w, [(jnp.asarray(x), jnp.asarray(y))])
    dense = np.kron(x.T @ x / 50, np.eye(4))  # ravel order of w (40, 4): row-major
    ev = np.linalg.eigvalsh(dense)
    assert np.allclose(ev[-4:], ev[-1]) and np.allclose(ev[-6:-4], ev[-5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = eigsh(op, 6, key=jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(res.eigenvalues), ev[-6:], rtol=1e-10)
    assert bool(np.all(np.asarray(res.converged)))
    ref, _ = arpack(dense, 6, "largest")
    print(
        f"kronecker: eigsh err {np.abs(res.eigenvalues - ev[-6:]).max():.1e}, ARPACK {np.abs(ref - ev[-6:]).max():.1e}"
    )


def test_tolerance_is_relative_to_each_eigenvalue():
    """A bulk-edge eigenvalue of 0.09 in a spectrum reaching 40: small error relative to 0.09."""
    eigs = np.concatenate([[0.09, 0.1, 0.15, 0.2, 0.3, 0.5], np.linspace(1.0, 40.0, NM - 6)])
    a = sym(eigs, seed=12)
    res = eigsh(hvp.from_dense(a), 6, which="smallest", key=jax.random.PRNGKey(0))
    rel = np.abs(np.asarray(res.eigenvalues) - eigs[:6]) / eigs[:6]
    assert rel.max() < 1e-6, rel
    thr = np.asarray(res.thresholds)
    np.testing.assert_allclose(thr, 1e-6 * np.asarray(res.eigenvalues), rtol=1e-12)
    assert np.all(np.asarray(res.residuals) <= thr)


# ------------------------------------------------------------------------------------------
# Issue 16 §3 / 12 §5: "converged" means verified; a warm start does not stop early.
# ------------------------------------------------------------------------------------------


def test_warm_start_like_the_monitor_k2_float32():
    """The monitor's use: float32 MLP Hessian after each SGD step, k=2, v0 = last eigenvectors.

    Before the fix, steps 1 and 6 ended after 25-28 products with a pair unconverged by its
    true residual (the Ritz estimate had passed) and no restart.
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 16)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=128))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    params = {
        "l0": {"w": f32(rng.normal(size=(16, 32))), "b": jnp.zeros(32, jnp.float32)},
        "l1": {"w": f32(rng.normal(size=(32, 4))), "b": jnp.zeros(4, jnp.float32)},
    }

    def loss_fn(p, b):
        h = jnp.tanh(b[0] @ p["l0"]["w"] + p["l0"]["b"]) @ p["l1"]["w"] + p["l1"]["b"]
        return hvp.losses.softmax_cross_entropy(h, b[1])

    grad = jax.jit(jax.grad(loss_fn))
    vecs, counts = None, []
    for step in range(8):
        params = jax.tree_util.tree_map(lambda a, g: a - 0.05 * g, params, grad(params, (x, y)))
        op = hvp.hessian(loss_fn, params, [(x, y)])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "only 1 of 2 eigenpairs" warning
            res = eigsh(op, 2, key=jax.random.fold_in(jax.random.PRNGKey(0), step), v0=vecs)
        vecs = res.eigenvectors
        assert bool(np.all(np.asarray(res.converged)))
        true = [
            float(tu.norm(tu.axpy(-lam, v, op.matvec(v))))
            for lam, v in zip(np.asarray(res.eigenvalues), tu.unstack(res.eigenvectors))
        ]
        assert np.all(np.asarray(true) <= 1.5 * np.asarray(res.thresholds))
        counts.append(int(res.num_matvecs))
    print(f"warm-started float32 k=2 matvecs per step: {counts}")


def test_unconverged_only_when_budget_is_spent():
    """With restarts left a run does not end unconverged; when it ends so, the budget is spent."""
    a = sym(SPECTRA["clustered"], seed=7)
    for max_restarts in (0, 2):
        with pytest.warns(RuntimeWarning, match="eigenpairs converged"):
            res = eigsh(
                hvp.from_dense(a),
                4,
                key=jax.random.PRNGKey(0),
                num_iters=8,
                max_restarts=max_restarts,
                tol=1e-12,
            )
        assert int(res.num_restarts) >= max_restarts
    res = eigsh(hvp.from_dense(a), 4, key=jax.random.PRNGKey(0), num_iters=8, max_restarts=500)
    assert bool(np.all(np.asarray(res.converged)))


# ------------------------------------------------------------------------------------------
# Issue 9 §2: half precision. Issue 12 §4: transformations.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_parameters(dtype):
    """Products in half precision, the rest in float32; agrees with float32 within its eps."""
    eigs = np.concatenate([np.linspace(-1.0, 1.0, NM - 3), [2.0, 3.0, 4.0]])
    a = sym(eigs, seed=13)
    ah = jnp.asarray(a, dtype)
    ref = eigsh(hvp.from_dense(ah.astype(jnp.float32)), 3, key=jax.random.PRNGKey(0), tol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = eigsh(hvp.from_dense(ah), 3, key=jax.random.PRNGKey(0), tol=1e-2)
    assert res.dtype_policy.compute == jnp.dtype(dtype).name
    assert res.dtype_policy.accumulate == "float32"
    assert res.eigenvalues.dtype == jnp.float32
    eps = float(jnp.finfo(dtype).eps)
    # bound: a half-precision product has relative error ~ eps per entry; 8 eps ||A||
    diff = np.abs(np.asarray(res.eigenvalues) - np.asarray(ref.eigenvalues)).max()
    print(f"{jnp.dtype(dtype).name}: max |lambda - lambda_f32| = {diff:.2e} (eps {eps:.1e})")
    assert diff <= 8 * eps * 4.0
    assert bool(np.all(np.asarray(res.converged)))


def test_float16_overflow_raises():
    a = np.diag(np.full(NM, 6.0e4))
    a[0, 1] = a[1, 0] = 6.0e4
    with pytest.raises(hvp.NonFiniteError, match="NaN or Inf"):
        # k=3 and n=40 as in test_half_precision_parameters: the compiled loop is shared
        eigsh(hvp.from_dense(jnp.asarray(a, jnp.float16)), 3, key=jax.random.PRNGKey(0))


def test_inside_jit_and_vmap_equals_the_host_result():
    """The compiled driver runs inside the user's jit and vmap and gives the host's numbers;
    a NaN product there gives NaN eigenvalues (no exception, no warning)."""
    a = sym(SPECTRA["negatives"], seed=8)
    b = sym(SPECTRA["separated"], seed=9)
    bad = a.copy()
    bad[3, 5] = bad[5, 3] = np.nan
    key = jax.random.PRNGKey(3)

    def top(m):
        r = eigsh(hvp.from_dense(m), 4, key=key, tol=1e-9)
        return r.eigenvalues, r.residuals, r.num_matvecs, r.converged

    hosts = [eigsh(hvp.from_dense(m), 4, key=key, tol=1e-9) for m in (a, b)]
    assert all(isinstance(h.num_matvecs, int) for h in hosts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lam, res, nmv, conv = jax.jit(jax.vmap(top))(jnp.asarray(np.stack([a, b, bad])))
    for i, (m, host) in enumerate(zip((a, b), hosts, strict=True)):
        np.testing.assert_allclose(lam[i], host.eigenvalues, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res[i], host.residuals, rtol=0, atol=1e-12)
        assert int(nmv[i]) == host.num_matvecs and bool(np.all(conv[i]))
        np.testing.assert_allclose(lam[i], np.linalg.eigvalsh(m)[-4:], rtol=0, atol=1e-12)
    assert np.all(np.isnan(np.asarray(lam[2]))) and not np.any(np.asarray(conv[2]))


def test_drivers_agree():
    """Host and compiled drivers: the same numbers to round-off (triple eigenvalues at both
    ends, which="both": locking, confirmation and residual checks on both ends)."""
    rng = np.random.default_rng(11)
    a = sym(spectrum_with_copies(rng, 3, "both"), seed=11)
    op = hvp.from_dense(a)
    # the configuration of test_multiplicities_one_to_six[both] (its compiled loop is reused)
    host, comp = assert_drivers_agree(
        lambda **kw: eigsh(op, 3, which="both", key=jax.random.key(1), **kw), rtol=0, atol=1e-12
    )
    assert isinstance(host.num_matvecs, int) and isinstance(host.num_restarts, int)
    assert host.num_matvecs == int(comp.num_matvecs) and bool(np.all(host.converged))
    np.testing.assert_allclose(
        host.eigenvalues, expected(np.linalg.eigvalsh(a), 3, "both"), rtol=0, atol=1e-12
    )


def test_resume_bit_for_bit_and_compiled_steps_reused(tmp_path):
    """An interrupted host run resumes bit for bit; another tol reuses the compiled steps."""
    from hvp.linalg import _driver

    op = hvp.from_dense(sym(SPECTRA["negatives"], seed=8))
    call = lambda **kw: eigsh(op, 4, key=jax.random.PRNGKey(3), tol=1e-9, **kw)  # noqa: E731
    # interrupted in the confirming sequences, after locks and residual checks
    ref, _ = assert_resume_bitwise(call, tmp_path, interrupt_after=150, every=7)
    assert ref.num_matvecs > 150
    size = _driver._update._cache_size()
    other = eigsh(op, 4, key=jax.random.PRNGKey(3), tol=1e-7, max_restarts=40, progress=True)
    assert _driver._update._cache_size() == size  # tol and max_restarts live in the state
    assert bool(np.all(other.converged)) and other.num_matvecs <= ref.num_matvecs


def test_definiteness_labels():
    from hvp.linalg import definiteness

    assert definiteness(-1e-9, 3.0, 1e-6)[0] == "positive semi-definite, singular"
    assert definiteness(-1.0, 3.0, 1e-6) == ("indefinite", None, None)
    assert definiteness(-3.0, -1.0, 1e-6) == ("negative definite", False, 3.0)
    assert definiteness(-3.0, 1e-8, 1e-6)[0] == "negative semi-definite, singular"
    assert definiteness(0.0, 0.0, 0.0)[0] == "zero"
    with pytest.raises(ValueError, match="zero_threshold"):
        definiteness(0.0, 1.0, float("nan"))


def test_no_room_to_confirm_spans_the_whole_space():
    """k close to n (no room for a confirming sequence): the basis spans the space instead."""
    for n, k, which, want in [(6, 3, "both", [0, 0, 0, 0, 1, 2])]:
        d = np.zeros(n)
        d[-2:] = [1.0, 2.0]
        a = sym(d, seed=n)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = eigsh(hvp.from_dense(a), k, which=which, key=jax.random.PRNGKey(0))
        np.testing.assert_allclose(np.asarray(res.eigenvalues), want, atol=1e-12)
        assert bool(np.all(np.asarray(res.converged)))


# ---------------------------------------------------------------------------
# float32 regressions (QA run): a missed copy of a repeated eigenvalue reported as converged,
# and low-rank operators at both ends that never converged or returned a vector twice.
# ---------------------------------------------------------------------------


def check_float32_run(res, a, k, which, what):
    """``converged`` implies the wanted multiset within the thresholds; vectors orthonormal."""
    ev = np.linalg.eigvalsh(np.asarray(a, np.float64))
    want = expected(ev, k, which)
    lam = np.asarray(res.eigenvalues, np.float64)
    thr = np.asarray(res.thresholds, np.float64)
    conv = np.asarray(res.converged)
    vecs = np.asarray(jax.vmap(tu.ravel)(res.eigenvectors), np.float64)
    gram_err = np.abs(vecs @ vecs.T - np.eye(lam.size)).max()
    assert gram_err < 1e-4, (what, "returned eigenvectors are not orthonormal", gram_err)
    # k orthonormal vectors with residuals <= thr lie within sqrt(k) thr of k eigenvalues;
    # the float32 rounding of the matrix adds a few eps ||A||.
    slack = np.sqrt(lam.size) * thr.max() + 8 * np.finfo(np.float32).eps * np.abs(ev).max()
    wrong = np.abs(lam - want) > slack
    assert not np.any(conv & wrong), (what, lam.round(6).tolist(), want.round(6).tolist())
    assert bool(np.all(conv)), (what, "did not converge", conv.tolist())


def _fourfold(seed, n=40):
    rng = np.random.default_rng(5000 + seed)
    lam = np.repeat(rng.uniform(0.1, 3, n // 4), 4)  # every eigenvalue exactly 4-fold
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (u * lam) @ u.T


def _low_rank(seed, rank, n=40, base=5000):
    rng = np.random.default_rng(base + seed)
    lam = np.r_[np.zeros(n - rank), rng.uniform(0.5, 3, rank)]  # PSD, rank 2-3
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (u * lam) @ u.T


def test_float32_kronecker_ggn_fourfold_largest_six():
    """GGN of a linear model with 4 outputs (float32): [0.839 x2, 0.899 x4], once [x3, x3]."""
    ks = jax.random.split(jax.random.key(312), 3)
    w = jax.random.normal(ks[0], (8, 4), jnp.float32)
    x = jax.random.normal(ks[1], (16, 8), jnp.float32)
    y = jax.random.normal(ks[2], (16, 4), jnp.float32)
    g = hvp.ggn(lambda w, x: x @ w, hvp.losses.mean_squared_error, w, (x, y))
    dense = np.asarray(g.dense(), np.float64)
    for key in [12] + list(range(6)):  # key 12 failed in the QA run (without x64 enabled)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = eigsh(g, 6, which="largest", key=jax.random.key(key), **SWEEP)
        assert res.eigenvalues.dtype == jnp.float32
        check_float32_run(res, dense, 6, "largest", ("kron ggn", key))


@pytest.mark.parametrize(
    "cases",
    [
        # (seed, k, which): the QA failures first, then a sweep sharing the compiles
        [(5, 6, "smallest"), (26, 4, "both"), (26, 6, "both")]
        + [(s, 6, "smallest") for s in range(40) if s % 4 == 0]
        + [(s, 4, "both") for s in range(40) if s % 4 == 1]
        + [(s, 6, "both") for s in range(40) if s % 4 == 2]
        + [(s, 6, "largest") for s in range(40) if s % 4 == 3],
    ],
    ids=["fourfold"],
)
def test_float32_fourfold_spectra_sweep(cases):
    for seed, k, which in cases:
        a = _fourfold(seed)
        res = eigsh(
            hvp.from_dense(jnp.asarray(a, jnp.float32)),
            k,
            which=which,
            key=jax.random.key(seed),
            **SWEEP,
        )
        check_float32_run(res, a, k, which, (seed, k, which))


def test_float32_low_rank_both_ends_sweep():
    """PSD rank 1-6, n=40, which="both": often never converged before (the residual bound
    stuck on the breakdown residuals), and once a vector came back twice."""
    cases = [(25, 2, 8, 1000, 32), (19, 2, 8, 1000, 26), (14, 3, 3, 1000, 21)]
    cases += [(s, 2 + s % 2, (8, 3)[s // 2 % 2], 5000, s) for s in range(20)]
    cases += [(s, 1 + s % 6, 3, 1000, s + 7) for s in range(12)]  # ranks 1 to 6, k=3
    for seed, rank, k, base, key in cases:
        a = _low_rank(seed, rank, base=base)
        res = eigsh(
            hvp.from_dense(jnp.asarray(a, jnp.float32)),
            k,
            which="both",
            key=jax.random.key(key),
            **SWEEP,
        )
        check_float32_run(res, a, k, "both", (seed, rank, k))


def test_one_pair_per_end_needs_no_confirmation():
    """k=1: a copy cannot be missing, so no confirming sequences (47 products on the MLP Hessian
    with them, 14 without, as in 0.1.0); low-rank float32 (repeated zeros) still right."""
    from problems import operator, reference

    h = operator("mlp", "hessian")
    top = np.linalg.eigvalsh(reference("mlp", "hessian"))[-1]
    res = eigsh(h, 1, key=jax.random.key(0))
    print(f"mlp hessian k=1: {res.num_matvecs} matvecs")
    assert res.num_matvecs <= 20 and bool(res.converged[0])
    assert abs(float(res.eigenvalues[0]) - top) <= 1e-9 * abs(top)
    for seed in range(4):
        # low rank in float32 (a repeated zero at the bottom): the residual bound sticks on
        # breakdown residuals, the true residuals decide
        a = _low_rank(seed, 1 + seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = eigsh(
                hvp.from_dense(jnp.asarray(a, jnp.float32)),
                1,
                which="both",
                key=jax.random.key(seed),
                **SWEEP,
            )
        check_float32_run(r, a, 1, "both", seed)
        assert int(r.num_matvecs) <= 20


def test_null_space_zeros_converged_float32():
    """Exact zeros of a singular PSD operator in float32: converged, within zero_tol * ||A||
    (about 1e-5 ||A||) of 0 (float64, about 1e-12 ||A||: test_null_spaces; basis="host":
    tests/scale/test_host_basis.py). The size, k, key type and settings of
    test_float32_multiplicities_and_nulls, whose compiled steps are reused (the float64 tests
    below use k=6 as test_null_spaces for the same reason)."""
    from hvp.linalg import zero_floor

    a = sym(np.r_[np.zeros(5), np.linspace(1.0, 4.0, NM - 5)], seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = eigsh(
            hvp.from_dense(jnp.asarray(a, jnp.float32)),
            4,
            which="smallest",
            key=jax.random.PRNGKey(1),
            tol=1e-5,
            **SWEEP,
        )
    lam, thr = np.asarray(r.eigenvalues, float), np.asarray(r.thresholds, float)
    assert bool(np.all(np.asarray(r.converged))), lam
    assert np.allclose(thr, zero_floor(np.float32) * 4.0, rtol=1e-3)  # zero_tol * ||A||
    assert np.all(np.abs(lam) <= thr) and np.all(np.asarray(r.residuals) <= thr)
    assert np.abs(lam).max() <= 1e-5 * 4.0


def test_small_nonzero_eigenvalue_keeps_relative_accuracy():
    """An eigenvalue of 1e-3 ||A|| is tested relative to itself (tol), not to ||A||: no false
    "converged" for a wrong value, and a looser zero_tol only loosens pairs below it."""
    lam_small = 4e-3  # 1e-3 ||A||
    a = sym(np.r_[lam_small, np.linspace(0.5, 4.0, NM - 1)], seed=5)
    op = hvp.from_dense(a)
    r = eigsh(op, 6, which="smallest", key=jax.random.PRNGKey(0), **SWEEP)
    thr = float(r.thresholds[0])
    assert bool(r.converged[0]) and thr == pytest.approx(1e-6 * abs(float(r.eigenvalues[0])))
    assert abs(float(r.eigenvalues[0]) - lam_small) <= thr
    # zero_tol above the eigenvalue's relative level: the stated bound still holds
    loose = eigsh(op, 6, which="smallest", key=jax.random.PRNGKey(0), zero_tol=1e-2, **SWEEP)
    assert float(loose.thresholds[0]) == pytest.approx(1e-2 * 4.0, rel=1e-3)  # ||A|| = 4
    assert abs(float(loose.eigenvalues[0]) - lam_small) <= float(loose.thresholds[0])
    # float32: the value is within its (||A||-relative) threshold of the true one
    r32 = eigsh(
        hvp.from_dense(jnp.asarray(a, jnp.float32)),
        4,
        which="smallest",
        key=jax.random.PRNGKey(0),
        tol=1e-5,
        **SWEEP,
    )
    assert bool(r32.converged[0])
    assert abs(float(r32.eigenvalues[0]) - lam_small) <= float(r32.thresholds[0])
    with pytest.raises(ValueError, match="zero_tol"):
        eigsh(op, 1, key=jax.random.PRNGKey(0), zero_tol=-1.0)
    for basis in ("device", "none"):  # at 1 or more any Ritz value would pass near "0"
        with pytest.raises(ValueError, match="must be below 1"):
            eigsh(op, 1, key=jax.random.PRNGKey(0), zero_tol=2.0, basis=basis)


def test_warning_near_zero_gives_the_accuracy_reached_not_tol():
    """A continuum of eigenvalues near 0 (1e-9 .. 1 ||A||) with a spent budget: the warning
    says what helps there (num_iters, max_restarts, a zero_tol that accepts what was reached),
    not a looser `tol`; that zero_tol then converges (with restarts left to confirm the set)."""
    a = sym(np.geomspace(1e-9, 1.0, NM), seed=2)
    op = hvp.from_dense(a)
    with pytest.warns(RuntimeWarning) as rec:
        r = eigsh(op, 6, which="smallest", key=jax.random.PRNGKey(0), max_restarts=0, **SWEEP)
    msg = str(rec[0].message)
    assert not bool(np.all(np.asarray(r.converged)))
    assert "near 0" in msg and "`num_iters`" in msg and "`tol` does not apply" in msg
    assert "loosen `tol`" not in msg
    suggested = float(msg.split("zero_tol=")[2].split(" ")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = eigsh(op, 6, which="smallest", key=jax.random.PRNGKey(0), zero_tol=suggested, **SWEEP)
    assert bool(np.all(np.asarray(ok.converged)))
    np.testing.assert_allclose(np.asarray(ok.thresholds), suggested, rtol=1e-3)  # ||A|| = 1
    ref = np.linalg.eigvalsh(a)[:6]
    assert np.all(np.abs(np.asarray(ok.eigenvalues) - ref) <= np.asarray(ok.thresholds))
