"""Executors run TrialJobs and hand back TrialResults. Only the driver talks to Optuna.

- ``InProcessExecutor`` runs each job in the driver's own process (tests, debugging).
- ``RayExecutor`` runs each job as a Ray task, on a local Ray that it starts itself (files
  under the run folder, no dashboard, every server bound to 127.0.0.1, its processes ended
  with the driver's however it ends) or on an existing cluster given
  by address. When the study names a latency target (a Ray custom resource), a trial is
  split in two tasks: quality anywhere, timing only on nodes that carry the target.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from slimsearch.search import raywatch
from slimsearch.search.log import say
from slimsearch.search.study_file import StudyError
from slimsearch.search.worker import TrialJob, TrialResult, run_trial, timing_objectives


class Executor(Protocol):
    capacity: int

    def submit(self, job: TrialJob, fresh_process: bool = False) -> None: ...

    def poll(self, timeout: float) -> list[TrialResult]: ...

    def cancel(self, number: int, reason: str) -> TrialResult | None: ...

    def in_flight(self) -> int: ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """Runs queued jobs one at a time, inside ``poll``. Timeouts are enforced by the worker."""

    def __init__(self, capacity: int = 1) -> None:
        self.capacity = capacity
        self._queue: deque[TrialJob] = deque()

    def submit(self, job: TrialJob, fresh_process: bool = False) -> None:
        self._queue.append(job)

    def poll(self, timeout: float) -> list[TrialResult]:
        if not self._queue:
            return []
        return [run_trial(self._queue.popleft())]

    def cancel(self, number: int, reason: str) -> TrialResult | None:
        return None  # jobs run synchronously inside poll: nothing is ever left running

    def in_flight(self) -> int:
        return len(self._queue)

    def shutdown(self) -> None:
        self._queue.clear()


LOOPBACK = "127.0.0.1"
CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While it is open, a Ray started by this process binds every server to 127.0.0.1.

    Ray resolves a loopback node address to the machine's network address (so that other
    nodes could join) and its gRPC servers then listen on every interface. With clusters
    off (the switch Ray has for Windows and macOS), the node address stays loopback and so
    does every server; a local Ray has no other nodes. Read when Ray is imported, so it is
    also set on the module if Ray already is; both are put back on exit, so a later
    connection to a real cluster from this process is not affected.
    """
    import ray._private.ray_constants as constants

    previous = os.environ.get(CLUSTER_SWITCH), constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_SWITCH] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if previous[0] is None:
            os.environ.pop(CLUSTER_SWITCH, None)
        else:
            os.environ[CLUSTER_SWITCH] = previous[0]
        constants.ENABLE_RAY_CLUSTER = previous[1]


# Unix socket paths are limited to 107 bytes; Ray puts its longest socket this far below
# its temp dir (a 7-digit pid), so a deep run folder cannot hold them.
_RAY_SOCKET_TAIL = "/session_2026-12-07_07-06-52_290303_1234567/sockets/plasma_store"
_RAY_SOCKET_ROOM = 107 - len(_RAY_SOCKET_TAIL)


def _ray_temp_dir(run_dir: Path) -> Path:
    wanted = run_dir / "ray"
    if len(str(wanted)) <= _RAY_SOCKET_ROOM:
        return wanted
    short = Path(tempfile.gettempdir()) / f"slimsearch-ray-{os.getpid()}"
    say(f"run folder path is too long for Ray's sockets; Ray's session files go to {short}")
    return short


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (before any trial) when a HOST:PORT Ray address does not answer."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise StudyError(f"executor.address: {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise StudyError(
            f"executor.address: the Ray cluster at {address!r} did not answer ({exc}); start it with "
            "`ray start --head --port PORT`, or remove the address to use a local Ray"
        ) from None


def split_job(job: TrialJob) -> list[TrialJob]:
    """Quality objectives and timing objectives as separate jobs (timing pinned to the target)."""
    timing = timing_objectives(job.objectives)
    quality = tuple(o for o in job.objectives if o not in timing)
    if not timing or not quality:
        return [job]
    return [replace(job, objectives=quality), replace(job, objectives=timing)]


def task_options(job: TrialJob, cpus: int, gpus: float) -> dict[str, Any]:
    """The Ray resources one (part of a) trial asks for."""
    opts: dict[str, Any] = {"num_cpus": cpus}
    timing = bool(timing_objectives(job.objectives))
    if gpus:
        # A fraction lets trials share a GPU; timing still has it alone, under the worker's
        # exclusive machine lock (worker._evaluate), which every other trial's work waits on.
        opts["num_gpus"] = gpus
    target = job.latency.target
    if target and timing:
        opts["resources"] = {target: 0.001}
    elif target:
        opts["scheduling_strategy"] = "SPREAD"  # quality work may run on any node
    return opts


@dataclass
class _Pending:
    job: TrialJob
    refs: list[Any]
    parts: dict[int, TrialResult] = field(default_factory=dict)  # by submission index


class RayExecutor:
    """Runs jobs as Ray tasks; at most ``capacity`` trials in flight."""

    def __init__(
        self,
        run_dir: Path,
        capacity: int,
        cpus_per_trial: int,
        address: str | None = None,
        gpus_per_trial: float = 0.0,
    ) -> None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray runs its workers at nice 15 by default; timed work must not yield to every
        # other process on the machine.
        os.environ.setdefault("RAY_worker_niceness", "0")
        import ray

        self.capacity = capacity
        self._ray = ray
        self._trials: dict[int, _Pending] = {}
        self._owner: dict[Any, tuple[int, int]] = {}  # ref -> (trial number, part index)
        self._started_here = False
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._cpus = cpus_per_trial
        self._gpus = gpus_per_trial
        if address:
            check_address(address)
        if not ray.is_initialized():
            if address:
                say(f"connecting to the Ray cluster at {address}")
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            else:
                temp = _ray_temp_dir(run_dir)
                temp.mkdir(parents=True, exist_ok=True)
                say(f"starting a local Ray on 127.0.0.1 ({os.cpu_count()} CPUs, session files under {temp})")
                self._watchdog = raywatch.start()
                with loopback_only():
                    ray.init(
                        num_cpus=os.cpu_count(),
                        include_dashboard=False,
                        _temp_dir=str(temp),
                        _node_ip_address=LOOPBACK,
                        logging_level=logging.WARNING,
                        log_to_driver=True,
                    )
                node_ip = ray.util.get_node_ip_address()
                if node_ip != LOOPBACK:  # Ray would listen on the network: never run so
                    self.shutdown()
                    raise RuntimeError(
                        f"the local Ray came up on {node_ip}, not {LOOPBACK}; it was shut down. "
                        "Start a cluster yourself (`ray start --head`) and pass its --address"
                    )
            self._started_here = True
        # max_retries=1: a task whose worker process died is run once more. max_calls=1: the
        # worker exits after the task, so the next task starts in a fresh process.
        self._remote = ray.remote(max_retries=1, retry_exceptions=False)(run_trial)
        self._remote_fresh = ray.remote(max_retries=1, retry_exceptions=False, max_calls=1)(run_trial)
        if gpus_per_trial:
            self._check_gpus(address)

    def _check_gpus(self, address: str | None) -> None:
        """A study on a GPU needs Ray to know of one: refuse before any trial waits forever."""
        have = float(self._ray.cluster_resources().get("GPU", 0.0))
        if have >= min(self._gpus, 1.0):
            return
        where = f"the Ray cluster at {address!r}" if address else "the local Ray"
        self.shutdown()
        raise StudyError(
            f"device: a GPU, but {where} has {have:g} GPU(s); start GPU nodes with `ray start --address "
            "HEAD --num-gpus N`, or set device: cpu"
        )

    def submit(self, job: TrialJob, fresh_process: bool = False) -> None:
        parts = split_job(job) if job.latency.target else [job]
        remote = self._remote_fresh if fresh_process else self._remote
        refs = [remote.options(**task_options(p, self._cpus, self._gpus)).remote(p) for p in parts]
        self._trials[job.number] = _Pending(job, refs)
        for index, ref in enumerate(refs):
            self._owner[ref] = (job.number, index)

    def poll(self, timeout: float) -> list[TrialResult]:
        if not self._owner:
            return []
        ready, _ = self._ray.wait(list(self._owner), num_returns=1, timeout=timeout)
        done = []
        for ref in ready:
            number, index = self._owner.pop(ref)
            pending = self._trials[number]
            try:
                pending.parts[index] = self._ray.get(ref)
            except Exception as exc:  # the worker died twice, or Ray could not run the task
                pending.parts[index] = TrialResult(number, None, {}, error=f"{type(exc).__name__}: {exc}")
            if len(pending.parts) == len(pending.refs):
                del self._trials[number]
                done.append(merge_parts(number, [pending.parts[i] for i in range(len(pending.refs))]))
        return done

    def cancel(self, number: int, reason: str) -> TrialResult | None:
        pending = self._trials.pop(number, None)
        if pending is None:
            return None
        for ref in pending.refs:
            self._owner.pop(ref, None)
            self._ray.cancel(ref, force=True)
        return TrialResult(number, None, {}, error=reason)

    def in_flight(self) -> int:
        return len(self._trials)

    def shutdown(self) -> None:
        for number in list(self._trials):
            self.cancel(number, "shutdown")
        if self._started_here:
            self._ray.shutdown()
            self._started_here = False
        raywatch.stop(self._watchdog)  # ends the agents that outlive ray.shutdown()
        self._watchdog = None


def merge_parts(number: int, parts: list[TrialResult]) -> TrialResult:
    """One result from a trial's parts, given in submission order (quality, then timing)."""
    if len(parts) == 1:
        return parts[0]
    seconds = max(p.seconds for p in parts)
    errors = [p for p in parts if p.values is None and not p.pruned]
    if errors:
        first = errors[0]
        return TrialResult(number, None, {}, first.error, first.traceback, seconds, first.node)
    pruned = [p for p in parts if p.pruned]
    if pruned:  # screened out in the quality part: the timing part's work is not used
        return replace(pruned[0], seconds=seconds)
    values: dict[str, float] = {}
    records: dict[str, Any] = {}
    for p in parts:
        values |= p.values or {}
        records |= p.records
    records["nodes"] = [p.node for p in parts]
    return TrialResult(number, values, records, seconds=seconds, node=parts[-1].node)


def make_executor(
    kind: str,
    run_dir: Path,
    capacity: int,
    cpus_per_trial: int,
    address: str | None,
    gpus_per_trial: float = 0.0,
) -> Executor:
    if kind == "inprocess":
        return InProcessExecutor(capacity)
    return RayExecutor(run_dir, capacity, cpus_per_trial, address, gpus_per_trial)
