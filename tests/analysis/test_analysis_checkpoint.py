"""Reading Orbax checkpoints read-only into NNX / Linen models, with the structure check."""

import hashlib
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from checkpoint_files import save_checkpoint
from flax import nnx

from hvp import tree as tu
from hvp.analysis import (
    AnalysisError,
    StructureMismatchError,
    load_model,
    read_checkpoint,
    resolve_checkpoint,
    restore_into,
)
from hvp.analysis._demo import DigitsMLP, digits_mlp


def _hash_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _save(path, tree):
    save_checkpoint(path, tree)
    return path


def _trained_like_model(seed=7, hidden=32):
    return DigitsMLP(hidden, rngs=nnx.Rngs(seed))


def _params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("pure", [False, True])
def test_nnx_state_roundtrip_values_and_read_only(tmp_path, pure):
    src = _trained_like_model()
    state = nnx.state(src)
    path = _save(tmp_path / "ck", nnx.to_pure_dict(state) if pure else state)
    before = _hash_tree(path)
    spec = load_model("hvp.analysis._demo:digits_mlp")
    restored = restore_into(spec, read_checkpoint(path), dtype=jnp.float64)
    assert _hash_tree(path) == before  # nothing written, nothing changed
    got, want = _params(restored.model), _params(src)
    assert (
        tu.leaf_paths(got)
        == tu.leaf_paths(want)
        == ["hidden/bias", "hidden/kernel", "out/bias", "out/kernel"]
    )
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert a.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, dtype=np.float64))


def test_manager_layouts_step_and_item(tmp_path):
    trees = {s: nnx.state(_trained_like_model(seed=s)) for s in (1, 2)}
    mgr = ocp.CheckpointManager(os.path.abspath(tmp_path / "run"))
    for s, st in trees.items():
        mgr.save(s, args=ocp.args.StandardSave(st))
    mgr.wait_until_finished()
    mgr.close()

    def spec_params(ck):
        return _params(restore_into(load_model("hvp.analysis._demo:digits_mlp"), ck).model)

    latest = read_checkpoint(tmp_path / "run")
    assert latest.step == 2 and latest.item == "default"
    np.testing.assert_array_equal(
        spec_params(latest)["out"]["bias"], _params(_trained_like_model(2))["out"]["bias"]
    )
    first = read_checkpoint(tmp_path / "run", step=1)
    np.testing.assert_array_equal(
        spec_params(first)["out"]["bias"], _params(_trained_like_model(1))["out"]["bias"]
    )
    assert read_checkpoint(tmp_path / "run" / "1").step is None  # a step directory
    with pytest.raises(AnalysisError, match="has no step 5; steps: 1, 2"):
        resolve_checkpoint(tmp_path / "run", step=5)

    mgr2 = ocp.CheckpointManager(os.path.abspath(tmp_path / "multi"), item_names=("model", "other"))
    mgr2.save(
        3,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(trees[1]), other=ocp.args.StandardSave({"a": np.ones(2)})
        ),
    )
    mgr2.wait_until_finished()
    mgr2.close()
    with pytest.raises(
        AnalysisError, match=r"holds several items \(model, other\); choose one with --item"
    ):
        resolve_checkpoint(tmp_path / "multi")
    path, step, item = resolve_checkpoint(tmp_path / "multi", item="model")
    assert step == 3 and item == "model" and path.name == "model"


def test_missing_file_and_non_checkpoint_dirs(tmp_path):
    with pytest.raises(AnalysisError, match="does not exist"):
        read_checkpoint(tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(AnalysisError, match="is a file"):
        read_checkpoint(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="is not an Orbax checkpoint"):
        read_checkpoint(tmp_path / "empty")


def test_corrupted_checkpoint_is_a_clean_error(tmp_path):
    path = _save(tmp_path / "ck", nnx.state(_trained_like_model()))
    (path / "_METADATA").write_text("{ this is not json")
    with pytest.raises(AnalysisError, match="Cannot read the checkpoint"):
        read_checkpoint(path)
    path2 = _save(tmp_path / "ck2", nnx.state(_trained_like_model()))
    for dirpath, _, files in os.walk(path2):  # truncate every array data file
        for name in files:
            if dirpath.rstrip("/").endswith("/d"):
                open(os.path.join(dirpath, name), "wb").close()
    with pytest.raises(AnalysisError, match="Cannot read the checkpoint arrays"):
        read_checkpoint(path2)


def test_structure_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    class Other(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(64, 16, rngs=rngs)  # wrong width
            self.extra = nnx.Linear(16, 10, rngs=rngs)  # 'out' missing, 'extra' unexpected

    path = _save(tmp_path / "ck", nnx.state(Other(nnx.Rngs(0))))
    with pytest.raises(StructureMismatchError) as info:
        restore_into(load_model("hvp.analysis._demo:digits_mlp"), read_checkpoint(path))
    e = info.value
    assert sorted(e.missing) == ["out/bias", "out/kernel"]
    assert sorted(e.unexpected) == ["extra/bias", "extra/kernel"]
    assert sorted(e.mismatched) == [
        ("hidden/bias", (16,), (32,)),
        ("hidden/kernel", (64, 16), (64, 32)),
    ]
    msg = str(e)
    for s in (
        "missing keys",
        "out/kernel",
        "unexpected keys",
        "extra/kernel",
        "shape mismatches",
        "hidden/kernel checkpoint (64, 16) vs model (64, 32)",
    ):
        assert s in msg


def test_nan_parameters_are_reported(tmp_path):
    pure = nnx.to_pure_dict(nnx.state(digits_mlp()[0]))
    pure["out"]["kernel"] = np.asarray(pure["out"]["kernel"]).copy()
    pure["out"]["kernel"][0, 0] = np.nan
    path = _save(tmp_path / "nan", pure)
    with pytest.raises(AnalysisError, match=r"NaN or Inf in out/kernel"):
        restore_into(load_model("hvp.analysis._demo:digits_mlp"), read_checkpoint(path))


LINEN = """
import jax, jax.numpy as jnp
import flax.linen as nn

class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(5)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(3)(jnp.tanh(x))

def factory():
    net = Net()
    return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))), "cross_entropy"
"""


def test_linen_variables_params_only_and_trainstate(tmp_path):
    f = tmp_path / "linen_net.py"
    f.write_text(textwrap.dedent(LINEN))
    spec = load_model(f"{f}:factory")
    other = jax.tree_util.tree_map(lambda a: np.asarray(a) + 1.0, spec.variables)
    full = _save(tmp_path / "full", other)
    r = restore_into(spec, read_checkpoint(full))
    np.testing.assert_array_equal(
        r.variables["batch_stats"]["BatchNorm_0"]["var"], other["batch_stats"]["BatchNorm_0"]["var"]
    )
    assert r.ignored == ()
    ts = _save(
        tmp_path / "ts",
        {
            "step": np.int32(10),
            "params": other["params"],
            "batch_stats": other["batch_stats"],
            "opt_state": {"mu": np.zeros(3)},
        },
    )
    r = restore_into(spec, read_checkpoint(ts))
    assert sorted(r.ignored) == ["opt_state", "step"]
    np.testing.assert_array_equal(
        r.variables["params"]["Dense_1"]["kernel"], other["params"]["Dense_1"]["kernel"]
    )
    # a bare params tree lacks the batch statistics the model needs
    bare = _save(tmp_path / "bare", other["params"])
    with pytest.raises(StructureMismatchError, match="batch_stats/BatchNorm_0/mean"):
        restore_into(spec, read_checkpoint(bare))
