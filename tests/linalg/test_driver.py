"""The two drivers of hvp.linalg (compiled while_loop / host loop), checkpoints and progress.

Checked with power_iteration (the reference conversion) and a small three-phase state machine
written here (a block of 3 products chunked by 2, a phase without products, a single product;
a bfloat16 and a weakly typed state entry), against a NumPy float64 re-implementation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from driver_checks import assert_drivers_agree, assert_resume_bitwise
from mesh_runs import run_on_cpu_devices

import hvp
from hvp.linalg import Checkpoint, CheckpointMismatchError, Progress, _driver
from hvp.linalg._driver import StateMachine, run

N = 12


def _slow_matrix(n=N, ratio=0.97, seed=0):
    """Symmetric, top eigenvalue 1, second ``ratio``: power iteration converges slowly."""
    q, _ = np.linalg.qr(np.random.RandomState(seed).randn(n, n))
    eigs = np.concatenate([[1.0, ratio], np.linspace(-0.5, 0.5, n - 2)])
    return (q * eigs) @ q.T


A = _slow_matrix()
OP = hvp.from_dense(jnp.asarray(A))
KEY = jax.random.key(0)


def _power(op=OP, key=KEY, tol=1e-9, num_iters=60, **kw):
    return hvp.power_iteration(op, key=key, tol=tol, num_iters=num_iters, **kw)


# ------------------------------------------------------------------------------------------------
# a custom state machine: phases of block size 3 (chunked by 2), 0 (no product) and 1
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ThreePhase(StateMachine):
    rounds: int = 4
    chunk: int | None = 2

    name: ClassVar[str] = "three_phase_test"
    progress_keys: ClassVar[tuple[str, ...]] = ("matvecs", "acc")

    @property
    def block_sizes(self):
        return (3, 0, 1)

    @property
    def chunk_size(self):
        return self.chunk

    def prepare(self, op, state, phase):
        x = state["x"]
        if phase == 0:
            return jnp.stack([x, 2.0 * x, x + state["scale"]])
        if phase == 1:
            return None
        return x[None]

    def update(self, op, state, phase, vs, avs):
        if phase == 0:
            acc = state["acc"] + jnp.sum(vs * avs)
            x = avs[0] / jnp.linalg.norm(avs[0])
            return dict(
                state,
                x=x,
                acc=acc,
                h=x.astype(jnp.bfloat16),
                matvecs=state["matvecs"] + 3,
                phase=jnp.int32(1),
            )
        if phase == 1:
            x = state["x"] * state["scale"] + state["h"].astype(state["x"].dtype)
            return dict(state, x=x, round=state["round"] + 1, phase=jnp.int32(2))
        acc = state["acc"] + vs[0] @ avs[0]
        done = state["round"] >= self.rounds
        return dict(state, acc=acc, matvecs=state["matvecs"] + 1, phase=jnp.int32(0), done=done)

    def finalize(self, op, state):
        return dict(acc=state["acc"], x=state["x"], matvecs=state["matvecs"])

    def progress(self, state):
        assert set(state) == {"matvecs", "acc"}  # only the declared entries reach the host
        return Progress(int(state["matvecs"]), 4 * self.rounds, f"acc {float(state['acc']):.4g}")


def _three_state(x0):
    return dict(
        x=jnp.asarray(x0, jnp.float64),
        h=jnp.asarray(x0, jnp.bfloat16),
        scale=jnp.asarray(0.5),  # weakly typed: a resumed state keeps it weak
        acc=jnp.zeros((), jnp.float64),
        round=jnp.zeros((), jnp.int32),
        matvecs=jnp.zeros((), jnp.int32),
        phase=jnp.zeros((), jnp.int32),
        done=jnp.array(False),
    )


X0 = np.linspace(-1.0, 1.0, N)


def _three(alg=ThreePhase(), x0=X0, op=OP, **kw):
    out, _ = run(alg, op, _three_state(x0), **kw)
    return out


def _three_reference(a, x0, rounds):
    """The same algorithm in NumPy float64 (bfloat16 rounding of h emulated with jnp)."""
    x, acc = np.asarray(x0, np.float64), 0.0
    h = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float64))
    r = 0
    while True:
        vs = np.stack([x, 2 * x, x + 0.5])
        avs = vs @ a
        acc += np.sum(vs * avs)
        x = avs[0] / np.linalg.norm(avs[0])
        h = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float64))
        x = x * 0.5 + h
        r += 1
        acc += x @ a @ x
        if r >= rounds:
            return acc, x, 4 * rounds


def test_custom_machine_matches_numpy_and_drivers_agree(monkeypatch):
    dims = []
    matmat = hvp.operators.LinearOperator.matmat

    def logged(self, vs):
        leaf = jax.tree_util.tree_leaves(vs)[0]
        if not isinstance(leaf, jax.core.Tracer):  # the host driver's products
            dims.append(leaf.shape[0])
        return matmat(self, vs)

    monkeypatch.setattr(hvp.operators.LinearOperator, "matmat", logged)
    host, comp = assert_drivers_agree(_three, rtol=1e-13, atol=1e-13)
    assert dims == [2, 1, 1] * 4  # host: the block of 3 in chunks of 2 and 1, then 1 product
    acc, x, nmv = _three_reference(A, X0, rounds=4)
    np.testing.assert_allclose(float(host["acc"]), acc, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(host["x"]), x, rtol=1e-12, atol=1e-14)
    assert int(host["matvecs"]) == int(comp["matvecs"]) == nmv == 16


def test_custom_machine_resumes_bitwise_in_every_phase(tmp_path):
    # interrupted after 2, 3 and 5 products: inside the chunked block, after a round, later
    for after in (2, 3, 5):
        assert_resume_bitwise(_three, tmp_path, interrupt_after=after)
        # a checkpoint every 2 steps: the step after the last periodic save is redone
        assert_resume_bitwise(_three, tmp_path, interrupt_after=after, every=2)


@dataclasses.dataclass(frozen=True)
class Forward(StateMachine):
    """``prepare`` returns a state entry as is (the host driver donates the state to update)."""

    block_sizes = (2,)

    def prepare(self, op, state, phase):
        return state["vs"]

    def update(self, op, state, phase, vs, avs):
        m = state["matvecs"] + 2
        return dict(state, vs=avs / jnp.linalg.norm(avs), matvecs=m, done=m >= 12)

    def finalize(self, op, state):
        return state["vs"]


def test_donated_state_never_deletes_a_callers_array(tmp_path):
    import warnings

    v0 = jnp.asarray(np.random.RandomState(1).randn(2, N))
    state = dict(vs=v0, phase=jnp.int32(0), done=jnp.array(False), matvecs=jnp.int32(0))

    def call(**kw):
        return run(Forward(), OP, state, **kw)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Some donated buffers were not usable"
        host, _ = assert_drivers_agree(call, rtol=1e-13)
        assert_resume_bitwise(call, tmp_path, interrupt_after=3)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(state))
    ref = np.linalg.matrix_power(A, 6) @ np.asarray(v0).T
    np.testing.assert_allclose(np.asarray(host), (ref / np.linalg.norm(ref)).T, rtol=1e-12)


def test_consumed_state_donates_only_what_nothing_else_holds():
    """``run(consume=True)`` donates the state's private arrays (no second initial state for the
    run) and copies the arrays a caller or the operator still holds, or that appear twice."""
    users = jnp.asarray(np.random.RandomState(2).randn(2, N))
    twice = jnp.ones((2,))
    op_array = jax.tree_util.tree_leaves(OP)[0]
    state = dict(vs=jnp.asarray(np.random.RandomState(3).randn(2, N)), mine=users)
    state.update(a=twice, b=twice, op=op_array)
    owned = _driver._own(state, keep_private=True)
    assert owned["vs"] is state["vs"]  # held by the state alone: donated as is
    for name in ("mine", "a", "b", "op"):  # a caller's, twice, the operator's: copies
        assert owned[name] is not state[name]
    copied = _driver._own(state, keep_private=False)  # run(consume=False): every array copied
    assert copied["vs"] is not state["vs"]
    host = dict(vs=jnp.asarray(np.random.RandomState(5).randn(2, N)))
    view = np.asarray(host["vs"])  # a live host view of the buffer (it holds the array)
    assert _driver._own(host, keep_private=True)["vs"] is not host["vs"]
    del view
    # End to end: the algorithms consume their own states, never a user's start vector.
    v0 = jnp.asarray(np.random.RandomState(4).randn(N))
    for basis in ("device", "none"):
        r = hvp.eigsh(OP, 1, v0=v0, basis=basis, key=jax.random.key(0))
        assert not v0.is_deleted()
        np.testing.assert_allclose(float(r.eigenvalues[0]), np.linalg.eigvalsh(A)[-1], rtol=1e-6)


def test_power_drivers_agree_and_resume(tmp_path):
    host, comp = assert_drivers_agree(_power, rtol=1e-12)
    assert isinstance(host.num_matvecs, int) and host.num_matvecs == int(comp.num_matvecs)
    assert 10 < host.num_matvecs <= 60
    top = np.linalg.eigvalsh(A)[-1]
    np.testing.assert_allclose(float(host.eigenvalue), top, rtol=1e-4)  # 60 steps, ratio 0.97
    assert_resume_bitwise(_power, tmp_path, interrupt_after=7)


# ------------------------------------------------------------------------------------------------
# checkpoint files
# ------------------------------------------------------------------------------------------------
def _interrupted(call, path, after=3, every=1):
    """Run ``call`` with a checkpoint until ``after`` block products, then KeyboardInterrupt."""
    orig, n = _driver.block_product, {"calls": 0}

    def flaky(*args, **kwargs):
        n["calls"] += 1
        if n["calls"] > after:
            raise KeyboardInterrupt
        return orig(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(_driver, "block_product", flaky)
    try:
        with pytest.raises(KeyboardInterrupt):
            call(checkpoint=Checkpoint(path, every=every))
    finally:
        mp.undo()
    assert path.exists()


def test_checkpoint_of_another_run_is_refused(tmp_path, capsys):
    path = tmp_path / "eig.npz"
    _interrupted(lambda **kw: _power(**kw), path)
    assert "interrupted after 3 steps" in capsys.readouterr().err
    saved = path.read_bytes()
    other_a = A.copy()
    other_a[0, 0] += 1e-13  # a tiny change of one operator entry is detected
    cases = [
        (dict(key=jax.random.key(1)), "another key"),
        (dict(tol=1e-8), r"'tol' differ"),
        (dict(num_iters=61), r"'max_matvecs' differ"),
        (dict(key=None, v0=jnp.ones(N)), r"another key"),
        (dict(op=hvp.from_dense(jnp.asarray(other_a))), "another operator"),
    ]
    for kw, match in cases:
        with pytest.raises(CheckpointMismatchError, match=match):
            _power(checkpoint=path, **kw)
        assert path.read_bytes() == saved  # a refused file is left as it was
    with pytest.raises(CheckpointMismatchError, match="is of 'power_iteration', not 'three_phase"):
        _three(checkpoint=path)
    # settings of the machine itself (its dataclass fields) and the state's layout
    p3 = tmp_path / "three.npz"
    _interrupted(lambda **kw: _three(**kw), p3)
    with pytest.raises(CheckpointMismatchError, match="other settings"):
        _three(ThreePhase(rounds=5), checkpoint=p3)
    with pytest.raises(CheckpointMismatchError, match="'x' differ"):
        _three(x0=X0 + 1.0, checkpoint=p3)
    with pytest.raises(CheckpointMismatchError, match="another structure"):
        _three(x0=np.ones(N + 1), op=hvp.from_dense(jnp.eye(N + 1)), checkpoint=p3)
    # the same run resumes (bitwise equality: test_custom_machine_resumes_bitwise_in_every_phase)
    _three(checkpoint=p3)
    assert not p3.exists()


def test_killed_run_resumes_from_the_last_periodic_save(tmp_path, monkeypatch):
    """A killed process saves nothing more: the file holds the last periodic save (here after 6
    steps of a run with every=3, copied while the run went on), and resuming from it equals the
    uninterrupted run bit for bit (test_resume_after_sigterm_and_sigkill kills a real process)."""
    path, snapshot = tmp_path / "eig.npz", tmp_path / "snapshot"
    orig, n = _driver.block_product, {"calls": 0}

    def snapshotting(*args, **kwargs):
        n["calls"] += 1
        if n["calls"] == 8:  # steps 1-7 done: the file is the save after step 6
            snapshot.write_bytes(path.read_bytes())
        return orig(*args, **kwargs)

    monkeypatch.setattr(_driver, "block_product", snapshotting)
    ref = _power(checkpoint=Checkpoint(path, every=3))
    monkeypatch.setattr(_driver, "block_product", orig)
    assert not path.exists()
    path.write_bytes(snapshot.read_bytes())
    with np.load(path) as data:
        assert json.loads(str(data["__meta__"]))["steps"] == 6
    out = _power(checkpoint=path)
    assert out.num_matvecs == ref.num_matvecs > 10
    for x, y in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_corrupt_or_foreign_file_raises_a_clear_error(tmp_path):
    path = tmp_path / "eig.npz"
    _interrupted(lambda **kw: _power(**kw), path)
    good = path.read_bytes()
    for content in (good[: len(good) // 2], b"not a checkpoint", b""):
        path.write_bytes(content)
        with pytest.raises(CheckpointMismatchError, match="truncated, corrupt or not an hvp"):
            _power(checkpoint=path)
    np.savez(path, x=np.ones(3))  # an .npz of something else
    with pytest.raises(CheckpointMismatchError, match="Cannot read the checkpoint"):
        _power(checkpoint=path)


def test_save_is_atomic_when_interrupted_while_writing(tmp_path, monkeypatch):
    """An interrupt in the middle of writing leaves the previous complete file (and no
    temporary file); resuming from it gives the uninterrupted result bit for bit."""
    path = tmp_path / "eig.npz"
    ref = _power(driver="host")
    real_open, saves = _driver.atomic_open, {"n": 0}

    class Breaking:  # the file of the 4th save: interrupted after its first chunk of bytes
        def __init__(self, f):
            self.f, self.chunks = f, 0

        def write(self, data):
            self.chunks += 1
            if saves["n"] == 4 and self.chunks == 2:
                raise KeyboardInterrupt
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    import contextlib

    @contextlib.contextmanager
    def breaking_open(p, mode):
        saves["n"] += 1
        with real_open(p, mode) as f:
            yield Breaking(f)

    monkeypatch.setattr(_driver, "atomic_open", breaking_open)
    with pytest.raises(KeyboardInterrupt):
        _power(checkpoint=Checkpoint(path, every=1))
    # the 4th save was cut and the save on interrupt (the 5th) then succeeded: 4 steps kept
    assert saves["n"] == 5
    assert sorted(os.listdir(tmp_path)) == ["eig.npz"]
    (tmp_path / ".eig.npz.abc123.tmp").write_bytes(b"left by a killed save")
    with np.load(path) as data:
        assert json.loads(str(data["__meta__"]))["steps"] == 4
    monkeypatch.setattr(_driver, "atomic_open", real_open)
    out = _power(checkpoint=path)
    assert os.listdir(tmp_path) == []  # the file and the stale temporary file are gone
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restored_state_keeps_dtypes_weak_types_and_keys(tmp_path):
    path = tmp_path / "three.npz"
    _interrupted(lambda **kw: _three(**kw), path, after=4)
    init = _three_state(X0)
    fp = _driver._fingerprint(ThreePhase(), OP, init)
    state, steps = _driver._load(path, init, fp)
    assert steps == 6  # 2 rounds of 3 steps (block, no product, 1 product); the 5th call stopped
    assert state["h"].dtype == jnp.bfloat16 and state["scale"].weak_type
    assert not state["acc"].weak_type and state["phase"].dtype == jnp.int32
    # typed PRNG keys in a state round-trip (checkpoint of a machine that keeps its key)
    key_state = dict(init, key=jax.random.key(7))
    _driver._save(path, key_state, _driver._fingerprint(ThreePhase(), OP, key_state), 1)
    back, _ = _driver._load(path, key_state, _driver._fingerprint(ThreePhase(), OP, key_state))
    assert jax.random.key_impl(back["key"]) == jax.random.key_impl(key_state["key"])
    np.testing.assert_array_equal(
        jax.random.key_data(back["key"]), jax.random.key_data(key_state["key"])
    )


def test_checkpoint_path_checked_before_any_product(tmp_path, monkeypatch):
    def no_products(*a, **k):
        raise AssertionError("a product ran")

    monkeypatch.setattr(_driver, "block_product", no_products)
    with pytest.raises(FileNotFoundError, match="does not exist: create"):
        _power(checkpoint=tmp_path / "missing" / "eig.npz")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        _power(checkpoint=tmp_path)
    with pytest.raises(TypeError, match="file path or hvp.linalg.Checkpoint"):
        _power(checkpoint=3)
    with pytest.raises(ValueError, match="at least 1"):
        Checkpoint(tmp_path / "x.npz", every=0)


# ------------------------------------------------------------------------------------------------
# driver choice and validation
# ------------------------------------------------------------------------------------------------
def test_driver_validation(tmp_path):
    with pytest.raises(ValueError, match="must be one of"):
        _power(driver="gpu")
    with pytest.raises(ValueError, match="checkpoint=` cannot be used with driver='compiled'"):
        _power(driver="compiled", checkpoint=tmp_path / "a.npz")
    with pytest.raises(ValueError, match="progress=True` cannot be used with driver='compiled'"):
        _power(driver="compiled", progress=True)
    with pytest.raises(TypeError, match="True, False or None"):
        _power(progress="yes")

    with pytest.raises(ValueError, match="cannot run inside jax.jit"):
        jax.jit(lambda k: _power(key=k, driver="host").eigenvalue)(KEY)
    with pytest.raises(ValueError, match="checkpoint=` cannot be used inside jax.jit"):
        jax.jit(lambda k: _power(key=k, checkpoint=tmp_path / "a.npz").eigenvalue)(KEY)
    with pytest.raises(ValueError, match="progress=True` cannot be used inside jax.jit"):
        jax.jit(lambda k: _power(key=k, progress=True).eigenvalue)(KEY)
    with pytest.raises(ValueError, match="lacks the entries"):
        run(ThreePhase(), OP, {"x": jnp.ones(N)})


# ------------------------------------------------------------------------------------------------
# progress display
# ------------------------------------------------------------------------------------------------
def test_progress_plain_lines_when_stderr_is_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(_driver, "_PLAIN_INTERVAL", 0.0)  # a line per step
    r = _power(progress=True)
    err = [
        re.sub(r"\d+:\d\d elapsed", "T elapsed", ln) for ln in capsys.readouterr().err.splitlines()
    ]
    assert err[0].startswith("hvp power_iteration: 0/60 products, T elapsed")
    assert len(err) == r.num_matvecs + 1  # one line before each step, and the last one
    assert err[-1].startswith(f"hvp power_iteration done: {r.num_matvecs}/60 products")
    assert "eigenvalue 0.99" in err[-1] and "residual/|eigenvalue|" in err[-1]
    assert "left" in err[5]
    # the default interval: a first and a last line for a run this short
    monkeypatch.setattr(_driver, "_PLAIN_INTERVAL", 2.0)
    _three(progress=True)
    err = [
        re.sub(r"\d+:\d\d elapsed", "T elapsed", ln) for ln in capsys.readouterr().err.splitlines()
    ]
    assert err == [
        "hvp three_phase_test: 0/16 products, T elapsed, acc 0",
        f"hvp three_phase_test done: 16/16 products, T elapsed, acc {err[1].split()[-1]}",
    ]
    # a progress reading an entry it did not declare still works (the whole state is copied)
    monkeypatch.setattr(ThreePhase, "progress_keys", ("matvecs",))
    monkeypatch.setattr(
        ThreePhase,
        "progress",
        lambda self, st: Progress(int(st["matvecs"]), None, f"x0 {st['x'][0]:.3g}"),
    )
    _three(progress=True)
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        rf"hvp three_phase_test: 0 products, \d+:\d\d elapsed, x0 {X0[0]:.3g}", err[0]
    )
    # default progress entries: scalars, not vectors nor PRNG keys
    st = {"key": jax.random.key(0), "a": jnp.zeros(()), "v": jnp.zeros(3)}
    assert _driver._progress_keys(StateMachine(), st) == ["a"]
    _power(progress=None)  # None: only on a terminal
    _power(progress=False)
    assert capsys.readouterr().err == ""


def test_progress_rich_bar_on_a_terminal(monkeypatch):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(_driver.StateMachine, "progress_keys", None)  # default: small entries
    seen = []
    orig = hvp.linalg._power.PowerIteration.progress

    def spy(self, state):
        seen.append(set(state))
        return orig(self, state)

    monkeypatch.setattr(hvp.linalg._power.PowerIteration, "progress", spy)
    _power(progress=None)  # a terminal and no CI variable: shown by default
    out = stream.getvalue()
    if os.environ.get("CI"):
        assert out == ""
        return
    assert "power_iteration" in out and "products" in out and "\x1b[" in out
    # by default only the scalar entries of the state are copied to the host for the display
    assert seen and all(
        s == {"lam", "res", "tol", "ok", "matvecs", "max_matvecs", "phase", "done"} for s in seen
    )


# ------------------------------------------------------------------------------------------------
# SIGTERM / SIGKILL of a separate process, resumed here
# ------------------------------------------------------------------------------------------------
def test_sigterm_in_process_saves_exits_143_and_resumes(tmp_path, monkeypatch):
    """SIGTERM during a checkpointed run: the state is saved, SystemExit(143) is raised, the
    previous handler comes back, and the rerun resumes bit for bit (a fast in-process check;
    test_resume_after_sigterm_and_sigkill does it to a separate process)."""
    path = tmp_path / "eig.npz"
    ref = _power(driver="host")
    orig, n = _driver.block_product, {"calls": 0}

    def terminating(*args, **kwargs):
        n["calls"] += 1
        if n["calls"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(*args, **kwargs)

    monkeypatch.setattr(_driver, "block_product", terminating)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        _power(checkpoint=Checkpoint(path, every=3))
    assert info.value.code == 143 and signal.getsignal(signal.SIGTERM) == before
    with np.load(path) as data:
        assert json.loads(str(data["__meta__"]))["steps"] in (4, 5)  # saved on the signal
    monkeypatch.setattr(_driver, "block_product", orig)
    out = _power(checkpoint=path)
    for x, y in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


CHILD = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import hvp
    from hvp.linalg import _driver
    a = np.load(sys.argv[2])
    orig = _driver.block_product
    def slow(*args, **kwargs):  # the products of a big model take time
        time.sleep(0.02)
        return orig(*args, **kwargs)
    _driver.block_product = slow
    hvp.power_iteration(hvp.from_dense(jnp.asarray(a)), key=jax.random.key(0), tol=0.0,
                        num_iters=400, checkpoint=hvp.linalg.Checkpoint(sys.argv[1], every=1))
    """
)


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill(tmp_path):
    a = _slow_matrix(ratio=0.9999)
    np.save(tmp_path / "a.npy", a)
    paths = {sig: tmp_path / f"{sig.name}.npz" for sig in (signal.SIGTERM, signal.SIGKILL)}
    procs = {
        sig: subprocess.Popen(
            [sys.executable, "-c", CHILD, str(p), str(tmp_path / "a.npy")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for sig, p in paths.items()
    }
    deadline = time.monotonic() + 120
    for sig, proc in procs.items():
        while not paths[sig].exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint file after 120 s"
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(sig)
    codes = {sig: proc.wait(60) for sig, proc in procs.items()}
    errs = {sig: proc.stderr.read() for sig, proc in procs.items()}
    assert codes[signal.SIGTERM] == _driver.SIGTERM_EXIT_CODE == 143, errs[signal.SIGTERM]
    assert "was interrupted after" in errs[signal.SIGTERM]
    assert codes[signal.SIGKILL] == -signal.SIGKILL
    op = hvp.from_dense(jnp.asarray(a))
    ref = hvp.power_iteration(op, key=KEY, tol=0.0, num_iters=400)
    assert ref.num_matvecs == 400
    for sig, path in paths.items():
        with np.load(path) as data:
            steps = json.loads(str(data["__meta__"]))["steps"]
        assert 0 < steps < 400, (sig, steps)
        out = hvp.power_iteration(op, key=KEY, tol=0.0, num_iters=400, checkpoint=path)
        assert not path.exists() and out.num_matvecs == 400
        for x, y in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # no temporary file left behind (one a SIGKILL left during a save goes with the finished run)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------
# states sharded over a mesh of 4 CPU devices (a subprocess: the device count is fixed at start)
# ------------------------------------------------------------------------------------------------
SHARDED = textwrap.dedent(
    """
    import contextlib, tempfile
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from hvp.linalg import _driver, Checkpoint
    from hvp.linalg._power import PowerIteration, _initial_state

    rs = np.random.RandomState(0)
    raw = {"w1": rs.randn(6, 8) / 2, "b1": rs.randn(8) / 2, "w2": rs.randn(8, 4) / 2}
    specs = {"w1": P(None, "d"), "b1": P("d"), "w2": P("d", None)}
    X, y = rs.randn(16, 6), rs.randint(0, 4, 16)

    def follow_batch(h):  # explicit mesh: the logits' example axis is sharded like the input's
        if hvp.tree.explicit_sharding(h) is None:
            return None
        return NamedSharding(jax.typeof(h).sharding.mesh, P(jax.typeof(h).sharding.spec[0], None))


    def loss(p, b):
        h = jnp.tanh(b[0] @ p["w1"] + p["b1"])
        return hvp.losses.softmax_cross_entropy(jnp.matmul(h, p["w2"], out_sharding=follow_batch(h)), b[1])

    def interrupted(call, path, after=3):
        orig, n = _driver.block_product, {"k": 0}
        def flaky(*a, **k):
            n["k"] += 1
            if n["k"] > after:
                raise KeyboardInterrupt
            return orig(*a, **k)
        _driver.block_product = flaky
        try:
            call(checkpoint=Checkpoint(path, every=1))
        except KeyboardInterrupt:
            pass
        finally:
            _driver.block_product = orig
        assert os.path.exists(path)

    def check(kind, axis_type):
        # explicit: a second axis for the data (hvp.tree.place_batch splits batches over an axis the
        # parameters do not use)
        shape, names = ((4,), ("d",)) if axis_type == AxisType.Auto else ((2, 2), ("batch", "d"))
        mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))
        ctx = jax.set_mesh(mesh) if axis_type == AxisType.Explicit else contextlib.nullcontext()
        with ctx:
            params = {k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in raw.items()}
            op = hvp.hessian(loss, params, (jnp.asarray(X), jnp.asarray(y)))
            v0 = {k: jax.device_put(jnp.asarray(rs.randn(*v.shape)), NamedSharding(mesh, specs[k])) for k, v in raw.items()}
            call = lambda **kw: hvp.power_iteration(op, key=None, v0=v0, tol=0.0, num_iters=12, **kw)
            ref = call()
            path = os.path.join(tempfile.mkdtemp(), "s.npz")
            interrupted(call, path)
            # the saved state, restored leaf by leaf with the initial state's sharding
            init = _initial_state(v0, op.like, 0.0, 12)
            fp = _driver._fingerprint(PowerIteration(), op, init, (None,))
            state, steps = _driver._load(path, init, fp)
            li, lr = jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(state)
            same = all(a.sharding == b.sharding and jax.typeof(a) == jax.typeof(b) for a, b in zip(li, lr))
            sharded = sum(not x.sharding.is_fully_replicated for x in li)
            out = call(checkpoint=path)
            eq = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                     zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out)))
            vec_same = all(a.sharding == b.sharding for a, b in zip(
                jax.tree_util.tree_leaves(ref.eigenvector), jax.tree_util.tree_leaves(out.eigenvector)))
            return dict(steps=steps, same=same, sharded=sharded, bitwise=eq, vec_same=vec_same,
                        removed=not os.path.exists(path), types=str(jax.typeof(lr[-1])))

    print("RESULT" + json.dumps({"auto": check("auto", AxisType.Auto), "explicit": check("explicit", AxisType.Explicit)}))
    """
)


def test_sharded_state_saved_and_restored_with_its_sharding():
    """A state sharded over a mesh (Auto axes, and Explicit axes "sharding in types") is saved,
    restored leaf by leaf with the initial state's sharding, and resumes bit for bit."""
    res = run_on_cpu_devices(SHARDED, timeout=600)
    for kind, r in res.items():
        assert r["steps"] == 3 and r["sharded"] >= 3, (kind, r)
        assert r["same"] and r["bitwise"] and r["vec_same"] and r["removed"], (kind, r)
    assert res["explicit"]["types"] == "float64[8@d,4]"


def test_docs_drivers_page_runs():
    """The runnable examples of docs/drivers.md (all but the signature overview)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = open(os.path.join(root, "docs", "drivers.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 3 and "key=jax.random.key(0)," in blocks[0]
    ns: dict = {}
    for code in blocks[1:]:
        exec(compile(code, "docs/drivers.md", "exec"), ns)
    assert bool(ns["res"].converged) and ns["res"].num_matvecs > 20
    np.testing.assert_allclose(float(ns["res"].eigenvalue), 4.0, rtol=1e-12)
    assert ns["out"].tolist() == [1.0, 8.0] and ns["driver"] == "host"
