"""Analysis settings (validated once, same exception types as hvp.linalg) and the derived figures
(one definition with hvp.linalg.spectrum_summary), without a checkpoint or a model."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest

import hvp
from hvp.analysis import AnalysisError, AnalysisSettings, AnalysisTypeError
from hvp.analysis._analyze import (
    DEFAULTS,
    DensitySection,
    _eigen_section,
    derived_figures,
    zero_threshold,
)


def test_settings_defaults_validation_and_exception_types():
    s = AnalysisSettings()
    assert {k: getattr(s, k) for k in DEFAULTS if k != "grid_size"} == {
        k: v for k, v in DEFAULTS.items() if k != "grid_size"
    }
    assert s.eig_tol == 1e-4 and s.dtype == np.float32
    assert AnalysisSettings(x64=True).eig_tol == 1e-6
    assert AnalysisSettings(k=np.int64(3)).k == 3 and type(AnalysisSettings(k=np.int64(3)).k) is int
    # a wrong type is a TypeError (as in hvp.linalg), a wrong value a ValueError; both are
    # AnalysisErrors, printed on one line by the `hvp` command; the message names the flag
    for bad, exc, match in [
        (dict(k=2.5), TypeError, r"`k` \(-k\) must be an integer >= 1, got float"),
        (dict(k=True), TypeError, "`k`"),
        (dict(num_probes=1), ValueError, r"`num_probes` \(--probes\) must be an integer >= 2"),
        (dict(chunk_size=0), ValueError, r"--chunk-size"),
        (dict(seed=-1), ValueError, r"--seed"),
        (dict(tol=float("nan")), ValueError, "tol"),
        (dict(tol="1e-3"), TypeError, "tol"),
        (dict(operator="fisher"), ValueError, "hessian, ggn"),
        (dict(trace_method="exact"), ValueError, "hutch"),
        (dict(layer_view="some"), ValueError, "grouped"),
        (dict(x64="yes"), TypeError, "x64"),
    ]:
        with pytest.raises(exc, match=match):
            AnalysisSettings(**bad)
        with pytest.raises(AnalysisError):
            AnalysisSettings(**bad)
    with pytest.raises(AnalysisTypeError, match="Unknown analysis setting.*num_probe"):
        s.replace(num_probe=3)
    assert s.replace(k=2).k == 2 and s.k == 5  # frozen: replace makes a copy


def test_analyze_validates_settings_before_touching_the_checkpoint():
    with pytest.raises(AnalysisTypeError, match="Unknown analysis setting"):
        hvp.analysis.analyze("no/such/dir", model="m:f", num_probe=3)
    with pytest.raises(ValueError, match="--iters"):
        hvp.analysis.analyze("no/such/dir", model="m:f", num_iters=1)
    with pytest.raises(TypeError, match="AnalysisSettings"):
        hvp.analysis.analyze("no/such/dir", model="m:f", settings={"k": 1})


def _rotated(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues),) * 2))
    return (q * np.asarray(eigenvalues)) @ q.T


@pytest.mark.parametrize(
    "spectrum, expected",
    [
        ([-2.0, -1.0, 0.5, 1.5, 2.0, 3.0], 3.0 / 0.5),  # indefinite: smallest |lambda| is interior
        ([0.5, 1.0, 1.5, 2.0, 3.0, 4.0], 4.0 / 0.5),  # positive definite
        ([0.0, 0.0, 1.0, 1.5, 2.0, 3.0], np.inf),  # singular
    ],
)
def test_report_and_spectrum_summary_agree_on_the_derived_figures(spectrum, expected):
    """One definition of the condition estimate, the zero threshold and the negative mass.

    With as many SLQ steps as dimensions the Ritz values are the eigenvalues, so both must
    give the dense reference; before, the report divided by the smallest of the 2k extreme
    eigenvalues (3 / 2 for the indefinite spectrum).
    """
    a = _rotated(spectrum)
    op = hvp.from_dense(a)
    n, tol = len(spectrum), 1e-6
    summary = hvp.spectrum_summary(
        op, key=jax.random.key(0), tol=tol, zero_tol=tol, num_probes=3, num_iters=n
    )
    # the extreme eigenpairs as eigsh reports them (dense eigh: the figures, not eigsh, on test)
    lam = np.linalg.eigvalsh(a)
    top, bottom = (
        _eigen_section(
            SimpleNamespace(
                eigenvalues=x, residuals=np.zeros(1), converged=np.ones(1, bool), num_matvecs=0
            ),
            which,
            0.0,
        )
        for x, which in ((lam[-1:], "largest"), (lam[:1], "smallest"))
    )
    sd = hvp.spectral_density(op, key=jax.random.key(3), num_probes=3, num_iters=n)
    zero = zero_threshold(top, bottom, tol=tol, dtype=np.float64)
    dens = DensitySection(
        grid=np.zeros(1),
        density=np.zeros(1),
        sigma=0.1,
        nodes=np.asarray(sd.nodes),
        weights=np.asarray(sd.weights),
        negative_mass=float(sd.negative_mass(zero)),
        zero_threshold=zero,
        num_probes=3,
        num_iters=n,
        num_matvecs=int(sd.num_matvecs),
        seconds=0.0,
    )
    derived = derived_figures(top, bottom, dens, size=n)
    np.testing.assert_allclose(derived.condition_estimate, expected, rtol=1e-8)
    np.testing.assert_allclose(summary.condition_number, expected, rtol=1e-8)
    np.testing.assert_allclose(zero, summary.zero_threshold, rtol=1e-8)
    assert derived.positive_definite == summary.positive_definite
    np.testing.assert_allclose(derived.lambda_max, summary.lambda_max, rtol=1e-8)
    np.testing.assert_allclose(derived.lambda_min, summary.lambda_min, rtol=1e-8, atol=1e-10)
    # the negative mass: exact fraction of negative eigenvalues for these Ritz values
    ref_neg = np.mean(np.asarray(spectrum) < -zero)
    assert abs(derived.negative_mass - ref_neg) < 0.4  # three probes: a statistical figure
    assert (derived.negative_mass > 0) == (summary.negative_mass > 0) == (ref_neg > 0)


def test_unconverged_extreme_eigenvalues_are_marked_in_the_derived_figures_verdict_and_json():
    """lambda_min from an unconverged pair: the derived section, the critical-point verdict, the
    terminal note and the `--json` summary all say so (no products: sections built by hand)."""
    from hvp.analysis._compression_critical import critical_section
    from hvp.analysis._report import _unconverged_extremes
    from hvp.cli._main import _json_summary

    def sec(lam, conv, which):
        ns = SimpleNamespace(
            eigenvalues=np.array(lam),
            residuals=np.full(len(lam), 1e-3),
            converged=np.array(conv),
            num_matvecs=5,
        )
        return _eigen_section(ns, which, 0.0)

    top, bottom = (
        sec([2.0, 3.0], [True, True], "largest"),
        sec([1e-6, 0.1], [False, True], "smallest"),
    )
    dens = DensitySection(
        grid=np.zeros(1),
        density=np.zeros(1),
        sigma=0.1,
        nodes=np.array([[0.1, 3.0]]),
        weights=np.array([[0.5, 0.5]]),
        negative_mass=0.0,
        zero_threshold=1e-6,
        num_probes=1,
        num_iters=2,
        num_matvecs=2,
        seconds=0.0,
    )
    derived = derived_figures(top, bottom, dens, size=4)
    assert derived.lambda_min_converged is False and derived.lambda_max_converged is True
    assert _unconverged_extremes(derived) == "[red](from unconverged λ_min)"
    crit = critical_section(
        None,
        top,
        bottom,
        operator="hessian",
        zero_threshold=1e-6,
        seconds=0.0,
        gradient=np.zeros(3),
    )
    assert crit.converged is False and crit.verdict.endswith("(unverified: λ_min did not converge)")
    d = {
        "checkpoint": {"item_dir": "c", "step": 1},
        "model": dict.fromkeys(("spec", "framework", "num_params", "operator", "dtype")),
        "data": dict.fromkeys(("spec", "num_examples", "num_batches")),
        "top": top.to_dict(),
        "bottom": bottom.to_dict(),
        "trace": {"estimate": 1.0, "std_error": 0.1},
        "derived": derived.to_dict(),
        "critical": crit.to_dict(),
        "num_matvecs": 12,
        "timings": {"total": 1.0},
        "command": "hvp analyze",
    }
    summary = _json_summary(
        SimpleNamespace(to_dict=lambda: d), "out", [], SimpleNamespace(command="analyze")
    )
    assert summary["lambda_min_converged"] is False and summary["lambda_max_converged"] is True
    assert summary["converged"] is False and "unverified" in summary["critical_point"]
    # the compression table marks a layer's unconverged top eigenvalue
    from hvp.analysis._compression_critical import compression_table

    comp = {
        "layers": ["a", "b"],
        "bits": [2],
        "num_params": [2, 2],
        "trace": [1.0, 2.0],
        "trace_std_error": [0.1, 0.1],
        "top_eigenvalue": [1.0, 2.0],
        "top_eigenvalue_converged": [True, False],
        "omega": [[0.1], [0.2]],
        "allocation_bits": [2, 2],
        "allocation_average": 2.0,
        "obd_pruned_saliency": {"0.5": 0.1},
    }
    cells = list(compression_table({"compression": comp}).columns[3].cells)
    assert cells == ["1", "2 (not converged)"]
