"""hvp.influence against dense inverse-Hessian influence and leave-one-out retraining.

The model is L2-regularised binary logistic regression on pooled digits (16 features + bias,
a mixed-shape parameter pytree), trained to the optimum by Newton's method in float64, where
the Hessian is positive definite and the influence function is exact to first order.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import digits

import hvp
from hvp import tree as tu

ALPHA = 1e-2  # L2 regularisation
N_TRAIN, N_TEST = 48, 4


def loss_fn(params, batch):
    x, y = batch
    z = x @ params["w"] + params["b"][0]
    data = jnp.mean(jax.nn.softplus(z) - y * z)
    return data + 0.5 * ALPHA * (jnp.sum(params["w"] ** 2) + jnp.sum(params["b"] ** 2))


def _flat_loss(theta, batch):
    return loss_fn({"w": theta[:16], "b": theta[16:]}, batch)


_grad = jax.jit(jax.grad(_flat_loss))
_hess = jax.jit(jax.hessian(_flat_loss))


def _train(batch, theta0=None):
    """Newton's method to machine precision (convex, 17 parameters)."""
    theta = jnp.zeros(17) if theta0 is None else theta0
    for _ in range(30):
        g = _grad(theta, batch)
        if float(jnp.linalg.norm(g)) < 1e-13:
            break
        theta = theta - jnp.linalg.solve(_hess(theta, batch), g)
    return theta


@pytest.fixture(scope="module")
def setup():
    x, labels = digits(N_TRAIN + N_TEST, seed=7)
    y = (labels < 5).astype(np.float64)
    train = (jnp.asarray(x[:N_TRAIN]), jnp.asarray(y[:N_TRAIN]))
    test = (jnp.asarray(x[N_TRAIN:]), jnp.asarray(y[N_TRAIN:]))
    theta = _train(train)
    params = {"w": theta[:16], "b": theta[16:]}
    H = hvp.hessian(loss_fn, params, [train])
    # the dense reference: jax.hessian and per-example jax.grad, in float64
    Hd = np.asarray(_hess(theta, train))
    per_ex = jax.vmap(jax.grad(_flat_loss), in_axes=(None, 0))
    g_train = np.asarray(per_ex(theta, tu.map(lambda a: a[:, None], train)))
    g_test = np.asarray(per_ex(theta, tu.map(lambda a: a[:, None], test)))
    return dict(train=train, test=test, theta=theta, H=H, Hd=Hd, g_train=g_train, g_test=g_test)


def _reference(s, damping=0.0):
    A = s["Hd"] + damping * np.eye(17)
    return -s["g_test"] @ np.linalg.solve(A, s["g_train"].T)


def _rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_dense_matches_the_formula(setup):
    s = setup
    for damping in (0.0, 0.1):
        r = hvp.influence(
            s["H"],
            s["test"],
            s["train"],
            method="dense",
            damping=damping,
            with_self_influence=True,
            chunk_size=16,
        )
        ref = _reference(s, damping)
        assert r.scores.shape == (N_TEST, N_TRAIN)
        assert _rel(r.scores, ref) < 1e-8
        A = s["Hd"] + damping * np.eye(17)
        ref_self = np.einsum("ij,ji->i", s["g_train"], np.linalg.solve(A, s["g_train"].T))
        assert _rel(r.self_influence, ref_self) < 1e-8
        assert r.converged and r.method == "dense"


def test_per_example_grads(setup):
    s = setup
    g = hvp.influence.per_example_grads(s["H"], s["test"], chunk_size=3)  # padded last chunk
    flat = np.concatenate([np.asarray(g["b"]), np.asarray(g["w"])], axis=1)  # ravel order b, w
    np.testing.assert_allclose(flat[:, 1:], s["g_test"][:, :16], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(flat[:, 0], s["g_test"][:, 16], rtol=1e-12, atol=1e-14)


def test_arnoldi_full_rank_is_exact_and_truncation_is_the_projection(setup):
    s = setup
    eig = hvp.eigsh(s["H"], 17, key=jax.random.key(0))  # p = n
    r = hvp.influence(s["H"], s["test"], s["train"], eigsh=eig, with_self_influence=True)
    assert r.rank == 17 and r.converged and r.num_matvecs == 0
    assert _rel(r.scores, _reference(s)) < 1e-8
    # p < n: exactly the inverse restricted to the top-p eigenvectors (the rest ignored)
    p, damping = 5, 0.01
    # the top-p pairs of the full run (an eigsh with k=p would find the same ones)
    eig_p = dataclasses.replace(
        eig,
        eigenvalues=eig.eigenvalues[-p:],
        eigenvectors=tu.map(lambda a: a[-p:], eig.eigenvectors),
        residuals=eig.residuals[-p:],
        converged=eig.converged[-p:],
        thresholds=eig.thresholds[-p:],
    )
    r = hvp.influence(
        s["H"], s["test"], s["train"], eigsh=eig_p, damping=damping, with_self_influence=True
    )
    lam, V = np.linalg.eigh(s["Hd"])
    lam, V = lam[::-1][:p], V[:, ::-1][:, :p]
    ref = -(s["g_test"] @ V / (lam + damping)) @ (V.T @ s["g_train"].T)
    assert _rel(r.scores, ref) < 1e-6
    np.testing.assert_allclose(r.eigenvalues, lam, rtol=1e-8)
    # self-influence is minus the diagonal of the train-train scores
    tt = hvp.influence(s["H"], s["train"], s["train"], eigsh=eig_p, damping=damping)
    np.testing.assert_allclose(r.self_influence, -np.diag(tt.scores), rtol=1e-10)
    only = hvp.influence.self_influence(s["H"], s["train"], eigsh=eig_p, damping=damping)
    np.testing.assert_allclose(only.self_influence, r.self_influence, rtol=1e-10)
    assert only.scores is None
    import json

    d = json.loads(r.to_json())
    assert d["method"] == "arnoldi" and len(d["scores"]) == N_TEST


def test_solve_matches_dense(setup):
    s = setup
    damping = 0.01
    r = hvp.influence(
        s["H"],
        s["test"],
        s["train"],
        method="solve",
        damping=damping,
        rtol=1e-10,
        with_self_influence=True,
        chunk_size=16,
    )
    assert r.converged and r.solver == "cg" and r.num_matvecs > 0
    assert _rel(r.scores, _reference(s, damping)) < 1e-8
    A = s["Hd"] + damping * np.eye(17)
    ref_self = np.einsum("ij,ji->i", s["g_train"], np.linalg.solve(A, s["g_train"].T))
    assert _rel(r.self_influence, ref_self) < 1e-8


def test_leave_one_out_rank_correlation(setup):
    from scipy.stats import spearmanr

    s = setup
    test1 = tu.map(lambda a: a[:1], s["test"])
    r = hvp.influence(s["H"], test1, s["train"], method="dense")
    predicted = -r.scores[0] / N_TRAIN  # predicted change of the test loss when removing i
    # retrain without each of the 12 most influential examples (warm start: Newton converges fast)
    idx = np.argsort(-np.abs(predicted))[:12]
    base = float(_flat_loss(s["theta"], test1))
    actual = []
    for i in idx:
        keep = np.delete(np.arange(N_TRAIN), i)
        theta_i = _train(tu.map(lambda a, keep=keep: a[keep], s["train"]), s["theta"])
        actual.append(float(_flat_loss(theta_i, test1)) - base)
    rho = spearmanr(predicted[idx], actual).statistic
    print(f"LOO Spearman rank correlation on 12 points: {rho:.4f}")
    assert rho > 0.9, rho


def test_errors(setup):
    s = setup
    with pytest.raises(ValueError, match="method"):
        hvp.influence(s["H"], s["test"], s["train"], method="lissa")
    with pytest.raises(TypeError, match="key"):
        hvp.influence(s["H"], s["test"], s["train"])
    with pytest.raises(TypeError, match="curvature operator"):
        hvp.influence(hvp.from_dense(jnp.eye(2)), s["test"], s["train"], method="dense")
    with pytest.raises(ValueError, match="damping"):
        hvp.influence(s["H"], s["test"], s["train"], method="dense", damping=-1.0)
    with pytest.raises(ValueError, match="leading"):
        hvp.influence(s["H"], (jnp.ones((2, 16)), jnp.ones(3)), s["train"], method="dense")


def test_solve_scores_with_arnoldi_self_influence_in_one_pass(setup):
    s = setup
    key = jax.random.key(5)
    both = hvp.influence(
        s["H"],
        s["test"],
        s["train"],
        method="solve",
        rtol=1e-10,
        damping=0.1,
        rank=6,
        key=key,
        with_self_influence=True,
        self_influence_method="arnoldi",
    )
    alone = hvp.influence(s["H"], s["test"], s["train"], method="solve", rtol=1e-10, damping=0.1)
    np.testing.assert_allclose(both.scores, alone.scores, rtol=1e-12)
    arn = hvp.influence.self_influence(s["H"], s["train"], damping=0.1, rank=6, key=key)
    np.testing.assert_allclose(both.self_influence, arn.self_influence, rtol=1e-12)
    assert both.num_gradients == N_TEST + N_TRAIN and both.rank == 6
    assert both.num_matvecs == alone.num_matvecs + arn.num_matvecs
    with pytest.raises(ValueError, match="self_influence_method"):
        hvp.influence(
            s["H"], s["test"], s["train"], method="dense", self_influence_method="arnoldi"
        )
