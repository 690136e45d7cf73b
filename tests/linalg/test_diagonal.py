"""Diagonal estimation (Bekas, Kokiopoulou & Saad 2007) and per-leaf block traces.

Statistical rules (fixed keys, deterministic):

* Per-entry calibration: each entry of ``(estimate - diag) / std_error`` is
  approximately standard normal; over n = 120 entries we require at least 88 %
  within 2 (expected 95.4 %; the entries share probes, so the fraction is
  noisier than a binomial) and all within 5.
* Over keys, the entry-wise standard deviation of the estimates divided by the
  root-mean-square standard error must be in [0.8, 1.25] at the median entry
  (30 keys: about 13 % sampling error per entry, the median is much tighter).
* Error ~ 1/sqrt(m): the log-log slope of the RMS error against m must be in
  [-0.65, -0.35].
* Leaf traces: over 40 keys, all within 4 standard errors and at most 6 of the
  40 x 3 = 120 (leaf, key) pairs outside 2 (Binomial(120, 0.0455) has mean 5.5;
  the leaves of one key are correlated, so the check is per leaf: at most 6 of 40).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hvp
from hvp import tree as tu
from hvp.linalg import DiagonalResult, LeafTraces, diagonal, trace
from tests.linalg.driver_checks import assert_drivers_agree, assert_resume_bitwise

LIKE = {
    "layer0": {"w": jnp.zeros((8, 6)), "b": jnp.zeros((6,))},
    "layer1": {"w": jnp.zeros((6, 11))},
}
N = tu.size(LIKE)  # 48 + 6 + 66 = 120


def _matrix(n, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    a = (q * rng.normal(size=n)) @ q.T
    return a + np.diag(rng.uniform(-1.0, 1.0, n))  # a non-trivial diagonal


A = _matrix(N, 0)
OP = hvp.from_dense(A, like=LIKE)
DIAG = np.diag(A)


def _flat(tree):
    return np.asarray(tu.ravel(tree))


def test_entries_calibrated_single_key():
    res = diagonal(OP, key=jax.random.key(0), num_matvecs=100)
    z = (_flat(res.estimate) - DIAG) / _flat(res.std_error)
    assert np.mean(np.abs(z) <= 2) >= 0.88 and np.all(np.abs(z) <= 5)
    # per-entry variance theory: Var((z * Az)_i) = sum_{j != i} A_ij^2
    se_theory = np.sqrt((np.sum(A**2, axis=1) - DIAG**2) / 100)
    ratio = _flat(res.std_error) / se_theory
    assert 0.75 <= np.median(ratio) <= 1.25


def test_standard_error_matches_spread_and_rate():
    ests = {
        m: np.stack(
            [_flat(diagonal(OP, key=jax.random.key(k), num_matvecs=m).estimate) for k in range(30)]
        )
        for m in (8, 32)
    }
    res = [diagonal(OP, key=jax.random.key(k), num_matvecs=100) for k in range(30)]
    est = np.stack([_flat(r.estimate) for r in res])
    se = np.stack([_flat(r.std_error) for r in res])
    ratio = np.std(est - DIAG, axis=0) / np.sqrt(np.mean(se**2, axis=0))
    assert 0.8 <= np.median(ratio) <= 1.25, np.median(ratio)
    ests[100] = est
    budgets = np.array(sorted(ests))
    rmse = [np.sqrt(np.mean((ests[m] - DIAG) ** 2)) for m in budgets]
    slope = np.polyfit(np.log(budgets), np.log(rmse), 1)[0]
    assert -0.65 <= slope <= -0.35, slope


def test_leaf_traces_calibrated_and_consistent():
    paths = tu.leaf_paths(LIKE)
    sizes = [int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(LIKE)]
    offsets = np.cumsum([0] + sizes)
    truth = {p: DIAG[offsets[i] : offsets[i + 1]].sum() for i, p in enumerate(paths)}
    outside = {p: 0 for p in paths}
    for k in range(40):
        res = diagonal(OP, key=jax.random.key(k), num_matvecs=60)
        lt = res.sum_by_leaf()
        assert isinstance(lt, LeafTraces)
        for p, e, s, leaf in zip(
            paths,
            jax.tree_util.tree_leaves(lt.estimate),
            jax.tree_util.tree_leaves(lt.std_error),
            jax.tree_util.tree_leaves(res.estimate),
        ):
            np.testing.assert_allclose(float(e), float(jnp.sum(leaf)), rtol=1e-10, atol=1e-12)
            z = (float(e) - truth[p]) / float(s)
            assert abs(z) <= 4.0, (p, k, z)
            outside[p] += abs(z) > 2
    assert max(outside.values()) <= 6, outside


def test_sum_by_groups_and_trace():
    res = diagonal(OP, key=jax.random.key(3), num_matvecs=60)
    per_layer = res.sum_by(lambda path: path.split("/")[0])
    assert list(per_layer.estimate) == ["layer0", "layer1"]
    leaves = res.sum_by_leaf().estimate
    np.testing.assert_allclose(
        float(per_layer.estimate["layer0"]),
        float(leaves["layer0"]["w"] + leaves["layer0"]["b"]),
        rtol=1e-12,
    )
    # the group's standard error comes from per-probe sums, not from adding the leaves' errors
    s = res.leaf_samples
    both = s["layer0"]["w"] + s["layer0"]["b"]
    np.testing.assert_allclose(
        float(per_layer.std_error["layer0"]), float(jnp.std(both, ddof=1) / np.sqrt(60)), rtol=1e-10
    )
    # trace() is Hutchinson with the same probes as hvp.linalg.trace
    t = res.trace()
    ref = trace(OP, key=jax.random.key(3), num_matvecs=60)
    np.testing.assert_allclose(float(t.estimate), float(ref.estimate), rtol=1e-10)
    np.testing.assert_allclose(float(t.std_error), float(ref.std_error), rtol=1e-8)
    lo, hi = per_layer.confidence_interval(0.9)
    assert float(lo["layer1"]) < float(per_layer.estimate["layer1"]) < float(hi["layer1"])
    d = res.sum_by_leaf().to_dict()
    assert set(d["estimate"]["layer0"]) == {"w", "b"} and isinstance(
        d["std_error"]["layer1"]["w"], float
    )


def test_exact_mode_and_chunking():
    res = diagonal(OP, key=jax.random.key(0), num_matvecs=N, chunk_size=50)
    assert isinstance(res, DiagonalResult) and res.method == "exact" and res.num_matvecs == N
    np.testing.assert_allclose(_flat(res.estimate), DIAG, rtol=1e-12, atol=1e-12)
    assert np.all(_flat(res.std_error) == 0)
    lt = res.sum_by_leaf()
    np.testing.assert_allclose(float(lt.estimate["layer1"]["w"]), DIAG[54:].sum(), rtol=1e-12)
    assert float(lt.std_error["layer1"]["w"]) == 0.0
    np.testing.assert_allclose(float(res.trace().estimate), np.trace(A), rtol=1e-12)
    # chunking (blocks of 8 + 2 vs 12 + 2, Chan's update) does not change the result
    a = diagonal(OP, key=jax.random.key(5), num_matvecs=50)
    b = diagonal(OP, key=jax.random.key(5), num_matvecs=50, chunk_size=12)
    c = diagonal(OP, key=jax.random.key(5), num_matvecs=50)
    np.testing.assert_allclose(_flat(b.estimate), _flat(a.estimate), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(_flat(b.std_error), _flat(a.std_error), rtol=1e-8)
    for x, y in zip(
        jax.tree_util.tree_leaves(b.leaf_samples), jax.tree_util.tree_leaves(a.leaf_samples)
    ):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(_flat(a.estimate), _flat(c.estimate))
    one = diagonal(OP, key=jax.random.key(5), num_matvecs=1)
    assert np.all(np.isinf(_flat(one.std_error)))


def test_mlp_hessian_diagonal():
    from problems import operator, reference

    h = operator("mlp", "hessian")
    ref = np.diag(reference("mlp", "hessian"))
    res = diagonal(h, key=jax.random.key(0), num_matvecs=100, chunk_size=50)
    z = (_flat(res.estimate) - ref) / _flat(res.std_error)
    z = z[np.isfinite(z)]
    assert np.mean(np.abs(z) <= 2) >= 0.85 and np.all(np.abs(z) <= 6)
    # per-layer traces from the same probes
    lt = res.sum_by(lambda p: p.split("/")[0])
    assert set(lt.estimate) == {"dense0", "dense1"}
    total = sum(float(v) for v in lt.estimate.values())
    np.testing.assert_allclose(total, float(res.trace().estimate), rtol=1e-10)


def test_errors():
    with pytest.raises(ValueError, match="at least 1"):
        diagonal(OP, key=jax.random.key(0), num_matvecs=0)
    with pytest.raises(TypeError, match="PRNG key"):
        diagonal(OP, key=3)
    with pytest.raises(ValueError, match="chunk_size"):
        diagonal(OP, key=jax.random.key(0), chunk_size=-2)
    with pytest.raises(TypeError, match="like="):
        diagonal(lambda v: v, key=jax.random.key(0))
    with pytest.raises(hvp.NonFiniteError):
        diagonal(
            hvp.from_matvec(lambda v: v / 0.0, jnp.zeros(5)), key=jax.random.key(0), num_matvecs=3
        )
    with pytest.raises(TypeError, match="function"):
        diagonal(OP, key=jax.random.key(0), num_matvecs=4).sum_by("layer")


# ------------------------------------------------------------------------------------------------
# drivers (issue 11): compiled == host, resume bit for bit, chunking, jit / vmap, progress
# ------------------------------------------------------------------------------------------------
def test_drivers_agree_and_resume_bitwise(tmp_path):
    key = jax.random.key(7)
    # 50 probes in steps of 12: four full blocks and a remainder block of 2 (two phases); the
    # same settings as test_exact_mode_and_chunking, so the host steps are compiled once
    call = lambda **kw: diagonal(OP, key=key, num_matvecs=50, chunk_size=12, **kw)  # noqa: E731
    host, comp = assert_drivers_agree(call, rtol=1e-12, atol=1e-14)
    assert host.num_matvecs == comp.num_matvecs == 50 and type(host.num_matvecs) is int
    ref, resumed = assert_resume_bitwise(call, tmp_path, interrupt_after=2)
    np.testing.assert_array_equal(_flat(ref.std_error), _flat(resumed.std_error))
    # the exact path: 120 unit vectors in steps of 50, 50, 20 (the compiled exact path is
    # checked against the dense truth in test_estimator_policies.py::test_every_estimator_under_jit)
    exact = lambda **kw: diagonal(OP, key=key, num_matvecs=N, chunk_size=50, **kw)  # noqa: E731
    ref, _ = assert_resume_bitwise(exact, tmp_path, interrupt_after=1)
    np.testing.assert_array_equal(_flat(ref.estimate), DIAG)  # each entry written once: exact


def test_jit_vmap_over_keys():
    """The compiled driver inside the user's jit(vmap(...)) equals the host driver key by key."""
    keys = jnp.stack([jax.random.key(7), jax.random.key(8)])
    call = jax.jit(jax.vmap(lambda k: diagonal(OP, key=k, num_matvecs=50, chunk_size=12)))
    batched = call(keys)
    assert batched.num_matvecs == 50 and batched.method == "hutchinson"  # static, a Python int
    for i in range(2):
        one = diagonal(OP, key=keys[i], num_matvecs=50, chunk_size=12, driver="host")
        row = jax.tree_util.tree_map(lambda x, i=i: x[i], batched)
        np.testing.assert_allclose(_flat(row.estimate), _flat(one.estimate), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(_flat(row.std_error), _flat(one.std_error), rtol=1e-10)
    with pytest.raises(ValueError, match="host driver"):
        diagonal(OP, key=keys[0], num_matvecs=50, driver="compiled", progress=True)
    with pytest.raises(ValueError, match="driver"):
        diagonal(OP, key=keys[0], num_matvecs=50, driver="gpu")


def test_progress_figure():
    from hvp.linalg import _driver
    from hvp.linalg._diagonal import Diagonal, _initial_state

    key = jax.random.key(0)
    res = diagonal(OP, key=key, num_matvecs=50, chunk_size=12, progress=True)
    assert res.num_matvecs == 50
    # the figure shown: RMS std_error over RMS estimate, kept in the state (a scalar)
    alg = Diagonal(total=50, chunk=12)
    se, est = _flat(res.std_error), _flat(res.estimate)
    state = _initial_state(OP.like, key, 50, exact=False)
    for phase in (0, 0, 0, 0, 1):  # the machine's own steps, as a driver runs them
        vs = alg.prepare(OP, state, phase)
        state = alg.update(OP, state, phase, vs, _driver.block_product(OP, vs))
    assert bool(state["done"])
    p = alg.progress(jax.device_get(state))
    assert p.matvecs == 50 and p.total == 50
    want = np.sqrt(np.mean(se**2)) / np.sqrt(np.mean(est**2))
    np.testing.assert_allclose(float(state["rel_se"]), want, rtol=1e-10)
    assert f"{want:.2e}" in p.text
    assert alg.block_sizes == (12, 2)
