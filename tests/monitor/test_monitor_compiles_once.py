"""A monitored training loop compiles at its first evaluation only.

The monitor builds a new curvature operator at every evaluation (new parameters and, for a Flax
model with BatchNorm, new statistics). Those are arguments of the compiled products, so later
evaluations with the same shapes must not compile anything: before the fix, the operator of a
model with non-parameter state was validated at every evaluation by building it on a problem
that closed over the new statistics, which compiled (and ran) its linearisation again each time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hvp.flax as hf
from hvp.monitor import CurvatureMonitor

F64 = jnp.float64


class _BatchNormMLP(nnx.Module):
    def __init__(self, rngs):
        kw = {"param_dtype": F64, "dtype": F64, "rngs": rngs}
        self.l1 = nnx.Linear(3, 4, **kw)
        self.bn = nnx.BatchNorm(4, **kw)
        self.bn.mean = nnx.BatchStat(jnp.zeros(4, F64))
        self.bn.var = nnx.BatchStat(jnp.ones(4, F64))
        self.l2 = nnx.Linear(4, 2, **kw)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


def test_later_evaluations_compile_nothing():
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is None:
        pytest.skip("this JAX cannot unregister a monitoring listener")
    rs = np.random.RandomState(0)
    probe = (jnp.asarray(rs.randn(8, 3)), jnp.asarray(rs.randint(0, 2, 8)))
    model = _BatchNormMLP(nnx.Rngs(0))
    model.eval()  # the curvature is taken with the statistics fixed
    problem = hf.from_nnx(model, "cross_entropy")
    monitor = CurvatureMonitor.from_flax(
        problem, probe, every=1, k=1, trace_matvecs=4, warm_start=False, key=jax.random.key(0)
    )
    compiles = []

    def listen(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    counts = []
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        for step in range(5):
            if step == 3:  # then warm-started from the previous eigenvector (the default)
                monitor.warm_start = True
            # a training step: new parameters and new batch statistics (same shapes)
            nnx.update(model, jax.tree_util.tree_map(lambda a: a * 1.05, nnx.state(model)))
            before = len(compiles)
            record = monitor(step, model)
            counts.append(len(compiles) - before)
            assert record is not None and record.trace is not None
    finally:
        unregister(listen)
    assert monitor.failures == []
    assert counts[0] > 0
    # the 2nd and 3rd evaluations compile nothing; the first warm-started one (step 3) may
    # compile eigsh's preparation of the start vector, once
    assert counts[1:3] == [0, 0] and counts[4] == 0, counts
