"""hvp.solve on sharded parameters and data: x keeps each leaf's sharding and equals the unsharded x.

Runs in a subprocess with 4 virtual CPU devices (the device count must be set before JAX
starts), as tests/operators/test_sharding.py. Slow: the solver code is the same as in the
default tests of tests/linalg/test_solve.py; this checks the placement.
"""

import textwrap

import pytest
from mesh_runs import MLP_SETUP, run_on_cpu_devices

SCRIPT = MLP_SETUP + textwrap.dedent(
    """
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
    out = run_on_cpu_devices(SCRIPT, timeout=600)
    for kind, res in out.items():
        assert res["converged"], kind
        assert res["err"] <= 1e-8 * res["scale"], (kind, res)
        assert all(res["same"].values()), (kind, res["same"])
