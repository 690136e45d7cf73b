"""hvp.classify_critical_point on functions with known critical points, against dense references."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import hvp
from hvp.critical import critical_verdict
from hvp.operators import data_gradient

KEY = jax.random.key(0)
DUMMY = jnp.zeros((1, 1))  # a data set for losses that do not read it


def _quadratic(eigenvalues, seed=0):
    """``0.5 x^T A x`` with ``A = Q diag(eigenvalues) Q^T``, at its critical point 0."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    a = (q * np.asarray(eigenvalues, float)) @ q.T
    a = 0.5 * (a + a.T)
    loss = lambda p, b: 0.5 * p["x"] @ (jnp.asarray(a) @ p["x"])  # noqa: E731
    return loss, a


@pytest.mark.parametrize(
    "eigenvalues, kind",
    [
        ([0.5, 1.0, 2.0, 3.0, 5.0, 8.0], "minimum"),  # positive definite
        ([-0.5, -1.0, -2.0, -3.0, -5.0, -8.0], "maximum"),  # negative definite
        ([-2.0, -0.5, 1.0, 1.0, 3.0, 4.0], "saddle"),  # indefinite
        ([0.0, 0.0, 1.0, 2.0, 3.0, 4.0], "degenerate"),  # positive semi-definite, singular
    ],
)
def test_quadratics_of_each_inertia(eigenvalues, kind):
    _, a = _quadratic(eigenvalues)
    # at the critical point 0 (gradient 0), through a dense operator: one compile for all four
    r = hvp.classify_critical_point(hvp.from_dense(a), key=KEY, gradient=jnp.zeros(6))
    assert r.kind == kind and r.verdict == hvp.critical.VERDICTS[kind]
    ref = np.linalg.eigvalsh(a)
    assert r.gradient_norm == 0.0 and r.converged
    # the Ritz values agree with the dense eigenvalues, within their residual bounds
    assert abs(r.lambda_min - ref[0]) <= max(r.lambda_min_error, 1e-10)
    assert abs(r.lambda_max - ref[-1]) <= max(r.lambda_max_error, 1e-10)
    assert abs(r.lambda_min - ref[0]) < 1e-8 and abs(r.lambda_max - ref[-1]) < 1e-8


def test_quadratic_through_the_hessian_at_and_away_from_its_critical_point():
    loss, a = _quadratic([-2.0, -0.5, 1.0, 1.0, 3.0, 4.0])
    r0 = hvp.classify_critical_point(hvp.hessian(loss, {"x": jnp.zeros(6)}, DUMMY), key=KEY)
    assert r0.kind == "saddle" and r0.gradient_norm == 0.0
    r1 = hvp.classify_critical_point(hvp.hessian(loss, {"x": jnp.ones(6)}, DUMMY), key=KEY)
    assert r1.kind == "not critical"  # gradient A x
    np.testing.assert_allclose(r1.gradient_norm, np.linalg.norm(a @ np.ones(6)), rtol=1e-12)
    assert r1.verdict == f"not a critical point: gradient norm {r1.gradient_norm:.3g}"
    np.testing.assert_allclose([r1.lambda_min, r1.lambda_max], [-2.0, 4.0], atol=1e-8)


def _rosen(p, b):
    return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2


def test_rosenbrock_minimum_and_a_non_critical_point():
    r = hvp.classify_critical_point(hvp.hessian(_rosen, jnp.ones(2), DUMMY), key=KEY)
    ref = np.linalg.eigvalsh(np.array([[802.0, -400.0], [-400.0, 200.0]]))  # at (1, 1)
    assert r.kind == "minimum"
    np.testing.assert_allclose([r.lambda_min, r.lambda_max], ref, rtol=1e-10)
    p = jnp.array([-1.2, 1.0])  # the classic start: not critical
    r = hvp.classify_critical_point(hvp.hessian(_rosen, p, DUMMY), key=KEY)
    assert r.kind == "not critical"
    np.testing.assert_allclose(r.gradient_norm, np.linalg.norm(jax.grad(_rosen)(p, None)))


def _linear_network():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3))
    y = x @ rng.normal(size=(3, 2))
    params = {"w1": jnp.zeros((3, 4)), "w2": jnp.zeros((4, 2))}

    def loss(p, b):
        return jnp.mean(jnp.sum((b[0] @ p["w1"] @ p["w2"] - b[1]) ** 2, axis=1))

    batches = [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:], y[16:])]
    return hvp.hessian(loss, params, batches)


@pytest.mark.slow  # the saddle verdict runs by default on a quadratic and a dense operator
def test_two_layer_linear_network_origin_is_a_saddle():
    H = _linear_network()
    r = hvp.classify_critical_point(H, key=KEY)
    dense = np.linalg.eigvalsh(np.asarray(H.dense()))
    assert r.kind == "saddle" and r.gradient_norm == 0.0
    np.testing.assert_allclose([r.lambda_min, r.lambda_max], dense[[0, -1]], atol=1e-8)
    assert r.negative_mass is None and r.to_dict()["verdict"] == "saddle point"


@pytest.mark.slow
def test_negative_mass_against_the_dense_spectrum():
    H = _linear_network()
    r = hvp.classify_critical_point(H, key=KEY, density=True, num_probes=4, num_iters=20)
    dense = np.linalg.eigvalsh(np.asarray(H.dense()))
    # n = 20 and 20 Lanczos steps: SLQ's quadrature is exact, the probe average is the error
    frac = float(np.mean(dense < -r.zero_threshold))
    assert 0 < r.negative_mass and abs(r.negative_mass - frac) < 0.15
    neg = np.abs(dense[dense < -r.zero_threshold]).sum() / np.abs(dense).sum()
    assert abs(r.negative_weight - neg) < 0.15


def _tiny_model():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 3))
    y = (np.sin(x @ np.array([1.0, -2.0, 0.5])) > 0).astype(np.int32)
    params = {
        "dense": {"kernel": jnp.asarray(0.5 * rng.normal(size=(3, 4))), "bias": jnp.zeros(4)},
        "out": {"kernel": jnp.asarray(0.5 * rng.normal(size=(4, 2))), "bias": jnp.zeros(2)},
    }

    def loss(p, b):
        h = jnp.tanh(b[0] @ p["dense"]["kernel"] + p["dense"]["bias"])
        logits = h @ p["out"]["kernel"] + p["out"]["bias"]
        ce = hvp.losses.softmax_cross_entropy(logits, b[1])
        l2 = sum(jnp.sum(w**2) for w in jax.tree_util.tree_leaves(p))
        return ce + 1e-2 * l2  # weight decay: a strict minimum

    return loss, params, [(x[:25], y[:25]), (x[25:], y[25:])], (x, y)


@pytest.mark.slow  # "not critical" runs by default on a quadratic and on Rosenbrock
def test_trained_vs_untrained_tiny_model():
    loss, params, batches, full = _tiny_model()
    untrained = hvp.classify_critical_point(hvp.hessian(loss, params, batches), key=KEY)
    assert untrained.kind == "not critical"
    # train to a critical point: gradient descent, then Newton steps (dense, n = 26)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    f = jax.jit(lambda w: loss(unravel(w), full))
    g, h = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
    for _ in range(300):
        flat = flat - 0.5 * g(flat)
    for _ in range(8):
        flat = flat - jnp.linalg.solve(h(flat), g(flat))
    trained_params = unravel(flat)
    H = hvp.hessian(loss, trained_params, batches)
    trained = hvp.classify_critical_point(H, key=KEY, grad_tol=1e-8)
    dense = np.linalg.eigvalsh(np.asarray(h(flat)))
    assert trained.kind == "minimum", trained
    assert trained.gradient_norm < 1e-8
    np.testing.assert_allclose(trained.lambda_min, dense[0], rtol=1e-6)


@pytest.mark.slow  # by default: the analysis test checks data_gradient against jax.grad
def test_data_gradient_matches_jax_grad_with_uneven_batches_and_ggn():
    loss, params, batches, full = _tiny_model()
    ref = jax.grad(loss)(params, full)
    got = data_gradient(hvp.hessian(loss, params, batches))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-13), got, ref)
    # the GGN's loss is output_loss(model_fn(params, x), y)
    model = lambda p, x: x @ p["w"]  # noqa: E731
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(9, 2))
    p = {"w": jnp.asarray(rng.normal(size=(3, 2)))}
    G = hvp.ggn(model, hvp.losses.mean_squared_error, p, [(x[:5], y[:5]), (x[5:], y[5:])])
    ref = jax.grad(lambda q: hvp.losses.mean_squared_error(model(q, x), y))(p)
    np.testing.assert_allclose(data_gradient(G)["w"], ref["w"], atol=1e-13)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="pass the Hessian"):
        model = lambda p, x: x @ p  # noqa: E731
        batch = (jnp.ones((4, 3)), jnp.ones((4, 2)))
        G = hvp.ggn(model, hvp.losses.mean_squared_error, jnp.ones((3, 2)), batch)
        hvp.classify_critical_point(G, key=KEY)
    with pytest.raises(TypeError, match="gradient="):
        hvp.classify_critical_point(hvp.from_dense(np.eye(2)), key=KEY)
    with pytest.raises(ValueError, match="grad_tol"):
        hvp.classify_critical_point(
            hvp.from_dense(np.eye(2)), key=KEY, gradient=jnp.zeros(2), grad_tol=-1.0
        )
    # a dense operator with its gradient given
    r = hvp.classify_critical_point(
        hvp.from_dense(np.diag([-1.0, 2.0])), key=KEY, gradient=jnp.zeros(2)
    )
    assert r.kind == "saddle"


def test_verdict_rule_at_the_thresholds():
    assert critical_verdict(1e-6, 1.0, 2.0, grad_tol=1e-6, zero=0.1)[0] == "minimum"
    assert critical_verdict(float("nan"), 1.0, 2.0, grad_tol=1e-6, zero=0.1)[0] == "not critical"
    assert critical_verdict(0.0, 0.1, 2.0, grad_tol=1e-6, zero=0.1)[0] == "degenerate"
    assert critical_verdict(0.0, -0.2, 0.05, grad_tol=1e-6, zero=0.1)[0] == "degenerate"
    assert critical_verdict(0.0, -3.0, -0.2, grad_tol=1e-6, zero=0.1)[0] == "maximum"
