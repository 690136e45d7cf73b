"""Checkpoint layouts of the official Flax examples (issue 18), each saved with the example's own
save code in miniature; the output directory rules and the float64 switch of ``analyze`` (issue 12).

No analysis runs here (no compilation of the algorithms): restoring is checked value by value against
the saved arrays, and the ``analyze`` checks fail (on purpose) before any heavy work.
"""

import dataclasses
import hashlib
import os
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hvp import tree as tu
from hvp.analysis import (
    AnalysisError,
    StructureMismatchError,
    analyze,
    load_model,
    read_checkpoint,
    resolve_checkpoint,
    restore_into,
)
from hvp.analysis._demo import DigitsMLP
from hvp.analysis._report import prepare_output_dir

DEMO = "hvp.analysis._demo:digits_mlp"


def _hash_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_tree_equal(got, want):
    assert tu.leaf_paths(got) == tu.leaf_paths(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- (a) {"model": nnx.state(model), "optimizer": nnx.state(optimizer), "step": ...} ---------------


@pytest.fixture(scope="module")
def gemma_layout(tmp_path_factory):
    """The NNX checkpointing guide / gemma layout, saved by a CheckpointManager as gemma does."""
    root = tmp_path_factory.mktemp("gemma") / "ckpts"
    model = DigitsMLP(32, rngs=nnx.Rngs(5))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    mgr = ocp.CheckpointManager(os.path.abspath(root))
    for step in (10, 20):
        state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer), "step": step}
        mgr.save(step, args=ocp.args.StandardSave(state))
    mgr.wait_until_finished()
    mgr.close()
    return root, _params(model)


def test_model_state_under_a_top_level_key_is_found(gemma_layout):
    root, want = gemma_layout
    before = _hash_tree(root)
    ck = read_checkpoint(root)
    assert ck.step == 20 and ck.key is None
    r = restore_into(load_model(DEMO), ck)
    assert r.key == "model"  # found automatically, and said
    assert "optimizer" in r.ignored and "step" in r.ignored
    assert all(p.startswith("model/") for p in r.restored)
    _assert_tree_equal(_params(r.model), want)
    # --item KEY selects it explicitly (a key inside the step's only item "default")
    ck = read_checkpoint(root, item="model")
    assert ck.key == "model" and ck.item == "default"
    r = restore_into(load_model(DEMO), ck)
    assert r.key == "model"
    _assert_tree_equal(_params(r.model), want)
    assert _hash_tree(root) == before  # read-only


def test_unknown_key_and_no_matching_key_are_clear_errors(gemma_layout):
    root, _ = gemma_layout
    with pytest.raises(AnalysisError, match=r"--item 'nope' names neither.*model, optimizer, step"):
        read_checkpoint(root, item="nope")
    narrow = dataclasses.replace(load_model(DEMO), model=DigitsMLP(16, rngs=nnx.Rngs(0)))
    with pytest.raises(StructureMismatchError, match="Nor does any top-level key") as info:
        restore_into(narrow, read_checkpoint(root))
    assert "select one with --item KEY" in str(info.value)


def test_relative_checkpoint_paths_are_read(gemma_layout, tmp_path, monkeypatch):
    # `hvp analyze demo/checkpoint ...`: Orbax finds no item metadata for a relative directory
    root, want = gemma_layout
    item = tmp_path / "work" / "demo" / "checkpoint"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(item), {"params": {"kernel": np.arange(6.0).reshape(2, 3)}})
    ckptr.wait_until_finished()
    ckptr.close()
    monkeypatch.chdir(tmp_path / "work")
    for rel in ("demo/checkpoint", "./demo/checkpoint", "demo/checkpoint/"):
        ck = read_checkpoint(rel)
        assert ck.requested == rel and not os.path.isabs(ck.path)  # reported as given
        np.testing.assert_array_equal(ck.tree["params"]["kernel"], np.arange(6.0).reshape(2, 3))
    # a CheckpointManager root by a relative path: the latest step's item
    monkeypatch.chdir(root.parent)
    ck = read_checkpoint(root.name)
    assert ck.step == 20 and ck.requested == root.name
    _assert_tree_equal(_params(restore_into(load_model(DEMO), ck).model), want)


def test_step_metadata_without_item_metadata_falls_back_to_the_handler(tmp_path, monkeypatch):
    # Orbax's metadata() returns a StepMetadata with item_metadata=None when it cannot read the
    # tree (a relative directory, unreadable array metadata): never taken for the tree itself
    from orbax.checkpoint._src.metadata.checkpoint import StepMetadata

    path = tmp_path / "ck"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), {"w": np.arange(3.0)})
    ckptr.wait_until_finished()
    ckptr.close()
    monkeypatch.setattr(
        ocp.PyTreeCheckpointer, "metadata", lambda self, d: StepMetadata(item_metadata=None)
    )
    np.testing.assert_array_equal(read_checkpoint(path).tree["w"], np.arange(3.0))
    for name in os.listdir(path / "d"):  # truncated array files: Orbax's own error, named
        open(path / "d" / name, "wb").close()
    with pytest.raises(
        AnalysisError, match=r"Cannot read the checkpoint arrays.*OUT_OF_RANGE"
    ) as e:
        read_checkpoint(path)
    assert "StepMetadata" not in str(e.value)


# --- (b) a Flax workdir: checkpoint_120/, checkpoint_240/ (flax.training.checkpoints) ---------------

LINEN_DENSE = """
import jax, jax.numpy as jnp
import flax.linen as nn

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))

def factory():
    net = Net()
    return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))), "cross_entropy"
"""


def test_flax_workdir_steps_latest_and_step_n(tmp_path):
    from flax.training import checkpoints, train_state

    f = tmp_path / "linen_dense.py"
    f.write_text(textwrap.dedent(LINEN_DENSE))
    spec = load_model(f"{f}:factory")
    workdir = tmp_path / "workdir"
    saved = {}
    for step in (120, 240):  # the Linen MNIST / ImageNet examples' save code
        params = jax.tree_util.tree_map(lambda a, s=step: a + s, spec.variables["params"])
        state = train_state.TrainState.create(
            apply_fn=spec.model.apply, params=params, tx=optax.sgd(0.1)
        )
        checkpoints.save_checkpoint(str(workdir), state, step=step, keep=3)
        saved[step] = params
    assert sorted(os.listdir(workdir)) == ["checkpoint_120", "checkpoint_240"]
    # an unfinished save (Orbax's temporary directory) is not a step
    (workdir / "checkpoint_360.orbax-checkpoint-tmp-1234").mkdir()

    path, step, item = resolve_checkpoint(workdir)
    assert (path.name, step, item) == ("checkpoint_240", 240, None)
    for want_step in (120, 240):
        ck = read_checkpoint(workdir, step=want_step if want_step == 120 else None)
        assert ck.step == want_step
        r = restore_into(spec, ck)
        assert sorted(r.ignored) == ["opt_state", "step"]
        _assert_tree_equal(r.variables["params"], saved[want_step])
    with pytest.raises(AnalysisError, match="has no step 5; steps: 120, 240"):
        resolve_checkpoint(workdir, step=5)


# --- (c) Linen variables with logically partitioned (boxed) parameters --------------------------------

LINEN_BOXED = """
import jax, jax.numpy as jnp
import flax.linen as nn

def _init(names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, kernel_init=_init(("embed", "mlp")))(x)
        return nn.Dense(3, kernel_init=_init(("mlp", "vocab")))(jnp.tanh(x))

def factory():  # module.init(...): the example variables hold boxed kernels
    net = Net()
    return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))), "cross_entropy"
"""


@pytest.mark.parametrize("saved_boxed", [True, False])
def test_linen_boxed_params_are_unboxed(tmp_path, saved_boxed):
    import flax.linen as nn

    f = tmp_path / "linen_boxed.py"
    f.write_text(textwrap.dedent(LINEN_BOXED))
    spec = load_model(f"{f}:factory")
    boxed = jax.tree_util.tree_map(
        lambda a: a * 2.0 + 1.0, spec.variables
    )  # other values, same boxes
    assert any(
        isinstance(x, nn.LogicallyPartitioned)
        for x in jax.tree_util.tree_leaves(
            boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )
    )
    tree = boxed if saved_boxed else nn.unbox(boxed)
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(tmp_path / "ck"), tree)
    ck.wait_until_finished()
    ck.close()
    r = restore_into(spec, read_checkpoint(tmp_path / "ck"))
    assert sorted(r.restored) == [
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    ]
    _assert_tree_equal(r.variables, nn.unbox(boxed))
    out = spec.model.apply(r.variables, jnp.ones((2, 5)))  # usable as Linen variables
    assert out.shape == (2, 3)


# --- output directory (issue 12 §2) and the float64 switch (issue 12 §4) -----------------------------


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "ck"
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(path), nnx.state(DigitsMLP(32, rngs=nnx.Rngs(2))))
    ck.wait_until_finished()
    ck.close()
    return path


def test_output_dir_checked_before_any_work(small_ckpt, tmp_path):
    # an existing report: refused without overwrite, before the model is even built (the model
    # spec would fail to import)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    t0 = time.perf_counter()
    with pytest.raises(AnalysisError, match=r"already holds report.json.*--overwrite"):
        analyze(small_ckpt, model="nowhere_pkg:model", out_dir=out)
    assert time.perf_counter() - t0 < 5
    assert (out / "report.json").read_text() == "{}"
    # with overwrite the output check passes and the run goes on to the (failing) model spec
    with pytest.raises(AnalysisError, match="cannot import module 'nowhere_pkg'"):
        analyze(small_ckpt, model="nowhere_pkg:model", out_dir=out, overwrite=True)
    # a file where the directory should be
    (tmp_path / "file").write_text("x")
    with pytest.raises(AnalysisError, match="exists and is not a directory"):
        analyze(small_ckpt, model="nowhere_pkg:model", out_dir=tmp_path / "file")
    # stale PNGs count as earlier outputs too
    png = tmp_path / "png"
    png.mkdir()
    (png / "density.png").write_bytes(b"x")
    with pytest.raises(AnalysisError, match="already holds density.png"):
        prepare_output_dir(png)


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions"
)
def test_read_only_output_dir_refused_before_any_work(small_ckpt, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(AnalysisError, match="is not writable"):
            analyze(small_ckpt, model="nowhere_pkg:model", out_dir=ro)
    finally:
        ro.chmod(0o755)


def test_x64_setting_restored_after_analyze(small_ckpt, tmp_path):
    f = tmp_path / "narrow.py"
    f.write_text(
        "from flax import nnx\nfrom hvp.analysis._demo import DigitsMLP\n"
        "def narrow():\n    return DigitsMLP(16, rngs=nnx.Rngs(0)), 'cross_entropy'\n"
    )
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        # fails after switching to float64 (the model does not match the checkpoint)
        with pytest.raises(StructureMismatchError):
            analyze(small_ckpt, model=f"{f}:narrow", x64=True)
        assert jax.config.jax_enable_x64 is False
        assert jnp.zeros(1, dtype=float).dtype == jnp.float32
    finally:
        jax.config.update("jax_enable_x64", before)
