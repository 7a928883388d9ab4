"""What each shard did: `results/_shard-SSS.json`, one file per shard, cumulative over resumes.

Shards that share a results dir each write only their own file (atomically, `store.write_atomic`),
so 8 shards finishing at once never race for one file; `_run.json` stays the config record.
Parquet readers skip names that start with "_". A file holds the totals of the shard over all
its sessions (a resume is a new session) and, per session, the model work of every chunk it ran:

    {"shard": 0, "num_shards": 4,
     "totals": {"examples": 12, "chunks": 3, "forward_passes": 130, "forward_tokens": ..., "tokens_generated": ...},
     "sessions": [{"started": ..., "finished": ..., "host": ..., "pid": ..., "examples_skipped": 0,
                   "setup": {"forward_passes": 1, ...}, "peak_memory_mb": 812.0,
                   "parts": [{"part": "part-000-0000000.parquet", "examples": 4, "forward_passes": 43, ...}]}]}
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

from patchscan.engine.counting import Counts
from patchscan.runs.store import write_atomic

TOTAL_KEYS = ("examples", "chunks", "forward_passes", "forward_tokens", "tokens_generated")


def shard_log_path(results_dir: Path, shard: int) -> Path:
    return Path(results_dir) / f"_shard-{shard:03d}.json"


def read_shard_logs(results_dir: Path) -> dict[int, dict]:
    """Every shard's log in a results dir, by shard number."""
    out = {}
    for path in sorted(Path(results_dir).glob("_shard-*.json")):
        data = json.loads(path.read_text())
        out[int(data["shard"])] = data
    return out


def peak_memory_mb(device="cpu") -> float:
    """Peak memory of this process so far: CUDA allocations on a GPU, else the peak resident set."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ShardLog:
    """The running session's entry in its shard's log, saved after every chunk."""

    def __init__(self, results_dir: Path, shard: int, num_shards: int, skipped: int, setup: Counts | None = None):
        self.path = shard_log_path(results_dir, shard)
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
        else:
            self.data = {
                "shard": shard,
                "num_shards": num_shards,
                "totals": dict.fromkeys(TOTAL_KEYS, 0),
                "sessions": [],
            }
        self.session = {
            "started": _now(),
            "finished": None,
            "host": platform.node(),
            "pid": os.getpid(),
            "examples_skipped": skipped,
            "setup": (setup or Counts()).as_dict(),
            **dict.fromkeys(TOTAL_KEYS, 0),
            "parts": [],
        }
        self.data["sessions"].append(self.session)
        self.save()

    def add_chunk(self, part: str, n_examples: int, counts: Counts) -> None:
        self.session["parts"].append({"part": part, "examples": n_examples, **counts.as_dict()})
        for record in (self.session, self.data["totals"]):
            record["examples"] += n_examples
            record["chunks"] += 1
            for key, value in counts.as_dict().items():
                record[key] += value
        self.save()

    def finish(self, device="cpu") -> None:
        self.session["finished"] = _now()
        self.session["peak_memory_mb"] = round(peak_memory_mb(device), 1)
        self.save()

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1))
