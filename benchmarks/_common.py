"""Shared machinery of the benchmark scripts: timing, memory, isolation, writers.

* :func:`time_fn` - warm-up (compilation), ``jax.block_until_ready`` on every
  result, median of repeats with the inter-quartile range and min/max.
* :func:`measure` - the same plus the peak resident memory (host RSS) of the
  timed calls alone: the kernel's high-water mark ``VmHWM`` is reset through
  ``/proc/self/clear_refs`` after set-up and warm-up, so the number is the
  peak while the measured function runs (on an accelerator, the device's
  ``memory_stats()["peak_bytes_in_use"]`` is recorded too).
* :func:`run_isolated` - runs ``module:function(**kwargs)`` in a fresh Python
  process, so that a measurement's peak memory is its own and a measurement
  that runs out of memory or time is killed and recorded instead of crashing
  the run (memory guard polled from ``/proc/<pid>/status``, wall-clock limit).
* :class:`Report` - collects the rows of one benchmark group and writes
  ``<group>.json``, ``<group>.md`` and (optionally) PNG plots into
  ``benchmarks/results/<device>/``.

Linux ``/proc`` is used when present; elsewhere peak memory falls back to
``resource.getrusage`` (a process-lifetime peak) and the guard to the
wall-clock limit alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


# --------------------------------------------------------------------------------------------
# device and environment
# --------------------------------------------------------------------------------------------
def device_name() -> str:
    """``"cpu"``, or ``"gpu-<kind>"`` / ``"tpu-<kind>"`` (lower case, no spaces)."""
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return "cpu"
    kind = getattr(d, "device_kind", d.platform).lower().replace(" ", "-")
    return f"{d.platform}-{kind}"


def environment() -> dict:
    """Versions and machine facts recorded next to every result."""
    import jax

    env = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "device": device_name(),
        "device_kind": getattr(jax.devices()[0], "device_kind", "cpu"),
        "cpu_count": os.cpu_count(),
        "memory_total_gb": round(total_memory_bytes() / 1e9, 1) if total_memory_bytes() else None,
        "machine": platform.machine(),
    }
    try:
        import hvp

        env["hvp"] = hvp.__version__
    except Exception:  # pragma: no cover
        pass
    return env


def _proc_kb_field(path: str, field: str) -> int | None:
    """``field: N kB`` from a ``/proc`` file, in bytes (``None`` where unavailable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _meminfo(field: str) -> int | None:
    return _proc_kb_field("/proc/meminfo", field)


def total_memory_bytes() -> int | None:
    return _meminfo("MemTotal")


def available_memory_bytes() -> int | None:
    return _meminfo("MemAvailable")


# --------------------------------------------------------------------------------------------
# memory of this process
# --------------------------------------------------------------------------------------------
def status_field(field: str, pid: int | str = "self") -> int | None:
    """``field`` of ``/proc/<pid>/status`` (e.g. ``VmHWM``, ``RssAnon``) in bytes, or ``None``."""
    return _proc_kb_field(f"/proc/{pid}/status", field)


def rss_bytes() -> int | None:
    """Current resident set size of this process."""
    return status_field("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux); ``False`` when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """Peak RSS since the last :func:`reset_peak_rss` (or since start)."""
    hwm = status_field("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # pragma: no cover
        return None


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first accelerator (``None`` on CPU)."""
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        return None
    try:
        stats = d.memory_stats() or {}
        return int(stats.get("peak_bytes_in_use", 0)) or None
    except Exception:  # pragma: no cover
        return None


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _block(x):
    import jax

    try:
        return jax.block_until_ready(x)
    except Exception:  # non-JAX results (torch tensors, floats)
        return x


def summarize(samples: Sequence[float]) -> dict:
    """Median, quartiles, min/max and count of a list of seconds."""
    a = np.asarray(samples, dtype=float)
    return {
        "median_s": float(np.median(a)),
        "q25_s": float(np.percentile(a, 25)),
        "q75_s": float(np.percentile(a, 75)),
        "min_s": float(a.min()),
        "max_s": float(a.max()),
        "repeats": int(a.size),
    }


def time_fn(
    fn: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    min_time: float = 0.0,
    max_repeats: int | None = None,
) -> dict:
    """Time ``fn()`` (blocking on its result): ``warmup`` untimed calls, then ``repeats`` timed ones.

    With ``min_time > 0`` more repeats are taken (up to ``max_repeats``) until
    the timed calls add up to ``min_time`` seconds, which steadies very short
    calls. Returns :func:`summarize` of the samples plus the last result under
    ``"value"``.
    """
    out = None
    for _ in range(warmup):
        out = _block(fn())
    samples: list[float] = []
    cap = max_repeats if max_repeats is not None else max(repeats, 10 * repeats)
    while len(samples) < repeats or (sum(samples) < min_time and len(samples) < cap):
        t0 = time.perf_counter()
        out = _block(fn())
        samples.append(time.perf_counter() - t0)
    stats = summarize(samples)
    stats["value"] = out
    return stats


def measure(
    fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, min_time: float = 0.0
) -> dict:
    """:func:`time_fn` plus the peak memory of the timed calls.

    Fields: the timing summary, ``rss_before_bytes`` (after set-up and warm-up),
    ``peak_rss_bytes`` (high-water mark while the timed calls ran),
    ``peak_extra_bytes`` (their difference: what the measured computation
    itself needed on the host), and ``device_peak_bytes`` on accelerators.
    """
    for _ in range(warmup):
        _block(fn())
    gc.collect()
    before = rss_bytes()
    reset = reset_peak_rss()
    stats = time_fn(fn, repeats=repeats, warmup=0, min_time=min_time)
    peak = peak_rss_bytes()
    stats.update(
        rss_before_bytes=before,
        peak_rss_bytes=peak,
        peak_extra_bytes=(peak - before)
        if (reset and peak is not None and before is not None)
        else None,
        peak_is_process_lifetime=not reset,
        device_peak_bytes=device_peak_bytes(),
    )
    return stats


# --------------------------------------------------------------------------------------------
# isolated measurements (own process, memory and time guard)
# --------------------------------------------------------------------------------------------
def run_isolated(
    target: str,
    kwargs: dict | None = None,
    *,
    timeout: float = 600.0,
    mem_limit_bytes: int | None = None,
    poll: float = 0.05,
    env: dict | None = None,
) -> dict:
    """Run ``target`` (``"package.module:function"``) with ``kwargs`` in a fresh process.

    The function must return a JSON-serialisable dict. Returns it with
    ``"status": "ok"``, or ``{"status": "oom" | "timeout" | "error", "reason": ...}``
    when the child exceeded ``mem_limit_bytes`` of resident memory (it is killed),
    ran past ``timeout`` seconds, or raised (XLA's own out-of-memory errors come
    back as ``"oom"`` with XLA's message). ``peak_child_rss_bytes`` is the largest
    RSS the parent saw while polling.
    """
    with tempfile.TemporaryDirectory(prefix="hvp-bench-") as tmp:
        out_path = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks._worker",
            target,
            json.dumps(kwargs or {}),
            str(out_path),
        ]
        child_env = dict(os.environ)
        child_env.setdefault("PYTHONPATH", "")
        child_env["PYTHONPATH"] = str(REPO) + (
            os.pathsep + child_env["PYTHONPATH"] if child_env["PYTHONPATH"] else ""
        )
        if env:
            child_env.update(env)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=str(REPO),
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        peak = 0
        status, reason = None, None
        while proc.poll() is None:
            rss = status_field("VmRSS", proc.pid) or 0
            peak = max(peak, rss)
            if mem_limit_bytes is not None and rss > mem_limit_bytes:
                proc.kill()
                status = "oom"
                reason = (
                    f"killed by the memory guard: resident memory passed {mem_limit_bytes / 1e9:.1f} GB "
                    f"after {time.perf_counter() - t0:.1f} s"
                )
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                status = "timeout"
                reason = f"killed by the time guard after {timeout:.0f} s"
                break
            time.sleep(poll)
        output = proc.communicate()[0] or ""
        wall = time.perf_counter() - t0
        if status is None and proc.returncode == 0 and out_path.exists():
            res = json.loads(out_path.read_text())
            res.setdefault("status", "ok")
        elif status is None:
            tail = output.strip().splitlines()[-12:]
            text = "\n".join(tail)
            low = text.lower()
            if any(
                s in low
                for s in (
                    "resource_exhausted",
                    "out of memory",
                    "memoryerror",
                    "failed to allocate",
                    "bad_alloc",
                )
            ) or proc.returncode in (-9, 137):
                status = "oom"
            else:
                status = "error"
            reason = _short_reason(tail) or f"exit status {proc.returncode}"
            res = {"status": status, "reason": reason, "output_tail": text[-2000:]}
        else:
            res = {"status": status, "reason": reason}
        res["peak_child_rss_bytes"] = peak or None
        res["wall_s"] = wall
        return res


def _short_reason(lines: list[str]) -> str:
    for line in reversed(lines):
        line = line.strip()
        if line and ("Error" in line or "error" in line or "RESOURCE_EXHAUSTED" in line):
            return line[:400]
    return lines[-1][:400] if lines else ""


def call_target(target: str, kwargs: dict) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
def jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items() if k != "value"}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.generic,)):
        return jsonable(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        arr = np.asarray(x)
        return jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    return str(x)


def fmt_s(x: float | None) -> str:
    """Seconds in a readable unit."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} µs"
    if x < 1.0:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def fmt_bytes(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e9:
        return f"{x / 1e9:.2f} GB"
    if x >= 1e6:
        return f"{x / 1e6:.0f} MB"
    return f"{x / 1e3:.0f} kB"


def fmt_spread(stats: dict | None) -> str:
    """``median (IQR lo-hi)`` of a :func:`summarize` dict."""
    if not stats or stats.get("median_s") is None:
        return "-"
    return f"{fmt_s(stats['median_s'])} ({fmt_s(stats['q25_s'])}–{fmt_s(stats['q75_s'])})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Report:
    """The results of one benchmark group, written as JSON + Markdown (+ PNG plots)."""

    group: str
    title: str
    out_dir: Path
    quick: bool = False
    data: dict = dataclasses.field(default_factory=dict)
    sections: list = dataclasses.field(default_factory=list)  # (heading, markdown text)
    figures: list = dataclasses.field(default_factory=list)  # file names
    notes: list = dataclasses.field(default_factory=list)

    def table(
        self, heading: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = ""
    ) -> str:
        text = markdown_table(headers, rows)
        if note:
            text += "\n\n" + note
        self.sections.append((heading, text))
        return text

    def text(self, heading: str, body: str) -> None:
        self.sections.append((heading, body))

    def figure(self, name: str, draw: Callable[[Any], None], *, figsize=(7.0, 4.5)) -> str | None:
        """Draw with ``draw(fig)`` and save ``<out>/<name>``; ``None`` without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.notes.append(f"{name}: not drawn (matplotlib is not installed)")
            return None
        fig = plt.figure(figsize=figsize)
        try:
            draw(fig)
            fig.tight_layout()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.out_dir / name, dpi=110)
        finally:
            plt.close(fig)
        self.figures.append(name)
        return name

    def markdown(self) -> str:
        parts = [f"# {self.title}", ""]
        env = self.data.get("environment", {})
        if env:
            parts.append(
                f"Device: `{env.get('device')}` ({env.get('cpu_count')} CPU cores, "
                f"{env.get('memory_total_gb')} GB), jax {env.get('jax')}, hvp {env.get('hvp')}, "
                f"{env.get('date_utc')}{' — QUICK MODE (small sizes, few repeats)' if self.quick else ''}."
            )
            parts.append("")
        for heading, body in self.sections:
            parts += [f"## {heading}", "", body, ""]
        for fig in self.figures:
            parts += [f"![{fig}]({fig})", ""]
        if self.notes:
            parts += ["## Notes", ""] + [f"- {n}" for n in self.notes] + [""]
        return "\n".join(parts)

    def write(self) -> dict:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "group": self.group,
            "title": self.title,
            "quick": self.quick,
            "figures": self.figures,
            "notes": self.notes,
            **jsonable(self.data),
        }
        (self.out_dir / f"{self.group}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (self.out_dir / f"{self.group}.md").write_text(self.markdown())
        return payload


def console():
    """A rich console when available (tables print nicely), else ``None``."""
    try:
        from rich.console import Console

        return Console()
    except ImportError:  # pragma: no cover
        return None


def print_markdown(text: str) -> None:
    """Print a group's Markdown as is (tables stay copy-pasteable and unwrapped)."""
    print(text, flush=True)


def progress(iterable, *, description: str, total: int | None = None):
    """Iterate with a rich progress bar on a terminal (plain iteration otherwise)."""
    items = list(iterable)
    if not sys.stderr.isatty():
        yield from items
        return
    try:
        from rich.progress import track
    except ImportError:  # pragma: no cover
        yield from items
        return
    yield from track(items, description=description, total=total or len(items), transient=True)


def algorithm(name: str):
    """``hvp.<name>`` (top-level export), else ``hvp.linalg.<name>``."""
    import hvp

    fn = getattr(hvp, name, None)
    if fn is None:
        import hvp.linalg

        fn = getattr(hvp.linalg, name)
    return fn


def log_xticks(ax, values) -> None:
    """Label a log x-axis exactly at ``values`` (plain numbers, no overlapping minor labels)."""
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(list(values))
    ax.set_xticklabels([f"{v:g}" for v in values])
    ax.xaxis.set_minor_formatter(NullFormatter())
