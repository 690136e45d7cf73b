"""An interrupted analysis resumes its finished stages from a resume directory (issue 11).

The stages run again only when not kept; the report of the resumed run has the same numbers as
an uninterrupted run; a directory of another analysis is refused; it is emptied at the end.
"""

import collections
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import hvp
from hvp.analysis import AnalysisError, analyze, load_model

MODEL = """
import jax, jax.numpy as jnp
import flax.linen as nn

class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jnp.tanh(nn.Dense(3)(x)))

def small():
    net = Small()
    return (net, net.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))), "mse"
"""

SETTINGS = dict(
    k=1,
    num_probes=2,
    num_iters=4,
    trace_method="hutchinson",
    trace_matvecs=4,
    layer_matvecs=2,
    seed=3,
    x64=True,
)
ALGORITHMS = ("eigsh", "trace", "spectral_density", "layer_trace")


def _problem(tmp_path):
    (tmp_path / "small_model.py").write_text(textwrap.dedent(MODEL))
    spec = f"{tmp_path / 'small_model.py'}:small"
    rng = np.random.default_rng(0)
    saved = jax.tree_util.tree_map(
        lambda a: np.asarray(rng.normal(size=a.shape), np.float32), load_model(spec).variables
    )
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(tmp_path / "ckpt"), saved)
    ck.wait_until_finished()
    ck.close()
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = rng.normal(size=(6, 2)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    return tmp_path / "ckpt", spec, str(tmp_path / "data.npz"), (saved, x, y)


def _figures(report) -> dict:
    d = report.to_dict()
    out = {}
    for section in ("top", "bottom", "trace", "density", "layers", "derived"):
        out[section] = {k: v for k, v in d[section].items() if k != "seconds"}
    return out


def _interrupt_and_resume(tmp_path, monkeypatch):
    """Interrupt an analysis in its density stage, then resume it; return the resumed report."""
    ckpt, model, data, arrays = _problem(tmp_path)
    state = tmp_path / "state"
    calls = collections.Counter()
    real = {name: getattr(hvp.linalg, name) for name in ALGORITHMS}

    def counting(name):
        def run(*args, **kwargs):
            calls[name] += 1
            return real[name](*args, **kwargs)

        return run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the density runs

    for name in ALGORITHMS:
        monkeypatch.setattr(hvp.linalg, name, counting(name))
    monkeypatch.setattr(hvp.linalg, "spectral_density", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analyze(ckpt, model=model, data=data, resume_dir=state, **SETTINGS)
    kept = sorted(p.name for p in state.iterdir())
    assert kept == ["bottom.pkl", "state.json", "top.pkl", "trace.pkl"], kept

    # the state of one analysis is refused to another (here: another k), before any work
    calls.clear()
    with pytest.raises(AnalysisError, match=r"state of another analysis \(differs in: settings\)"):
        analyze(ckpt, model=model, data=data, resume_dir=state, **{**SETTINGS, "k": 2})
    with pytest.raises(AnalysisError, match="spec strings"):
        analyze(ckpt, model=model, data=[np.zeros((2, 4))], resume_dir=state, **SETTINGS)
    assert not calls

    monkeypatch.setattr(hvp.linalg, "spectral_density", counting("spectral_density"))
    resumed = analyze(ckpt, model=model, data=data, resume_dir=state, **SETTINGS)
    assert calls == {"spectral_density": 1, "layer_trace": 1}  # eigsh and trace not run again
    assert resumed.extra["resumed_stages"] == ["top", "bottom", "trace"]
    assert not state.exists()  # emptied once the report is complete
    return resumed, (ckpt, model, data, arrays), calls


def test_interrupted_analysis_resumes_the_finished_stages(tmp_path, monkeypatch):
    resumed, (_, model, _, (saved, x, y)), _ = _interrupt_and_resume(tmp_path, monkeypatch)
    # the kept stages are in the report: against the dense float64 Hessian
    f64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), saved)
    problem = hvp.flax.from_linen(load_model(model).model, f64, "mse")
    lam = np.linalg.eigvalsh(np.asarray(problem.hessian((x, y)).dense()))
    np.testing.assert_allclose(resumed.top.eigenvalues, lam[-1:], rtol=1e-6)
    np.testing.assert_allclose(resumed.bottom.eigenvalues, lam[:1], rtol=1e-6, atol=1e-8)
    assert resumed.trace.num_matvecs == 4
    assert abs(resumed.trace.estimate - lam.sum()) < 5 * resumed.trace.std_error + 1e-8


@pytest.mark.slow  # a third analysis; the default test above covers the same code
def test_resumed_analysis_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    resumed, (ckpt, model, data, _), calls = _interrupt_and_resume(tmp_path, monkeypatch)
    calls.clear()
    fresh = analyze(ckpt, model=model, data=data, **SETTINGS)  # uninterrupted
    assert calls == {"eigsh": 2, "trace": 1, "spectral_density": 1, "layer_trace": 1}
    assert "resumed_stages" not in fresh.extra
    assert _figures(resumed) == _figures(fresh)  # the same numbers, exactly
    assert resumed.num_matvecs == fresh.num_matvecs
