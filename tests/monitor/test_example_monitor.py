"""examples/train_digits_monitor.py, shortened: outputs exist and agree with each other."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "train_digits_monitor.py")


def _load():
    spec = importlib.util.spec_from_file_location("train_digits_monitor", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_short_run(tmp_path, capsys):
    out = tmp_path / "mon"
    summary = _load().main(
        [
            "--steps",
            "12",
            "--every",
            "5",
            "--num-train",
            "200",
            "--hidden",
            "8",
            "--trace-matvecs",
            "4",
            "--lr",
            "0.5",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "% of the wall time" in printed
    for name in (
        "history.jsonl",
        "history.csv",
        "sharpness.png",
        "summary.json",
        "density_step0.json",
        "density_step11.json",
    ):
        assert (out / name).stat().st_size > 0, name
    recs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 5, 10, 11]  # every 5, plus the final density step
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_allclose(
        [float(r["eigenvalue_1"]) for r in rows], [r["eigenvalues"][0] for r in recs]
    )
    saved = json.loads((out / "summary.json").read_text())
    assert saved["num_evaluations"] == 4 == summary["num_evaluations"]
    assert saved["num_matvecs"] == sum(r["num_matvecs"] for r in recs)
    assert saved["max_sharpness"] == max(r["eigenvalues"][0] for r in recs) > 0
    assert 0 < saved["overhead"] < 1 and saved["two_over_lr"] == 4.0
    assert all(r["lr_threshold"] == 4.0 and r["trace"] is not None for r in recs)
    assert recs[0]["negative_mass"] is not None and recs[1]["negative_mass"] is None
    assert (out / "sharpness.png").read_bytes()[:4] == b"\x89PNG"
