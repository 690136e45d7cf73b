"""hvp.solve (CG, MINRES, Neumann), preconditioners and hvp.inverse against dense float64 solves."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg
from problems import operator, reference, sym

import hvp
from hvp import tree as tu
from hvp.linalg import Preconditioner
from tests.linalg.driver_checks import assert_drivers_agree, assert_resume_bitwise


def _rhs(like, seed=0):
    flat = np.random.default_rng(seed).normal(size=tu.size(like))
    return tu.unravel_fn(like)(jnp.asarray(flat))


def _true_rel(a, x, b, damping=0.0):
    x, b = np.asarray(tu.ravel(x), np.float64), np.asarray(tu.ravel(b), np.float64)
    return np.linalg.norm(b - a @ x - damping * x) / np.linalg.norm(b)


N = 40


def _outliers(n=N, seed=3):
    """SPD with 10 outliers in [1e2, 1e5] above a bulk in [1, 2] (as trained networks' GGNs)."""
    eigs = np.concatenate([np.geomspace(1e5, 1e2, 10), np.linspace(1.0, 2.0, n - 10)])
    return sym(eigs, seed=seed)


def _badly_scaled(n=N):
    """``S C S`` with ``C`` well conditioned and ``S`` diagonal over 3 decades (Jacobi's case)."""
    s = np.diag(np.logspace(-1.5, 1.5, n))
    return s @ sym(np.linspace(1.0, 3.0, n), seed=4) @ s


# ------------------------------------------------------------------------------------------------
# CG
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kind", "damping"),
    [("nested", "ggn", 1e-2), ("linear_regression", "ggn", 0.0)],
)
def test_cg_matches_dense_solve_on_ggn(name, kind, damping):
    op = operator(name, kind)
    a = reference(name, kind)
    b = _rhs(op.like)
    r = hvp.solve(op, b, method="cg", damping=damping, rtol=1e-10)
    ref = np.linalg.solve(a + damping * np.eye(len(a)), np.asarray(tu.ravel(b)))
    assert bool(r.converged) and r.method == "cg" and not bool(r.negative_curvature)
    assert isinstance(r.num_matvecs, int) and isinstance(r.num_iters, int)
    assert r.num_matvecs == r.num_iters + 1  # the iterations and one true-residual product
    err = np.linalg.norm(np.asarray(tu.ravel(r.x)) - ref) / np.linalg.norm(ref)
    assert err < 1e-6 * np.linalg.cond(a + damping * np.eye(len(a)))
    rel = _true_rel(a, r.x, b, damping)
    np.testing.assert_allclose(float(r.relative_residual), rel, rtol=1e-6, atol=1e-13)
    assert rel <= 1e-10


@pytest.mark.parametrize(
    "method",
    ["minres", pytest.param("neumann", marks=pytest.mark.slow)],  # dense test covers it
)
def test_minres_and_neumann_on_a_shared_ggn(method):
    """Linear regression's GGN (repeated eigenvalues 0.66 ... 1.45) with damping."""
    op = operator("linear_regression", "ggn")
    a = reference("linear_regression", "ggn")
    b = _rhs(op.like, seed=3)
    r = hvp.solve(op, b, method=method, damping=0.1, rtol=1e-10, key=jax.random.key(0))
    ref = np.linalg.solve(a + 0.1 * np.eye(len(a)), np.asarray(tu.ravel(b)))
    assert bool(r.converged) and r.method == method and not bool(r.negative_curvature)
    np.testing.assert_allclose(
        np.asarray(tu.ravel(r.x)), ref, rtol=0, atol=1e-9 * np.abs(ref).max()
    )
    np.testing.assert_allclose(
        float(r.relative_residual), _true_rel(a, r.x, b, 0.1), rtol=1e-5, atol=1e-14
    )
    # MINRES: at most 6 distinct eigenvalues -> 6 steps (+ round-off); Neumann: rate ~0.55
    assert r.num_iters <= (8 if method == "minres" else 60)


def test_cg_singular_plus_damping_and_mixed_pytree_structure():
    op = operator("nested", "ggn")  # mixed shapes: (1,), vectors and matrices
    a = reference("nested", "ggn")
    assert np.linalg.eigvalsh(a)[0] < 1e-10 * np.linalg.eigvalsh(a)[-1]  # singular GGN
    b = _rhs(op.like, seed=1)
    r = hvp.solve(op, b, method="cg", damping=1e-3, rtol=1e-9)
    assert jax.tree_util.tree_structure(r.x) == jax.tree_util.tree_structure(op.like)
    ref = np.linalg.solve(a + 1e-3 * np.eye(len(a)), np.asarray(tu.ravel(b)))
    assert bool(r.converged)
    assert np.linalg.norm(np.asarray(tu.ravel(r.x)) - ref) / np.linalg.norm(ref) < 1e-5


@pytest.fixture(scope="module")
def float32_system():
    """SPD with cond 1e3 (a damped GGN's spread) in float32: ``(a, op32, b32)``, one operator."""
    a = _outliers() / 1e3 + 0.1 * np.eye(N)
    b = np.random.default_rng(1).normal(size=N)
    return a, hvp.from_dense(jnp.asarray(a, jnp.float32)), jnp.asarray(b, jnp.float32)


def test_cg_float32(float32_system):
    a, op, b = float32_system
    r = hvp.solve(op, b, method="cg", damping=1e-1, rtol=1e-5)
    assert r.dtype_policy.accumulate == "float32" and r.x.dtype == jnp.float32
    assert bool(r.converged)
    rel = _true_rel(a, r.x, b, 1e-1)
    assert rel <= 2e-5  # the float64 residual of the float32 answer
    # the reported residual is evaluated in float32: right up to eps32 * ||A|| ||x|| / ||b||
    assert float(r.relative_residual) <= 1e-5
    np.testing.assert_allclose(float(r.relative_residual), rel, rtol=0, atol=5e-6)
    m = hvp.solve(op, b, method="minres", damping=1e-1, rtol=1e-5)
    assert bool(m.converged) and m.x.dtype == jnp.float32
    assert _true_rel(a, m.x, b, 1e-1) <= 2e-5


def test_default_rtol_is_dtype_aware_and_stagnation_is_reported(float32_system):
    """rtol=None: 1e-6 in float64, sqrt(eps32) in float32; an rtol out of float32's reach ends
    `stagnated` with a warning after a few restarts, not at the end of the budget."""
    a, op32, b32 = float32_system
    b = np.asarray(b32, np.float64)
    eps32 = float(np.finfo(np.float32).eps)
    assert hvp.linalg.default_rtol(op32.like) == pytest.approx(np.sqrt(eps32))
    assert hvp.linalg.default_rtol(jnp.float64) == 1e-6
    r = hvp.solve(op32, b32, method="cg")
    assert r.rtol == pytest.approx(np.sqrt(eps32)) and bool(r.converged)
    assert not bool(r.stagnated) and _true_rel(a, r.x, b32) <= r.rtol
    for method in ("cg", "minres"):
        with pytest.warns(RuntimeWarning, match="stagnated"):
            s = hvp.solve(op32, b32, method=method, rtol=1e-9)
        assert s.rtol == 1e-9 and bool(s.stagnated) and not bool(s.converged)
        # measured: 66 (CG) and 29 (MINRES) products of the 402 budget; true residual 1.3e-5 and
        # 2.1e-5 (float32's floor here), reported to float32's accuracy
        assert s.num_matvecs <= 100
        rel = _true_rel(a, s.x, b32)
        assert 1e-9 < rel <= 1e-4
        np.testing.assert_allclose(float(s.relative_residual), rel, rtol=0, atol=2e-6)
    r64 = hvp.solve(hvp.from_dense(a), b, method="cg")  # float64: the default stays 1e-6
    assert r64.rtol == 1e-6 and bool(r64.converged) and _true_rel(a, r64.x, b) <= 1e-6
    # the inverse fixes the default at construction and names the stagnation when it raises
    assert hvp.inverse(op32, damping=0.0, method="cg").rtol == r.rtol
    tight = hvp.inverse(op32, damping=0.0, method="cg", rtol=1e-9)
    with pytest.raises(hvp.linalg.ConvergenceError, match="stagnated"):
        tight @ b32


def test_cg_on_indefinite_hessian_reports_negative_curvature():
    op = operator("quadratic", "hessian")  # symmetric indefinite
    a = reference("quadratic", "hessian")
    assert np.linalg.eigvalsh(a)[0] < 0
    b = _rhs(op.like, seed=2)
    r = hvp.solve(op, b, method="cg", rtol=1e-10)
    assert bool(r.negative_curvature) and not bool(r.converged)
    assert float(r.min_curvature) <= 0
    # the reported residual is the true one of the returned x (never a silent wrong x)
    np.testing.assert_allclose(float(r.relative_residual), _true_rel(a, r.x, b), rtol=1e-10)
    assert float(r.relative_residual) > 1e-10


def test_unconverged_solve_warns_outside_jit_only_and_returns_a_verified_x():
    """One rule for every method (MINRES's and Neumann's tests check it too): converged=False
    warns (ConvergenceWarning) outside jit, never inside; success never warns; the returned x's
    residual is the true one and at most ||b||."""
    method = "cg"
    a = sym(np.linspace(1.0, 2.0, N), seed=5)  # N: the compiled steps of the other tests
    b = np.random.default_rng(0).normal(size=len(a))
    kw = dict(method=method, rtol=1e-10)
    with pytest.warns(hvp.ConvergenceWarning, match=r"did not converge.*after 3 products"):
        r = hvp.solve(hvp.from_dense(a), b, max_matvecs=3, **kw)
    assert r.num_matvecs == 3 and r.num_iters == 2 and not bool(r.converged)
    rel = _true_rel(a, r.x, b)
    np.testing.assert_allclose(float(r.relative_residual), rel, rtol=1e-10)
    assert 1e-10 < rel <= 1.0 and r.x_iter == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", hvp.ConvergenceWarning)
        ok = hvp.solve(hvp.from_dense(a), b, **kw)  # success: no warning
        assert bool(ok.converged) and _true_rel(a, ok.x, b) <= 1e-10
        short = jax.jit(lambda v: hvp.solve(hvp.from_dense(a), v, max_matvecs=3, **kw))(b)
        assert not bool(short.converged)  # inside jit: the field says it, no warning
        np.testing.assert_allclose(float(short.relative_residual), rel, rtol=1e-8)


def test_bfloat16_minres_on_a_singular_system_stops_at_the_product_floor():
    """Products in bfloat16, recurrence in float32: MINRES stops (stagnated) once the products'
    round-off reaches ||b|| (it ran 301 steps before), with a residual below ||b||, and warns."""
    eigs = np.concatenate([np.zeros(3), np.geomspace(1e-3, 1, 12), -np.geomspace(1e-3, 1, 15)])
    a = sym(eigs, seed=0)  # singular and indefinite: b is not in the range
    b = np.random.default_rng(0).normal(size=len(a))
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    with pytest.warns(hvp.ConvergenceWarning, match="stagnated.*float32 parameters"):
        r = hvp.solve(hvp.from_dense(a16), b16, method="minres")
    assert bool(r.stagnated) and r.num_matvecs < 200  # measured 144
    lsq = np.linalg.lstsq(a, b, rcond=None)[0]  # the least-squares floor: 0.34 ||b||
    rel = _true_rel(np.asarray(a16, np.float64), r.x, b16)
    assert _true_rel(a, lsq, b) < rel <= float(r.relative_residual) + 0.05 and rel < 1.0


def test_cg_safeguard_returns_zero_when_the_last_iterate_is_worse():
    """CG's first iterate on diag(1, 1000, 1, ...) has 9x the residual of x = 0 (SciPy's cg
    returns it); hvp.solve returns x = 0, says so (x_iter=0, relative residual 1) and warns."""
    a, b = np.diag([1.0, 1000.0] + [1.0] * (N - 2)), np.r_[1.0, 0.1, np.zeros(N - 2)]
    x1, _ = scipy.sparse.linalg.cg(a, b, maxiter=1)
    assert np.linalg.norm(b - a @ x1) > 9 * np.linalg.norm(b)  # the last iterate is worse
    with pytest.warns(hvp.ConvergenceWarning, match="safeguard returned the start"):
        r = hvp.solve(hvp.from_dense(a), b, method="cg", max_matvecs=2)
    assert r.num_iters == 1 and r.x_iter == 0 and float(r.relative_residual) == 1.0
    assert not np.asarray(r.x).any()
    x0 = np.full(N, 10.0)  # a start worse than zero: its start product shows it, zero is kept
    with pytest.warns(hvp.ConvergenceWarning, match="safeguard returned the start"):
        r0 = hvp.solve(hvp.from_dense(a), b, method="cg", x0=x0, max_matvecs=2)
    assert r0.num_iters == 0 and float(r0.relative_residual) == 1.0 and not np.asarray(r0.x).any()


@pytest.mark.slow  # 14 s of compilation; the dense bfloat16 test above covers the stop
def test_bfloat16_minres_stops_at_the_product_floor_no_worse_than_zero():
    """The trial's case: MINRES on a tanh MLP's (singular) Hessian with bfloat16 parameters ran
    the whole budget (3,342 products) to a true residual of 1.9 ||b||, silently. Now it stops once
    the products' round-off reaches ||b||, returns a residual below ||b|| and warns."""
    op = operator("mlp", "hessian", "bfloat16")
    a = reference("mlp", "hessian")
    b = tu.cast(_rhs(op.like), jnp.bfloat16)
    with pytest.warns(hvp.ConvergenceWarning, match="bfloat16.*float32 parameters"):
        r = hvp.solve(op, b, method="minres")
    assert not bool(r.converged) and bool(r.stagnated) and r.num_matvecs < 1000  # measured 461
    rel = _true_rel(a, r.x, b)  # float64 Hessian at the float64 parameters
    assert float(r.relative_residual) <= 1.0 and rel <= 1.0  # measured 0.585, 0.583


def test_cg_x0_and_block():
    a = _outliers() / 100 + 0.5 * np.eye(N)
    rng = np.random.default_rng(4)
    B = rng.normal(size=(3, N))
    B[1] = 0.0  # a zero right-hand side: x = 0, converged at once
    X0 = rng.normal(size=(3, N))
    op = hvp.from_dense(a)
    r = hvp.solve(op, B, method="cg", x0=X0, block=True, damping=0.1, rtol=1e-10)
    ref = np.linalg.solve(a + 0.1 * np.eye(N), B.T).T
    assert r.converged.shape == (3,) and bool(np.all(r.converged))
    np.testing.assert_allclose(np.asarray(r.x), ref, atol=1e-8)
    assert r.num_matvecs == 3 * (int(np.max(r.num_iters)) + 2)  # x0 product, steps, check


def test_cg_drivers_agree_and_resume_bitwise(tmp_path):
    op = hvp.from_dense(_outliers())
    b = np.random.default_rng(2).normal(size=N)
    call = lambda **kw: hvp.solve(op, b, method="cg", damping=1e-2, rtol=1e-8, **kw)  # noqa: E731
    assert_drivers_agree(call, rtol=1e-9, atol=1e-12)
    assert_resume_bitwise(call, tmp_path, interrupt_after=4, every=2)


def test_deflation_cg_fewer_iterations_on_outliers():
    a = _outliers()
    op = hvp.from_dense(a)
    b = np.random.default_rng(5).normal(size=N)
    plain = hvp.solve(op, b, method="cg", rtol=1e-8)
    pre = Preconditioner.from_eigsh(op, k=10, key=jax.random.key(0))
    defl = hvp.solve(op, b, method="cg", rtol=1e-8, preconditioner=pre)
    for r in (plain, defl):
        assert bool(r.converged) and _true_rel(a, r.x, b) <= 1e-8
    assert defl.preconditioner == "deflation"
    assert defl.num_matvecs == defl.num_iters + 1 + pre.num_matvecs
    # measured: 56 -> 14 iterations (deflating 10 outliers leaves the bulk's condition number 2)
    assert defl.num_iters <= plain.num_iters // 3


@pytest.mark.slow
def test_diagonal_and_user_preconditioned_cg():
    a2 = _badly_scaled()
    op2 = hvp.from_dense(a2)
    b = np.random.default_rng(5).normal(size=N)
    plain2 = hvp.solve(op2, b, method="cg", rtol=1e-8)
    diag2 = hvp.solve(
        op2, b, method="cg", rtol=1e-8, preconditioner="diagonal", key=jax.random.key(1)
    )
    user = hvp.solve(
        op2, b, method="cg", rtol=1e-8, preconditioner=hvp.from_dense(np.linalg.inv(a2))
    )
    for r in (plain2, diag2, user):
        assert bool(r.converged) and _true_rel(a2, r.x, b) <= 1e-8
    assert diag2.preconditioner == "diagonal"
    # measured: 179 -> 39 (the Hutchinson diagonal of 100 probes undoes most of the scaling)
    assert diag2.num_iters <= plain2.num_iters // 3
    assert user.num_iters <= 2  # the exact inverse


def test_solve_errors_are_clear():
    op = hvp.from_dense(np.eye(3))
    with pytest.raises(ValueError, match="block=True"):
        hvp.solve(op, np.ones((2, 3)))
    with pytest.raises(ValueError, match="method"):
        hvp.solve(op, np.ones(3), method="gmres")
    with pytest.raises(ValueError, match="damping"):
        hvp.solve(op, np.ones(3), damping=-1.0)
    with pytest.raises(TypeError, match="key"):
        hvp.solve(op, np.ones(3), method="cg", preconditioner="diagonal")
    with pytest.raises(ValueError, match="max_matvecs"):
        hvp.solve(op, np.ones(3), x0=np.ones(3), max_matvecs=1)
    with pytest.raises(ValueError, match="rows"):
        hvp.solve(op, np.ones((2, 3)), x0=np.ones((3, 3)), block=True)


# ------------------------------------------------------------------------------------------------
# MINRES
# ------------------------------------------------------------------------------------------------
def test_minres_iterates_match_scipy():
    """x_k after k = 1..8 steps equals scipy.sparse.linalg.minres(maxiter=k) to round-off."""
    from scipy.sparse.linalg import minres

    op = operator("quadratic", "hessian")  # indefinite, 12 x 12
    a = reference("quadratic", "hessian")
    b = _rhs(op.like, seed=0)
    bf = np.asarray(tu.ravel(b))
    scale = np.abs(np.linalg.solve(a, bf)).max()
    for damping in (0.0, 0.3):
        for k in range(1, 9):
            ref, _ = minres(a, bf, maxiter=k, rtol=0.0, shift=-damping)
            r = hvp.solve(op, b, method="minres", damping=damping, max_matvecs=k + 1, rtol=0.0)
            assert r.num_iters == k and r.num_matvecs == k + 1
            np.testing.assert_allclose(np.asarray(tu.ravel(r.x)), ref, rtol=0, atol=1e-13 * scale)


def test_minres_indefinite_solve_and_negative_curvature():
    op = operator("quadratic", "hessian")
    a = reference("quadratic", "hessian")
    b = _rhs(op.like, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hvp.ConvergenceWarning)  # success: no warning
        r = hvp.solve(op, b, method="minres", rtol=1e-10)
    ref = np.linalg.solve(a, np.asarray(tu.ravel(b)))
    assert bool(r.converged) and bool(r.negative_curvature) and float(r.min_curvature) < 0
    assert r.method == "minres" and hvp.linalg.resolve_solve_method("auto", op) == "minres"
    np.testing.assert_allclose(np.asarray(tu.ravel(r.x)), ref, atol=1e-8 * np.abs(ref).max())
    np.testing.assert_allclose(
        float(r.relative_residual), _true_rel(a, r.x, b), rtol=1e-6, atol=1e-14
    )
    # too small a budget: flagged and warned, with the true residual of the returned x
    with pytest.warns(hvp.ConvergenceWarning, match=r"did not converge.*after 4 products"):
        r = hvp.solve(op, b, method="minres", rtol=1e-10, max_matvecs=4)
    assert not bool(r.converged) and r.num_iters == 3 and r.x_iter == 3
    rel = _true_rel(a, r.x, b)
    np.testing.assert_allclose(float(r.relative_residual), rel, rtol=1e-10)
    assert rel <= 1.0


def test_minres_preconditioned_block_and_singular_damped():
    eigs = np.concatenate([np.geomspace(-1e3, -1e1, 5), np.zeros(3), np.linspace(1, 2, N - 8)])
    a = sym(eigs, seed=6)  # indefinite and singular (3 zero eigenvalues): damping makes it regular
    op = hvp.from_dense(a)
    B = np.random.default_rng(7).normal(size=(2, N))
    ref = np.linalg.solve(a + 0.5 * np.eye(N), B.T).T
    # an SPD preconditioner: |A + 0.5 I|^-1 on the 5 negative outliers, 1 elsewhere
    w, q = np.linalg.eigh(a)
    mu = np.where(w < -1, 1.0 / np.abs(w + 0.5), 1.0)
    pre = hvp.from_dense((q * mu) @ q.T)
    r = hvp.solve(op, B, method="minres", damping=0.5, block=True, rtol=1e-9, preconditioner=pre)
    assert (
        bool(np.all(r.converged)) and r.num_iters.shape == (2,) and r.preconditioner == "operator"
    )
    np.testing.assert_allclose(np.asarray(r.x), ref, atol=1e-7 * np.abs(ref).max())
    # the outliers are mapped to -1: MINRES sees eigenvalues in {-1} U [0.5, 2.5]
    assert int(np.max(r.num_iters)) <= 30
    np.testing.assert_allclose(
        np.asarray(r.relative_residual),
        [_true_rel(a, r.x[i], B[i], 0.5) for i in range(2)],
        rtol=1e-5,
        atol=1e-14,
    )


def test_minres_drivers_agree_and_resume_bitwise(tmp_path):
    op = operator("quadratic", "hessian")
    b = _rhs(op.like)
    call = lambda **kw: hvp.solve(op, b, method="minres", damping=0.5, rtol=1e-8, **kw)  # noqa: E731
    assert_drivers_agree(call, rtol=1e-7, atol=1e-9)  # residuals at round-off (5e-10) differ
    assert_resume_bitwise(call, tmp_path, interrupt_after=4, every=2)


# ------------------------------------------------------------------------------------------------
# Neumann
# ------------------------------------------------------------------------------------------------
def test_neumann_matches_dense_and_refuses_indefinite():
    a = _outliers() / 1e5 + 0.02 * np.eye(N)  # SPD, eigenvalues in [0.02, 1.02]
    b = np.random.default_rng(8).normal(size=N)
    op = hvp.from_dense(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error", hvp.ConvergenceWarning)  # success: no warning
        r = hvp.solve(op, b, method="neumann", damping=0.2, key=jax.random.key(0), rtol=1e-8)
    ref = np.linalg.solve(a + 0.2 * np.eye(N), b)
    assert bool(r.converged) and r.method == "neumann" and not bool(r.negative_curvature)
    np.testing.assert_allclose(np.asarray(r.x), ref, atol=1e-7 * np.abs(ref).max())
    assert float(r.relative_residual) <= 1e-8
    with pytest.warns(hvp.ConvergenceWarning, match=r"did not converge.*after 6 products"):
        slow = hvp.solve(op, b, method="neumann", damping=0.2, scale=1.5, max_matvecs=6)
    assert slow.num_iters == 5 and not bool(slow.converged) and slow.x_iter == 5
    rel = _true_rel(a, slow.x, b, 0.2)
    np.testing.assert_allclose(float(slow.relative_residual), rel, rtol=1e-10)
    assert rel <= 1.0
    indefinite = hvp.from_dense(sym(np.linspace(-1.0, 2.0, N), seed=8))  # eigsh compiled above
    with pytest.raises(ValueError, match="positive definite"):
        hvp.solve(indefinite, b, method="neumann", key=jax.random.key(0))
    with pytest.raises(ValueError, match="preconditioner"):
        hvp.solve(op, b, method="neumann", scale=1.0, preconditioner=hvp.from_dense(np.eye(N)))


# ------------------------------------------------------------------------------------------------
# inverse
# ------------------------------------------------------------------------------------------------
def test_inverse_operator_products_jit_and_nonconvergence():
    a = _outliers() / 1e3 + 0.1 * np.eye(N)
    op = hvp.from_dense(a)
    inv = hvp.inverse(op, damping=0.1, method="cg", rtol=1e-10)
    V = np.random.default_rng(9).normal(size=(2, N))
    ref = np.linalg.solve(a + 0.1 * np.eye(N), V.T).T
    np.testing.assert_allclose(np.asarray(inv.matmat(V)), ref, rtol=1e-8)  # one block solve
    np.testing.assert_allclose(np.asarray(jax.jit(lambda v: inv @ v)(V[0])), ref[0], rtol=1e-8)
    short = hvp.inverse(op, damping=0.0, method="cg", max_matvecs=3)
    with pytest.raises(hvp.linalg.ConvergenceError, match="did not converge"):
        short @ V[0]
    assert bool(np.all(np.isnan(np.asarray(jax.jit(lambda v: short @ v)(V[0])))))


@pytest.mark.slow
def test_inverse_operator_in_eigsh():
    a = _outliers() / 1e3 + 0.1 * np.eye(N)
    inv = hvp.inverse(hvp.from_dense(a), damping=0.1, method="cg", rtol=1e-10)
    res = hvp.eigsh(inv, 2, key=jax.random.key(0), tol=1e-8)
    ref = 1.0 / (np.linalg.eigvalsh(a)[:2] + 0.1)  # the smallest of A + damping, inverted
    np.testing.assert_allclose(np.sort(np.asarray(res.eigenvalues)), np.sort(ref), rtol=1e-7)
