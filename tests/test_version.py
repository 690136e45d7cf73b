"""``hvp.__version__`` is the version of the code running, not of another installed checkout."""

import json
from pathlib import Path

import hvp
from hvp import _version
from hvp.analysis._analyze import versions


class _Dist:
    """A stand-in for an installed ``importlib.metadata`` distribution."""

    def __init__(self, version, *, editable_from=None, site=None):
        self.version, self._editable, self._site = version, editable_from, site

    def read_text(self, name):
        if name == "direct_url.json" and self._editable is not None:
            return json.dumps({"dir_info": {"editable": True}, "url": f"file://{self._editable}"})
        return None

    def locate_file(self, path):
        return Path(self._site) / path


def test_the_installed_version_only_when_it_is_the_running_code(tmp_path):
    here = Path(_version.__file__).parent
    # an editable install of this source tree, or a regular install holding these files: its version
    assert _version.running_version(here, _Dist("9.9.9", editable_from=here.parent)) == "9.9.9"
    assert _version.running_version(here, _Dist("9.9.8", site=here.parent)) == "9.9.8"
    # another checkout installed (the code runs from PYTHONPATH): never its version
    other = _Dist("9.9.7", editable_from=tmp_path)
    assert _version.running_version(here, other) != "9.9.7"
    assert _version.running_version(here, _Dist("9.9.6", site=tmp_path)) != "9.9.6"
    (tmp_path / "hvp").mkdir()  # a source tree without pyproject.toml nor git: unknown
    assert _version.running_version(tmp_path / "hvp", _Dist("1.0", site="/")) == "0.0.0+unknown"
    # what report.json records is the running module's version
    assert versions()["hvp"] == hvp.__version__ == _version.running_version()
