"""Test configuration shared by the whole suite.

* float64 is enabled for every test (``jax_enable_x64``): references are dense
  float64 matrices, so create float32 arrays explicitly when testing float32.
* XLA's CPU backend optimisation level is 0 (faster compiles; see below).
* ``tests/`` is put on ``sys.path`` so that ``from problems import ...`` works
  from any test folder (there are no ``__init__.py`` files under ``tests/``).
"""

import os
import sys

# Test problems are tiny, so the suite's time is mostly XLA compilation; LLVM's optimisation
# passes dominate it on CPU. Level 0 compiles ~3x faster and keeps IEEE semantics (the float64
# references are unaffected). Set before JAX creates its backend; subprocesses inherit it.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
