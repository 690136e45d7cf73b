"""The command line's persistent compilation cache keeps every program, however quick to compile."""

import jax
from jax.experimental.compilation_cache import compilation_cache as cc

from hvp.cli._main import _enable_compilation_cache

_NAMES = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")


def test_cache_on_keeps_small_programs(tmp_path, monkeypatch):
    old = {n: getattr(jax.config, n) for n in _NAMES}
    monkeypatch.setenv("HVP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        _enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        # JAX's default (1 s) skipped the algorithms' small step programs
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()


def test_cache_off(monkeypatch):
    old = {n: getattr(jax.config, n) for n in _NAMES}
    monkeypatch.setenv("HVP_CACHE_DIR", "off")
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        _enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None
        assert jax.config.jax_persistent_cache_min_compile_time_secs == old[_NAMES[1]]
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()
