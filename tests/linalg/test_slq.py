"""Stochastic Lanczos quadrature (hvp.linalg.spectral_density) and spectrum_summary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import sym

import hvp
from hvp.linalg import spectral_density, spectrum_summary, wasserstein1

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
    assert abs(est - true) < 0.03
    assert accurate.negative_mass() + accurate.positive_mass() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "f, true",
    [(lambda t: t, EIGS.sum()), (lambda t: t**2, np.sum(EIGS**2)), (jnp.exp, np.sum(np.exp(EIGS)))],
)
def test_trace_fn_within_four_standard_errors(accurate, f, true):
    est = accurate.trace_fn(f)
    assert est.samples.shape == (32,)
    assert np.isfinite(float(est.stderr)) and float(est.stderr) > 0
    assert abs(float(est.estimate) - true) < 4 * float(est.stderr)


def test_no_reorthogonalization_and_chunks(op, accurate):
    chunked = spectral_density(
        op, key=jax.random.PRNGKey(0), num_probes=32, num_iters=60, chunk_size=8
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
    assert zero.negative_mass() == 0.0
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
    assert s.negative_positive_ratio == pytest.approx(s.negative_mass / s.positive_mass)
    true_abs = np.sum(-eigs[eigs < 0]) / np.sum(eigs[eigs > 0])
    assert s.negative_positive_abs_ratio == pytest.approx(true_abs, rel=0.25)
    # indefinite: the smallest magnitude comes from interior Ritz values, a rough estimate
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
