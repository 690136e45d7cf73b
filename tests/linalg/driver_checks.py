"""Shared checks of the two drivers (compiled / host) and of checkpoint-resume, for every algorithm.

Usage in an algorithm's tests::

    from tests.linalg.driver_checks import assert_drivers_agree, assert_resume_bitwise

    def test_drivers(problem):
        assert_drivers_agree(lambda **kw: hvp.power_iteration(op, key=key, **kw), rtol=1e-12)

    def test_resume(tmp_path):
        assert_resume_bitwise(lambda **kw: hvp.power_iteration(op, key=key, **kw), tmp_path)
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from hvp.linalg import _driver


def _leaves(result):
    if dataclasses.is_dataclass(result):
        result = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    return [
        np.asarray(x)
        for x in jax.tree_util.tree_leaves(result)
        if isinstance(x, (jax.Array, np.ndarray, float, int, np.generic))
    ]


def assert_drivers_agree(call, *, rtol=1e-10, atol=1e-12):
    """``call(driver=...)`` gives the same numbers with the compiled and the host driver."""
    host = call(driver="host")
    comp = call(driver="compiled")
    a, b = _leaves(host), _leaves(comp)
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b, strict=True):
        if x.dtype == bool or np.issubdtype(x.dtype, np.integer):
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
    return host, comp


def assert_resume_bitwise(call, tmp_path, *, interrupt_after=3, every=1):
    """Interrupt a host-driver run after ``interrupt_after`` block products, resume it, and
    check that the result equals an uninterrupted run bit for bit (and that the file is gone)."""
    path = tmp_path / "state.npz"
    ref = call(driver="host")
    orig = _driver.block_product
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > interrupt_after:
            raise KeyboardInterrupt
        return orig(*args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(_driver, "block_product", flaky)
    try:
        with pytest.raises(KeyboardInterrupt):
            call(driver="host", checkpoint=_driver.Checkpoint(path, every=every))
    finally:
        mp.undo()
    assert path.exists(), "the interrupted run saved no state (did it finish too early?)"
    resumed = call(driver="host", checkpoint=_driver.Checkpoint(path, every=every))
    assert not path.exists()
    a, b = _leaves(ref), _leaves(resumed)
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    return ref, resumed
