"""One compiled product per operator and block size, shared by every algorithm and setting.

The user's loss counts its own traces (a Python side effect runs only while JAX traces). On one
``hvp.hessian`` operator of a tiny MLP, with the host driver (the default outside ``jit``), the
algorithms below may trace the loss at most once per distinct block size of the products they
run through ``op.matmat`` (plus once for ``op.matvec`` if used): the model's product is compiled
once and reused by ``eigsh(k=1)``, ``eigsh(k=5)``, ``trace`` (every method),
``spectral_density`` and ``diagonal``.

The tests run in file order and share the operator (and so JAX's compilation cache): each one
checks the traces it added against the block sizes it used for the first time. Algorithms not
yet on the drivers compile their own copy of the product and are marked ``xfail``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hvp
from hvp.linalg import _driver

TRACES = {"loss": 0}
KEY = jax.random.key(0)


def _loss(params, batch):
    TRACES["loss"] += 1
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y[:, None], 1))


def _problem(loss=_loss):
    rs = np.random.RandomState(0)
    params = {
        "w1": jnp.asarray(rs.randn(4, 5) / 2),
        "b1": jnp.asarray(rs.randn(5) / 2),
        "w2": jnp.asarray(rs.randn(5, 3) / 2),
    }
    batch = (jnp.asarray(rs.randn(16, 4)), jnp.asarray(rs.randint(0, 3, 16)))
    # forward-over-reverse: every product program traces the loss (a linearized operator,
    # the default for small models, traces it once when built and never in its products)
    return hvp.hessian(loss, params, batch, linearize=False)


class _Log:
    """Block sizes of the products run (concrete ``matmat`` calls) and loss traces per product
    program."""

    def __init__(self):
        self.op = _problem()
        before = TRACES["loss"]
        jax.eval_shape(self.op.matvec, self.op.like)  # traces the product once, compiles nothing
        self.per_program = TRACES["loss"] - before
        assert self.per_program >= 1
        self.sizes: set = set()
        self.block_dims: list = []


@pytest.fixture(scope="module")
def log():
    return _Log()


@pytest.fixture
def counted(log, monkeypatch):
    """Call ``fn`` and check: new loss traces <= traces per program x new product sizes."""
    matmat, matvec = hvp.operators.LinearOperator.matmat, hvp.operators.LinearOperator.matvec
    block_product = _driver.block_product

    def logged_matmat(self, vs):
        leaf = jax.tree_util.tree_leaves(vs)[0]
        if not isinstance(leaf, jax.core.Tracer):
            log.sizes.add(leaf.shape[0])
        return matmat(self, vs)

    def logged_matvec(self, v):
        if not isinstance(jax.tree_util.tree_leaves(v)[0], jax.core.Tracer):
            log.sizes.add("matvec")
        return matvec(self, v)

    def logged_block_product(op, vs, chunk_size=None):
        log.block_dims.append(jax.tree_util.tree_leaves(vs)[0].shape[0])
        return block_product(op, vs, chunk_size)

    monkeypatch.setattr(hvp.operators.LinearOperator, "matmat", logged_matmat)
    monkeypatch.setattr(hvp.operators.LinearOperator, "matvec", logged_matvec)
    monkeypatch.setattr(_driver, "block_product", logged_block_product)

    def call(fn):
        traces, sizes = TRACES["loss"], set(log.sizes)
        out = fn(log.op)
        new_sizes = log.sizes - sizes
        added = TRACES["loss"] - traces
        assert added <= log.per_program * len(new_sizes), (
            f"{added} trace(s) of the loss for {len(new_sizes)} new product size(s) "
            f"{sorted(map(str, new_sizes))} ({log.per_program} trace(s) per product program)"
        )
        return out

    return call


def test_power_iteration_shares_the_product_across_settings(counted, log):
    r = counted(lambda op: hvp.power_iteration(op, key=KEY, num_iters=20, tol=1e-6))
    assert isinstance(r.num_matvecs, int)
    # other settings (dynamic, in the state) reuse everything: no new trace at all
    traces = TRACES["loss"]
    counted(lambda op: hvp.power_iteration(op, key=jax.random.key(1), num_iters=7, tol=0.0))
    assert TRACES["loss"] == traces
    # the compiled driver reuses the operator's traced product too (no new trace) ...
    hvp.power_iteration(log.op, key=KEY, num_iters=3, driver="compiled")
    assert TRACES["loss"] == traces
    # ... while the counter does see a new product: another loss function is traced again
    other = _problem(lambda p, b: _loss(p, b))
    assert TRACES["loss"] > traces
    hvp.power_iteration(other, key=KEY, num_iters=3)


def test_eigsh_k1(counted):
    counted(lambda op: hvp.eigsh(op, k=1, key=KEY))


def test_eigsh_k5(counted):
    counted(lambda op: hvp.eigsh(op, k=5, key=KEY))


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_trace(counted, method):
    counted(lambda op: hvp.trace(op, key=KEY, num_matvecs=12, method=method))


def test_spectral_density(counted):
    counted(lambda op: hvp.spectral_density(op, key=KEY, num_probes=2, num_iters=8))


def test_diagonal(counted):
    counted(lambda op: hvp.diagonal(op, key=KEY, num_matvecs=8))


def test_block_products_went_through_the_driver(log):
    """The products above ran through the drivers' block product (the lead: the sizes seen)."""
    assert 1 in log.block_dims
    assert log.sizes >= {1}
    print(f"product block sizes: {sorted(map(str, log.sizes))}; per program {log.per_program}")


def test_cold_eigsh_compiles_few_programs():
    # A cold first answer waits for every XLA compilation: the host driver's step programs,
    # the initial state and the checks are one program each (eigsh(k=1) on a hessian of a
    # 26k-parameter MLP compiled 94 programs before, most of them eager operations, and 16 now).
    rs = np.random.RandomState(1)
    params = {"w": jnp.asarray(rs.randn(7, 6) / 3), "b": jnp.asarray(rs.randn(6) / 3)}
    batch = (jnp.asarray(rs.randn(11, 7)), jnp.asarray(rs.randint(0, 6, 11)))

    def loss(p, b):
        logits = jnp.tanh(b[0] @ p["w"] + p["b"])
        return jnp.mean(jax.nn.logsumexp(logits, 1) - jnp.take_along_axis(logits, b[1][:, None], 1))

    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is None:
        pytest.skip("this JAX cannot unregister a monitoring listener")
    jax.clear_caches()
    compiles = []

    def listen(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        op = hvp.hessian(loss, params, batch)
        res = hvp.eigsh(op, k=1, key=jax.random.key(3), tol=1e-6, progress=False)
    finally:
        unregister(listen)
    assert res.converged.all()
    assert len(compiles) <= 24, len(compiles)
