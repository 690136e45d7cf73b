"""`hvp analyze --influence`: the influence section against `hvp.influence` called directly.

The section builder runs on a tiny softmax-regression operator (float64): its scores,
self-influences, rankings, labels and pixels must be those of `hvp.influence` and
`hvp.influence.self_influence` (which are checked against `jax.hessian` and leave-one-out
retraining in tests/influence/); then one tiny `analyze(..., influence=True)` checks the wiring
(settings, report.json, influence.png, the terminal table), and the flags are validated.
"""

import io
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_files import save_checkpoint
from rich.console import Console

import hvp
from hvp.analysis import AnalysisError, AnalysisSettings, AnalysisTypeError
from hvp.analysis._influence_section import (
    DENSE_MAX_PARAMS,
    influence_section,
    influence_table,
    plot_influence,
    resolve_method,
)


def _problem(n=14):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, 4, 4, 1))
    y = rng.integers(0, 3, size=n).astype(np.int32)
    d = int(np.prod(x.shape[1:]))
    params = {"w": jnp.asarray(0.3 * rng.normal(size=(d, 3))), "b": jnp.zeros(3)}

    def loss(p, batch):
        logits = batch[0].reshape(len(batch[0]), -1) @ p["w"] + p["b"]
        nll = (
            jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch[1][:, None], -1)[:, 0]
        )
        return jnp.mean(nll) + 0.05 * jnp.sum(p["w"] ** 2)

    return loss, params, (jnp.asarray(x), jnp.asarray(y))


def test_section_equals_hvp_influence_and_plots(tmp_path):
    loss, params, train = _problem()
    H = hvp.hessian(loss, params, train)
    sec = influence_section(H, train, num_test=2, top=3, damping=0.01)
    assert sec.method == "dense" and sec.method_rule.startswith("auto: dense")
    assert sec.test_indices == [12, 13] and sec.self_excluded
    test = jax.tree_util.tree_map(lambda a: a[12:], train)
    ref = hvp.influence(H, test, train, method="dense", damping=0.01, with_self_influence=True)
    scores = np.array(ref.scores)
    for t, i in enumerate(sec.test_indices):
        scores[t, i] = np.nan  # the test example's own score is left out
        order = np.argsort(np.where(np.isnan(scores[t]), np.inf, scores[t]))[:3]
        np.testing.assert_array_equal(sec.helpful_indices[t], order)
        np.testing.assert_allclose(sec.helpful_scores[t], scores[t, order], rtol=1e-12)
        order = np.argsort(np.where(np.isnan(scores[t]), np.inf, -scores[t]))[:3]
        np.testing.assert_array_equal(sec.harmful_indices[t], order)
        np.testing.assert_allclose(sec.harmful_scores[t], scores[t, order], rtol=1e-12)
        assert i not in sec.helpful_indices[t] and i not in sec.harmful_indices[t]
    self_ref = np.asarray(ref.self_influence)
    np.testing.assert_array_equal(sec.self_influence_indices, np.argsort(-self_ref)[:3])
    np.testing.assert_allclose(sec.self_influence_values, np.sort(self_ref)[::-1][:3], rtol=1e-12)
    assert sec.num_matvecs == ref.num_matvecs == H.size
    labels = np.asarray(train[1])
    assert sec.test_labels == labels[12:].tolist()
    assert sec.helpful_labels[0] == labels[sec.helpful_indices[0]].tolist()
    np.testing.assert_allclose(
        sec.test_loss,
        [float(loss(params, (train[0][i : i + 1], train[1][i : i + 1]))) for i in (12, 13)],
    )
    # images: the shape and the pixels of every example listed
    assert sec.image_shape == (4, 4, 1)
    i = int(sec.harmful_indices[1][0])
    np.testing.assert_array_equal(sec.images[str(i)], np.asarray(train[0][i]))
    # Arnoldi on the report's top eigenpairs (here from the dense matrix: no Lanczos compile),
    # a held-out test batch: hvp.influence with the top-4 of those pairs
    lam, vec = np.linalg.eigh(np.asarray(H.dense()))

    def pairs(k):
        vecs = jax.vmap(hvp.tree.unravel_fn(params))(jnp.asarray(vec[:, -k:].T))
        return hvp.EigshResult(
            eigenvalues=jnp.asarray(lam[-k:]),
            eigenvectors=vecs,
            residuals=jnp.zeros(k),
            converged=jnp.ones(k, bool),
            num_matvecs=0,
            num_restarts=0,
            thresholds=jnp.full(k, 1e-8),
        )

    held_out = jax.tree_util.tree_map(lambda a: a[:3], train)
    sec = influence_section(
        H,
        train,
        test=held_out,
        test_spec="held.npz",
        num_test=2,
        top=2,
        method="arnoldi",
        rank=4,
        damping=0.0,
        eigsh=pairs(6),
    )
    ref = hvp.influence(H, jax.tree_util.tree_map(lambda a: a[:2], held_out), train, eigsh=pairs(4))
    assert not sec.self_excluded and "--influence-test held.npz" in sec.test_source
    np.testing.assert_allclose(
        sec.helpful_scores, np.sort(np.asarray(ref.scores), axis=1)[:, :2], rtol=1e-9
    )
    assert sec.rank == 4 and sec.num_matvecs == 0
    assert sec.eigenpairs == "the report's top eigenpairs"
    # solve: the scores by CG (exact to its tolerance), the self-influence by Arnoldi
    sec = influence_section(
        H, train, num_test=1, top=2, method="solve", rank=4, damping=0.01, eigsh=pairs(6)
    )
    exact = hvp.influence(
        H, jax.tree_util.tree_map(lambda a: a[13:], train), train, method="dense", damping=0.01
    )
    s_ref = np.array(exact.scores[0])
    s_ref[13] = np.nan
    np.testing.assert_allclose(
        sec.helpful_scores[0], np.sort(s_ref[~np.isnan(s_ref)])[:2], rtol=1e-6
    )
    arn = hvp.influence.self_influence(H, train, damping=0.01, eigsh=pairs(4))
    np.testing.assert_allclose(
        sec.self_influence_values, np.sort(arn.self_influence)[::-1][:2], rtol=1e-9
    )
    assert sec.converged and sec.self_influence_method == "arnoldi (rank 4)"
    # the figure: images, and bars for non-image inputs; the terminal table
    report = {"influence": sec.to_dict()}
    assert plot_influence(report, tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"
    bars = {**sec.to_dict(), "image_shape": None, "images": None}  # non-image inputs: bars
    assert plot_influence({"influence": bars}, tmp_path / "b.png").stat().st_size > 0
    buf = io.StringIO()
    Console(file=buf, width=200).print(influence_table({"influence": sec}))
    assert "most helpful" in buf.getvalue() and "self-influence" in buf.getvalue()
    json.dumps(sec.to_dict())  # JSON-serialisable


def test_settings_and_flags_are_validated(capsys):
    assert resolve_method("auto", DENSE_MAX_PARAMS)[0] == "dense"
    assert resolve_method("auto", DENSE_MAX_PARAMS + 1)[0] == "solve"
    with pytest.raises(AnalysisError, match="refused above"):
        resolve_method("dense", 10**6)
    with pytest.raises(AnalysisError, match=r"--influence-top.*add --influence"):
        AnalysisSettings(influence_top=3)
    with pytest.raises(AnalysisError, match="--influence-method"):
        AnalysisSettings(influence=True, influence_method="lissa")
    with pytest.raises(AnalysisError, match="--influence-damping"):
        AnalysisSettings(influence=True, influence_damping=-1.0)
    with pytest.raises(AnalysisTypeError, match="--influence-test"):
        AnalysisSettings(influence=True, influence_test=3)
    with pytest.raises(AnalysisError, match="--influence-num-test"):
        AnalysisSettings(influence=True, influence_num_test=0)
    s = AnalysisSettings(influence=True, influence_rank=7)
    assert s.to_dict()["influence_rank"] == 7 and s.to_dict()["influence"] is True
    from hvp.cli import main

    for bad in (
        ["--influence-method", "x"],
        ["--influence-rank", "0"],
        ["--influence-damping", "-1"],
    ):
        assert main(["analyze", "ckpt", "--model", "m:f", *bad]) == 2
    assert "--influence-damping" in capsys.readouterr().err
    from hvp.cli._main import _analysis_kwargs, build_parser

    argv = ["analyze", "ckpt", "--model", "m:f", "--influence", "--influence-test", "held.npz"]
    argv += ["--influence-top", "4", "--influence-method", "arnoldi", "--influence-damping", "0.1"]
    kw = _analysis_kwargs(build_parser().parse_args(argv))
    assert kw["influence"] and kw["influence_test"] == "held.npz" and kw["influence_top"] == 4
    assert kw["influence_method"] == "arnoldi" and kw["influence_damping"] == 0.1
    assert kw["influence_rank"] == 20 and kw["influence_num_test"] == 3
    demo = _analysis_kwargs(build_parser().parse_args(["demo"]))  # hvp demo: no influence flags
    assert "influence" not in demo
    s = AnalysisSettings(**{k: v for k, v in kw.items() if k.startswith("influence")})
    from hvp.analysis._analyze import _command_line

    line = _command_line("ckpt", "m:f", "digits", s.to_dict())
    assert line.endswith(
        "--influence --influence-test held.npz --influence-top 4 "
        "--influence-method arnoldi --influence-damping 0.1"
    )


def _tiny():
    net = nn.Dense(3)
    return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))), "cross_entropy"


def test_analyze_influence_section_end_to_end(tmp_path):
    rng = np.random.default_rng(1)
    (_, variables), _ = _tiny()
    saved = jax.tree_util.tree_map(lambda a: np.asarray(rng.normal(size=a.shape)), variables)
    ckpt = save_checkpoint(tmp_path / "ckpt", saved)
    x, y = rng.normal(size=(10, 4)), rng.integers(0, 3, size=10).astype(np.int32)
    report = hvp.analysis.analyze(
        ckpt,
        model=_tiny,
        data=[(x, y)],
        k=1,
        num_probes=2,
        num_iters=4,
        trace_method="hutchinson",
        trace_matvecs=4,
        layer_matvecs=2,
        x64=True,
        influence=True,
        influence_num_test=2,
        influence_top=2,
        out_dir=tmp_path / "out",
    )
    sec = report.influence
    lam_max, lam_min = float(report.top.eigenvalues[-1]), float(report.bottom.eigenvalues[0])
    assert sec.method == "dense"
    assert sec.damping == pytest.approx(max(0.0, -lam_min) + 1e-3 * lam_max)
    # the same scores from hvp.influence on the report's operator (the GGN-free Hessian here)
    p = saved["params"]

    def loss(q, b):
        return hvp.losses.softmax_cross_entropy(b[0] @ q["kernel"] + q["bias"], b[1])

    H = hvp.hessian(loss, jax.tree_util.tree_map(jnp.asarray, p), (jnp.asarray(x), jnp.asarray(y)))
    ref = hvp.influence(H, (x[8:], y[8:]), (x, y), method="dense", damping=sec.damping)
    np.testing.assert_allclose(
        sec.helpful_scores[0][0],
        np.nanmin(np.where(np.arange(10) == 8, np.nan, ref.scores[0])),
        rtol=1e-8,
    )
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    assert d["influence"]["test_indices"] == [8, 9] and d["settings"]["influence"] is True
    assert (tmp_path / "out" / "influence.png").stat().st_size > 0
    assert report.num_matvecs >= sec.num_matvecs
    buf = io.StringIO()
    hvp.analysis.print_summary(report, Console(file=buf, width=200))
    assert "Influence (Koh & Liang)" in buf.getvalue()
    # a held-out split the model cannot read is refused before any algorithm runs
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 7)), y=np.zeros(3, np.int32))
    with pytest.raises(AnalysisError, match="--influence-test data .* layout of --data"):
        hvp.analysis.analyze(
            ckpt,
            model=_tiny,
            data=[(x, y)],
            influence=True,
            influence_test=str(tmp_path / "bad.npz"),
        )


def test_density_figure_title_ends_with_the_critical_point_verdict():
    from hvp.analysis._plots import _verdict_line

    assert _verdict_line({"critical": None}) == ""
    c = {"kind": "saddle", "verdict": "saddle point", "gradient_norm": 1e-5, "grad_tol": 1e-3}
    line = _verdict_line({"critical": {**c, "zero_threshold": 1e-4}})
    assert line.startswith("\nverdict: saddle point") and "≤ 0.001" in line
    c = {"kind": "not critical", "verdict": "not a critical point: gradient norm 0.07"}
    assert "(> tolerance 0.001)" in _verdict_line({"critical": {**c, "grad_tol": 1e-3}})
