"""Streamed data sets (issue 13, items 1-3): equal to the in-memory operators, one pass per block.

The streamed operator reads its data set again on every product; these tests check it against
the in-memory operator (float64, 1e-12) and against dense float64 references, count the passes
each algorithm makes with an instrumented loader, bound the batches on the device, and check the
determinism check, the automatic choice and the errors.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mesh_runs import run_on_cpu_devices
from problems import build, make_operator, reference, relative_error

import hvp
from hvp.operators import _data

KEY = jax.random.key(0)


class CountingLoader:
    """A loader whose ``__iter__`` starts over; counts the passes (fresh iterators)."""

    def __init__(self, batches, *, change_on_pass=None, change=None):
        self.batches = [jax.tree_util.tree_map(np.asarray, b) for b in batches]
        self.passes = 0
        self.change_on_pass = change_on_pass
        self.change = change

    def __iter__(self):
        self.passes += 1
        batches = self.batches
        if self.change_on_pass is not None and self.passes >= self.change_on_pass:
            batches = self.change(batches)
        return iter(batches)


def _shuffled(batches):
    rng = np.random.default_rng(7)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    perm = rng.permutation(len(x))
    x, y = x[perm], y[perm]
    out, start = [], 0
    for b in batches:
        n = len(b[0])
        out.append((x[start : start + n], y[start : start + n]))
        start += n
    return out


def _rel(a, b):
    return relative_error(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# equality with the in-memory operators and the dense references
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kind",
    [
        ("nested", "hessian"),
        ("linear_regression", "ggn"),
        ("linear_regression", "empirical_fisher"),
    ],
)
def test_streamed_operator_equals_in_memory(name, kind):
    # mixed-shape pytree parameters (nested), 3 equal batches + a ragged last one (13 examples)
    prob = build(name)
    mem = make_operator(prob, kind)
    loader = CountingLoader(prob.batches)
    st = make_operator(prob, kind, data=loader, stream=True)
    assert st.streaming and not mem.streaming and isinstance(st, hvp.operators.CurvatureOperator)
    assert (st.num_examples, st.num_batches) == (mem.num_examples, mem.num_batches)
    dense = np.asarray(st.dense())
    assert _rel(dense, mem.dense()) < 1e-12
    assert _rel(dense, reference(name, kind)) < 1e-10
    v = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), prob.params)
    assert _rel(hvp.tree.ravel(st.mv(v)), hvp.tree.ravel(mem.mv(v))) < 1e-12
    assert loader.passes == 3  # the building pass, dense() (one block of n columns), mv
    if kind == "ggn":  # block="map": single products on each row, still one pass per block
        st_map = make_operator(prob, kind, data=loader, stream=True, block="map")
        assert st_map.block_mode() == "map"
        assert _rel(st_map.dense(), dense) < 1e-12 and loader.passes == 5


def test_weighted_batches_and_array_batches_on_npy_files(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(11, 3)), rng.normal(size=(11, 2))
    w = rng.uniform(0.0, 2.0, size=11)
    w[4] = 0.0  # a masked example
    for arr, nm in ((x, "x"), (y, "y"), (w, "w")):
        np.save(tmp_path / f"{nm}.npy", arr)
    files = tuple(str(tmp_path / f"{nm}.npy") for nm in ("x", "y", "w"))
    params = {"w": 0.3 * rng.normal(size=(3, 2)), "b": np.zeros(2)}

    def model(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    loss = hvp.operators.compose(model, hvp.losses.mean_squared_error)
    source = hvp.operators.ArrayBatches(files, batch_size=4)  # 4, 4, 3: ragged
    in_memory = list(source)
    assert isinstance(in_memory[0][0], np.memmap)
    for build_op in (
        lambda d, **k: hvp.hessian(loss, params, d, **k),
        lambda d, **k: hvp.ggn(model, hvp.losses.mean_squared_error, params, d, **k),
        lambda d, **k: hvp.empirical_fisher(loss, params, d, **k),
    ):
        st, mem = build_op(source, stream=True), build_op(in_memory, stream=False)
        assert st.streaming and st.dataset.weighted
        assert _rel(st.dense(), mem.dense()) < 1e-12
    # the weighted Hessian equals the one of the whole data set as one weighted batch
    whole = hvp.hessian(loss, params, (x, y, w))
    assert _rel(hvp.hessian(loss, params, source, stream=True).dense(), whole.dense()) < 1e-12
    # reduction="sum": every batch has weight 1
    st = hvp.hessian(loss, params, source, stream=True, reduction="sum")
    assert _rel(st.dense(), hvp.hessian(loss, params, in_memory, reduction="sum").dense()) < 1e-12


@pytest.mark.slow  # the streamed runs are checked against dense references in the pass-count test
def test_algorithms_on_a_streamed_operator_equal_in_memory():
    prob = build("quadratic")  # n = 12, indefinite
    mem = make_operator(prob, "hessian")
    st = make_operator(prob, "hessian", data=CountingLoader(prob.batches), stream=True)
    e1, e2 = (hvp.eigsh(op, 2, key=KEY, num_iters=11) for op in (mem, st))
    np.testing.assert_allclose(e2.eigenvalues, e1.eigenvalues, rtol=1e-10, atol=1e-12)
    assert bool(np.all(e2.converged)) and e2.num_matvecs == e1.num_matvecs
    ref = np.linalg.eigvalsh(reference("quadratic", "hessian"))
    np.testing.assert_allclose(np.asarray(e2.eigenvalues), ref[-2:], rtol=1e-8)
    t1, t2 = (hvp.trace(op, key=KEY, num_matvecs=9, method="hutch++") for op in (mem, st))
    assert (
        abs(float(t2.estimate) - np.trace(reference("quadratic", "hessian")))
        < 4 * float(t2.std_error) + 1e-8
    )
    np.testing.assert_allclose(float(t2.estimate), float(t1.estimate), rtol=1e-12)
    d1, d2 = (hvp.spectral_density(op, key=KEY, num_probes=2, num_iters=4) for op in (mem, st))
    np.testing.assert_allclose(d2.nodes, d1.nodes, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d2.weights, d1.weights, rtol=1e-10, atol=1e-12)
    g1, g2 = (hvp.diagonal(op, key=KEY, num_matvecs=4) for op in (mem, st))
    assert _rel(hvp.tree.ravel(g2.estimate), hvp.tree.ravel(g1.estimate)) < 1e-12


# ------------------------------------------------------------------------------------------------
# one data pass per block of vectors
# ------------------------------------------------------------------------------------------------
def test_one_pass_per_block_of_vectors():
    prob = build("quadratic")  # n = 12 > every budget below (no exact-trace shortcut)
    loader = CountingLoader(prob.batches)
    op = make_operator(prob, "hessian", data=loader, stream=True)

    def passes(call):
        before = loader.passes
        out = call()
        return loader.passes - before, out

    dense = reference("quadratic", "hessian")
    p, res = passes(lambda: hvp.trace(op, key=KEY, num_matvecs=9, method="hutch++"))
    assert p <= 3
    assert abs(float(res.estimate) - np.trace(dense)) < 4 * float(res.std_error) + 1e-8
    p, _ = passes(lambda: hvp.trace(op, key=KEY, num_matvecs=8, method="xtrace"))
    assert p <= 2
    p, _ = passes(lambda: hvp.trace(op, key=KEY, num_matvecs=8, method="hutchinson"))
    assert p == 1  # one probe block
    p, _ = passes(lambda: hvp.trace(op, key=KEY, num_matvecs=8, chunk_size=4))
    assert p == 2  # one pass per probe block of 4
    p, _ = passes(lambda: hvp.diagonal(op, key=KEY, num_matvecs=8, chunk_size=4))
    assert p == 2
    p, _ = passes(lambda: hvp.spectral_density(op, key=KEY, num_probes=4, num_iters=5))
    assert p == 5  # 4 probes in lockstep: one pass per Lanczos step, not 4
    p, res = passes(lambda: hvp.eigsh(op, 1, key=KEY, num_iters=10))
    assert p == res.num_matvecs  # single-vector Lanczos: one pass per product
    assert bool(np.all(res.converged))
    np.testing.assert_allclose(res.eigenvalues[0], np.linalg.eigvalsh(dense)[-1], rtol=1e-8)


# ------------------------------------------------------------------------------------------------
# device memory: at most prefetch + 1 batches
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_at_most_prefetch_plus_one_batches_on_the_device(monkeypatch, prefetch):
    prob = build("linear_regression")
    batches = prob.batches * 2  # 8 batches
    op = make_operator(prob, "ggn", data=CountingLoader(batches), stream=True, prefetch=prefetch)
    created, peak = [], [0]
    put = _data.put_batch

    def counting_put(batch, params):
        out, made = put(batch, params)
        created.append(made)
        live = sum(any(not x.is_deleted() for x in m) for m in created)
        peak[0] = max(peak[0], live)
        return out, made

    monkeypatch.setattr(_data, "put_batch", counting_put)
    v = jax.tree_util.tree_map(jnp.ones_like, prob.params)
    out = op.mv(v)
    assert len(created) == len(batches)
    assert peak[0] == min(prefetch + 1, len(batches))
    assert all(x.is_deleted() for m in created for x in m)  # nothing left on the device
    mem = make_operator(prob, "ggn", data=batches)
    assert _rel(hvp.tree.ravel(out), hvp.tree.ravel(mem.mv(v))) < 1e-12


# ------------------------------------------------------------------------------------------------
# determinism check
# ------------------------------------------------------------------------------------------------
def test_a_loader_that_shuffles_or_augments_raises():
    prob = build("linear_regression")
    v = jax.tree_util.tree_map(jnp.ones_like, prob.params)
    shuffling = CountingLoader(prob.batches, change_on_pass=2, change=_shuffled)
    op = make_operator(prob, "ggn", data=shuffling, stream=True)
    with pytest.raises(hvp.operators.NonDeterministicDataError, match="shuffl") as info:
        op.mv(v)
    assert "batch 0 differs" in str(info.value) and "dropout" in str(info.value).lower()

    def augment(batches):  # noise on the last batch only
        return batches[:-1] + [(batches[-1][0] + 1e-3, batches[-1][1])]

    noisy = CountingLoader(prob.batches, change_on_pass=3, change=augment)
    op = make_operator(prob, "ggn", data=noisy, stream=True)
    op.mv(v)  # pass 2 is still the same data
    with pytest.raises(hvp.operators.NonDeterministicDataError, match="batch 3 differs"):
        op.mv(v)
    # a callable that returns the same (exhausted) iterator every time
    it = iter(prob.batches)
    op = make_operator(prob, "ggn", data=lambda: it, stream=True)
    with pytest.raises(hvp.operators.NonDeterministicDataError, match="FRESH iterator"):
        op.mv(v)


# ------------------------------------------------------------------------------------------------
# the automatic choice and the errors
# ------------------------------------------------------------------------------------------------
def test_auto_choice_follows_the_memory_rule():
    prob = build("linear_regression")
    nbytes = sum(_data.batch_nbytes(b) for b in prob.batches)
    loss = prob.loss_fn

    def kind(data, **kw):
        return hvp.hessian(loss, prob.params, data, linearize=False, **kw).streaming

    assert _data.default_stream_budget() == _data.DEFAULT_STREAM_BUDGET  # CPU: fixed 2 GiB
    assert not kind(prob.batches)  # small: in memory
    assert kind(prob.batches, stream_budget=nbytes - 1)
    assert not kind(prob.batches, stream_budget=nbytes)
    loader = CountingLoader(prob.batches)
    assert kind(loader, stream_budget=nbytes - 1) and not kind(loader, stream_budget=nbytes)
    assert not kind(lambda: iter(prob.batches))  # a callable of small data: kept
    assert not kind(iter(prob.batches), stream_budget=0)  # a generator: read once and kept
    assert kind(prob.batches, stream=True, stream_budget=10**12)  # overrides
    assert not kind(loader, stream=False, stream_budget=0)


def test_clear_errors():
    prob = build("linear_regression")
    v = jax.tree_util.tree_map(jnp.ones_like, prob.params)
    with pytest.raises(TypeError, match="pass a callable returning a fresh iterator"):
        make_operator(prob, "ggn", data=(b for b in prob.batches), stream=True)
    with pytest.raises(TypeError, match="one batch"):
        make_operator(prob, "ggn", data=prob.batches[0], stream=True)
    with pytest.raises(ValueError, match="`stream` must be"):
        make_operator(prob, "ggn", stream="yes")
    with pytest.raises(ValueError, match="`prefetch` must be"):
        make_operator(prob, "ggn", stream=True, prefetch=-1)
    with pytest.raises(ValueError, match="linearize=True"):
        make_operator(prob, "hessian", stream=True, linearize=True)
    with pytest.raises(ValueError, match="empty"):
        make_operator(prob, "ggn", data=lambda: iter([]), stream=True)
    op = make_operator(prob, "ggn", stream=True)
    with pytest.raises(ValueError, match="driver='host'"):
        hvp.trace(op, key=KEY, num_matvecs=3, driver="compiled")
    with pytest.raises(ValueError, match="driver='host'"):
        jax.jit(op.mv)(v)
    with pytest.raises(ValueError, match="cannot run inside jax.jit"):
        jax.jit(lambda k: hvp.trace(op, key=k, num_matvecs=3).estimate)(KEY)


MESH_SCRIPT = textwrap.dedent(
    """
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from hvp.operators import _data

    mesh = jax.make_mesh((2, 2), ("batch", "model"), axis_types=(AxisType.Explicit,) * 2)
    rs = np.random.RandomState(0)
    raw = {"w1": rs.randn(6, 8) / 2, "b1": rs.randn(8) / 2}
    specs = {"w1": P(None, "model"), "b1": P("model")}
    params = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in raw.items()}

    def loss(p, b):
        h = jnp.tanh(b[0] @ p["w1"] + p["b1"])
        return jnp.mean((jnp.sum(h, axis=1) - b[1]) ** 2)

    X, y = rs.randn(14, 6), rs.randn(14)
    batches = [(X[:4], y[:4]), (X[4:8], y[4:8]), (X[8:12], y[8:12]), (X[12:], y[12:])]
    specs_seen = []
    put = _data.put_batch

    def record(batch, params):
        out, made = put(batch, params)
        specs_seen.append(list(out[0].sharding.spec))
        return out, made

    _data.put_batch = record
    with jax.set_mesh(mesh):
        st = hvp.hessian(loss, params, batches, stream=True)
        mem = hvp.hessian(loss, params, batches, stream=False, linearize=False)
        a, b = np.asarray(st.dense()), np.asarray(mem.dense())
        v = st.mv(jax.tree_util.tree_map(jnp.ones_like, params))
    print("RESULT" + json.dumps({
        "rel": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "specs": specs_seen,
        "out_specs": [list(v[k].sharding.spec) for k in ("b1", "w1")],
    }))
    """
)


def test_streamed_batches_split_over_the_data_axis_of_an_explicit_mesh():
    out = run_on_cpu_devices(MESH_SCRIPT, timeout=300)
    assert out["rel"] < 1e-12
    # batches of 4 examples: the example axis over 'batch'; the ragged batch of 2 as well
    # (the building pass puts nothing on the device; dense() and mv read 4 batches each)
    assert out["specs"] == [["batch"]] * 8
    assert out["out_specs"] == [["model"], [None, "model"]]


def test_one_compiled_program_per_batch_shape_and_block_size():
    from hvp.operators._curvature import _stream_step

    x = np.random.default_rng(1).normal(size=(23, 3))  # 5 batches of 4 and a ragged one of 3
    data = hvp.operators.ArrayBatches((x, np.zeros(23)), batch_size=4)

    def loss(p, b):  # a fresh function: nothing compiled for it yet
        return jnp.mean(jnp.sin(b[0] @ p) ** 2)

    op = hvp.hessian(loss, jnp.ones(3), data, stream=True)
    size = _stream_step._cache_size()
    op.mv(jnp.ones(3))
    op.mv(jnp.zeros(3))
    assert _stream_step._cache_size() - size == 2  # batches of 4, and the ragged last batch
    op.matmat(jnp.eye(3))
    op.matmat(2 * jnp.eye(3))
    assert _stream_step._cache_size() - size == 4  # the same for a block of 3
    assert _rel(op.dense(), hvp.hessian(loss, jnp.ones(3), list(data)).dense()) < 1e-12
    # an operator at other parameters over the same streamed data set: no new building pass
    passes = op.dataset.passes
    op2 = hvp.hessian(loss, 2 * jnp.ones(3), op.dataset)
    assert op2.streaming and op2.dataset is op.dataset and op.dataset.passes == passes
    assert _rel(op2.dense(), hvp.hessian(loss, 2 * jnp.ones(3), list(data)).dense()) < 1e-12
    assert _stream_step._cache_size() - size == 4  # dense() and op2 reuse the compiled programs


def test_checkpoint_resume_on_a_streamed_operator(tmp_path):
    from tests.linalg.driver_checks import assert_resume_bitwise

    prob = build("quadratic")
    op = make_operator(prob, "hessian", data=CountingLoader(prob.batches), stream=True)
    assert_resume_bitwise(
        lambda **kw: hvp.spectral_density(op, key=KEY, num_probes=4, num_iters=5, **kw),
        tmp_path,
    )
