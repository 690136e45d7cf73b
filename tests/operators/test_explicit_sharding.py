"""Meshes with explicit axis types ("sharding in types", ``jax.sharding.AxisType.Explicit``).

Operators, probes, Krylov bases and results keep every parameter leaf's sharding type, and every
algorithm equals its unsharded run (same keys, float64). Runs in a subprocess with 4 virtual CPU
devices (the device count must be set before JAX starts); the in-process tests check the tree
helpers on one device, where they must change nothing.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_runs import run_on_cpu_devices

import hvp
from hvp import tree as tu

SCRIPT = textwrap.dedent(
    """
    import time
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from flax import nnx

    mesh = jax.make_mesh((2, 2), ("batch", "model"), axis_types=(AxisType.Explicit,) * 2)
    rs = np.random.RandomState(0)
    raw = {"w1": rs.randn(6, 8) / 2, "b1": rs.randn(8) / 2, "w2": rs.randn(8, 3) / 2}
    specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}
    params = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in raw.items()}
    plain = {k: jnp.asarray(v) for k, v in raw.items()}
    n = sum(v.size for v in raw.values())

    def follow_batch(h):
        # the output's example axis is sharded like the input's (works for one example too)
        s = jax.typeof(h).sharding
        if hvp.tree.explicit_sharding(h) is None:
            return None
        return NamedSharding(s.mesh, P(s.spec[0], None))

    def model(p, x):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.matmul(h, p["w2"], out_sharding=follow_batch(h))

    def loss(p, b):
        return hvp.losses.softmax_cross_entropy(model(p, b[0]), b[1])

    X, y = rs.randn(16, 6), rs.randint(0, 3, 16)
    batches = [(X[:8], y[:8]), (X[8:], y[8:])]
    out = {"n": n}

    def spec_ok(tree, like, leading=0):
        # every leaf's sharding type is the parameter leaf's, with unsharded leading axes
        return all(
            tuple(jax.typeof(t).sharding.spec) == (None,) * leading + tuple(jax.typeof(l).sharding.spec)
            for t, l in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(like))
        )

    def err(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(z))))
                   for x, z in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

    key = jax.random.key(3)
    FULL = os.environ.get("HVP_TEST_PART") == "full"
    t0 = time.perf_counter()
    ref_ops = {"hessian": hvp.hessian(loss, plain, batches)}
    ref_dense = np.asarray(ref_ops["hessian"].dense())
    ref_eigs = np.linalg.eigh(ref_dense)[0]
    ref = dict(
        density=hvp.spectral_density(ref_ops["hessian"], key=key, num_probes=2, num_iters=8),
        trace={},
    )
    if FULL:
        ref["eigsh"] = hvp.eigsh(ref_ops["hessian"], k=2, key=key)
        ref_ops["ggn"] = hvp.ggn(model, hvp.losses.softmax_cross_entropy, plain, batches)
        ref_ops["fisher"] = hvp.empirical_fisher(loss, plain, batches)
        ref.update(
            eigsh_both=hvp.eigsh(ref_ops["hessian"], k=2, which="both", key=key),
            diag=hvp.diagonal(ref_ops["hessian"], key=key, num_matvecs=10),
            frob=hvp.frobenius_norm(ref_ops["ggn"], key=key, num_matvecs=10),
            power=hvp.power_iteration(ref_ops["ggn"], key=key, v0=raw, num_iters=30),
        )
        ref["trace"].update({m: hvp.trace(ref_ops["hessian"], key=key, num_matvecs=12, method=m)
                             for m in ("hutchinson", "hutch++", "xtrace")})
    out["t_ref"] = time.perf_counter() - t0

    with jax.set_mesh(mesh):
        sharded = [
            (jax.device_put(a, NamedSharding(mesh, P("batch", None))),
             jax.device_put(b, NamedSharding(mesh, P("batch"))))
            for a, b in batches
        ]
        ops = {kind: None for kind in ref_ops}
        ops["hessian"] = hvp.hessian(loss, params, sharded)
        if FULL:
            ops["ggn"] = hvp.ggn(model, hvp.losses.softmax_cross_entropy, params, sharded)
            ops["fisher"] = hvp.empirical_fisher(loss, params, sharded)
        v = hvp.tree.rademacher_like(key, params)
        vj = jax.jit(hvp.tree.normal_like)(key, params)
        out["probe_spec"] = spec_ok(v, params) and spec_ok(vj, params)
        out["probe_equal"] = err(v, hvp.tree.rademacher_like(key, plain))
        # a vector made from shapes (no sharding type) is accepted and the result is typed
        v0 = {k: jnp.asarray(np.asarray(x)) for k, x in v.items()}
        # reductions never flatten a sharded leaf, also with one operand untyped
        out["dot_err"] = max(
            abs(float(hvp.tree.dot(v, v0)) - float(hvp.tree.dot(v0, v0))),
            abs(float(hvp.tree.norm(v)) - float(hvp.tree.norm(v0))),
            float(np.max(np.abs(np.asarray(hvp.tree.vdot_batched(hvp.tree.stack([v, v]), v0)) - float(hvp.tree.dot(v0, v0))))),
        )
        prods = {}
        for kind, op in ops.items():
            hv, hv0 = op @ v, op @ v0
            hvs = op.matmat(hvp.tree.stack([v, v0]))
            r = ref_ops[kind] @ v0
            prods[kind] = dict(
                err=max(err(hv, r), err(hv0, r), err(hvp.tree.index(hvs, 1), r)),
                spec=spec_ok(hv, params) and spec_ok(hv0, params) and spec_ok(hvs, params, 1),
            )
        out["products"] = prods

        op = ops["hessian"]
        e = hvp.eigsh(op, k=2, key=key)
        e_np = hvp.eigsh(op, k=2, v0=raw, key=key)  # a NumPy start vector takes the leaves' types
        out["eigsh"] = dict(
            err_dense=max(
                float(np.max(np.abs(np.sort(np.asarray(x.eigenvalues)) - np.sort(ref_eigs[-2:]))))
                for x in (e, e_np)
            ),
            converged=bool(np.all(e.converged)) and bool(np.all(e_np.converged)),
            vec_spec=spec_ok(e.eigenvectors, params, 1) and spec_ok(e_np.eigenvectors, params, 1),
        )
        if FULL:
            out["eigsh_err_ref"] = float(np.max(np.abs(np.asarray(e.eigenvalues) - np.asarray(ref["eigsh"].eigenvalues))))
        out["trace"] = {
            m: abs(float(hvp.trace(op, key=key, num_matvecs=12, method=m).estimate)
                   - float(r.estimate))
            for m, r in ref["trace"].items()
        }
        sd = hvp.spectral_density(op, key=key, num_probes=2, num_iters=8)
        out["density"] = max(
            float(np.max(np.abs(np.asarray(sd.nodes) - np.asarray(ref["density"].nodes)))),
            float(np.max(np.abs(np.asarray(sd.weights) - np.asarray(ref["density"].weights)))),
        )
        # NumPy batches join the mesh: example axis over the axis no parameter uses ('batch')
        op_np = hvp.hessian(loss, params, batches)
        out["numpy_batch_spec"] = str(jax.typeof(op_np.dataset.groups[0][0]).sharding.spec)
        out["numpy_batch_err"] = err(op_np @ v, ref_ops["hessian"] @ v0)
        out["t_core"] = time.perf_counter() - t0

    if FULL:
      with jax.set_mesh(mesh):
        out["hvp_fn_err"] = err(hvp.hvp(loss, params, v0, sharded[0]), hvp.hvp(loss, plain, v0, batches[0]))
        out["dense_err"] = float(np.max(np.abs(np.asarray(op.dense()) - ref_dense)))
        eb = hvp.eigsh(op, k=2, which="both", key=key)
        out["eigsh_both"] = float(np.max(np.abs(np.asarray(eb.eigenvalues) - np.asarray(ref["eigsh_both"].eigenvalues))))
        out["trace_exact"] = abs(float(hvp.trace(op, key=key, num_matvecs=n).estimate) - float(np.trace(ref_dense)))
        d = hvp.diagonal(op, key=key, num_matvecs=10)
        out["diag"] = dict(err=err(d.estimate, ref["diag"].estimate), spec=spec_ok(d.estimate, params))
        dx = hvp.diagonal(op, key=key, num_matvecs=n)
        out["diag_exact"] = float(np.max(np.abs(np.asarray(hvp.tree.ravel(dx.estimate)) - np.diag(ref_dense))))
        out["frob"] = abs(float(hvp.frobenius_norm(ops["ggn"], key=key, num_matvecs=10).estimate) - float(ref["frob"].estimate))
        pw = hvp.power_iteration(ops["ggn"], key=key, v0=raw, num_iters=30)  # NumPy start vector
        out["power"] = dict(err=abs(float(pw.eigenvalue) - float(ref["power"].eigenvalue)),
                            spec=spec_ok(pw.eigenvector, params))
        one_np = hvp.hessian(loss, params, (X[:5], y[:5]))  # 5 examples: replicated
        out["numpy_odd_spec"] = str(jax.typeof(one_np.dataset.groups[0][0]).sharding.spec)
        out["numpy_odd_err"] = err(one_np @ v, hvp.hessian(loss, plain, (X[:5], y[:5])) @ v0)

        # a model that pins its activations to a sharded example axis cannot run per example
        def pinned(p, b):
            h = jnp.tanh(b[0] @ p["w1"] + p["b1"])
            o = jnp.matmul(h, p["w2"], out_sharding=P("batch", None))
            return hvp.losses.softmax_cross_entropy(o, b[1])
        try:
            hvp.empirical_fisher(pinned, params, sharded)
            out["fisher_error"] = None
        except ValueError as exc:
            out["fisher_error"] = str(exc)

    # an NNX model created under the mesh, partitioned like miniGPT's nnx.with_partitioning
    class MLP(nnx.Module):
        def __init__(self, rngs, part):
            init = nnx.initializers.lecun_normal()
            self.l1 = nnx.Linear(6, 8, kernel_init=part(init, (None, "model")),
                                 bias_init=part(nnx.initializers.normal(0.5), ("model",)),
                                 param_dtype=jnp.float64, rngs=rngs)
            self.l2 = nnx.Linear(8, 3, kernel_init=part(init, ("model", None)),
                                 param_dtype=jnp.float64, rngs=rngs)
        def __call__(self, x):
            h = jnp.tanh(self.l1(x))
            return self.l2(h, out_sharding=follow_batch(h))

    plain_net = MLP(nnx.Rngs(0), lambda f, names: f)
    pp = hvp.flax.from_nnx(plain_net, "cross_entropy")
    r_nnx = np.asarray(hvp.eigsh(pp.hessian(batches), k=2, key=key).eigenvalues)
    with jax.set_mesh(mesh):
        net = MLP(nnx.Rngs(0), nnx.with_partitioning)
        problem = hvp.flax.from_nnx(net, "cross_entropy")
        out["nnx_param_types"] = jax.tree.map(lambda x: str(jax.typeof(x)), problem.params)
        e_nnx = hvp.eigsh(problem.hessian(batches), k=2, key=key)  # NumPy batches
        hv_nnx = problem.hessian(sharded) @ problem.params
        out["nnx_spec"] = spec_ok(e_nnx.eigenvectors, problem.params, 1) and spec_ok(hv_nnx, problem.params)
        out["nnx_err"] = float(np.max(np.abs(np.asarray(e_nnx.eigenvalues) - r_nnx)))
        out["nnx_hv_err"] = err(hv_nnx, pp.hessian(batches) @ pp.params)
        if FULL:
            out["nnx_ggn_err"] = err(problem.ggn(batches) @ problem.params, pp.ggn(batches) @ pp.params)
    out["t_nnx"] = time.perf_counter() - t0

    # without the mesh in context: a clear error, not an AssertionError from inside JAX
    try:
        hvp.hessian(loss, params, batches)
        out["no_mesh_error"] = None
    except RuntimeError as exc:
        out["no_mesh_error"] = str(exc)
    print("RESULT" + json.dumps(out))
    """
)


def _run(part: str) -> dict:
    return run_on_cpu_devices(SCRIPT, timeout=900, HVP_TEST_PART=part)


def _check_core(r: dict) -> None:
    # probes and products keep every leaf's sharding type and equal the unsharded ones
    assert r["probe_spec"] and r["probe_equal"] == 0.0, r
    assert r["dot_err"] < 1e-12, r["dot_err"]
    for kind, p in r["products"].items():
        assert p["err"] < 1e-12 and p["spec"], (kind, p)
    # eigsh: same eigenvalues as unsharded and as numpy.linalg.eigh; sharded eigenvectors
    e = r["eigsh"]
    assert e["converged"] and e["vec_spec"], e
    assert e["err_dense"] < 1e-9, e
    for method, d in r["trace"].items():
        assert d < 1e-9, (method, d)
    assert r["density"] < 1e-9
    # a NumPy batch is split over the mesh axis no parameter uses
    assert r["numpy_batch_spec"] == "P(None, 'batch', None)", r["numpy_batch_spec"]
    assert r["numpy_batch_err"] < 1e-12
    # NNX model built under the mesh with nnx.with_partitioning
    assert r["nnx_param_types"]["l1"]["kernel"] == "float64[6,8@model]", r["nnx_param_types"]
    assert r["nnx_spec"] and r["nnx_err"] < 1e-9 and r["nnx_hv_err"] < 1e-12, r
    # no mesh in context: a clear error naming the fix
    msg = r["no_mesh_error"]
    assert msg and "jax.set_mesh(mesh)" in msg and "Explicit" in msg, msg


def test_explicit_mesh_matches_unsharded():
    """Hessian products, eigsh, SLQ, NumPy batches and an NNX model on a 2x2 explicit mesh."""
    _check_core(_run("core"))


@pytest.mark.slow
def test_explicit_mesh_every_algorithm():
    """Also GGN/Fisher, hvp(), dense(), eigsh both ends, every trace method, diagonal, Frobenius, power."""
    r = _run("full")
    _check_core(r)
    assert r["hvp_fn_err"] < 1e-12 and r["dense_err"] < 1e-12
    assert r["eigsh_both"] < 1e-9 and r["eigsh_err_ref"] < 1e-9
    assert set(r["trace"]) == {"hutchinson", "hutch++", "xtrace"}
    assert r["trace_exact"] < 1e-10
    assert r["diag"]["err"] < 1e-12 and r["diag"]["spec"], r["diag"]
    assert r["diag_exact"] < 1e-12
    assert r["frob"] < 1e-10
    assert r["power"]["err"] < 1e-9 and r["power"]["spec"], r["power"]
    assert r["numpy_odd_spec"] == "P(None, None)" and r["numpy_odd_err"] < 1e-12, r
    assert r["nnx_ggn_err"] < 1e-12
    assert r["fisher_error"] and "one example" in r["fisher_error"]
    assert "hvp.ggn" in r["fisher_error"]


# --- one device: the helpers change nothing ------------------------------------------------------


def test_helpers_are_identity_without_explicit_mesh():
    like = {"a": jnp.ones((3, 2)), "b": jnp.ones(4)}
    new = {"a": jnp.arange(6.0).reshape(3, 2), "b": jnp.arange(4.0)}
    assert tu.explicit_sharding(like["a"]) is None
    assert tu.explicit_sharding(np.ones(3)) is None
    assert tu.like_sharding(new, like) is not None
    for x, y in zip(
        jax.tree_util.tree_leaves(tu.like_sharding(new, like)), jax.tree_util.tree_leaves(new)
    ):
        assert x is y
    stacked = tu.stack([new, new])
    for x, y in zip(
        jax.tree_util.tree_leaves(tu.stacked_like(stacked, like)),
        jax.tree_util.tree_leaves(stacked),
    ):
        assert x is y
    batch = (np.ones((4, 2)), np.zeros(4))
    assert tu.place_batch(batch, like) is batch
    tu.check_mesh_context(like)  # nothing to check


def test_contract_rows_matches_flattened_products():
    rs = np.random.RandomState(0)
    x, y = rs.randn(3, 4, 5), rs.randn(2, 4, 5)
    v = rs.randn(4, 5)
    np.testing.assert_allclose(
        tu.contract_rows(jnp.asarray(x), jnp.asarray(y), kind="gram"),
        x.reshape(3, -1) @ y.reshape(2, -1).T,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        tu.contract_rows(jnp.asarray(x), jnp.asarray(v)), x.reshape(3, -1) @ v.ravel(), rtol=1e-6
    )
    np.testing.assert_allclose(
        tu.contract_rows(jnp.asarray(x), jnp.asarray(x), kind="rowwise"),
        np.sum(x * x, axis=(1, 2)),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        tu.contract_rows(jnp.asarray(v), jnp.asarray(v), kind="dot"), np.sum(v * v), rtol=1e-6
    )
    with pytest.raises(ValueError, match="kind"):
        tu.contract_rows(jnp.asarray(v), jnp.asarray(v), kind="outer")


def test_place_batch_replicates_when_every_mesh_axis_holds_parameters():
    # A one-device Explicit mesh whose only axis shards the parameters leaves no axis for the
    # data: the batch is replicated on the mesh (an IndexError before), and a Hessian product
    # over it matches the unsharded one.
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    w = jax.device_put(jnp.arange(1.0, 3.0), NamedSharding(mesh, P("model")))
    x = np.arange(8.0).reshape(4, 2)
    placed = tu.place_batch({"x": x}, {"w": w})["x"]
    assert placed.sharding.mesh == mesh and placed.sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(placed), x)

    def loss(params, batch):
        return jnp.sum(jnp.tanh(batch["x"] @ params["w"]) ** 2)

    v = {"w": jnp.ones(2)}
    with jax.set_mesh(mesh):
        sharded = hvp.hessian(loss, {"w": w}, {"x": x}) @ v
    plain = hvp.hessian(loss, {"w": jnp.arange(1.0, 3.0)}, {"x": x}) @ v
    np.testing.assert_allclose(np.asarray(sharded["w"]), np.asarray(plain["w"]), rtol=1e-12)
