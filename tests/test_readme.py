"""The README's Python snippets run, in order, on a real problem (docs that run)."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hvp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _namespace(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = jnp.asarray(digits.data[:600] / 16.0)
    y = jnp.asarray(digits.target[:600])
    rs = np.random.RandomState(0)
    params = {
        "w1": jnp.asarray(rs.randn(64, 12) / 8.0),
        "b1": jnp.zeros(12),
        "w2": jnp.asarray(rs.randn(12, 10) / 3.5),
    }
    batches = [(X[i : i + 256], y[i : i + 256]) for i in range(0, 600, 256)]  # 256, 256, 88

    def model_fn(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(64, 8, rngs=rngs, param_dtype=jnp.float64)
            self.out = nnx.Linear(8, 10, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    lr = 0.5
    opt = optax.sgd(lr)

    @jax.jit
    def train_step(p, opt_state, batch):
        x, t = batch

        def loss(q):
            return hvp.losses.softmax_cross_entropy(model_fn(q, x), t)

        updates, opt_state = opt.update(jax.grad(loss)(p), opt_state)
        return optax.apply_updates(p, updates), opt_state

    v = hvp.tree.normal_like(jax.random.PRNGKey(1), params)
    return dict(
        jax=jax,
        jnp=jnp,
        hvp=hvp,
        params=params,
        batches=batches,
        model_fn=model_fn,
        v=v,
        vs=hvp.tree.stack([v, hvp.tree.scale(2.0, v)]),
        model=MLP(nnx.Rngs(0)),
        lr=lr,
        probe_batch=batches[0],
        train_batches=batches * 2,
        opt_state=opt.init(params),
        train_step=train_step,
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_readme_snippets_run(tmp_path, monkeypatch):
    snippets = _snippets()
    assert len(snippets) >= 4, "the README lost its API examples"
    monkeypatch.chdir(tmp_path)
    ns = _namespace(tmp_path)
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"README.md snippet {i}", "exec"), ns)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"README snippet {i} failed: {err!r}\n{code}") from err
        if i == 0:  # the operator snippet computed real products: check them against dense
            dense = np.asarray(ns["H"].dense())
            np.testing.assert_allclose(
                np.asarray(hvp.tree.ravel(ns["Hv"])),
                dense @ np.asarray(hvp.tree.ravel(ns["v"])),
                rtol=1e-10,
                atol=1e-12,
            )
        if i == 1:  # the algorithms snippet: Lanczos agrees with eigh of the same Hessian
            ref = np.linalg.eigvalsh(dense)
            got = np.asarray(ns["eig"].eigenvalues)
            np.testing.assert_allclose(
                got, np.concatenate([ref[:5], ref[-5:]]), rtol=1e-4, atol=1e-6 * np.abs(ref).max()
            )
    assert os.path.exists(tmp_path / "runs" / "curvature" / "history.jsonl")
    assert len(ns["monitor"].history) >= 1
