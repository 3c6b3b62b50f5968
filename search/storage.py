"""The run's Optuna storage, opened in one place.

The driver is the only writer, and the only process that creates the storage: it builds a
new SQLite file under a temporary name (tables, version stamp and the study itself) and
renames it into place, so any other process sees either no ``study.db`` or a complete one.
Readers (``pareto``, ``report``, ``open_run``, tests) never create tables, so they cannot
race the driver's schema creation. A file that is not an Optuna storage, or that holds
another study, is refused before anything is written to it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from slimsearch.search.study_file import StudyError

SQLITE_FILE = "study.db"
JOURNAL_FILE = "study.journal"
SQLITE_MAGIC = b"SQLite format 3\x00"
# Another process (optuna-dashboard, an older slimsearch) may be creating tables in an
# existing file at the same moment; its half-done work makes our first attempt fail.
OPEN_ATTEMPTS = 5


def storage_path(output: Path, kind: str) -> Path:
    return output / (SQLITE_FILE if kind == "sqlite" else JOURNAL_FILE)


def storage_url(output: Path, kind: str) -> str:
    path = storage_path(output, kind)
    return f"sqlite:///{path}" if kind == "sqlite" else str(path)


def _path_of(url: str) -> Path:
    return Path(url.removeprefix("sqlite:///"))


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    # WAL with synchronous=NORMAL survives a killed process (only a power cut can lose the
    # last commits) and makes each commit ~10x cheaper: Optuna commits every parameter of
    # every ask, which cost 1.8 s per trial on a 109-parameter space with the defaults.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def sqlite_studies(path: Path) -> list[str] | None:
    """Study names in an SQLite file; None when it has no Optuna tables yet (a new, empty
    database). Raises StudyError when the file is not SQLite or holds other tables."""
    with path.open("rb") as handle:
        head = handle.read(len(SQLITE_MAGIC))
    if head and head != SQLITE_MAGIC:
        raise StudyError(
            f"storage: {path} is not an SQLite database (it starts {head[:8]!r}); move it away, "
            "or give a new output folder (--output)"
        )
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                return None
            if "studies" not in tables:
                raise StudyError(
                    f"storage: {path} is an SQLite database but not an Optuna study (its tables: "
                    f"{sorted(tables)[:6]}); move it away, or give a new output folder (--output)"
                )
            return [str(row[0]) for row in db.execute("SELECT study_name FROM studies")]
    except sqlite3.DatabaseError as exc:
        raise StudyError(
            f"storage: {path} cannot be read as SQLite ({exc}); it is corrupt: move it away, or give a "
            "new output folder (--output)"
        ) from None


def journal_studies(path: Path) -> list[str]:
    """Study names created in an Optuna journal file; StudyError when it is not one."""
    names = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                entry = json.loads(line)
                if not isinstance(entry, dict) or "op_code" not in entry:
                    raise ValueError(f"line {number} is not an Optuna journal entry")
                if entry["op_code"] == 0 and "study_name" in entry:  # CREATE_STUDY
                    names.append(str(entry["study_name"]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StudyError(
            f"storage: {path} is not an Optuna journal ({exc}); move it away, or give a new output "
            "folder (--output)"
        ) from None
    return names


def check_storage(output: Path, kind: str, study_name: str) -> None:
    """Refuse, before any work, a storage file that is corrupt, foreign, or holds another study."""
    path = storage_path(output, kind)
    if not path.exists():
        return
    if not path.is_file():
        raise StudyError(f"storage: {path} exists but is not a file; move it away or give a new --output")
    names = sqlite_studies(path) if kind == "sqlite" else journal_studies(path)
    others = [n for n in names or [] if n != study_name]
    if others and study_name not in (names or []):
        raise StudyError(
            f"storage: {path} holds the study {others[0]!r}, not {study_name!r}; a run folder holds "
            "one study: give this study its own output folder (--output), or resume that one with "
            "its own study file"
        )


def _rdb(url: str, create: bool) -> optuna.storages.RDBStorage:
    last: Exception | None = None
    for attempt in range(OPEN_ATTEMPTS):
        try:
            storage = optuna.storages.RDBStorage(url, skip_table_creation=not create)
            break
        except sqlalchemy.exc.SQLAlchemyError as exc:  # a concurrent schema creation
            last = exc
            time.sleep(0.2 * (attempt + 1))
    else:
        raise StudyError(f"storage: could not open {url}: {last}") from None
    sqlalchemy.event.listen(storage.engine, "connect", _sqlite_pragmas)
    storage.engine.dispose()  # reconnect with the pragmas
    return storage


def _create_sqlite(path: Path, study_name: str, directions: Sequence[Any]) -> None:
    """A complete new storage holding the study, built aside and renamed into place."""
    tmp = path.with_name(f"{path.name}.creating-{os.getpid()}")
    for leftover in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        leftover.unlink(missing_ok=True)
    storage = _rdb(f"sqlite:///{tmp}", create=True)
    optuna.create_study(study_name=study_name, storage=storage, directions=list(directions))
    storage.engine.dispose()  # closes the last connection: SQLite folds the WAL into the file
    os.replace(tmp, path)


def open_for_driver(
    output: Path, kind: str, study_name: str, directions: Sequence[Any]
) -> optuna.storages.BaseStorage:
    """The run's storage for the driver, created (atomically) when it does not exist yet."""
    path = storage_path(output, kind)
    if kind == "journal":
        return JournalStorage(JournalFileBackend(str(path)))
    if not path.exists() or sqlite_studies(path) is None:
        _create_sqlite(path, study_name, directions)
    return _rdb(f"sqlite:///{path}", create=False)


def open_for_reading(kind: str, url: str) -> optuna.storages.BaseStorage:
    """A run's storage for a reader: never creates a file or a table."""
    path = _path_of(url) if kind == "sqlite" else Path(url)
    if not path.is_file():
        raise StudyError(
            f"{path} does not exist: the run has not created its storage yet (or it was moved); "
            "start it with `slimsearch run STUDY`"
        )
    if kind == "journal":
        return JournalStorage(JournalFileBackend(str(path)))
    if sqlite_studies(path) is None:
        raise StudyError(f"{path} holds no study yet: the run is still creating it; try again in a moment")
    return _rdb(url, create=False)
