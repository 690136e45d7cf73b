"""Property tests (hypothesis): the Hessian operator of a random symmetric quadratic is its matrix."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import hvp
from hvp import tree as tu


def quadratic_loss(params, batch):
    """``mean_i 0.5 x^T A_i x + b_i^T x`` with the matrices carried as data (no retrace per example)."""
    a, b = batch
    x = jnp.concatenate([params["head"], params["tail"].ravel()])
    return jnp.mean(0.5 * jnp.einsum("i,nij,j->n", x, a, x) + b @ x)


finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@settings(max_examples=8, deadline=None)
@given(data=st.data(), n_tail=st.integers(1, 2))
def test_random_symmetric_quadratic(data, n_tail):
    num = 2  # few distinct shapes: every new shape compiles the operator again
    n = 2 + 2 * n_tail
    m = data.draw(arrays(np.float64, (num, n, n), elements=finite))
    a = 0.5 * (m + np.swapaxes(m, 1, 2))  # symmetric, any signature
    b = data.draw(arrays(np.float64, (num, n), elements=finite))
    x0 = data.draw(arrays(np.float64, (n,), elements=finite))
    params = {"head": jnp.asarray(x0[:2]), "tail": jnp.asarray(x0[2:]).reshape(n_tail, 2)}
    op = hvp.hessian(quadratic_loss, params, (jnp.asarray(a), jnp.asarray(b)))
    expected = a.mean(axis=0)
    dense = np.asarray(op.dense())
    np.testing.assert_allclose(
        dense, expected, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(expected).max())
    )
    v = data.draw(arrays(np.float64, (n,), elements=finite))
    hv = op @ tu.unravel_fn(params)(jnp.asarray(v))
    np.testing.assert_allclose(
        tu.ravel(hv), expected @ v, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(v).max())
    )
