"""Inputs left out, counted by reason, so that nothing is dropped in silence.

Loaders and scopes add to a `Counter` (reason -> how many); the run logs it, records it in
`_run.json` and `metrics.json` (`"dropped"`), and names it when nothing is left to run.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("patchscan")


def describe(dropped: Counter) -> str:
    """'3 texts shorter than 8 tokens, 1 LRE sample without a text object' (most first); '' for none."""
    return ", ".join(f"{n} {reason}" for reason, n in dropped.most_common() if n)


def counts(dropped: Counter) -> dict[str, int]:
    """The counts as a plain dict (most first) for _run.json and metrics.json; {} for none."""
    return {reason: int(n) for reason, n in dropped.most_common() if n}


def report(dropped: Counter) -> None:
    """Log the inputs left out: one warning naming each reason."""
    if sum(dropped.values()):
        log.warning("left out %d inputs: %s", sum(dropped.values()), describe(dropped))


def nothing_left(what: str, dropped: Counter) -> str:
    """The message when nothing is left: `what`, then what was dropped and why."""
    said = describe(dropped)
    return f"{what} (left out: {said})" if said else what
