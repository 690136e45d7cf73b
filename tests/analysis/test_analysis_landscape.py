"""`hvp analyze --landscape`: the report's loss-landscape section and figures.

The default test checks the section builder and the figure writer on a tiny operator; the end to
end CLI run (a full analysis, ~1 min of CPU) is marked slow.
"""

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import hvp
from hvp.analysis._analyze import LANDSCAPE_POINTS, landscape_sections
from hvp.analysis._report import LANDSCAPE_FILES, write_landscape_plots


def test_sections_reuse_the_top_eigenpairs_and_plots_are_written(tmp_path):
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.normal(size=(12, 3))), jnp.asarray(rng.normal(size=(12, 2)))
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2))), "bias": jnp.zeros(2)}}

    def loss(p, b):
        return jnp.mean(jnp.tanh(b[0] @ p["dense"]["kernel"] + p["dense"]["bias"] - b[1]) ** 2)

    H = hvp.hessian(loss, params, (x, y))
    # the top eigenpair as hvp.eigsh returns it, here from the dense matrix (no Lanczos compile)
    lam_d, vec_d = np.linalg.eigh(np.asarray(H.dense()))
    vec = jax.vmap(hvp.tree.unravel_fn(params))(jnp.asarray(vec_d[:, -1:].T))
    res = np.linalg.norm(np.asarray(H.dense()) @ vec_d[:, -1] - lam_d[-1] * vec_d[:, -1])
    top = hvp.EigshResult(
        eigenvalues=jnp.asarray(lam_d[-1:]),
        eigenvectors=vec,
        residuals=jnp.asarray([res]),
        converged=jnp.asarray([True]),
        num_matvecs=0,
        num_restarts=0,
        thresholds=jnp.asarray([1e-8]),
    )
    out = landscape_sections(H, top, seed=0)
    eig, rnd = out["eigen"], out["random"]
    assert eig.num_matvecs == 0 and eig.losses.shape == (LANDSCAPE_POINTS[0],)
    assert rnd.losses.shape == (LANDSCAPE_POINTS[1],) * 2
    lam = float(top.eigenvalues[-1])
    assert eig.directions[0]["eigenvalue"] == pytest.approx(lam)
    span = np.sqrt(2 * max(float(eig.loss0), 1e-3) / lam)
    assert eig.coordinates[0][-1] == pytest.approx(span)
    # the centre point is the loss itself, and the model agrees near 0
    mid = LANDSCAPE_POINTS[0] // 2
    assert eig.losses[mid] == pytest.approx(float(eig.loss0), rel=1e-12)
    assert abs(eig.losses[mid + 1] - eig.quadratic[mid + 1]) < 1e-2 * float(eig.loss0)
    report = {"landscape": {k: v.to_dict() for k, v in out.items()}}
    files = write_landscape_plots(report, tmp_path)
    assert sorted(os.path.basename(f) for f in files.values()) == sorted(LANDSCAPE_FILES)
    assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in LANDSCAPE_FILES)
    # a report without the section removes stale figures
    assert write_landscape_plots({"landscape": None}, tmp_path) == {}
    assert not any((tmp_path / f).exists() for f in LANDSCAPE_FILES)


TINY = """
import jax, jax.numpy as jnp
import flax.linen as nn

class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))

def tiny():
    net = Tiny()
    return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))), "mse"
"""


@pytest.mark.slow
def test_cli_landscape_flag(tmp_path, capsys):
    from hvp.analysis import load_model
    from hvp.cli import main

    (tmp_path / "tiny_model.py").write_text(textwrap.dedent(TINY))
    spec = f"{tmp_path / 'tiny_model.py'}:tiny"
    variables = load_model(spec).variables
    rng = np.random.default_rng(1)
    saved = jax.tree_util.tree_map(
        lambda a: np.asarray(rng.normal(size=a.shape) * 0.5, np.float32), variables
    )
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(tmp_path / "ckpt"), saved)
    ck.wait_until_finished()
    ck.close()
    np.savez(
        tmp_path / "data.npz",
        x=rng.normal(size=(40, 5)).astype(np.float32),
        y=rng.normal(size=(40, 3)).astype(np.float32),
    )
    out = tmp_path / "out"
    flags = ["-k", "1", "--probes", "2", "--iters", "6", "--trace-matvecs", "6"]
    flags += ["--layer-matvecs", "4", "--batch-size", "40", "--x64", "--quiet"]
    argv = [
        "analyze",
        str(tmp_path / "ckpt"),
        "--model",
        spec,
        "--data",
        str(tmp_path / "data.npz"),
    ]
    rc = main([*argv, *flags, "--landscape", "--json", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert {os.path.basename(f) for f in summary["files"]} >= set(LANDSCAPE_FILES)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["landscape"] is True and "--landscape" in report["command"]
    eig = report["landscape"]["eigen"]
    assert eig["directions"][0]["eigenvalue"] == pytest.approx(report["top"]["eigenvalues"][-1])
    assert len(report["landscape"]["random"]["losses"]) == LANDSCAPE_POINTS[1]
    assert all((out / f).is_file() for f in LANDSCAPE_FILES)
    # without the flag: no section, and --overwrite removes the stale figures
    rc = main([*argv, *flags, "--overwrite", "--out", str(out)])
    assert rc == 0
    assert json.loads((out / "report.json").read_text())["landscape"] is None
    assert not any((out / f).exists() for f in LANDSCAPE_FILES)
