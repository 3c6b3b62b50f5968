"""Fault injection: a killed Ray worker, a killed driver, a cluster of two Ray nodes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import tiny_study
from slimsearch.search.driver import run_study
from slimsearch.search.study_file import StudyError, study_from_mapping

TESTS = Path(__file__).resolve().parent
SLIMSEARCH = [sys.executable, "-m", "slimsearch.search.cli"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(TESTS), RAY_AUTH_MODE="disabled")


def _study(run: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{run / 'study.db'}")


def _complete(run: Path) -> dict[int, tuple[float, ...]]:
    trials = _study(run).get_trials(states=[TrialState.COMPLETE])
    return {t.number: tuple(t.values) for t in trials}


@pytest.mark.ray
def test_killed_ray_worker_is_retried_and_nothing_is_lost(tmp_path: Path, ray_session: None) -> None:
    marker = tmp_path / "marker"
    marker.mkdir()
    objectives = ["accuracy", {"name": "plugins.custom_eval:SlowOnce", "options": {"folder": str(marker)}}]
    data = tiny_study(tmp_path, objectives=objectives, executor={"kind": "ray"}, budget={"trials": 3})
    data["seed_uniform"] = False

    import threading

    killed: list[int] = []

    def killer() -> None:
        started = marker / "started"
        for _ in range(600):
            if started.exists() and started.read_text():
                pid = int(started.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=killer)
    thread.start()
    result = run_study(study_from_mapping(data))
    thread.join()
    assert killed, "the worker was never killed: the test proved nothing"
    assert killed[0] != os.getpid()  # a Ray worker died, not the driver
    # The killed task ran again (max_retries=1) and completed: every trial is complete.
    assert result.counts == {"complete": 3, "failed": 0, "repeats": 0}


def test_kill_9_of_the_driver_then_resume_keeps_every_finished_trial(tmp_path: Path) -> None:
    data = tiny_study(
        tmp_path,
        objectives=[
            "accuracy",
            "size_bytes",
            {"name": "plugins.custom_eval:Slow", "options": {"seconds": 0.7}},
        ],
        budget={"trials": 40},
    )
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        command = [*SLIMSEARCH, "run", str(path)]
        proc = subprocess.Popen(command, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    run = tmp_path / "run"
    started = time.monotonic()
    before: dict[int, tuple[float, ...]] = {}
    exited = None
    while time.monotonic() < started + 240:
        exited = proc.poll()
        if exited is not None:  # ended before it could be killed: its log says why
            break
        if (run / "study.db").exists():
            try:
                before = _complete(run)
            except Exception:  # the storage is still being created
                before = {}
            if len(before) >= 4:
                break
        time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    waited = time.monotonic() - started
    assert len(before) >= 4, (
        f"the driver finished {len(before)} of 4 trials in {waited:.0f} s (exit code {exited}); "
        f"its output ends:\n{log.read_text()[-3000:]}"
    )
    before = _complete(run)
    running = [t.number for t in _study(run).get_trials(states=[TrialState.RUNNING])]

    resumed = subprocess.run(
        [*SLIMSEARCH, "run", str(path), "--trials", str(len(before) + len(running) + 3)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = _complete(run)
    assert all(after[n] == v for n, v in before.items())  # nothing finished was lost or changed
    assert len(after) >= len(before) + 2
    study = _study(run)
    for number in running:
        assert study.trials[number].state == TrialState.FAIL
        assert any(t.user_attrs.get("retry_of") == number for t in study.trials)


def test_unanswering_ray_address_is_refused_before_any_trial(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # a port nobody listens on once closed
    data = tiny_study(tmp_path, executor={"kind": "ray", "address": f"127.0.0.1:{port}"})
    with pytest.raises(StudyError, match="did not answer"):
        run_study(study_from_mapping(data))
    assert not (tmp_path / "cache" / "baselines").exists()  # refused before the model was loaded


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.ray
def test_study_on_a_real_two_node_ray_cluster(tmp_path: Path) -> None:
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="ssclu-")
    port = _free_port()
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    env = _env()
    try:
        subprocess.run(
            [
                ray_bin,
                "start",
                "--head",
                f"--port={port}",
                f"--temp-dir={temp}",
                "--include-dashboard=false",
                '--resources={"target": 1}',
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [ray_bin, "start", f"--address=127.0.0.1:{port}", '--resources={"second": 1}', *common],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        data = tiny_study(
            tmp_path,
            objectives=[
                "accuracy",
                "latency_ms",
                {"name": "plugins.custom_eval:Slow", "options": {"seconds": 1}},
            ],
            executor={"kind": "ray", "max_in_flight": 2},
            latency={
                "batch_size": 1,
                "seq_len": 8,
                "warmup": 1,
                "repeats": 3,
                "threads": 1,
                "target": "target",
            },
            budget={"trials": 6},
        )
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(data))
        out = subprocess.run(
            [*SLIMSEARCH, "run", str(path), "--address", f"127.0.0.1:{port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        trials = _study(tmp_path / "run").get_trials(states=[TrialState.COMPLETE])
        assert len(trials) == 6
        quality_nodes = {t.user_attrs["records"]["nodes"][0] for t in trials}
        timing_nodes = {t.user_attrs["records"]["nodes"][1] for t in trials}
        assert len(quality_nodes | timing_nodes) == 2  # work ran on both nodes
        assert len(timing_nodes) == 1  # latency only on the node that carries the target
        info = json.loads((tmp_path / "run" / "run.json").read_text())
        assert info["study_name"] == "tiny"
    finally:
        _kill_cluster(temp)


def _kill_cluster(temp: str) -> None:
    """Stop only this test's cluster: `ray stop` would stop every Ray on the machine."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if temp in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def test_merging_split_parts_keeps_errors_and_screening() -> None:
    from slimsearch.search.executors import merge_parts
    from slimsearch.search.worker import TrialResult

    ok = TrialResult(3, {"latency_ms": 1.0}, {"latency": {}}, node="b")
    quality = TrialResult(3, {"accuracy": 80.0}, {"screen": {}}, node="a")
    merged = merge_parts(3, [quality, ok])
    assert merged.values == {"accuracy": 80.0, "latency_ms": 1.0} and merged.records["nodes"] == ["a", "b"]
    screened = TrialResult(3, None, {"screen": {"accuracy": 50.0}}, pruned=True)
    assert merge_parts(3, [screened, ok]).pruned
    assert merge_parts(3, [screened]).pruned
    failed = TrialResult(3, None, {}, error="boom")
    out = merge_parts(3, [failed, ok])
    assert out.values is None and out.error == "boom" and not out.pruned


def test_ray_sockets_fit_below_a_deep_run_folder() -> None:
    """Ray's longest socket path under the chosen temp dir stays within the 107-byte limit
    (a 46-character run folder once passed the check and failed in ray.init)."""
    from slimsearch.search.executors import _RAY_SOCKET_TAIL, _ray_temp_dir

    for run_dir in (Path("/r"), Path("/work/main/runs/minilm-onnxruntime-distill"), Path("/x" * 60)):
        temp = _ray_temp_dir(run_dir)
        assert len(str(temp)) + len(_RAY_SOCKET_TAIL) <= 107, temp
    assert _ray_temp_dir(Path("/r")) == Path("/r/ray")
