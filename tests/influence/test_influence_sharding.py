"""Influence scores and landscapes with sharded parameters equal the unsharded ones.

Runs in a subprocess with 4 virtual CPU devices (the device count must be set before JAX
starts). Marked slow: a separate process compiles everything again; the default tests cover the
same code on one device.
"""

import textwrap

import pytest
from mesh_runs import run_on_cpu_devices

SCRIPT = textwrap.dedent(
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("m",))
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(16, 8))), jnp.asarray(rng.normal(size=(16, 4)))
    params = {"w": jnp.asarray(rng.normal(size=(8, 4))) * 0.3, "b": jnp.zeros(4)}

    def loss(p, b):
        out = jnp.tanh(b[0] @ p["w"] + p["b"])
        return jnp.mean((out - b[1]) ** 2) + 0.01 * jnp.sum(p["w"] ** 2)

    specs = {"w": P(None, "m"), "b": P("m")}
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    H0, H1 = hvp.hessian(loss, params, [(x, y)]), hvp.hessian(loss, sharded, [(x, y)])
    test = (x[:3], y[:3])
    out = {}
    for m in ("dense", "solve"):
        a = hvp.influence(H0, test, (x, y), method=m, damping=0.1).scores
        b = hvp.influence(H1, test, (x, y), method=m, damping=0.1).scores
        out[m] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    a = hvp.influence(H0, test, (x, y), rank=6, key=jax.random.key(0)).scores
    b = hvp.influence(H1, test, (x, y), rank=6, key=jax.random.key(0)).scores
    out["arnoldi"] = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
    g = hvp.influence.per_example_grads(H1, test)
    out["grad_spec"] = str(g["w"].sharding.spec)
    r0 = hvp.landscape(H0, directions="random", dims=2, key=jax.random.key(0), num_points=3)
    r1 = hvp.landscape(H1, directions="random", dims=2, key=jax.random.key(0), num_points=3)
    out["landscape"] = float(np.max(np.abs(r0.losses - r1.losses)))
    print("RESULT", json.dumps(out))
    """
)


@pytest.mark.slow
def test_sharded_parameters_give_the_same_scores_and_landscape():
    out = run_on_cpu_devices(SCRIPT, timeout=600)
    assert out["dense"] < 1e-10 and out["solve"] < 1e-8 and out["arnoldi"] < 1e-8, out
    assert out["landscape"] < 1e-12, out
    assert "'m'" in out["grad_spec"]  # per-example gradients keep the parameters' sharding
