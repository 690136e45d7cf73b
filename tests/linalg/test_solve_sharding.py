"""hvp.solve on sharded parameters and data: x keeps each leaf's sharding and equals the unsharded x.

Runs in a subprocess with 4 virtual CPU devices (the device count must be set before JAX
starts), as tests/operators/test_sharding.py. Slow: the solver code is the same as in the
default tests of tests/linalg/test_solve.py; this checks the placement.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import hvp

    mesh = Mesh(np.array(jax.devices()), ("d",))
    rs = np.random.RandomState(0)
    raw = {"w1": rs.randn(8, 16), "b1": rs.randn(16), "w2": rs.randn(16, 4)}
    specs = {"w1": P(None, "d"), "b1": P("d"), "w2": P("d", None)}
    params = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in raw.items()}
    plain = {k: jnp.asarray(v) for k, v in raw.items()}

    def loss(p, b):
        x, t = b
        return hvp.losses.softmax_cross_entropy(jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"], t)

    X, y = rs.randn(40, 8), rs.randint(0, 4, 40)
    batches = [(X[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]
    sharded_batches = [
        (jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("d", None))),
         jax.device_put(jnp.asarray(b), NamedSharding(mesh, P("d"))))
        for a, b in batches
    ]
    model = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
    out = {}
    for kind, method in (("ggn", "cg"), ("hessian", "minres")):
        if kind == "hessian":
            op = hvp.hessian(loss, params, sharded_batches)
            ref_op = hvp.hessian(loss, plain, batches)
        else:
            op = hvp.ggn(model, hvp.losses.softmax_cross_entropy, params, sharded_batches)
            ref_op = hvp.ggn(model, hvp.losses.softmax_cross_entropy, plain, batches)
        b = jax.grad(loss)(params, sharded_batches[0])
        b_plain = {k: jnp.asarray(np.asarray(x)) for k, x in b.items()}
        r = hvp.solve(op, b, method=method, damping=1e-2, rtol=1e-10)
        ref = hvp.solve(ref_op, b_plain, method=method, damping=1e-2, rtol=1e-10)
        out[kind] = {
            "converged": bool(r.converged) and bool(ref.converged),
            "err": max(float(jnp.max(jnp.abs(r.x[k] - ref.x[k]))) for k in raw),
            "scale": max(float(jnp.max(jnp.abs(ref.x[k]))) for k in raw),
            "same": {k: r.x[k].sharding.is_equivalent_to(params[k].sharding, r.x[k].ndim) for k in raw},
        }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.slow
def test_solve_on_sharded_parameters():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    for kind, res in out.items():
        assert res["converged"], kind
        assert res["err"] <= 1e-8 * res["scale"], (kind, res)
        assert all(res["same"].values()), (kind, res["same"])
