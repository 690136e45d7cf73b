"""docs/language_models.md runs, and its masked-loss curvature matches float64 references.

The references are the lm1b example's loss written by hand (``_masked_ce``):
products ``H v`` by forward-over-reverse on it, ``G v = J^T H_out J v`` with
explicit JVP/VJP of the model, the empirical Fisher from the explicit Jacobian
of the per-example losses; the ``slow`` test compares whole dense matrices and
the eigenvalues.
"""

import os
import re

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import hvp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets():
    text = open(os.path.join(ROOT, "docs", "language_models.md"), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _masked_ce(logits, targets, weights, smoothing=0.0):
    """The lm1b example's compute_weighted_cross_entropy(...) / weight_sum, written by hand."""
    c = logits.shape[-1]
    on, off = 1.0 - smoothing, smoothing / (c - 1)
    soft = jax.nn.one_hot(targets, c) * (on - off) + off
    const = 0.0 if smoothing == 0 else -(on * np.log(on) + (c - 1) * off * np.log(off + 1e-20))
    loss = -jnp.sum(soft * jax.nn.log_softmax(logits), -1) - const
    return jnp.sum(loss * weights) / jnp.sum(weights)


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def ns():
    snippets = _snippets()
    assert len(snippets) == 3, "docs/language_models.md lost an example"
    namespace = {}
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"language_models.md snippet {i}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message is the point
            raise AssertionError(f"snippet {i} failed: {err!r}\n{code}") from err
    return namespace


def _linen(ns):
    model, variables, tokens = ns["model"], ns["variables"], ns["tokens"]
    flat, unravel = jax.flatten_util.ravel_pytree(variables["params"])
    w = (tokens > 0).astype(jnp.float64)

    def logits(f):
        return model.apply({"params": unravel(f)}, tokens)

    return flat, unravel, tokens, w, logits


def _gpt(ns):
    from flax import nnx

    gpt, (inputs, targets, w) = ns["gpt"], ns["gpt_batch"]
    graphdef, params, rest = nnx.split(gpt, nnx.Param, ...)
    flat, unravel = jax.flatten_util.ravel_pytree(nnx.to_pure_dict(params))

    def logits(f, x):
        state = jax.tree_util.tree_map(lambda a: a, params)
        nnx.replace_by_pure_dict(state, unravel(f))
        return nnx.merge(graphdef, state, rest)(x)

    def per_example(f):
        return jax.vmap(lambda x, t, wi: _masked_ce(logits(f, x[None])[0], t, wi))(
            inputs, targets, w
        )

    return flat, inputs, targets, w, logits, per_example


def _probes(n, k=2):
    return np.random.RandomState(0).randn(k, n)


def test_docs_snippets_masked_products_match_hand_written_loss(ns):
    flat, unravel, tokens, w, logits = _linen(ns)
    assert 0.2 < 1 - float(w.mean()) < 0.4  # a quarter of the positions are padding
    H, G = ns["H"], ns["G"]

    @jax.jit
    def refs(v):  # compiled once: H v (masked and unmasked) and G v of the hand-written loss
        hv = jax.jvp(jax.grad(lambda f: _masked_ce(logits(f), tokens, w)), (flat,), (v,))[1]
        unmasked = jax.grad(lambda f: _masked_ce(logits(f), tokens, jnp.ones_like(w)))
        hv_unmasked = jax.jvp(unmasked, (flat,), (v,))[1]
        out, jv = jax.jvp(logits, (flat,), (v,))
        smoothed = jax.grad(lambda o: _masked_ce(o, tokens, w, 0.1))
        gv = jax.vjp(logits, flat)[1](jax.jvp(smoothed, (out,), (jv,))[1])[0]
        return hv, hv_unmasked, gv

    for v in _probes(flat.size):
        v = jnp.asarray(v)
        hv, hv_unmasked, gv = refs(v)
        assert _rel(hvp.tree.ravel(H @ unravel(v)), hv) < 1e-10
        assert _rel(hv_unmasked, hv) > 0.05  # the padding-included loss (issue 16) differs
        assert _rel(hvp.tree.ravel(G @ unravel(v)), gv) < 1e-10

    gflat, inputs, targets, gw, glogits, per_example = _gpt(ns)
    ggrad = jax.grad(lambda f: _masked_ce(glogits(f, inputs), targets, gw))
    gref = jax.jit(lambda v: jax.jvp(ggrad, (gflat,), (v,))[1])
    jac = jax.jit(jax.jacrev(per_example))(gflat)
    share = gw.sum(1) / gw.sum()  # example i weighted by its share of the real tokens
    unravel_g = hvp.tree.unravel_fn(ns["H_gpt"].params)
    for v in _probes(gflat.size):
        v = jnp.asarray(v)
        got = hvp.tree.ravel(ns["H_gpt"] @ unravel_g(v))
        assert _rel(got, gref(v)) < 1e-10
        f_ref = jac.T @ (share * (jac @ v))
        assert _rel(hvp.tree.ravel(ns["F_gpt"] @ unravel_g(v)), f_ref) < 1e-10


@pytest.mark.slow
def test_docs_dense_matrices_and_eigenvalues(ns):
    flat, _, tokens, w, logits = _linen(ns)
    h_ref = jax.hessian(lambda f: _masked_ce(logits(f), tokens, w))(flat)
    assert _rel(ns["H"].dense(), h_ref) < 1e-10
    ref_top = np.linalg.eigvalsh(np.asarray(h_ref))[::-1][:2]
    np.testing.assert_allclose(np.sort(ns["top"].eigenvalues)[::-1], ref_top, rtol=1e-6)
    out = logits(flat)
    jac = jax.jacrev(lambda f: logits(f).reshape(-1))(flat)
    h_out = jax.hessian(lambda o: _masked_ce(o.reshape(out.shape), tokens, w, 0.1))(out.reshape(-1))
    assert _rel(ns["G"].dense(), jac.T @ h_out @ jac) < 1e-10
    gflat, inputs, targets, gw, glogits, per_example = _gpt(ns)
    gh_ref = jax.hessian(lambda f: _masked_ce(glogits(f, inputs), targets, gw))(gflat)
    assert _rel(ns["H_gpt"].dense(), gh_ref) < 1e-10
    pj = jax.jacrev(per_example)(gflat)
    assert _rel(ns["F_gpt"].dense(), (pj.T * (gw.sum(1) / gw.sum())) @ pj) < 1e-10
