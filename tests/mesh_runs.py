"""Shared helper of the tests on several devices: run a script in a process with virtual CPU devices.

JAX fixes the device count when it starts its backend, so a test that needs a mesh runs its
script in a fresh Python process with ``--xla_force_host_platform_device_count`` (and the suite's
``--xla_backend_optimization_level=0``: faster compiles of tiny problems, IEEE semantics kept).
The script starts after :data:`PRELUDE` (``os``, ``json``, ``jax``, ``jnp``, ``np`` and ``hvp``
imported, float64 on) and prints one line ``RESULT <json>``; :func:`run_on_cpu_devices` returns
that JSON. :data:`MLP_SETUP` is the sharded two-layer network shared by several scripts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PRELUDE = textwrap.dedent(
    """
    import os, json
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import hvp

    assert jax.device_count() == int(os.environ["HVP_TEST_DEVICES"]), jax.devices()
    """
)

# A mesh of the 4 devices over one axis "d"; a tanh network {w1 (8, 16), b1 (16), w2 (16, 4)}
# sharded over it (`params`, and `plain` unsharded), softmax cross-entropy `loss(p, batch)` and
# `model(p, x)`, five batches of 8 examples (`batches`, and `sharded_batches` split over "d").
MLP_SETUP = textwrap.dedent(
    """
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("d",))
    rs = np.random.RandomState(0)
    raw = {"w1": rs.randn(8, 16), "b1": rs.randn(16), "w2": rs.randn(16, 4)}
    specs = {"w1": P(None, "d"), "b1": P("d"), "w2": P("d", None)}
    params = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in raw.items()}
    plain = {k: jnp.asarray(v) for k, v in raw.items()}

    def model(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]

    def loss(p, b):
        x, t = b
        return hvp.losses.softmax_cross_entropy(model(p, x), t)

    X, y = rs.randn(40, 8), rs.randint(0, 4, 40)
    batches = [(X[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]
    sharded_batches = [
        (jax.device_put(jnp.asarray(a), NamedSharding(mesh, P("d", None))),
         jax.device_put(jnp.asarray(b), NamedSharding(mesh, P("d"))))
        for a, b in batches
    ]
    """
)


def run_on_cpu_devices(script: str, *, timeout: float, devices: int = 4, **env_extra: str) -> dict:
    """Run :data:`PRELUDE` + ``script`` with ``devices`` CPU devices; return its ``RESULT`` JSON.

    Asserts exit status 0 (the message ends with the script's stderr). ``env_extra`` is added to
    the environment (e.g. ``HVP_TEST_PART="full"``); ``hvp`` is imported from this checkout.
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", HVP_TEST_DEVICES=str(devices), **env_extra)
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    )
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])
