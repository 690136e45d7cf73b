"""Sharded parameters and data: products keep each leaf's sharding and equal the unsharded result.

Runs in a subprocess with 4 virtual CPU devices (the device count must be set before JAX starts).
"""

import json
import os
import subprocess
import sys
import textwrap

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
    out = {}
    for kind in ("hessian", "ggn"):
        if kind == "hessian":
            op = hvp.hessian(loss, params, sharded_batches)
            ref_op = hvp.hessian(loss, plain, batches)
        else:
            model = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
            op = hvp.ggn(model, hvp.losses.softmax_cross_entropy, params, sharded_batches)
            ref_op = hvp.ggn(model, hvp.losses.softmax_cross_entropy, plain, batches)
        v = hvp.tree.rademacher_like(jax.random.key(1), params)
        hv = op @ v
        ref = ref_op @ {k: jnp.asarray(np.asarray(x)) for k, x in v.items()}
        err = max(float(jnp.max(jnp.abs(hv[k] - ref[k]))) for k in raw)
        vs = hvp.tree.stack([v, v])
        hvs = op.matmat(vs)
        out[kind] = {
            "probe_specs": {k: str(x.sharding.spec) for k, x in v.items()},
            "out_same": {k: hv[k].sharding.is_equivalent_to(params[k].sharding, hv[k].ndim) for k in raw},
            "probe_same": {k: v[k].sharding.is_equivalent_to(params[k].sharding, v[k].ndim) for k in raw},
            "param_specs": {k: str(x.sharding.spec) for k, x in params.items()},
            "matmat_ndev": {k: len(x.sharding.device_set) for k, x in hvs.items()},
            "err": err,
        }
    print("RESULT" + json.dumps(out))
    """
)


def test_products_keep_leaf_sharding_and_match_unsharded():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT") :])
    for kind, r in res.items():
        assert r["err"] < 1e-12, (kind, r["err"])
        # random probes and products keep the parameters' per-leaf sharding
        assert all(r["probe_same"].values()), (kind, r)
        assert all(r["out_same"].values()), (kind, r)
        assert all(n == 4 for n in r["matmat_ndev"].values()), (kind, r)
