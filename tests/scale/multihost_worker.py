"""One process of the multi-process test (``test_multihost.py``); also the single-process reference.

Usage: ``python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json DTYPE``.

Each process has 2 virtual CPU devices (``XLA_FLAGS`` set by the caller); with 2 processes the
global mesh has 4 devices, ``("batch", "model") = (2, 2)``, the batch axis across the processes.
Every process reads only its own half of every batch (``jax.make_array_from_process_local_data``)
and the parameters are sharded over the ``"model"`` axis of the global mesh. With one process the
same data and parameters are plain (unsharded) arrays: the reference. Process 0 writes the results
as JSON.
"""

from __future__ import annotations

import json
import os
import sys

import jax


def main() -> None:
    pid, nproc, port, out_path, dtype_name = (
        int(sys.argv[1]),
        int(sys.argv[2]),
        sys.argv[3],
        sys.argv[4],
        sys.argv[5],
    )
    jax.config.update("jax_enable_x64", True)
    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{port}",
            num_processes=nproc,
            process_id=pid,
            initialization_timeout=60,
        )

    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import hvp

    dtype = jnp.dtype(dtype_name)
    rs = np.random.RandomState(0)
    D_IN, D_H, D_OUT, N_EX, N_BATCH = 6, 8, 4, 16, 2
    raw = {
        "w1": rs.randn(D_IN, D_H) / np.sqrt(D_IN),
        "b1": 0.1 * rs.randn(D_H),
        "w2": rs.randn(D_H, D_OUT) / np.sqrt(D_H),
    }
    raw = {k: v.astype(dtype) for k, v in raw.items()}
    X = rs.randn(N_BATCH, N_EX, D_IN).astype(dtype)
    Y = rs.randint(0, D_OUT, (N_BATCH, N_EX)).astype(np.int32)

    def loss(p, batch):
        x, t = batch
        return hvp.losses.softmax_cross_entropy(jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"], t)

    if nproc > 1:
        assert jax.process_count() == nproc and jax.device_count() == 2 * nproc
        # Auto axis types: XLA chooses the shardings of the intermediates (the model's code is
        # unchanged; explicit meshes are covered on one process by test_explicit_sharding.py).
        mesh = jax.make_mesh(
            (nproc, 2), ("batch", "model"), devices=jax.devices(), axis_types=(AxisType.Auto,) * 2
        )
        specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}
        params = {
            k: jax.make_array_from_callback(
                v.shape, NamedSharding(mesh, specs[k]), lambda idx, v=v: v[idx]
            )
            for k, v in raw.items()
        }
        per = N_EX // nproc  # this process's own rows of every batch
        mine = slice(pid * per, (pid + 1) * per)
        batches = [
            (
                jax.make_array_from_process_local_data(
                    NamedSharding(mesh, P("batch", None)), X[b, mine]
                ),
                jax.make_array_from_process_local_data(NamedSharding(mesh, P("batch")), Y[b, mine]),
            )
            for b in range(N_BATCH)
        ]
        assert not params["w1"].is_fully_addressable and not batches[0][0].is_fully_addressable
    else:
        params = {k: jnp.asarray(v) for k, v in raw.items()}
        batches = [(jnp.asarray(X[b]), jnp.asarray(Y[b])) for b in range(N_BATCH)]

    H = hvp.hessian(loss, params, batches)
    key = jax.random.key(0)

    def host(x):
        """A global array as NumPy on every process (gathered through JAX's collectives)."""
        from jax.experimental import multihost_utils

        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(x, dtype=np.float64)

    def flat(tree):
        return np.concatenate([host(tree[k]).reshape(-1) for k in sorted(tree)])

    def rows(block, m):
        return [flat({k: v[i] for k, v in block.items()}) for i in range(m)]

    out = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    v = hvp.tree.rademacher_like(jax.random.key(1), params)
    out["hv"] = flat(H @ v).tolist()
    for which in ("both",):
        r = hvp.eigsh(H, 2, which=which, key=key, tol=1e-5 if dtype == jnp.float32 else 1e-8)
        vecs = rows(r.eigenvectors, len(r.eigenvalues))
        out[f"eigsh_{which}"] = {
            "eigenvalues": host(r.eigenvalues).tolist(),
            "eigenvectors": [x.tolist() for x in vecs],
            "converged": np.asarray(r.converged).tolist(),
            "num_matvecs": r.num_matvecs,
        }
    t = hvp.trace(H, key=key, num_matvecs=12)
    out["trace"] = {"estimate": float(t.estimate), "std_error": float(t.std_error)}
    t = hvp.trace(H, key=key, method="hutch++", num_matvecs=12)
    out["trace_hutchpp"] = float(t.estimate)
    d = hvp.diagonal(H, key=key, num_matvecs=8, progress=True)  # shown by process 0 only
    out["diagonal"] = flat(d.estimate).tolist()
    s = hvp.spectral_density(H, key=key, num_probes=2, num_iters=10)
    out["density_nodes"] = host(s.nodes).tolist()
    out["density_weights"] = host(s.weights).tolist()
    try:  # a state spanning several processes cannot be saved to one file: refused early
        hvp.trace(
            H, key=key, num_matvecs=2, checkpoint=os.path.join(os.path.dirname(out_path), "c.npz")
        )
        out["checkpoint_refused"] = nproc == 1
    except ValueError as err:
        out["checkpoint_refused"] = "multi-host" in str(err)
    if pid == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)
    print("worker", pid, "done", flush=True)


if __name__ == "__main__":  # not on import (pytest --doctest-modules imports every module)
    main()
