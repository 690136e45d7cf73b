"""`hvp analyze --resume DIR`: SIGINT a real run, run the same command again, same numbers.

Slow (three runs of the command, each compiling from scratch); the in-process test
tests/analysis/test_analysis_resume.py covers the same code in the default run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest
from flax import nnx

from hvp.analysis._demo import DEMO_MODEL_SPEC, DigitsMLP

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["-k", "2", "--probes", "2", "--iters", "6", "--trace-matvecs", "6"]
TINY += ["--layer-matvecs", "4", "--batch-size", "50", "--num-batches", "1", "--x64"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals"),
]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(HVP_CACHE_DIR="off")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def _cmd(ckpt, out, *extra):
    return [
        sys.executable,
        "-m",
        "hvp",
        "analyze",
        str(ckpt),
        "--model",
        DEMO_MODEL_SPEC,
        *TINY,
        "--no-plots",
        "--json",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


def _numbers(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("out", "files", "seconds")}


def test_sigint_then_resume_gives_the_numbers_of_an_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.abspath(ckpt), nnx.state(DigitsMLP(32, rngs=nnx.Rngs(4))))
    ck.wait_until_finished()
    ck.close()

    full = subprocess.run(
        _cmd(ckpt, tmp_path / "full"), capture_output=True, text=True, env=_env(), timeout=600
    )
    assert full.returncode == 0, full.stderr
    reference = json.loads(full.stdout)

    state = tmp_path / "state"
    proc = subprocess.Popen(
        _cmd(ckpt, tmp_path / "out", "--resume", str(state)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + 600
        while not (state / "bottom.pkl").exists():  # both eigenvalue stages are done
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert {"state.json", "top.pkl", "bottom.pkl"} <= set(os.listdir(state))

    again = subprocess.run(
        _cmd(ckpt, tmp_path / "out", "--resume", str(state)),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    resumed = json.loads(again.stdout)
    assert resumed.pop("resumed_stages")[:2] == ["top", "bottom"]
    assert _numbers(resumed) == _numbers(reference)
    assert not state.exists()
