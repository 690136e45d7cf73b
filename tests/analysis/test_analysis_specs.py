"""Model specs and data specs of `hvp analyze` (no curvature computed here: fast)."""

import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from hvp.analysis import AnalysisError, digits, load_data, load_model, resolve_callable


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# --- model specs ----------------------------------------------------------------------------------------


def test_demo_factory_spec_builds_nnx_model():
    spec = load_model("hvp.analysis._demo:digits_mlp")
    assert spec.kind == "nnx"
    assert spec.loss == "cross_entropy"
    out = spec.model(jnp.zeros((3, 64), jnp.float32))
    assert out.shape == (3, 10)


def test_file_spec_with_linen_factory(tmp_path):
    f = _write(
        tmp_path,
        "linen_model.py",
        """
        import jax, jax.numpy as jnp
        import flax.linen as nn

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Dense(10)(jnp.tanh(nn.Dense(4)(x)))

        def factory():
            m = MLP()
            return (m, m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))), "mse"

        def with_kwargs():
            (m, v), loss = factory()
            return (m, v, {"deterministic": True}), loss

        def bad_kwargs():
            (m, v), loss = factory()
            return (m, v, ["train"]), loss
        """,
    )
    spec = load_model(f"{f}:factory")
    assert spec.kind == "linen"
    assert spec.loss == "mse"
    assert set(spec.variables) == {"params"} and spec.apply_kwargs is None
    assert load_model(f"{f}:with_kwargs").apply_kwargs == {"deterministic": True}
    with pytest.raises(AnalysisError, match="apply_kwargs of type list"):
        load_model(f"{f}:bad_kwargs")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("no_colon_here", "must look like 'module.path:function'"),
        ("surely_missing_module_xyz:f", "cannot import module 'surely_missing_module_xyz'"),
        ("hvp.analysis._demo:no_such_factory", "has no attribute 'no_such_factory'"),
        ("hvp.analysis._demo:DEMO_MODEL_SPEC", "not a callable"),
        ("missing/dir/model.py:f", "does not exist"),
    ],
)
def test_bad_model_specs(spec, match):
    with pytest.raises(AnalysisError, match=match):
        load_model(spec)


def test_factory_return_value_is_checked(tmp_path):
    f = _write(
        tmp_path,
        "bad_factories.py",
        """
        from hvp.analysis._demo import digits_mlp

        def not_a_pair():
            return 3

        def bad_loss():
            return digits_mlp()[0], "hinge"

        def bad_model():
            return object(), "mse"

        def raises():
            raise RuntimeError("boom")

        def needs_args(width):
            return None
        """,
    )
    with pytest.raises(AnalysisError, match=r"must return \(model, loss\)"):
        load_model(f"{f}:not_a_pair")
    with pytest.raises(AnalysisError, match="'hinge'.*'cross_entropy', 'mse'"):
        load_model(f"{f}:bad_loss")
    with pytest.raises(AnalysisError, match="must be an nnx.Module or a pair"):
        load_model(f"{f}:bad_model")
    with pytest.raises(AnalysisError, match="raised RuntimeError: boom"):
        load_model(f"{f}:raises")
    with pytest.raises(AnalysisError, match="callable without arguments"):
        load_model(f"{f}:needs_args")


def test_file_with_syntax_error(tmp_path):
    f = _write(tmp_path, "broken.py", "def f(:\n")
    with pytest.raises(AnalysisError, match="importing .* failed: SyntaxError"):
        resolve_callable(f"{f}:f")


# --- data specs -----------------------------------------------------------------------------------------


def test_digits_spec_batches_and_dtype():
    ds = load_data("digits", batch_size=500, dtype=jnp.float32)
    assert ds.num_examples == 1797 and ds.num_batches == 4
    assert [int(b[0].shape[0]) for b in ds.batches] == [500, 500, 500, 297]
    x, y = ds.batches[0]
    assert x.shape == (500, 64) and x.dtype == jnp.float32 and y.dtype == jnp.int32
    assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0
    x_all, _ = digits()
    np.testing.assert_array_equal(np.asarray(ds.batches[1][0]), x_all[500:1000])


def test_digits_images_and_num_batches():
    ds = load_data("digits:images", batch_size=100, num_batches=3, dtype=jnp.float64)
    assert ds.num_batches == 3 and ds.num_examples == 300
    assert ds.batches[0][0].shape == (100, 8, 8, 1) and ds.batches[0][0].dtype == jnp.float64


@pytest.mark.parametrize("keys", [("x", "y"), ("inputs", "targets")])
def test_npz_spec(tmp_path, keys):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), rng.integers(0, 3, size=30)
    path = tmp_path / "data.npz"
    np.savez(path, **{keys[0]: x, keys[1]: y})
    ds = load_data(str(path), batch_size=8, dtype=jnp.float32)
    assert ds.num_examples == 30 and ds.num_batches == 4
    np.testing.assert_allclose(np.asarray(ds.batches[3][0]), x[24:], rtol=1e-6)


def test_npz_errors(tmp_path):
    with pytest.raises(AnalysisError, match="does not exist"):
        load_data(str(tmp_path / "missing.npz"))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, a=np.zeros((3, 2)), b=np.zeros(3))
    with pytest.raises(AnalysisError, match=r"holds the arrays \['a', 'b'\]; it needs 'x' and 'y'"):
        load_data(str(wrong))
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 4)), y=np.zeros((0,)))
    with pytest.raises(AnalysisError, match="is empty"):
        load_data(str(empty))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(AnalysisError, match="Cannot read the data file"):
        load_data(str(bad))
    mismatched = tmp_path / "mismatched.npz"
    np.savez(mismatched, x=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(AnalysisError, match="same leading"):
        load_data(str(mismatched))


def test_function_spec_generator_with_batch_size(tmp_path):
    f = _write(
        tmp_path,
        "my_data.py",
        """
        import numpy as np

        def batches(batch_size=4):
            for i in range(5):
                yield {"x": np.full((batch_size, 3), float(i)), "y": np.arange(batch_size)}

        def one_batch():
            return (np.ones((6, 3)), np.zeros(6, dtype=np.int64))

        def nothing():
            return []

        def broken():
            raise KeyError("no data today")
        """,
    )
    ds = load_data(f"{f}:batches", batch_size=7, num_batches=3, dtype=jnp.float64)
    assert ds.num_batches == 3 and ds.num_examples == 21
    assert float(ds.batches[2]["x"][0, 0]) == 2.0 and ds.batches[0]["y"].dtype == jnp.int32
    one = load_data(f"{f}:one_batch")
    assert one.num_batches == 1 and one.num_examples == 6
    with pytest.raises(AnalysisError, match="is empty"):
        load_data(f"{f}:nothing")
    with pytest.raises(AnalysisError, match="raised KeyError"):
        load_data(f"{f}:broken")


def test_unknown_data_spec_and_bad_sizes():
    with pytest.raises(AnalysisError, match="Unknown data spec 'mnist'"):
        load_data("mnist")
    with pytest.raises(
        AnalysisError, match=r"`batch_size` \(--batch-size\) must be an integer >= 1"
    ):
        load_data("digits", batch_size=0)
    with pytest.raises(
        AnalysisError, match=r"`num_batches` \(--num-batches\) must be an integer >= 1"
    ):
        load_data("digits", num_batches=0)
    with pytest.raises(TypeError, match="batch_size"):  # a wrong type: TypeError, as in hvp.linalg
        load_data("digits", batch_size=2.5)
