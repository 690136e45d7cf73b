"""Power iteration (hvp.linalg.power_iteration) against numpy.linalg.eigh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import sym

import hvp
from hvp import tree as tu
from hvp.linalg import power_iteration

N = 60


@pytest.mark.parametrize("top", [4.0, -4.0])
def test_top_magnitude_pair(top):
    eigs = np.concatenate([[top], np.linspace(-2.0, 2.0, N - 1)])  # |top| dominates, ratio 0.5
    a = sym(eigs, seed=1)
    res = power_iteration(hvp.from_dense(a), key=jax.random.PRNGKey(0), num_iters=500, tol=1e-10)
    assert bool(res.converged)
    np.testing.assert_allclose(float(res.eigenvalue), top, rtol=1e-12)
    v = np.asarray(tu.ravel(res.eigenvector))
    np.testing.assert_allclose(np.linalg.norm(a @ v - top * v), float(res.residual), atol=1e-12)
    assert float(res.residual) <= 1e-10 * abs(top)
    # convergence rate |l2/l1| = 0.5: about log(1e-10)/log(0.5) ~ 33 steps, far below the cap
    assert 10 < int(res.num_matvecs) < 80


def test_iteration_cap_and_flag():
    eigs = np.concatenate([[1.0, 0.99], np.linspace(0, 0.5, N - 2)])  # slow: ratio 0.99
    a = sym(eigs, seed=2)
    with pytest.warns(hvp.ConvergenceWarning, match=r"did not converge.*after 5 products"):
        res = power_iteration(hvp.from_dense(a), key=jax.random.PRNGKey(0), num_iters=5, tol=1e-10)
    assert int(res.num_matvecs) == 5
    assert not bool(res.converged)
    assert float(res.residual) > 1e-10


def test_zero_operator_no_nan():
    res = power_iteration(hvp.from_dense(np.zeros((N, N))), key=jax.random.PRNGKey(0))
    assert float(res.eigenvalue) == 0.0 and float(res.residual) == 0.0
    assert bool(tu.all_finite(res.eigenvector))


def test_mlp_hessian_matches_eigh():
    from problems import operator, reference

    h = operator("mlp", "hessian")
    ev = np.linalg.eigvalsh(reference("mlp", "hessian"))
    top = ev[np.argmax(np.abs(ev))]
    res = power_iteration(h, key=jax.random.PRNGKey(0), num_iters=1000, tol=1e-9)
    print(f"power iteration on the mlp hessian: {int(res.num_matvecs)} matvecs")
    assert bool(res.converged)
    np.testing.assert_allclose(float(res.eigenvalue), top, rtol=1e-10)
    tu.assert_same_structure(res.eigenvector, h.like)


def test_v0_and_errors():
    a = sym(np.linspace(1, 3, N), seed=3)
    op = hvp.from_dense(a)
    r1 = power_iteration(op, key=None, v0=jnp.ones(N), num_iters=3)
    r2 = power_iteration(op, key=jax.random.PRNGKey(9), v0=jnp.ones(N), num_iters=3)
    assert float(r1.eigenvalue) == float(r2.eigenvalue)  # v0 given: the key is not used
    with pytest.raises(ValueError, match="v0"):
        power_iteration(op, key=jax.random.PRNGKey(0), v0=jnp.ones(N + 2))
    with pytest.raises(ValueError, match="num_iters"):
        power_iteration(op, key=jax.random.PRNGKey(0), num_iters=0)
    with pytest.raises(TypeError, match=r"pass key=jax\.random\.key\(seed\)"):
        power_iteration(op, key=None)
    d = r1.to_dict()
    assert set(d) == {
        "eigenvalue",
        "eigenvector",
        "residual",
        "num_matvecs",
        "converged",
        "dtype_policy",
    }
    assert d["dtype_policy"] == {"compute": "float64", "accumulate": "float64"}
