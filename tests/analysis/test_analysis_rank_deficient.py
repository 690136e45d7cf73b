"""`hvp analyze --operator ggn` on a rank-deficient batch reports zeros as zeros (issue 9).

A Linen model with 3 outputs under squared error on 2 examples has a GGN of rank at most
2 x 3 = 6 among n = 27 parameters: the bottom eigenvalues are exactly zero. The report must give
them as zeros (to round-off), label the matrix "positive semi-definite, singular", and give no
finite condition number; checked against the dense float64 GGN.
"""

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hvp import tree as tu
from hvp.analysis import analyze, load_model

MODEL = """
import jax, jax.numpy as jnp
import flax.linen as nn

class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(3)(x)))

def small():
    net = Small()
    return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))), "mse"
"""


def test_ggn_of_two_examples_reports_zeros_as_zeros(tmp_path):
    (tmp_path / "small_model.py").write_text(textwrap.dedent(MODEL))
    spec = f"{tmp_path / 'small_model.py'}:small"
    loaded = load_model(spec)
    rng = np.random.default_rng(0)
    saved = jax.tree_util.tree_map(
        lambda a: np.asarray(rng.normal(size=a.shape), np.float32), loaded.variables
    )
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(tmp_path / "ckpt"), saved)
    ck.wait_until_finished()
    ck.close()
    x = rng.normal(size=(2, 4)).astype(np.float32)
    y = rng.normal(size=(2, 3)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=y)

    report = analyze(
        tmp_path / "ckpt",
        model=spec,
        data=str(tmp_path / "data.npz"),
        operator="ggn",
        k=3,
        num_probes=2,
        num_iters=10,
        trace_matvecs=6,
        layer_matvecs=2,
        seed=0,
        x64=True,
    )

    # dense float64 reference: G = J^T (2 / (2 * 3)) J for the mean squared error over 6 entries
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), saved["params"])
    unravel = tu.unravel_fn(params)
    J = jax.jacfwd(
        lambda t: loaded.model.apply({"params": unravel(t)}, jnp.asarray(x, jnp.float64))
    )(tu.ravel(params))
    J = np.asarray(J).reshape(6, -1)
    G = 2.0 / 6 * J.T @ J
    lam = np.linalg.eigh(G)[0]
    scale = np.abs(lam).max()
    assert G.shape[0] == 27 and np.sum(lam > 1e-10 * scale) <= 6  # rank-deficient

    np.testing.assert_allclose(report.bottom.eigenvalues, 0.0, atol=1e-8 * scale)
    np.testing.assert_allclose(report.top.eigenvalues, lam[-3:], rtol=0, atol=1e-8 * scale)
    d = report.derived
    assert not d.positive_definite
    assert d.condition_estimate == float("inf")
    assert d.negative_ratio == 0.0
