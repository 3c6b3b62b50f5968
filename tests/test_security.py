"""What a run exposes and what it runs: the local Ray listens on loopback only and its
processes end with the driver; pickle weights are refused unless asked for."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_study
from slimsearch.search import preflight
from slimsearch.search.raywatch import descendants
from slimsearch.search.study_file import StudyError, study_from_mapping
from tiny import tiny_bert

TESTS = Path(__file__).resolve().parent
SLIMSEARCH = [sys.executable, "-m", "slimsearch.search.cli"]


def _listening() -> dict[int, str]:
    """Socket inode -> 'address:port' of every listening TCP socket (IPv4 and IPv6)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    host = ".".join(str(b) for b in raw[::-1])
                else:  # four little-endian 32-bit words
                    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                    host = b"".join(words).hex()
                out[int(fields[9])] = f"{host}:{int(port, 16)}"
    return out


def _sockets_of(pid: int, listening: dict[int, str]) -> list[str]:
    found = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and int(target[8:-1]) in listening:
                found.append(listening[int(target[8:-1])])
    except OSError:
        pass
    return found


LOOPBACK = ("127.0.0.1:", "00000000000000000000ffff7f000001:", "00000000000000000000000000000001:")


@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc")
def test_local_ray_listens_on_loopback_only_and_dies_with_a_killed_driver(tmp_path: Path) -> None:
    data = tiny_study(
        tmp_path,
        objectives=["accuracy", {"name": "plugins.custom_eval:Slow", "options": {"seconds": 0.5}}],
        executor={"kind": "ray"},
        budget={"trials": 200},
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen([*SLIMSEARCH, "run", str(path)], env=env, stdout=log, stderr=subprocess.STDOUT)
    seen: dict[int, list[str]] = {}
    try:
        deadline = time.monotonic() + 240
        polls_after_trials = 0
        while time.monotonic() < deadline and proc.poll() is None and polls_after_trials < 4:
            listening = _listening()
            for pid in descendants(proc.pid) | {proc.pid}:
                seen[pid] = _sockets_of(pid, listening) or seen.get(pid, [])
            if _complete(tmp_path / "run") >= 2:  # Ray, its agents and a worker are all up
                polls_after_trials += 1
            time.sleep(0.5)
        assert proc.poll() is None, (
            f"the driver ended early:\n{(tmp_path / 'driver.log').read_text()[-3000:]}"
        )
        addresses = [a for sockets in seen.values() for a in sockets]
        assert len(addresses) >= 4, f"too few Ray sockets seen to prove anything: {seen}"
        public = [a for a in addresses if not a.startswith(LOOPBACK)]
        assert not public, f"Ray processes listen beyond loopback: {public}"
        assert not any(a.endswith(":8265") for a in addresses), "a dashboard is listening"
        ray_pids = descendants(proc.pid)
        assert ray_pids
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Every process the driver started ends (the agents outlived it by minutes before).
        end = time.monotonic() + 60
        alive = set(ray_pids)
        while alive and time.monotonic() < end:
            alive = {p for p in alive if Path(f"/proc/{p}").exists() and "(Z)" not in _state(p)}
            time.sleep(0.5)
        assert not alive, f"still running after the driver was killed: {[_state(p) for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in seen:  # whatever is left, so a failure here does not leak processes
            if pid != proc.pid and Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _complete(run: Path) -> int:
    from optuna.trial import TrialState

    from slimsearch.search.storage import open_for_reading

    try:
        storage = open_for_reading("sqlite", f"sqlite:///{run / 'study.db'}")
        import optuna

        study = optuna.load_study(study_name="tiny", storage=storage)
        return len(study.get_trials(deepcopy=False, states=[TrialState.COMPLETE]))
    except (StudyError, KeyError):
        return 0  # not created yet


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "(gone)"
    name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    return f"{pid} {name} ({stat.rsplit(')', 1)[1].split()[0]})"


def _folder_with(tmp_path: Path, pickled: bool) -> Path:
    folder = tmp_path / "model"
    tiny_bert().save_pretrained(str(folder))
    if pickled:
        weights = folder / "model.safetensors"
        from safetensors.torch import load_file

        torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
        weights.unlink()
    return folder


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    folder = _folder_with(tmp_path, pickled=True)
    spec = study_from_mapping(tiny_study(tmp_path, model={"source": str(folder)}))
    with pytest.raises(StudyError, match=r"pickle weights only \(pytorch_model.bin\).*allow_pickle: true"):
        preflight.preflight(spec)
    allowed = study_from_mapping(tiny_study(tmp_path, model={"source": str(folder), "allow_pickle": True}))
    preflight.preflight(allowed)  # asked for: accepted


def test_safetensors_folder_passes_and_loads_safetensors_only(tmp_path: Path) -> None:
    from slimsearch.search import models

    folder = _folder_with(tmp_path, pickled=False)
    spec = study_from_mapping(tiny_study(tmp_path, model={"source": str(folder)}))
    preflight.preflight(spec)
    # A pickle file beside the safetensors one is never read.
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail")
    model, _ = models._load_source(spec)
    assert sum(p.numel() for p in model.parameters()) > 0
