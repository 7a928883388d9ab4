"""A quicker end for the `patchscan` process.

After a run the interpreter holds a few million objects (torch, transformers, pandas, the model).
At exit CPython clears every module and runs its cycle collector over all of them, which costs about
a second of a CLI run on 2 cores, to free memory the operating system takes back anyway.
`gc.freeze()` (a documented CPython call) moves the surviving objects out of the collector's reach,
so those passes are skipped. Nothing else changes: atexit handlers (logging's flush among them) still
run, and every file of a run is written and closed before this point.

Only for the process's own command line: an in-process caller (tests, a notebook) keeps its
collector as it was.
"""

from __future__ import annotations

import gc


def skip_final_collection() -> None:
    """Spare the interpreter's exit a cycle collection over everything that is still alive."""
    gc.collect()  # what is garbage now is freed now (and its finalizers run), as it would be at exit
    gc.freeze()
