"""Executors run TrialJobs and hand back TrialResults. Only the driver talks to Optuna.

- ``InProcessExecutor`` runs each job in the driver's own process (tests, debugging).
- ``RayExecutor`` runs each job as a Ray task, on a local Ray that it starts itself (files
  under the run folder, no dashboard) or on an existing cluster given by address.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from slimsearch.search.log import say
from slimsearch.search.worker import TrialJob, TrialResult, run_trial


class Executor(Protocol):
    capacity: int

    def submit(self, job: TrialJob) -> None: ...

    def poll(self, timeout: float) -> list[TrialResult]: ...

    def in_flight(self) -> int: ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """Runs queued jobs one at a time, inside ``poll``."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._queue: deque[TrialJob] = deque()

    def submit(self, job: TrialJob) -> None:
        self._queue.append(job)

    def poll(self, timeout: float) -> list[TrialResult]:
        if not self._queue:
            return []
        return [run_trial(self._queue.popleft())]

    def in_flight(self) -> int:
        return len(self._queue)

    def shutdown(self) -> None:
        self._queue.clear()


# Unix socket paths are limited to 107 bytes; Ray puts sockets several levels below its
# temp dir, so a deep run folder cannot hold them.
_RAY_SOCKET_ROOM = 60


def _ray_temp_dir(run_dir: Path) -> Path:
    wanted = run_dir / "ray"
    if len(str(wanted)) <= _RAY_SOCKET_ROOM:
        return wanted
    short = Path(tempfile.gettempdir()) / f"slimsearch-ray-{os.getpid()}"
    say(f"run folder path is too long for Ray's sockets; Ray's session files go to {short}")
    return short


class RayExecutor:
    """Runs jobs as Ray tasks; at most ``capacity`` in flight."""

    def __init__(self, run_dir: Path, capacity: int, cpus_per_trial: int, address: str | None = None) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        self.capacity = capacity
        self._ray = ray
        self._pending: dict[Any, TrialJob] = {}
        self._started_here = False
        if not ray.is_initialized():
            if address:
                say(f"connecting to the Ray cluster at {address}")
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            else:
                temp = _ray_temp_dir(run_dir)
                temp.mkdir(parents=True, exist_ok=True)
                say(f"starting a local Ray ({os.cpu_count()} CPUs, session files under {temp})")
                ray.init(
                    num_cpus=os.cpu_count(),
                    include_dashboard=False,
                    _temp_dir=str(temp),
                    logging_level=logging.WARNING,
                    log_to_driver=True,
                )
            self._started_here = True
        self._remote = ray.remote(num_cpus=cpus_per_trial, max_retries=1, retry_exceptions=False)(run_trial)

    def submit(self, job: TrialJob) -> None:
        self._pending[self._remote.remote(job)] = job

    def poll(self, timeout: float) -> list[TrialResult]:
        if not self._pending:
            return []
        ready, _ = self._ray.wait(list(self._pending), num_returns=1, timeout=timeout)
        results = []
        for ref in ready:
            job = self._pending.pop(ref)
            try:
                results.append(self._ray.get(ref))
            except Exception as exc:  # the worker died, or Ray could not run the task
                results.append(TrialResult(job.number, None, {}, error=f"{type(exc).__name__}: {exc}"))
        return results

    def in_flight(self) -> int:
        return len(self._pending)

    def shutdown(self) -> None:
        for ref in list(self._pending):
            self._ray.cancel(ref, force=True)
        self._pending.clear()
        if self._started_here:
            self._ray.shutdown()


def make_executor(
    kind: str, run_dir: Path, capacity: int, cpus_per_trial: int, address: str | None
) -> Executor:
    if kind == "inprocess":
        return InProcessExecutor(capacity)
    return RayExecutor(run_dir, capacity, cpus_per_trial, address)
