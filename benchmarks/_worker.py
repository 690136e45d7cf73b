"""Child process of :func:`benchmarks._common.run_isolated`: ``python -m benchmarks._worker TARGET KWARGS_JSON OUT``."""

from __future__ import annotations

import json
import sys

from benchmarks._common import call_target, jsonable


def main(argv: list[str]) -> int:
    target, kwargs, out = argv
    result = call_target(target, json.loads(kwargs))
    with open(out, "w") as f:
        json.dump(jsonable(result), f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
