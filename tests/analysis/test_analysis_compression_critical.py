"""The critical-point and compression sections of `hvp.analysis.analyze`, against dense references."""

import io
import json

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
from checkpoint_files import save_checkpoint
from rich.console import Console

import hvp
from hvp.analysis import print_summary


def _tiny():
    net = nn.Dense(2)
    return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))), "mse"


def test_sections_in_report_json_plot_and_summary(tmp_path):
    rng = np.random.default_rng(0)
    (net, variables), _ = _tiny()
    saved = jax.tree_util.tree_map(lambda a: np.asarray(rng.normal(size=a.shape)), variables)
    ckpt = save_checkpoint(tmp_path / "ckpt", saved)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 2))
    report = hvp.analysis.analyze(
        ckpt,
        model=_tiny,
        data=[(x[:8], y[:8]), (x[8:], y[8:])],
        k=1,
        num_probes=2,
        num_iters=4,
        trace_method="hutchinson",
        trace_matvecs=4,
        layer_matvecs=16,  # >= n = 8: the exact diagonal, so exact traces
        x64=True,
        compression=True,
        out_dir=tmp_path / "out",
    )
    params = saved["params"]

    def loss(p):
        return hvp.losses.mean_squared_error(x @ p["kernel"] + p["bias"], y)

    # critical point: the gradient over both batches, the verdict of the dense spectrum
    c = report.critical
    grad = jax.grad(loss)(params)
    np.testing.assert_allclose(c.gradient_norm, float(hvp.tree.norm(grad)), rtol=1e-10)
    assert c.kind == "not critical" and c.verdict.startswith("not a critical point")
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    dense = np.asarray(jax.hessian(lambda w: loss(unravel(w)))(flat))
    eig = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose([c.lambda_min, c.lambda_max], eig[[0, -1]], atol=1e-8)
    # compression: the kernel's Hessian trace (exact diagonal) and Omega against dense references
    s = report.compression
    assert s.layers == ("kernel",) and tuple(s.bits) == (2, 4, 8)
    idx = np.arange(2, 8)  # ravel order: bias (2), kernel (6)
    block = dense[np.ix_(idx, idx)]
    np.testing.assert_allclose(s.trace[0], np.trace(block), rtol=1e-10)
    w = np.asarray(params["kernel"])
    for j, b in enumerate(s.bits):
        pert = np.sum((np.asarray(hvp.compression.uniform_quantize(jnp.asarray(w), b)) - w) ** 2)
        np.testing.assert_allclose(s.omega[0, j], np.trace(block) / 6 * pert, rtol=1e-10)
    np.testing.assert_allclose(s.top_eigenvalue[0], np.linalg.eigvalsh(block)[-1], rtol=1e-6)
    # OBD at a non-critical point of the Hessian: the note says why and names the GGN
    negative = int(np.sum(0.5 * np.diag(block) * w.reshape(-1) ** 2 < 0))
    assert s.obd_num_negative == negative
    assert "OBD assumes a minimum" in s.obd_note and "--operator ggn" in s.obd_note
    assert f"gradient norm is {c.gradient_norm:.3g}" in s.obd_note
    # both sections in report.json, the plot written, both on the terminal
    d = json.loads((tmp_path / "out" / "report.json").read_text())
    assert d["critical"]["verdict"] == c.verdict and d["compression"]["layers"] == ["kernel"]
    assert (tmp_path / "out" / "compression.png").stat().st_size > 0
    assert d["settings"]["compression"] is True and d["compression"]["obd_note"] == s.obd_note
    buf = io.StringIO()
    print_summary(report, Console(file=buf, width=160))
    text = buf.getvalue()
    assert "critical point: not a critical point" in text and "Ω(2)" in text
    assert "OBD assumes a minimum" in text.replace("\n", " ")
