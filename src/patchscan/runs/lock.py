"""One writer per (results dir, shard): an flock held for the whole run, naming its holder."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from patchscan.errors import UserError

LOCK_PREFIX = ".lock-shard-"  # starts with "." so Parquet readers ignore it


class ShardLock:
    """flock on results/.lock-shard-SSS, held for the whole run; the file names the holder.

    The kernel drops the lock when its process dies (SIGKILL included), so a rerun after a crash
    takes it at once. A refused run writes nothing into the file.
    """

    def __init__(self, results_dir: Path, shard: int):
        self.path = results_dir / f"{LOCK_PREFIX}{shard:03d}"
        self.shard = shard
        self.fh = None

    def acquire(self) -> ShardLock:
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                fh.close()
                raise
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise UserError(
                f"{self.path.parent} (shard {self.shard}) is being written by {holder}; wait for it "
                "to finish, or write elsewhere (hydra.run.dir=... or runner.results_dir=...)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self.fh = fh
        return self

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None
