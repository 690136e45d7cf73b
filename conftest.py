"""Root pytest configuration: applies to the doctests in ``hvp/`` and to ``tests/``.

The docstring examples run with the same settings as the test suite (``tests/conftest.py``):
float64 enabled (``jax_enable_x64``), the CPU backend, and XLA's CPU optimisation level 0
(faster compiles of tiny problems). Set before JAX creates its backend.

Doctests also share a persistent XLA compilation cache (a temporary folder): several examples
run the same small computation (e.g. :func:`hvp.analysis.analyze` on the same tiny model), and
the cache compiles it once. The tests in ``tests/`` run without it (they run first; the cache is
switched on by the first doctest, unless the user configured one).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
# The `hvp` command turns on a persistent XLA compilation cache in the user's home directory;
# tests that run the command in-process must neither write there nor leave the cache on for
# the tests after them (tests that want a cache set a temporary one themselves).
os.environ.setdefault("HVP_CACHE_DIR", "off")

import jax  # noqa: E402
import pytest  # noqa: E402
from _pytest.doctest import DoctestItem  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True)
def _doctest_compilation_cache(request, tmp_path_factory):
    if isinstance(request.node, DoctestItem) and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla-cache")))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    XLA's CPU backend maps memory for every executable it compiles, and a process that keeps
    thousands of them (the whole suite in one process) reaches the kernel's limit on memory
    mappings (``vm.max_map_count``, 65530 by default), after which a compilation segfaults.
    Test modules share no compiled programs worth keeping, so each starts from empty caches.
    """
    yield
    jax.clear_caches()
