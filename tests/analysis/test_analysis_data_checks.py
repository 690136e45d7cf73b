"""The `hvp analyze` data path: label checks before any heavy work, weighted and language-model data.

Issue 12 §1 (labels 1..10 for 10 classes ran to the end with exit 0) and issues 16 §1 / 18
(lm1b batches ``{"inputs": tokens}`` and weighted batches from a .npz file).
"""

import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import hvp
from hvp.analysis import AnalysisError, analyze, load_data, load_model

TINY = """
import jax, jax.numpy as jnp
import flax.linen as nn

class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(jnp.tanh(nn.Dense(3)(x)))

def tiny():
    net = Tiny()
    return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))), "cross_entropy"
"""


def test_labels_outside_the_classes_stop_analyze_before_the_analysis(tmp_path):
    (tmp_path / "tiny_model.py").write_text(textwrap.dedent(TINY))
    spec = f"{tmp_path / 'tiny_model.py'}:tiny"
    variables = load_model(spec).variables
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(tmp_path / "ckpt"), variables)
    ck.wait_until_finished()
    ck.close()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = rng.integers(0, 10, size=40)
    y[[3, 17]] = 10  # labels_1_to_10-style: label 10 is not a class of a 10-way output
    np.savez(tmp_path / "labels.npz", x=x, y=y)
    with pytest.raises(AnalysisError, match=r"\[0, 10\).*10 at \(3,\)"):
        analyze(
            tmp_path / "ckpt",
            model=spec,
            data=str(tmp_path / "labels.npz"),
            batch_size=16,
            out_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out" / "report.json").exists()
    # NaN in the data: refused when the operator is built, naming the batch, leaf and count
    y[[3, 17]] = 0
    x[20, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    with pytest.raises(AnalysisError, match=r"NaN or Inf: batch 1, leaf '0' \(1 of 80 values"):
        analyze(tmp_path / "ckpt", model=spec, data=str(tmp_path / "nan.npz"), batch_size=16)


def test_npz_language_model_and_weighted_data(tmp_path):
    tokens = np.array([[3, 1, 4, 0], [2, 6, 0, 0], [5, 1, 2, 3]], np.int32)
    np.savez(tmp_path / "lm.npz", inputs=tokens)
    ds = load_data(str(tmp_path / "lm.npz"), batch_size=2)
    assert [sorted(b) for b in ds.batches] == [["inputs"], ["inputs"]]
    _, targets, w = hvp.operators.split_batch(ds.batches[0])
    np.testing.assert_array_equal(np.asarray(targets), tokens[:2])
    np.testing.assert_array_equal(np.asarray(w), (tokens[:2] > 0).astype(np.float32))

    weights = np.array([1.0, 0.0, 2.0], np.float32)
    np.savez(
        tmp_path / "w.npz", x=np.ones((3, 2), np.float32), y=np.array([0, 1, 1]), weights=weights
    )
    ds = load_data(str(tmp_path / "w.npz"), batch_size=2, dtype=jnp.float64)
    assert len(ds.batches) == 2 and all(len(b) == 3 for b in ds.batches)
    np.testing.assert_array_equal(np.asarray(ds.batches[1][2]), [2.0])

    ds = load_data((np.ones((3, 2)), np.array([0, 1, 1]), weights), batch_size=2)
    assert [len(b) for b in ds.batches] == [3, 3] and ds.num_examples == 3
    np.savez(tmp_path / "bad.npz", x=np.ones((3, 2)), y=np.zeros(3), weights=np.ones(2))
    with pytest.raises(AnalysisError, match=r"'weights' has shape \(2,\).*\(3\)"):
        load_data(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "floats.npz", inputs=np.ones((3, 2)))
    with pytest.raises(AnalysisError, match="integer tokens 'inputs' alone"):
        load_data(str(tmp_path / "floats.npz"))


def test_lm_batches_from_a_data_function_build_the_masked_hessian(tmp_path):
    # what `hvp analyze` does with a data function returning lm1b batches: load, then
    # problem.hessian(batches) on the Flax adapter, with no unpack option needed
    import flax.linen as nn

    class LM(nn.Module):
        @nn.compact
        def __call__(self, toks):
            shifted = jnp.pad(toks, ((0, 0), (1, 0)))[:, :-1]
            return nn.Dense(5, param_dtype=jnp.float64)(
                nn.Embed(5, 2, param_dtype=jnp.float64)(shifted)
            )

    (tmp_path / "lm_data.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    t = np.array([[1, 2, 3, 0], [4, 1, 0, 0], [2, 2, 2, 2]], np.int32)\n"
        "    return [{'inputs': t[:2]}, {'inputs': t[2:]}]\n"
    )
    ds = load_data(f"{tmp_path / 'lm_data.py'}:batches")
    toks = jnp.concatenate([b["inputs"] for b in ds.batches])
    model = LM()
    variables = model.init(jax.random.key(0), toks)
    H = hvp.flax.from_linen(model, variables, "cross_entropy").hessian(ds.batches)
    w = (toks > 0).astype(jnp.float64)

    def masked(p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, toks))
        return -jnp.sum(jnp.take_along_axis(logp, toks[..., None], -1)[..., 0] * w) / w.sum()

    v = hvp.tree.normal_like(jax.random.key(1), variables["params"])
    ref = jax.jvp(jax.grad(masked), (variables["params"],), (v,))[1]
    got = H @ v
    err = np.abs(hvp.tree.ravel(got) - hvp.tree.ravel(ref)).max()
    assert err < 1e-12 * np.abs(hvp.tree.ravel(ref)).max() + 1e-14


def test_a_cnn_given_flat_digits_stops_before_the_analysis_naming_the_data_choices(tmp_path):
    import flax.linen as nn
    from checkpoint_files import save_checkpoint

    class CNN(nn.Module):  # expects NHWC images 8x8x1
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(2, (3, 3))(x)
            return nn.Dense(10)(h.reshape(h.shape[0], -1))

    def cnn():
        net = CNN()
        return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))), "cross_entropy"

    ckpt = save_checkpoint(tmp_path / "ckpt", cnn()[0][1])
    with pytest.raises(AnalysisError) as info:
        analyze(ckpt, model=cnn, data="digits", batch_size=16, num_batches=1)
    msg = str(info.value)
    assert "inputs float32[16,64]; the model raised" in msg  # the shape given, the model's error
    assert "use --data digits:images" in msg  # the layout it does run on
    assert "'digits:images': x float32 (N, 8, 8, 1)" in msg and "'path/to/data.npz'" in msg
    # the same check on data it has never seen: no bundled layout fits, the choices are listed
    x = np.zeros((6, 5), np.float32)
    with pytest.raises(AnalysisError, match=r"float32\[6,5\].*Data choices \(--data\): 'digits'"):
        analyze(ckpt, model=cnn, data=(x, np.zeros(6, np.int32)))
