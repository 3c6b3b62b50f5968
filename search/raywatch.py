"""A watchdog that ends the local Ray's processes when the driver that started them ends.

Ray ends its GCS and raylet with the driver, but its agents (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) outlive a killed driver by minutes, and they rename themselves,
so nothing in their command line says whose they are. The driver starts this process with
a pipe on its stdin; it notes every process descended from the driver (once a second
while Ray starts, every 15 s after), and when the pipe closes (the driver exited, however
it died) it kills the ones it noted that are still there. Linux only (it reads /proc);
elsewhere it does nothing.

Run as ``python -m slimsearch.search.raywatch DRIVER_PID``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

# Ray starts its processes in the first seconds: poll often then, rarely after, so the
# watchdog does not wake up on the cores while latency is being timed.
POLL_S = 1.0
LATER_POLL_S = 15.0
LATER_AFTER_S = 60.0
PROC = Path("/proc")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (tells a pid apart from a later reuse of it)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _parents() -> dict[int, int]:
    out = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    return out


def descendants(root: int) -> set[int]:
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def watch(driver: int) -> None:
    # What the driver had started before it started Ray is not Ray's (in a test, the
    # process may hold another Ray of its own): never touched.
    before = descendants(driver)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    seen: dict[int, str] = {}
    began = time.monotonic()
    while True:
        for pid in descendants(driver) - before:
            started = _start_time(pid)
            if started is not None:
                seen.setdefault(pid, started)
        poll = POLL_S if time.monotonic() - began < LATER_AFTER_S else LATER_POLL_S
        ready, _, _ = select.select([sys.stdin], [], [], poll)
        if ready and not os.read(sys.stdin.fileno(), 1024):
            break  # EOF: the driver closed the pipe or died
    time.sleep(0.5)  # a clean ray.shutdown() ends most of them itself
    for pid, started in seen.items():
        if _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def start() -> subprocess.Popen[bytes] | None:
    """Start the watchdog for this process; keep the returned handle until Ray is shut down,
    then call ``stop``."""
    if not PROC.is_dir():
        return None
    handle = subprocess.Popen(
        [sys.executable, "-m", "slimsearch.search.raywatch", str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C in a terminal reaches the driver, not its watchdog
    )
    if handle.stdout is not None:
        handle.stdout.readline()  # it has noted what ran before Ray: now Ray may start
    return handle


def stop(handle: subprocess.Popen[bytes] | None, wait_s: float = 10.0) -> None:
    """Close the pipe (the watchdog then sweeps what is left) and wait for it."""
    if handle is None:
        return
    if handle.stdin is not None:
        handle.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        handle.wait(wait_s)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
