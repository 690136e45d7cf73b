"""Stochastic Lanczos quadrature (hvp.linalg.spectral_density) and spectrum_summary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import sym

import hvp
from hvp.linalg import _driver, spectral_density, spectrum_summary, wasserstein1
from hvp.linalg._probes import probes
from hvp.linalg._slq import LanczosQuadrature
from tests.linalg.driver_checks import assert_drivers_agree, assert_resume_bitwise

N = 200


def _spectrum():
    """30% negative bulk, positive bulk and a few outliers (like a network Hessian)."""
    rng = np.random.default_rng(0)
    neg = -np.abs(rng.gamma(2.0, 0.1, size=60))
    pos = np.abs(rng.gamma(1.5, 0.3, size=136))
    return np.sort(np.concatenate([neg, pos, [4.0, 6.0, 9.0, 15.0]]))


EIGS = _spectrum()
A = sym(EIGS, seed=1)


@pytest.fixture(scope="module")
def op():
    return hvp.from_dense(A)


@pytest.fixture(scope="module")
def accurate(op):
    return spectral_density(op, key=jax.random.PRNGKey(0), num_probes=32, num_iters=60)


def test_wasserstein_shrinks_with_probes_and_iterations(op, accurate):
    rng = EIGS.max() - EIGS.min()
    coarse = spectral_density(op, key=jax.random.PRNGKey(0), num_probes=2, num_iters=6)
    medium = spectral_density(op, key=jax.random.PRNGKey(0), num_probes=8, num_iters=20)
    w = [d.wasserstein1(EIGS) / rng for d in (coarse, medium, accurate)]
    print(
        "W1 / spectral range for (2 probes, 6 iters), (8, 20), (32, 60):", [f"{x:.4f}" for x in w]
    )
    assert w[0] > w[1] > w[2]
    assert w[2] < 0.02  # stated setting: 32 probes x 60 iterations, n = 200
    assert int(accurate.num_matvecs) == 32 * 60


def test_shapes_weights_and_density(accurate):
    assert accurate.nodes.shape == accurate.weights.shape == (32, 60)
    np.testing.assert_allclose(np.asarray(accurate.weights).sum(axis=1), 1.0, atol=1e-12)
    assert np.all(np.asarray(accurate.weights) >= 0)
    # Ritz values lie inside the spectrum; the extreme ones have converged
    nodes = np.asarray(accurate.nodes)
    assert nodes.min() >= EIGS.min() - 1e-10 and nodes.max() <= EIGS.max() + 1e-10
    np.testing.assert_allclose(nodes.max(axis=1), EIGS.max(), rtol=1e-8)
    grid = accurate.grid(num=4000)
    dens = accurate.density(grid)
    assert np.all(dens >= 0)
    np.testing.assert_allclose(np.trapezoid(dens, grid), 1.0, atol=1e-3)
    np.testing.assert_allclose(
        np.trapezoid(accurate.density(grid, sigma=0.3), grid), 1.0, atol=1e-3
    )
    assert accurate.cdf(EIGS.max() + 1) == pytest.approx(1.0)
    assert accurate.cdf(EIGS.min() - 1) == 0.0
    with pytest.raises(ValueError, match="sigma"):
        accurate.density(grid, sigma=0.0)


def test_negative_mass(accurate):
    true = np.mean(EIGS < 0)  # 0.3
    est = accurate.negative_mass()
    print(f"negative mass: estimate {est:.4f}, true {true:.4f}")
    assert abs(float(est) - true) < 0.03
    assert float(est) + float(accurate.positive_mass()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "f, true",
    [(lambda t: t, EIGS.sum()), (lambda t: t**2, np.sum(EIGS**2)), (jnp.exp, np.sum(np.exp(EIGS)))],
)
def test_trace_fn_within_four_standard_errors(accurate, f, true):
    est = accurate.trace_fn(f)
    assert est.samples.shape == (32,)
    assert np.isfinite(float(est.std_error)) and float(est.std_error) > 0
    assert abs(float(est.estimate) - true) < 4 * float(est.std_error)


def test_no_reorthogonalization_and_chunks(op, accurate):
    # `accurate` ran 4 groups of 8 probes (the default chunk size); this one all 32 at once
    chunked = spectral_density(
        op, key=jax.random.PRNGKey(0), num_probes=32, num_iters=60, chunk_size=32
    )
    np.testing.assert_allclose(np.asarray(chunked.nodes), np.asarray(accurate.nodes), atol=1e-10)
    plain = spectral_density(
        op, key=jax.random.PRNGKey(0), num_probes=32, num_iters=60, reorthogonalize=False
    )
    assert np.all(np.isfinite(np.asarray(plain.nodes)))
    np.testing.assert_allclose(np.asarray(plain.weights).sum(axis=1), 1.0, atol=1e-8)
    # same probes: the bulk agrees (ghost copies of outliers only move a little mass)
    rng = EIGS.max() - EIGS.min()
    assert plain.wasserstein1(EIGS) / rng < 0.03


def test_deterministic(op, accurate):
    again = spectral_density(op, key=jax.random.PRNGKey(0), num_probes=32, num_iters=60)
    np.testing.assert_array_equal(np.asarray(again.nodes), np.asarray(accurate.nodes))
    other = spectral_density(op, key=jax.random.PRNGKey(1), num_probes=32, num_iters=60)
    assert not np.allclose(np.asarray(other.nodes), np.asarray(accurate.nodes))


def test_degenerate_operators_no_nan():
    zero = spectral_density(
        hvp.from_dense(np.zeros((N, N))), key=jax.random.PRNGKey(0), num_probes=8, num_iters=20
    )
    np.testing.assert_array_equal(np.asarray(zero.nodes), 0.0)
    np.testing.assert_allclose(np.asarray(zero.weights).sum(axis=1), 1.0)
    assert float(zero.negative_mass()) == 0.0
    low = np.zeros(N)
    low[:3] = [-1.0, 2.0, 5.0]  # rank 3: each probe's Krylov space is invariant after 4 steps
    d = spectral_density(
        hvp.from_dense(sym(low, seed=3)), key=jax.random.PRNGKey(0), num_probes=8, num_iters=20
    )
    assert np.all(np.isfinite(np.asarray(d.nodes)))
    assert d.wasserstein1(low) < 0.05
    np.testing.assert_allclose(float(d.trace_fn(lambda t: t).estimate), 6.0, rtol=0.5)


def test_wasserstein1_function():
    assert wasserstein1([0.0], None, [1.0]) == pytest.approx(1.0)
    assert wasserstein1([0.0, 2.0], [0.5, 0.5], [1.0]) == pytest.approx(1.0)
    assert wasserstein1([0.0, 1.0, 2.0], None, [0.0, 1.0, 2.0]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        wasserstein1([0.0, 1.0], [1.0], [0.0])


def test_mlp_hessian_density():
    from problems import operator, reference

    h = operator("mlp", "hessian")
    ev = np.linalg.eigvalsh(reference("mlp", "hessian"))
    d = spectral_density(h, key=jax.random.PRNGKey(0), num_probes=8, num_iters=32)
    w = d.wasserstein1(ev) / (ev.max() - ev.min())
    print(
        f"mlp hessian SLQ (8 probes x 32 iters): W1/range = {w:.4f}, negative mass "
        f"{d.negative_mass():.3f} (true {np.mean(ev < 0):.3f})"
    )
    assert w < 0.02
    np.testing.assert_allclose(np.asarray(d.nodes).max(), ev.max(), rtol=1e-6)


def test_spectrum_summary():
    eigs = np.concatenate([np.linspace(-2.0, -0.5, 15), np.linspace(0.25, 8.0, N - 15)])
    s = spectrum_summary(
        hvp.from_dense(sym(eigs, seed=4)), key=jax.random.PRNGKey(0), num_probes=32, num_iters=60
    )
    assert s.lambda_max == pytest.approx(8.0, rel=1e-8)
    assert s.lambda_min == pytest.approx(-2.0, rel=1e-8)
    assert s.converged
    assert abs(s.negative_mass - 15 / N) < 0.03
    print(
        "negative mass, std error, bracket:",
        s.negative_mass,
        s.negative_mass_std_error,
        s.negative_mass_lower,
        s.negative_mass_upper,
    )
    assert s.negative_mass_lower <= s.negative_mass <= s.negative_mass_upper
    assert s.negative_mass_upper - s.negative_mass_lower < 0.1  # a gap around 0: a tight bracket
    assert abs(s.negative_mass - 15 / N) <= 4 * s.negative_mass_std_error
    assert s.negative_positive_ratio == pytest.approx(s.negative_mass / s.positive_mass)
    true_abs = np.sum(-eigs[eigs < 0]) / np.sum(eigs[eigs > 0])
    assert s.negative_positive_abs_ratio == pytest.approx(true_abs, rel=0.25)
    # indefinite: the smallest magnitude comes from interior Ritz values, a rough estimate.
    # A Ritz value may fall inside the spectral gap (-0.5, 0.25) with a negligible weight
    # (1.3e-7 with this key, exact per a float64 NumPy Lanczos on the same probes); weights
    # below 0.1/n stand for no eigenvalue and are ignored (it gave 1020 instead of 32).
    assert 8.0 / 0.25 / 2 <= s.condition_number <= 8.0 / 0.25 * 2
    pd = spectrum_summary(
        hvp.from_dense(sym(np.linspace(0.5, 4.0, N), seed=5)),
        key=jax.random.PRNGKey(0),
        num_probes=32,
        num_iters=60,
    )
    assert pd.condition_number == pytest.approx(8.0, rel=1e-6)  # definite: exact from Lanczos
    assert pd.negative_mass == 0.0 and pd.negative_positive_ratio == 0.0
    assert set(pd.to_dict()) >= {"lambda_max", "lambda_min", "condition_number", "negative_mass"}


def test_errors(op):
    for kwargs in ({"num_probes": 0}, {"num_iters": 0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            spectral_density(op, key=jax.random.PRNGKey(0), **kwargs)
    with pytest.raises(TypeError, match=r"pass key=jax\.random\.key\(seed\)"):
        spectral_density(op, key=None)
    with pytest.raises(TypeError, match="reorthogonalize"):
        spectral_density(op, key=jax.random.key(0), reorthogonalize="yes")


# ------------------------------------------------------------------------------------------------
# the state machine: references, drivers, resume, lockstep block products
# ------------------------------------------------------------------------------------------------
def _numpy_lanczos(a, z, m):
    """Float64 Lanczos with full reorthogonalisation from ``z``: Ritz values and weights."""
    q = np.zeros((m + 1, len(z)))
    q[0] = z / np.linalg.norm(z)
    alpha, beta = np.zeros(m), np.zeros(m)
    for j in range(m):
        w = a @ q[j]
        alpha[j] = q[j] @ w
        for _ in range(2):
            w -= q[: j + 1].T @ (q[: j + 1] @ w)
        beta[j] = np.linalg.norm(w)
        q[j + 1] = w / beta[j]
    theta, s = np.linalg.eigh(np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1))
    return theta, s[0] ** 2


def test_matches_numpy_lanczos_on_the_same_probes(accurate):
    """Probe i is Rademacher from fold_in(key, i); each probe's quadrature is its own Lanczos."""
    z = np.asarray(probes(jax.random.PRNGKey(0), jnp.zeros(N), 32, "rademacher"))
    assert set(np.unique(z)) == {-1.0, 1.0}
    err = 0.0
    for p in range(32):
        theta, w = _numpy_lanczos(A, z[p], 60)
        err = max(
            err, np.abs(theta - accurate.nodes[p]).max(), np.abs(w - accurate.weights[p]).max()
        )
    print(f"max |nodes, weights - float64 NumPy Lanczos| over 32 probes x 60 steps: {err:.1e}")
    assert err < 1e-10


LOW = np.concatenate([[-1.0, 0.5, 2.0, 3.0, 5.0], np.zeros(N - 5)])
A_LOW = sym(LOW, seed=3)  # rank 5: every probe breaks down after 6 steps


@pytest.fixture(scope="module")
def low():
    return hvp.from_dense(A_LOW)


def _low_call(op, reorth=True, chunk_size=2, num_probes=5):
    def call(**kw):
        return spectral_density(
            op,
            key=jax.random.key(7),
            num_probes=num_probes,
            num_iters=8,
            chunk_size=chunk_size,
            reorthogonalize=reorth,
            **kw,
        )

    return call


@pytest.mark.parametrize("reorth", [True, False])
def test_drivers_agree_through_breakdowns(low, reorth, monkeypatch):
    """5 probes in 3 groups of 2 (one extra probe), each breaking down at step 6 of 8.

    The low moments ``n q^T A q`` and ``n q^T A^2 q`` of each probe's quadrature are exact
    (they depend on the first two Lanczos steps only).
    """
    repairs = {"n": 0}
    orig = _driver._update_noprod

    def counted(*args):
        repairs["n"] += 1
        return orig(*args)

    monkeypatch.setattr(_driver, "_update_noprod", counted)
    host, comp = assert_drivers_agree(_low_call(low, reorth), rtol=1e-10, atol=1e-12)
    if reorth:  # every probe breaks down; without it round-off may hide the breakdown
        assert repairs["n"] >= 3  # at least one repair step per group (host driver)
    assert type(host.num_matvecs) is int and host.num_matvecs == 3 * 2 * 8
    assert host.nodes.shape == (5, 8)
    # exact quadrature despite the breakdown: n q^T f(A) q for the probes' own q
    z = np.asarray(probes(jax.random.key(7), jnp.zeros(N), 5, "rademacher"))
    for f, mat in ((lambda t: t, A_LOW), (lambda t: t**2, A_LOW @ A_LOW)):
        want = np.einsum("pi,ij,pj->p", z, mat, z)
        np.testing.assert_allclose(host.trace_fn(f).samples, want, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(host.weights).sum(axis=1), 1.0, atol=1e-12)


def test_resume_bit_for_bit(low, tmp_path):
    assert_resume_bitwise(_low_call(low), tmp_path, interrupt_after=11, every=2)


def test_lockstep_block_products_and_chunk_invariance(low, monkeypatch):
    """P probes x m steps in groups of c cost ceil(P / c) * m block products, not P * m."""
    sizes = []
    orig = _driver.block_product

    def counted(op, vs, chunk_size=None):
        sizes.append(hvp.tree.leading_dim(vs))
        return orig(op, vs, chunk_size)

    monkeypatch.setattr(_driver, "block_product", counted)
    two = _low_call(low)(driver="host")
    assert sizes == [2] * (3 * 8) and two.num_matvecs == 48  # 5 probes + 1 extra, 8 steps
    sizes.clear()
    default = _low_call(low, chunk_size=None, num_probes=10)(driver="host")  # 2 groups of 5
    assert sizes == [5] * (2 * 8) and default.num_matvecs == 80
    # probe i comes from fold_in(key, i): the same key gives the same probes, hence the same
    # density, whatever the grouping (here probes 0-4 in groups 2+2+1(+1 extra) vs one of 5)
    np.testing.assert_allclose(two.nodes, default.nodes[:5], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(two.weights, default.weights[:5], rtol=1e-10, atol=1e-12)


def test_under_jit_and_vmap(low):
    keys = jax.random.split(jax.random.key(7), 2)
    run = jax.jit(
        jax.vmap(lambda k: spectral_density(low, key=k, num_probes=5, num_iters=8, chunk_size=2))
    )
    out = run(keys)
    assert isinstance(out.num_matvecs, jax.Array) and out.nodes.shape == (2, 5, 8)
    for i in range(2):
        ref = spectral_density(low, key=keys[i], num_probes=5, num_iters=8, chunk_size=2)
        np.testing.assert_allclose(out.nodes[i], ref.nodes, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out.weights[i], ref.weights, rtol=1e-10, atol=1e-12)


def test_progress_text_and_display(low):
    alg = LanczosQuadrature(num_probes=5, num_iters=8, group=2)
    info = alg.progress({"g": 1, "j": 3, "matvecs": 22})
    assert info.total == 48 and info.matvecs == 22
    assert info.text == "probe group 2/3, Lanczos step 3/8"
    shown = _low_call(low)(driver="host", progress=True)  # runs with the rich display
    assert shown.num_matvecs == 48


def test_non_finite_product_stops_the_run(monkeypatch):
    bad = hvp.from_matvec(lambda v: v * jnp.nan, jnp.zeros(10))
    calls = {"n": 0}
    orig = _driver.block_product

    def counted(*args, **kwargs):
        calls["n"] += 1
        return orig(*args, **kwargs)

    monkeypatch.setattr(_driver, "block_product", counted)
    with pytest.raises(hvp.NonFiniteError, match="NaN or Inf"):
        spectral_density(bad, key=jax.random.key(0), num_probes=4, num_iters=5, chunk_size=2)
    assert calls["n"] == 1  # not 2 groups x 5 steps


def test_std_error_name(accurate):
    est = accurate.trace_fn(lambda t: t)
    with pytest.warns(DeprecationWarning, match="std_error"):
        assert est.stderr == est.std_error


def test_float32_basis_of_a_float64_operator(op):
    """``basis_dtype`` stores the bases in float32: accuracy limited to float32 round-off."""
    sd = spectral_density(
        op, key=jax.random.PRNGKey(0), num_probes=2, num_iters=20, basis_dtype=jnp.float32
    )
    assert sd.nodes.dtype == jnp.float64
    z = np.asarray(probes(jax.random.PRNGKey(0), jnp.zeros(N), 2, "rademacher"))
    err = 0.0
    for p in range(2):
        theta, w = _numpy_lanczos(A, z[p], 20)
        err = max(err, np.abs(theta - sd.nodes[p]).max() / np.abs(EIGS).max())
    print(f"float32 basis: max |nodes - float64 NumPy| / max|lambda| = {err:.1e}")
    assert 1e-12 < err < 1e-6  # measured 2.1e-9; float64 storage gives ~1e-14


# ------------------------------------------------------------------------------------------------
# spectral masses with their uncertainty (Chebyshev-Markov-Stieltjes brackets, probe std error)
# ------------------------------------------------------------------------------------------------
def _cluster_spectrum():
    """Like a CNN Hessian (n = 80): 3/8 of the eigenvalues in a cluster |lambda| < 5e-5 of
    both signs (below the zero threshold 1e-4 max|lambda|), 10% clearly negative, the rest
    positive."""
    rng = np.random.default_rng(4)

    def mag(lo, hi, k):
        return np.exp(rng.uniform(np.log(lo), np.log(hi), k))

    cluster = mag(1e-8, 5e-5, 30) * rng.choice([-1.0, 1.0], 30)
    return np.sort(np.concatenate([cluster, -mag(1e-3, 0.5, 8), mag(1e-3, 2.0, 42)]))


EIGS_C = _cluster_spectrum()
A_C = sym(EIGS_C, seed=5)
ZERO_C = 1e-4 * np.abs(EIGS_C).max()  # the analyze report's zero threshold (float32 tol)
COARSE = 12  # Lanczos steps of the coarse runs (one compile for all their keys)


def _probe_masses(a, eigs, key, num_probes, intervals):
    """Exact mass of each probe's spectral measure in each open interval, ``(len, P)``."""
    lam, vecs = np.linalg.eigh(a)
    z = np.asarray(probes(key, jnp.zeros(len(eigs)), num_probes, "rademacher"))
    mu = (z / np.sqrt(len(eigs)) @ vecs) ** 2  # (P, n): the probes' spectral measures
    return np.stack([mu[:, (lam > lo) & (lam < hi)].sum(axis=1) for lo, hi in intervals])


@pytest.fixture(scope="module")
def cluster_op():
    return hvp.from_dense(A_C)


def _coarse(op, seed):
    return spectral_density(op, key=jax.random.PRNGKey(seed), num_probes=16, num_iters=COARSE)


def test_mass_brackets_hold_for_every_probe(accurate, cluster_op):
    """Deterministic: every probe's exact mass lies in its quadrature bracket (many probes and
    keys, thresholds at a node cluster, indefinite spectra); the Gauss estimate lies in it too."""
    cases = [(accurate, A, EIGS, jax.random.PRNGKey(0), [0.0, 0.05, 1.0])]
    cases += [
        (_coarse(cluster_op, s), A_C, EIGS_C, jax.random.PRNGKey(s), [0.0, 1e-6, ZERO_C, 1e-2])
        for s in range(6)
    ]
    widest = 0.0
    for sd, a, eigs, key, thresholds in cases:
        intervals = [(-np.inf, -t) for t in thresholds] + [(t, np.inf) for t in thresholds]
        intervals += [(-0.3, 0.02), (-ZERO_C, ZERO_C), (0.5, 3.0)]
        exact = _probe_masses(a, eigs, key, sd.num_probes, intervals)
        for (lo, hi), ex in zip(intervals, exact):
            m = sd.interval_mass(lo, hi)
            assert np.all(m.lower_samples <= ex + 1e-9) and np.all(ex <= m.upper_samples + 1e-9)
            assert np.all(m.lower_samples <= m.samples) and np.all(m.samples <= m.upper_samples)
            assert m.lower <= m.estimate <= m.upper
            widest = max(widest, m.upper - m.lower)
        neg, pos = sd.negative_mass(thresholds[1]), sd.positive_mass(thresholds[1])
        assert neg.to_dict()["estimate"] == float(neg) == neg.estimate
        assert float(neg) + float(pos) <= 1.0 + 1e-12
    assert widest > 0.3  # the brackets do their job: some are wide (the cluster near 0)


def test_negative_mass_near_a_zero_cluster_says_how_sure_it_is(cluster_op):
    """Regression (CNN Hessian at the report's zero threshold): a coarse rule misplaces the
    cluster's node, so the Gauss estimate is far off; the bracket contains the exact fraction,
    and num_iters = n gives the exact per-probe masses."""
    exact = float(np.mean(EIGS_C < -ZERO_C))  # 0.1
    key = jax.random.PRNGKey(0)
    coarse = _coarse(cluster_op, 0).negative_mass(ZERO_C)
    full = spectral_density(cluster_op, key=key, num_probes=16, num_iters=80)
    full = full.negative_mass(ZERO_C)
    print(
        f"exact {exact:.3f}; {COARSE} steps: {coarse.estimate:.3f} +- {coarse.std_error:.3f} "
        f"[{coarse.lower:.3f}, {coarse.upper:.3f}]; 80: {full.estimate:.3f} +- {full.std_error:.3f}"
    )
    assert abs(coarse.estimate - exact) > 0.5 * exact  # the bias the bracket has to show
    z = 4.0 * coarse.bracket_std_error
    assert coarse.lower - z <= exact <= coarse.upper + z and coarse.upper - coarse.lower > 0.3
    assert full.lower == full.upper == full.estimate  # n steps: the quadrature is the measure
    probe_exact = _probe_masses(A_C, EIGS_C, key, 16, [(-np.inf, -ZERO_C)])[0]
    np.testing.assert_allclose(full.samples, probe_exact, atol=1e-10)
    assert abs(full.estimate - exact) <= 4.0 * full.std_error
    assert abs(full.estimate - exact) < abs(coarse.estimate - exact)


def test_interval_mass_errors(accurate):
    for lo, hi in [(1.0, 1.0), (2.0, 1.0), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="lo < hi"):
            accurate.interval_mass(lo, hi)
