"""Type check of ``hvp/`` with mypy against a committed baseline (the count may only shrink).

Usage: ``python .ci/typecheck.py`` (CI, pre-commit) or ``python .ci/typecheck.py --update``
after fixing errors, to lower the committed number in ``.ci/mypy-baseline.txt``.
Exit status: 0 when the number of errors is at most the baseline, 1 otherwise.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".ci" / "mypy-baseline.txt"
ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<msg>.*)$")


def run_mypy() -> list[str]:
    """Errors reported by mypy (configured in pyproject.toml), one line each."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-color-output", "--no-error-summary"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode not in (0, 1):  # 2: mypy itself failed (bad config, crash)
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"mypy failed to run (exit {proc.returncode}).")
    return [line for line in proc.stdout.splitlines() if ERROR.match(line)]


def main(argv: list[str] | None = None) -> int:
    """Compare the number of mypy errors with the committed baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="write the current count")
    args = parser.parse_args(argv)
    errors = run_mypy()
    baseline = int(BASELINE.read_text().split()[0])
    if args.update:
        BASELINE.write_text(f"{len(errors)}\n")
        print(f"typecheck: baseline set to {len(errors)} (was {baseline}).")
        return 0
    if len(errors) > baseline:
        print("\n".join(errors))
        print(
            f"typecheck: {len(errors)} mypy errors, more than the baseline {baseline} in "
            f"{BASELINE.relative_to(ROOT)}: fix the new ones (listed above) before committing."
        )
        return 1
    note = ""
    if len(errors) < baseline:
        note = "; lower the baseline with `python .ci/typecheck.py --update`"
    print(f"typecheck: {len(errors)} mypy errors (baseline {baseline}){note}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
