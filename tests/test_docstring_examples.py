"""Every public function and class of ``hvp`` has a runnable ``>>>`` example in its docstring.

The examples themselves run as doctests (``--doctest-modules`` on ``hvp/`` in pyproject.toml's
pytest options); this test makes sure none is missing: a new public name without an example
fails here, naming it.
"""

import importlib
import inspect
import re

import pytest

PUBLIC_MODULES = [
    "hvp",
    "hvp.tree",
    "hvp.typing",
    "hvp.operators",
    "hvp.losses",
    "hvp.linalg",
    "hvp.flax",
    "hvp.monitor",
    "hvp.analysis",
    "hvp.optim",
    "hvp.critical",
    "hvp.compression",
    "hvp.landscape",
    "hvp.influence",
]


def _public_objects():
    seen = {}
    for mod_name in PUBLIC_MODULES:
        mod = importlib.import_module("hvp")
        for part in mod_name.split(".")[1:]:
            mod = getattr(mod, part)  # hvp.losses is an attribute of hvp, not a module path
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or name == "__version__":
                continue
            if not getattr(obj, "__module__", "hvp").startswith("hvp"):
                continue  # a type alias of another library's object (hvp.typing.Array, PyTree)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                if callable(obj) and type(obj).__module__.startswith("hvp."):
                    obj = type(obj)  # a callable instance (e.g. a loss): its class documents it
                else:
                    continue  # constants and type aliases
            seen.setdefault(id(obj), (f"{mod_name}.{name}", obj))
    return sorted(seen.values(), key=lambda t: t[0])


PUBLIC = _public_objects()


def test_public_api_is_not_empty():
    # Guards the collection above: a broken import or an empty __all__ must not pass silently.
    assert len(PUBLIC) > 50


@pytest.mark.parametrize("qualname,obj", PUBLIC, ids=[q for q, _ in PUBLIC])
def test_public_name_has_an_example(qualname, obj):
    doc = inspect.getdoc(obj) or ""
    assert ">>>" in doc, (
        f"{qualname} has no `>>>` example in its docstring: append an `Examples:` section "
        "with a tiny runnable example (it runs as a doctest; see CONTRIBUTING.md)."
    )
    # The API docs (mkdocstrings, Google style) render only an `Examples:` section as code; under
    # any other title the example is read as Markdown (and `x["a"][0]` becomes a broken link).
    assert re.search(r"^Examples:\n(\s*\n)*\s+>>> ", doc, re.M), (
        f"{qualname}: put the `>>>` example in a Google-style `Examples:` section (plural, at "
        "the end of the docstring, the example indented under it) so the API docs render it."
    )
