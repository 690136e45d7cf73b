"""CurvatureMonitor: eigenvalues vs dense eigh, schedule, files, warm start, Flax integration."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hvp
import hvp.flax
from hvp import tree as tu
from hvp.monitor import CurvatureMonitor, MonitorError, MonitorRecord, MonitorWarning, read_history

# A tiny tanh MLP 4-5-3 with cross-entropy on fixed random data (n = 43), shared by the tests
# so that the operator, Lanczos and the trace estimator compile once for the whole file.
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(32, 4)))
Y = jnp.asarray(_rng.integers(0, 3, size=32))
PARAMS0 = {
    "l0": {"w": jnp.asarray(_rng.normal(size=(4, 5))), "b": jnp.asarray(0.1 * _rng.normal(size=5))},
    "l1": {"w": jnp.asarray(_rng.normal(size=(5, 3))), "b": jnp.zeros(3)},
}
BATCH = (X, Y)


def model(p, x):
    return jnp.tanh(x @ p["l0"]["w"] + p["l0"]["b"]) @ p["l1"]["w"] + p["l1"]["b"]


def loss_fn(p, batch):
    return hvp.losses.softmax_cross_entropy(model(p, batch[0]), batch[1])


_unravel = tu.unravel_fn(PARAMS0)
_dense_hessian = jax.jit(jax.hessian(lambda f: loss_fn(_unravel(f), BATCH)))


def dense_hessian(p):
    return np.asarray(_dense_hessian(tu.ravel(p)))


def _train(lr, num_steps, monitor=None, *, fail_at=None, keep=()):
    """Plain SGD with a jitted step; the monitor is called after every step."""
    opt = optax.sgd(lr)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p, BATCH)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    params, state = PARAMS0, opt.init(PARAMS0)
    kept = {}
    for i in range(num_steps):
        params, state = step(params, state)
        if i in keep:
            kept[i] = params
        if fail_at is not None and i == fail_at:
            raise RuntimeError("simulated crash")
        if monitor is not None:
            monitor(i, params)
    return params, kept


def _monitor(**kw):
    kw.setdefault("tol", 1e-8)
    kw.setdefault("k", 2)  # one Lanczos compilation for the whole file
    kw.setdefault("key", jax.random.key(0))
    return CurvatureMonitor.from_loss(loss_fn, BATCH, **kw)


def test_monitor_matches_dense_eigh_on_schedule_with_callback():
    seen = []
    mon = _monitor(
        every=3, trace_matvecs=30, learning_rate=0.5, callback=seen.append, key=jax.random.key(1)
    )
    _, kept = _train(0.5, 10, mon, keep=(0, 3, 6, 9))
    assert [r.step for r in mon.history] == [0, 3, 6, 9]
    assert seen == mon.history and all(isinstance(r, MonitorRecord) for r in seen)
    for r in mon.history:
        evals = np.linalg.eigvalsh(dense_hessian(kept[r.step]))
        np.testing.assert_allclose(r.eigenvalues, evals[::-1][:2], rtol=1e-8, atol=1e-10)
        assert np.all(r.converged) and np.all(r.residuals < 1e-6)
        assert abs(r.trace - evals.sum()) < 4 * r.trace_std_error
        assert r.trace_matvecs == 30 and r.num_matvecs == r.eig_matvecs + 30
        assert r.lr_threshold == pytest.approx(4.0) and r.seconds > 0
    # off-schedule steps and repeated calls return None
    assert mon(10, PARAMS0) is None and mon(9, PARAMS0) is None
    assert mon.steps_recorded().tolist() == [0, 3, 6, 9]
    np.testing.assert_allclose(mon.sharpness(), [r.eigenvalues[0] for r in mon.history])
    # explicit steps (density steps: tests/monitor/test_example_monitor.py)
    mon2 = _monitor(steps=[1, 4], trace=False)
    _train(0.5, 6, mon2)
    assert [r.step for r in mon2.history] == [1, 4] and mon2.history[0].trace is None
    assert mon2.history[0].negative_mass is None and mon2.densities == {}


def test_files_survive_a_crash_and_plot(tmp_path):
    out = tmp_path / "run"
    mon = _monitor(every=3, output_dir=out, learning_rate=0.5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _train(0.5, 10, mon, fail_at=7)
    lines = (out / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3  # steps 0, 3, 6 were written before the crash
    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs] == [0, 3, 6]
    np.testing.assert_allclose(
        [r["eigenvalues"] for r in recs], [r.eigenvalues for r in mon.history]
    )
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    np.testing.assert_allclose([float(r["eigenvalue_1"]) for r in rows], mon.sharpness())
    assert float(rows[0]["trace"]) == pytest.approx(mon.history[0].trace)
    png = mon.plot()
    data = open(png, "rb").read()
    assert png.endswith("sharpness.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # a new monitor in the same folder starts a fresh history
    mon2 = _monitor(every=100, output_dir=out)
    mon2(0, PARAMS0)
    assert len((out / "history.jsonl").read_text().splitlines()) == 1


def test_warm_start_saves_matvecs_and_cost_accounting():
    warm = _monitor(every=1, trace=False, measure_cold_start=True)
    cold = _monitor(every=1, trace=False, warm_start=False)
    _train(0.02, 6, warm)  # slow training: the top eigenvector barely moves
    _train(0.02, 6, cold)
    w = sum(r.eig_matvecs for r in warm.history)
    c = sum(r.eig_matvecs for r in cold.history)
    assert w < c, (w, c)
    np.testing.assert_allclose(warm.sharpness(), cold.sharpness(), rtol=1e-8)
    s = warm.summary(total_train_seconds=warm.seconds * 4)
    assert s.cold_eig_matvecs == c and s.eig_matvecs == w
    assert s.warm_start_savings == pytest.approx(1 - w / c) and s.warm_start_savings > 0
    assert s.overhead == pytest.approx(0.25) and warm.overhead(warm.seconds * 2) == pytest.approx(
        0.5
    )
    assert s.num_evaluations == 6 and s.final_sharpness == warm.history[-1].sharpness
    assert json.loads(s.to_json())["eig_matvecs"] == w
    assert cold.summary().warm_start_savings is None


def test_flax_params_extraction_and_linen_trainstate():
    # NNX: the model object and nnx.state(model, nnx.Param) give the adapter's parameter dict
    # (a full NNX training run with `monitor(step, model)` is tests/monitor/test_example_monitor.py).
    import flax.linen as nn
    from flax import nnx
    from flax.training import train_state

    from hvp.monitor import extract_params

    net = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    problem = hvp.flax.from_nnx(net, "cross_entropy")
    for obj in (net, nnx.state(net, nnx.Param)):
        got = extract_params(obj)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(problem.params)
        np.testing.assert_array_equal(got["kernel"], problem.params["kernel"])

    class LNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, param_dtype=jnp.float64)(
                jnp.tanh(nn.Dense(5, param_dtype=jnp.float64)(x))
            )

    module = LNet()
    variables = module.init(jax.random.key(0), X)
    state = train_state.TrainState.create(
        apply_fn=module.apply, params=variables["params"], tx=optax.sgd(0.1)
    )
    lproblem = hvp.flax.from_linen(module, variables, "cross_entropy")
    lmon = CurvatureMonitor.from_flax(
        lproblem, BATCH, every=1, k=2, tol=1e-8, trace=False, key=jax.random.key(0)
    )
    r1 = lmon(0, state)
    r2 = lmon(1, state.params)
    flat, unravel = tu.ravel(lproblem.params), tu.unravel_fn(lproblem.params)
    dense = jax.hessian(lambda f: lproblem.loss_fn(unravel(f), BATCH))(flat)
    ref = np.linalg.eigvalsh(np.asarray(dense))[::-1][:2]
    np.testing.assert_allclose(r1.eigenvalues, ref, rtol=1e-8)
    np.testing.assert_allclose(r2.eigenvalues, ref, rtol=1e-8)


def test_monitor_errors(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="monitor output_dir"):
        _monitor(output_dir=tmp_path / "file")  # at construction, not after an evaluation
    with pytest.raises(ValueError, match="every"):
        _monitor(every=0)
    with pytest.raises(ValueError, match="`k`"):
        _monitor(k=0)
    with pytest.raises(ValueError, match="kind"):
        CurvatureMonitor.from_loss(loss_fn, BATCH, kind="ggn")
    with pytest.raises(TypeError, match="operator_fn"):
        CurvatureMonitor(42, key=jax.random.key(0))
    # the key is required, as by every algorithm (it defaulted to key 0 before)
    with pytest.raises(TypeError, match="key"):
        CurvatureMonitor.from_loss(loss_fn, BATCH, every=1)
    mon = _monitor(every=1, trace=False)
    with pytest.raises(ValueError, match="Pass a path"):
        mon.plot()
    with pytest.raises(ValueError, match="no records"):
        mon.plot("never-written.png")
    mon(0, PARAMS0)
    with pytest.raises(MonitorError, match="step 1 failed while reading the parameters") as info:
        mon(1, {"l0": PARAMS0["l0"]})
    assert isinstance(info.value.__cause__, ValueError)
    assert "same pytree structure" in str(info.value)
    with pytest.raises(ValueError, match="on_error"):
        _monitor(on_error="ignore")


def test_bad_key_and_numbers_are_refused_at_construction():
    # before: key=0 was accepted, then every evaluation failed naming the learning rate
    from hvp.flax import from_nnx

    for bad in (0, np.int64(3), "0"):
        with pytest.raises(TypeError, match=r"`key` must be a JAX PRNG key.*jax\.random\.key"):
            _monitor(every=1, key=bad)
        with pytest.raises(TypeError, match=r"`key` must be a JAX PRNG key"):
            CurvatureMonitor(lambda p: None, key=bad)
    with pytest.raises(ValueError, match="single PRNG key"):
        _monitor(key=jax.random.split(jax.random.key(0), 2))
    for kw, err, msg in [
        ({"tol": float("inf")}, ValueError, "`tol` must be a finite number"),
        ({"tol": float("nan")}, ValueError, "`tol` must be a finite number"),
        ({"tol": "1e-4"}, TypeError, "`tol` must be a number"),
        ({"every": 2.0}, TypeError, "`every` must be an int"),
        ({"k": True}, TypeError, "`k` must be an int"),
        ({"num_iters": 1}, ValueError, "`num_iters` must be at least 2"),
        ({"max_restarts": -1}, ValueError, "`max_restarts` must be at least 0"),
        ({"trace_matvecs": 1}, ValueError, "`trace_matvecs` must be at least 2"),
        ({"trace_method": "hutch+"}, ValueError, "Unknown `trace_method`"),
        ({"density_probes": 0}, ValueError, "`density_probes` must be at least 1"),
        ({"density_iters": 1.5}, TypeError, "`density_iters` must be an int"),
        ({"steps": [1, 2.5]}, TypeError, "`steps` must be an int"),
        ({"density_steps": [-1]}, ValueError, "`density_steps` must be at least 0"),
        (
            {"learning_rate": float("inf")},
            ValueError,
            "`learning_rate` must be a finite number > 0",
        ),
        ({"learning_rate": 0.0}, ValueError, "`learning_rate` must be a finite number > 0"),
    ]:
        with pytest.raises(err, match=msg):
            _monitor(**kw)
    # from_flax checks through the same constructor
    from flax import nnx

    problem = from_nnx(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), hvp.losses.softmax_cross_entropy)
    with pytest.raises(TypeError, match="`key` must be a JAX PRNG key"):
        CurvatureMonitor.from_flax(problem, BATCH, every=1, key=0)
    with pytest.raises(ValueError, match="`tol` must be a finite number"):
        CurvatureMonitor.from_flax(problem, BATCH, every=1, tol=float("inf"), key=jax.random.key(0))
    # trace options are not checked when the trace is off; a raw key is a key
    assert _monitor(trace=False, trace_matvecs=1, key=jax.random.PRNGKey(0)).trace_matvecs == 1


# --------------------------------------------------------------------------------------------
# issue 18 "Monitor": optax schedules, errors that do not stop training silently, plot scale
# --------------------------------------------------------------------------------------------
def rsqrt_schedule(init_value: float, shift: int = 0):
    """The Linen lm1b example's schedule (train.py), verbatim."""

    def schedule(count):
        return init_value * (count + shift) ** -0.5 * shift**0.5

    return schedule


def create_learning_rate_schedule(learning_rate: float, warmup_steps: int):
    return optax.join_schedules(
        [
            optax.linear_schedule(
                init_value=0, end_value=learning_rate, transition_steps=warmup_steps
            ),
            rsqrt_schedule(init_value=learning_rate, shift=warmup_steps),
        ],
        boundaries=[warmup_steps],
    )


def test_lm1b_schedule_is_called_as_optax_does():
    schedule = create_learning_rate_schedule(0.4, warmup_steps=3)
    with pytest.raises(ZeroDivisionError):
        schedule(0)  # what calling it with a Python int did at step 0
    mon = _monitor(every=2, trace=False, learning_rate=schedule)
    _train(0.1, 6, mon)
    assert [r.step for r in mon.history] == [0, 2, 4]
    assert mon.history[0].lr_threshold is None  # lr = 0 during the first warm-up step
    for r in mon.history[1:]:
        lr = float(schedule(jnp.asarray(r.step, jnp.int32)))
        assert lr > 0 and r.lr_threshold == pytest.approx(2.0 / lr)


def test_errors_name_step_and_part_and_warn_mode_keeps_training(tmp_path):
    # default: a clear error naming the step and the part that failed, cause chained
    def bad_callback(record):
        raise KeyError("wandb run not initialised")

    mon = _monitor(every=1, trace=False, callback=bad_callback)
    with pytest.raises(MonitorError, match="step 0 failed while running the callback.*wandb"):
        mon(0, PARAMS0)
    assert len(mon.history) == 1  # the evaluation itself was recorded
    # a diverged run (NaN parameters): with on_error="warn" training goes on
    mon = _monitor(every=1, trace=False, on_error="warn", output_dir=tmp_path)
    nan_params = tu.map(lambda a: a * jnp.nan, PARAMS0)
    assert mon(0, PARAMS0) is not None
    with pytest.warns(MonitorWarning, match="step 1 failed while building the curvature operator"):
        assert mon(1, nan_params) is None
    assert mon(2, PARAMS0) is not None
    assert [r.step for r in mon.history] == [0, 2]
    assert [s for s, _ in mon.failures] == [1] and "NaN" in mon.failures[0][1]
    # history files: append-only lines; a partial last line (a crash mid-write) is skipped
    path = tmp_path / "history.jsonl"
    assert [r["step"] for r in read_history(path)] == [0, 2]
    with open(path, "a") as f:
        f.write('{"step": 3, "eigenval')
    assert [r["step"] for r in read_history(path)] == [0, 2]
    with pytest.raises(MonitorError, match="learning rate"):
        _monitor(every=1, trace=False, learning_rate=lambda s: 1 / 0)(0, PARAMS0)


def test_plot_scales_to_measurements_with_adam_learning_rate(tmp_path):
    from hvp.monitor._plot import sharpness_axis

    # Adam, lr = 1e-3: 2/lr = 2000 far above sharpness ~ 1-3: axis from the data, line hidden
    (lo, hi), shown = sharpness_axis([[1.0, 0.5], [3.0, 2.0]], [2000.0, 2000.0])
    assert not shown and 0 < hi < 4 and lo < 0.5
    # a threshold near the data is drawn and included in the axis
    (lo, hi), shown = sharpness_axis([1.0, 3.0], [3.5])
    assert shown and hi > 3.5
    # warm-up: 2/lr falls from far away into range: drawn, axis not stretched to the far part
    (lo, hi), shown = sharpness_axis([1.0, 3.0], [3000.0, 4.0, 3.2])
    assert shown and 4.0 < hi < 6
    mon = _monitor(every=3, trace=True, learning_rate=1e-3)
    _train(1e-3, 4, mon)
    png = mon.plot(tmp_path / "adam.png")
    assert open(png, "rb").read()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["adam.png"]  # no temporary file left


def test_from_loss_given_a_model_with_state_warns_once():
    import warnings

    from flax.training import train_state

    class BNState(train_state.TrainState):  # as in the Linen ImageNet example
        batch_stats: dict

    state = BNState.create(
        apply_fn=None, params=PARAMS0, tx=optax.sgd(0.1), batch_stats={"mean": jnp.zeros(3)}
    )
    mon = _monitor(every=1, trace=False)
    with pytest.warns(hvp.flax.StaleStateWarning, match=r"batch_stats.*from_flax"):
        mon(0, state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        mon(1, state)
    assert [r.step for r in mon.history] == [0, 1]
