"""Sharded parameters and data: products keep each leaf's sharding and equal the unsharded result.

Runs in a subprocess with 4 virtual CPU devices (the device count must be set before JAX starts).
"""

import textwrap

from mesh_runs import MLP_SETUP, run_on_cpu_devices

SCRIPT = MLP_SETUP + textwrap.dedent(
    """
    out = {}
    for kind in ("hessian", "ggn"):
        if kind == "hessian":
            op = hvp.hessian(loss, params, sharded_batches)
            ref_op = hvp.hessian(loss, plain, batches)
        else:
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
    res = run_on_cpu_devices(SCRIPT, timeout=300)
    for kind, r in res.items():
        assert r["err"] < 1e-12, (kind, r["err"])
        # random probes and products keep the parameters' per-leaf sharding
        assert all(r["probe_same"].values()), (kind, r)
        assert all(r["out_same"].values()), (kind, r)
        assert all(n == 4 for n in r["matmat_ndev"].values()), (kind, r)
