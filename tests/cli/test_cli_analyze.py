"""`hvp demo` and `hvp analyze` end to end: outputs, reproducibility, read-only checkpoint, dense
reference, and every bad input (message + exit status).

The demo runs once per module with reduced sizes; the analyses after it reuse its compiled
programs through a persistent compilation cache in a temporary directory (results are
bit-identical, only compile time is saved).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import scipy.linalg
import scipy.sparse.linalg
from flax import nnx

import hvp
from hvp import tree as tu
from hvp.analysis import (
    DEMO_MODEL_SPEC,
    digits,
    load_model,
    load_report,
    read_checkpoint,
    restore_into,
)
from hvp.analysis._report import FIGURE_KEYS
from hvp.cli import main

FLAGS = [
    "-k",
    "3",
    "--probes",
    "4",
    "--iters",
    "12",
    "--trace-matvecs",
    "12",
    "--layer-matvecs",
    "8",
    "--batch-size",
    "100",
    "--num-batches",
    "2",
    "--x64",
    "--quiet",
]
SEED = 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hash_tree(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _get(d, dotted):
    section, key = dotted.split(".")
    return d[section][key]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    old = {n: getattr(jax.config, n) for n in names}
    path = tmp_path_factory.mktemp("jax-cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    cc.reset_cache()
    yield path
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, compile_cache):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--out", str(out), "--steps", "60", "--seed", str(SEED), *FLAGS])
    assert rc == 0
    return out


def test_demo_writes_checkpoint_report_and_plots(demo, capsys):
    assert (demo / "checkpoint" / "_METADATA").is_file()
    report = load_report(demo / "report.json")  # validates the documented schema
    assert report["schema_version"] == 1
    assert report["settings"]["seed"] == SEED and report["settings"]["x64"] is True
    assert report["settings"]["k"] == 3 and report["settings"]["dtype"] == "float64"
    assert report["data"] == {
        "spec": "digits",
        "num_examples": 200,
        "num_batches": 2,
        "batch_size": 100,
    }
    assert report["model"]["num_params"] == 2410 and report["model"]["framework"] == "nnx"
    assert (
        report["versions"]["hvp"] == hvp.__version__
        and report["versions"]["jax"] == jax.__version__
    )
    assert report["device"]["platform"] == jax.devices()[0].platform
    for section in ("top", "bottom", "trace", "density", "layers", "derived"):
        assert report[section]["num_matvecs"] > 0 and report[section]["seconds"] >= 0
    assert len(report["top"]["eigenvalues"]) == 3 and len(report["bottom"]["eigenvalues"]) == 3
    assert np.asarray(report["density"]["nodes"]).shape == (4, 12)
    assert report["layers"]["layers"] == ["hidden", "out"] and report["layers"]["num_params"] == [
        2080,
        330,
    ]
    assert abs(sum(report["layers"]["top_eigenvector_mass"]) - 1) < 1e-9
    assert report["extra"]["demo"]["train_steps"] == 60
    assert f"--seed {SEED}" in report["command"] and "--x64" in report["command"]
    for name in ("density.png", "layers.png"):
        data = (demo / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_analyze_reproduces_demo_and_never_writes_the_checkpoint(demo, tmp_path, capsys):
    ckpt = demo / "checkpoint"
    before = _hash_tree(ckpt)
    mtimes = {p: os.stat(os.path.join(ckpt, p)).st_mtime_ns for p in before}
    out = tmp_path / "again"
    rc = main(
        [
            "analyze",
            str(ckpt),
            "--model",
            DEMO_MODEL_SPEC,
            "--data",
            "digits",
            "--seed",
            str(SEED),
            *FLAGS,
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert _hash_tree(ckpt) == before
    assert {p: os.stat(os.path.join(ckpt, p)).st_mtime_ns for p in before} == mtimes
    a, b = load_report(demo / "report.json"), load_report(out / "report.json")
    for key in FIGURE_KEYS:
        assert _get(a, key) == _get(b, key), key
    assert a["command"].replace(str(ckpt), "CKPT") == b["command"].replace(str(ckpt), "CKPT")
    assert (out / "density.png").is_file() and (out / "layers.png").is_file()
    # another seed changes the random estimates but not the eigenvalues
    rc = main(
        [
            "analyze",
            str(ckpt),
            "--model",
            DEMO_MODEL_SPEC,
            "--seed",
            str(SEED + 1),
            *FLAGS,
            "--no-plots",
            "--out",
            str(tmp_path / "seed"),
        ]
    )
    assert rc == 0
    c = load_report(tmp_path / "seed" / "report.json")
    assert c["trace"]["estimate"] != a["trace"]["estimate"]
    np.testing.assert_allclose(c["top"]["eigenvalues"], a["top"]["eigenvalues"], rtol=1e-5)
    assert not (tmp_path / "seed" / "density.png").exists()


def test_report_matches_dense_float64_reference(demo):
    report = load_report(demo / "report.json")
    restored = restore_into(
        load_model(DEMO_MODEL_SPEC), read_checkpoint(demo / "checkpoint"), dtype=jnp.float64
    )
    params = nnx.to_pure_dict(nnx.state(restored.model, nnx.Param))
    x, y = digits(dtype=np.float64)
    x, y = jnp.asarray(x[:200]), jnp.asarray(y[:200])
    unravel = tu.unravel_fn(params)
    flat = tu.ravel(params)

    def loss(theta):  # the demo MLP written out by hand: out(tanh(hidden(x)))
        p = unravel(theta)
        logits = (
            jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"]) @ p["out"]["kernel"]
            + p["out"]["bias"]
        )
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    H = np.asarray(jax.jit(jax.hessian(loss))(flat))
    lam = scipy.linalg.eigh(H, eigvals_only=True)  # dense eigh (values only: half the cost)
    lam_top, vecs = scipy.sparse.linalg.eigsh(H, k=1, which="LA", tol=1e-12)  # the top eigenvector
    assert abs(lam_top[0] - lam[-1]) <= 1e-10 * abs(lam).max()
    scale = np.abs(lam).max()
    top, bottom = (
        np.asarray(report["top"]["eigenvalues"]),
        np.asarray(report["bottom"]["eigenvalues"]),
    )
    np.testing.assert_allclose(top, lam[-3:], rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(bottom, lam[:3], rtol=0, atol=1e-6 * scale)
    assert all(report["top"]["converged"]) and all(report["bottom"]["converged"])
    assert max(report["top"]["residuals"]) <= 1e-6 * scale * 1.01
    assert (
        report["derived"]["lambda_max"] == top[-1] and report["derived"]["lambda_min"] == bottom[0]
    )
    # trace and per-layer traces within 4 standard errors of the exact values
    assert abs(report["trace"]["estimate"] - np.trace(H)) <= 4 * report["trace"]["std_error"] + 1e-9
    paths = tu.leaf_paths(params)
    sizes = [int(np.size(a)) for a in jax.tree_util.tree_leaves(params)]
    owner = np.concatenate([np.full(s, p.split("/")[0] == "out") for p, s in zip(paths, sizes)])
    exact = [np.trace(H[~owner][:, ~owner]), np.trace(H[owner][:, owner])]  # hidden, out
    for est, se, ref in zip(report["layers"]["trace"], report["layers"]["trace_std_error"], exact):
        assert abs(est - ref) <= 4 * se + 1e-9
    # the top eigenvector's share per layer equals the dense top eigenvector's
    v = vecs[:, 0]
    ref_mass = [float(np.sum(v[~owner] ** 2)), float(np.sum(v[owner] ** 2))]
    np.testing.assert_allclose(report["layers"]["top_eigenvector_mass"], ref_mass, atol=1e-4)
    # negative mass: the weight of the SLQ nodes below -zero_threshold, raised to the count the
    # converged bottom eigenpairs certify (with 12 Lanczos steps the node that stands for the
    # near-zero bulk may fall on either side of 0, so the estimate is not compared with the exact
    # fraction; its quadrature bracket, widened by 4 standard errors, must hold it), and the
    # density integrates to 1
    nodes, weights = (
        np.asarray(report["density"]["nodes"]),
        np.asarray(report["density"]["weights"]),
    )
    dens = report["density"]
    thr = dens["zero_threshold"]
    assert thr == pytest.approx(1e-6 * max(abs(top).max(), abs(bottom).max()))
    exact_neg = np.mean(lam < -thr)
    assert 0 < dens["negative_count_eigsh"] <= np.sum(lam < -thr)
    assert report["derived"]["negative_mass"] == pytest.approx(
        max(np.sum(weights[nodes < -thr]) / len(nodes), dens["negative_count_eigsh"] / len(lam))
    )
    z = 4 * dens["negative_mass_bracket_std_error"]
    assert dens["negative_mass_lower"] - z <= exact_neg <= dens["negative_mass_upper"] + z
    assert dens["negative_mass_lower"] <= dens["negative_mass"] <= dens["negative_mass_upper"]
    assert dens["negative_mass_std_error"] > 0
    grid, rho = np.asarray(report["density"]["grid"]), np.asarray(report["density"]["density"])
    assert np.all(rho >= 0) and abs(np.sum(rho) * (grid[1] - grid[0]) - 1) < 0.02
    assert (
        lam[0] < 0
        and bottom[0] < 0
        and report["derived"]["negative_ratio"] == pytest.approx(-lam[0] / lam[-1], rel=1e-5)
    )


# --- bad inputs: message and exit status ------------------------------------------------------------------


def _run(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _analyze_args(ckpt, *extra):
    return ["analyze", str(ckpt), "--model", DEMO_MODEL_SPEC, *FLAGS, *extra]


def _assert_one_line_error(rc, err, *needles):
    assert rc == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hvp analyze: error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_directory_and_file_instead_of_directory(tmp_path, capsys):
    rc, _, err = _run(capsys, *_analyze_args(tmp_path / "nope", "--out", str(tmp_path / "o")))
    _assert_one_line_error(rc, err, "does not exist")
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _run(capsys, *_analyze_args(f, "--out", str(tmp_path / "o")))
    _assert_one_line_error(rc, err, "is a file")
    assert not (tmp_path / "o").exists()


def test_unreadable_checkpoint(demo, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(demo / "checkpoint", bad)
    (bad / "_METADATA").write_bytes(b"\x00\xff garbage")
    rc, _, err = _run(capsys, *_analyze_args(bad, "--out", str(tmp_path / "o")))
    _assert_one_line_error(rc, err, "Cannot read the checkpoint")


def test_structure_mismatch_lists_keys(demo, tmp_path, capsys):
    f = tmp_path / "narrow.py"
    f.write_text(
        textwrap.dedent("""
        from flax import nnx
        from hvp.analysis._demo import DigitsMLP

        def narrow():
            return DigitsMLP(16, rngs=nnx.Rngs(0)), "cross_entropy"
        """)
    )
    rc, _, err = _run(
        capsys,
        "analyze",
        str(demo / "checkpoint"),
        "--model",
        f"{f}:narrow",
        *FLAGS,
        "--out",
        str(tmp_path / "o"),
    )
    assert rc == 1 and "Traceback" not in err
    assert "does not match" in err and "shape mismatches (3)" in err
    assert "hidden/kernel checkpoint (64, 32) vs model (64, 16)" in err
    assert "out/kernel checkpoint (32, 10) vs model (16, 10)" in err


def test_nan_parameters(tmp_path, capsys):
    pure = nnx.to_pure_dict(nnx.state(load_model(DEMO_MODEL_SPEC).model))
    pure["hidden"]["bias"] = np.full(32, np.nan, np.float32)
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(tmp_path / "nan"), pure)
    ck.wait_until_finished()
    ck.close()
    rc, _, err = _run(capsys, *_analyze_args(tmp_path / "nan", "--out", str(tmp_path / "o")))
    _assert_one_line_error(rc, err, "NaN or Inf in hidden/bias")


def test_empty_data_and_bad_specs(demo, tmp_path, capsys):
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 64), np.float32), y=np.zeros((0,), np.int32))
    rc, _, err = _run(
        capsys,
        *_analyze_args(demo / "checkpoint", "--data", str(empty), "--out", str(tmp_path / "o")),
    )
    _assert_one_line_error(rc, err, "is empty")
    rc, _, err = _run(
        capsys,
        *_analyze_args(demo / "checkpoint", "--data", "imagenet", "--out", str(tmp_path / "o")),
    )
    _assert_one_line_error(rc, err, "Unknown data spec 'imagenet'")
    rc, _, err = _run(
        capsys, "analyze", str(demo / "checkpoint"), "--model", "nowhere_pkg:model", *FLAGS
    )
    _assert_one_line_error(rc, err, "cannot import module 'nowhere_pkg'")
    wrong = tmp_path / "wrong.npz"  # 10 features: the model expects 64
    np.savez(wrong, x=np.zeros((5, 10), np.float32), y=np.zeros((5,), np.int32))
    rc, _, err = _run(
        capsys,
        *_analyze_args(demo / "checkpoint", "--data", str(wrong), "--out", str(tmp_path / "o")),
    )
    _assert_one_line_error(
        rc, err, "The model cannot run on the inputs", "[5,10]", "Data choices (--data)"
    )


def test_debug_shows_traceback(tmp_path, capsys):
    rc, _, err = _run(capsys, *_analyze_args(tmp_path / "nope", "--debug"))
    assert rc == 1 and "Traceback" in err and "does not exist" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["analyze", "ck"], "the following arguments are required: --model"),
        (["analyze", "ck", "--model", "a:b", "-k", "0"], "expected a positive integer"),
        (["analyze", "ck", "--model", "a:b", "--operator", "fisher"], "invalid choice: 'fisher'"),
        (["demo", "--seed", "-1"], "expected a non-negative integer"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, needle):
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and needle in err


@pytest.mark.parametrize("cmd", [[], ["analyze"], ["demo"]])
def test_help_for_every_subcommand(capsys, cmd):
    rc, out, _ = _run(capsys, *cmd, "--help")
    assert rc == 0 and out.startswith(f"usage: hvp{' ' + cmd[0] if cmd else ''}")
    common = [
        "--operator",
        "--probes",
        "--iters",
        "--batch-size",
        "--num-batches",
        "--seed",
        "--x64",
        "--out",
        "-k",
    ]
    expected = {
        "analyze": common + ["--model", "--data", "--step", "--item"],
        "demo": common + ["--steps"],
    }
    for flag in expected[cmd[0]] if cmd else ["analyze", "demo"]:
        assert flag in out


def test_subprocess_console_entry(tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hvp.cli",
            "analyze",
            str(tmp_path / "missing"),
            "--model",
            DEMO_MODEL_SPEC,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1
    missing = tmp_path / "missing"
    assert (
        proc.stderr.strip()
        == f"hvp analyze: error: The checkpoint directory '{missing}' does not exist."
    )
    # --version in-process (a second interpreter adds nothing: the exit status and stdout of
    # `python -m hvp` on success are checked by test_python_m_hvp_quiet_prints_nothing_on_stderr)
    assert _run(capsys, "--version") == (0, f"hvp {hvp.__version__}\n", "")


# --- outputs: refusal, --overwrite as a whole set, atomic writes, --chunk-size, x64 restore -----------------


def test_second_run_into_the_same_out_is_refused_before_any_work(demo, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(demo, out, ignore=shutil.ignore_patterns("checkpoint"))
    before = _hash_tree(out)
    rc, _, err = _run(capsys, *_analyze_args(demo / "checkpoint", "--out", str(out)))
    _assert_one_line_error(
        rc, err, "already holds report.json, density.png, layers.png", "--overwrite"
    )
    assert _hash_tree(out) == before
    # the demo refuses an earlier demo's directory the same way, before training
    rc, _, err = _run(capsys, "demo", "--out", str(demo), "--steps", "1", *FLAGS)
    assert rc == 1 and "already holds" in err and "checkpoint" in err


def test_overwrite_replaces_the_whole_set_chunk_size_and_x64_restored(demo, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(demo, out, ignore=shutil.ignore_patterns("checkpoint"))
    old_created = load_report(out / "report.json")["created"]
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        rc, stdout, err = _run(
            capsys,
            *_analyze_args(demo / "checkpoint", "--seed", str(SEED), "--out", str(out)),
            "--overwrite",
            "--no-plots",
            "--chunk-size",
            "2",
            "--json",
        )
        assert jax.config.jax_enable_x64 is False  # --x64 held for the run only
    finally:
        jax.config.update("jax_enable_x64", x64)
    assert rc == 0 and err == ""
    assert sorted(os.listdir(out)) == ["report.json"]  # no stale PNG beside the new report
    new, ref = load_report(out / "report.json"), load_report(demo / "report.json")
    assert new["created"] >= old_created and new["settings"]["chunk_size"] == 2
    assert "--chunk-size 2" in new["command"]
    for key in FIGURE_KEYS:  # chunking changes how the probes are batched, not the estimates
        np.testing.assert_allclose(_get(new, key), _get(ref, key), rtol=1e-9, atol=1e-12)
    summary = json.loads(stdout)  # --json: one JSON object on stdout, nothing else
    assert summary["files"] == [str(out / "report.json")]
    assert summary["top_eigenvalues"] == new["top"]["eigenvalues"]
    assert summary["lambda_max"] == new["derived"]["lambda_max"]
    assert summary["trace"] == {
        "estimate": new["trace"]["estimate"],
        "std_error": new["trace"]["std_error"],
    }


def test_interrupted_write_keeps_the_previous_complete_files(demo, tmp_path, monkeypatch):
    import matplotlib.figure

    from hvp.analysis._report import write_outputs

    out = tmp_path / "out"
    shutil.copytree(demo, out, ignore=shutil.ignore_patterns("checkpoint"))
    before = _hash_tree(out)
    report = load_report(demo / "report.json")

    def interrupted_savefig(self, f, **kw):
        f.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted_savefig)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(report, out)
    assert sorted(os.listdir(out)) == ["density.png", "layers.png", "report.json"]  # no temp file
    assert _hash_tree(out) == before  # the same report rewritten; the PNGs untouched


def test_missing_matplotlib_is_reported_before_any_work(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "o"
    rc, _, err = _run(capsys, *_analyze_args(demo / "checkpoint", "--out", str(out)))
    _assert_one_line_error(rc, err, 'pip install "hvp-jax[plots]"', "--no-plots")
    assert not out.exists()


def test_python_m_hvp_quiet_prints_nothing_on_stderr(demo, compile_cache, tmp_path):
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        JAX_COMPILATION_CACHE_DIR=str(compile_cache),  # the demo's compiled programs
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    # a factory module that imports flax.training.checkpoints, which logs absl's "Tensorflow
    # library not found" warning on stderr (the Linen examples do)
    (tmp_path / "factory_mod.py").write_text(
        "from flax.training import checkpoints  # noqa: F401\n"
        "from hvp.analysis._demo import digits_mlp  # noqa: F401\n"
    )
    args = _analyze_args(demo / "checkpoint", "--seed", str(SEED))
    args[args.index(DEMO_MODEL_SPEC)] = f"{tmp_path / 'factory_mod.py'}:digits_mlp"
    proc = subprocess.run(
        [sys.executable, "-m", "hvp", *args, "--out", str(tmp_path / "q"), "--no-plots"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip() == f"Wrote report.json to {tmp_path / 'q'}"
    a, b = load_report(demo / "report.json"), load_report(tmp_path / "q" / "report.json")
    assert _get(a, "top.eigenvalues") == _get(b, "top.eigenvalues")
