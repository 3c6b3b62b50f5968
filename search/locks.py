"""Locks: a per-machine reader/writer lock, so latency is timed while no other trial
computes, and a run-folder lock, so one driver at a time writes a run.

Quality evaluation takes the lock shared (trials may overlap); latency measurement takes it
exclusive (it waits for running evaluations and blocks new ones). The lock file lives in
the cache folder, which every process of a machine shares.
"""

from __future__ import annotations

import fcntl
import os
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


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Held by the driver for the whole run; a second driver on the same folder is refused."""
    from slimsearch.search.study_file import StudyError

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".driver.lock"
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StudyError(
                f"output: {run_dir} is in use by another slimsearch run (pid {holder}); wait for it "
                "to end, or give this run its own output folder (--output)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
