"""Draw `make fig-controls`'s figures from the runs under a folder: python scripts/fig_controls.py DIR."""

from __future__ import annotations

import sys
from pathlib import Path

from patchscan.errors import UserError
from patchscan.plots.controls import draw


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python scripts/fig_controls.py RUNS_DIR", file=sys.stderr)
        return 2
    try:
        for path in draw(Path(argv[0])):
            print(f"figure:  {path}")
    except UserError as exc:
        print(f"fig_controls: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
