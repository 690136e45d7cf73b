"""``examples/quickstart.py`` runs and its H @ v agrees with jax.hessian to float64 accuracy."""

import importlib.util
import pathlib
import re

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "quickstart.py"


def test_quickstart_example(capsys):
    spec = importlib.util.spec_from_file_location("hvp_quickstart_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main()
    out = capsys.readouterr().out
    match = re.search(r"relative error vs jax.hessian: (\S+)", out)
    assert match, out
    printed = float(match.group(1))
    assert printed < 1e-10
    assert abs(printed - result["relative_error"]) <= 1e-3 * result["relative_error"] + 1e-300
    assert result["n"] == 64 * 16 + 16 + 16 * 10 + 10
    assert "ms per product" in out
