"""What the exact weight identity costs on the built-in model (issue 27): SHA-256 of every tensor in
memory, of the weight files the first time, and from the digest cache (path, size, mtime, ctime, inode).

    PYTHONPATH=src python scripts/identity_cost.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    os.environ["PATCHSCAN_CACHE"] = tempfile.mkdtemp()  # an empty digest cache: the first hash is a real one
    import patchscan as ps
    from patchscan.models import fingerprints
    from patchscan.models.loading import builtin_folder

    lm = ps.load_model("smollm2_135m", device="cpu")
    start = time.perf_counter()
    fingerprints._tensor_digests(lm.model)
    print(f"in memory, every tensor: {time.perf_counter() - start:.2f} s")
    files = sorted(Path(builtin_folder()).glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    fingerprints.file_digests(files)
    first = time.perf_counter() - start
    start = time.perf_counter()
    fingerprints.file_digests(files)
    cached = time.perf_counter() - start
    rate = size / first / 1e6
    print(f"weight files ({size / 1e6:.0f} MB): first {first:.2f} s ({rate:.0f} MB/s), cached {cached * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
