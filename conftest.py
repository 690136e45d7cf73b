"""Root pytest configuration: applies to the doctests in ``hvp/`` and to ``tests/``.

The docstring examples run with the same settings as the test suite (``tests/conftest.py``):
float64 enabled (``jax_enable_x64``), the CPU backend, and XLA's CPU optimisation level 0
(faster compiles of tiny problems). Set before JAX creates its backend.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
