"""Faults that are not one trial's: they stop the run with one clear error.

- The run folder, or the storage in it, disappeared: no trial can be stored any more.
- ``limit`` trials in a row failed with the same error: a broken plugin, a full disk, a
  dead cluster; running on would only turn the rest of the budget into failures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


class RunAborted(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


@dataclass
class RunFolderWatch:
    """Notices the run folder or its storage file going away (or being replaced)."""

    folder: Path
    storage: Path
    _inode: int = 0

    def start(self) -> None:
        self._inode = self.storage.stat().st_ino

    def intact(self) -> bool:
        try:
            return self.folder.is_dir() and self.storage.stat().st_ino == self._inode
        except OSError:
            return False

    def check(self) -> None:
        if not self.intact():
            raise RunAborted(
                f"the run folder {self.folder} (or its {self.storage.name}) was removed or replaced "
                "while the run was going, so no more trials can be stored; the run stopped. "
                "Start again (a new --output keeps it apart from whatever is there now)"
            )


def _signature(error: str) -> str:
    """An error without the parts that change from trial to trial (numbers, addresses)."""
    first = error.strip().splitlines()[0] if error.strip() else error
    return re.sub(r"0x[0-9a-f]+|\d+(\.\d+)?", "N", first)[:300]


@dataclass
class FailureStreak:
    """Counts trials in a row that failed with the same error."""

    limit: int | None
    count: int = 0
    last: str = ""

    def note(self, error: str | None) -> None:
        """``error`` of a finished trial (None: it did not fail); raises RunAborted at the limit."""
        if error is None:
            self.count, self.last = 0, ""
            return
        signature = _signature(error)
        self.count = self.count + 1 if signature == self.last else 1
        self.last = signature
        if self.limit is not None and self.count >= self.limit:
            raise RunAborted(
                f"{self.count} trials in a row failed with the same error, so the run stopped rather "
                f"than spend the rest of its budget on it: {error.strip().splitlines()[0][:400]}. Fix "
                "the cause and run the study again (it resumes); executor.max_consecutive_failures "
                "sets how many in a row stop a run"
            )
