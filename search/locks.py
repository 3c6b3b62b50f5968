"""A per-machine reader/writer lock, so latency is timed while no other trial computes.

Quality evaluation takes the lock shared (trials may overlap); latency measurement takes it
exclusive (it waits for running evaluations and blocks new ones). The lock file lives in
the cache folder, which every process of a machine shares.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def machine_lock(cache_dir: str | Path, exclusive: bool) -> Iterator[None]:
    folder = Path(cache_dir) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "measure.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
