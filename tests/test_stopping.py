"""How a run stops: interrupted trials come back whole, systematic faults stop the run with
one error, the time budget is the search's, and a run always ends with a front."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import tiny_study
from slimsearch.search import driver as driver_module
from slimsearch.search.driver import run_study
from slimsearch.search.study_file import study_from_mapping

TESTS = Path(__file__).resolve().parent
SLIMSEARCH = [sys.executable, "-m", "slimsearch.search.cli"]


def _study(run: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{run / 'study.db'}")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["term", "int"])
def test_an_interrupted_run_requeues_its_running_trial_whole_and_exits_non_zero(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    marker = tmp_path / "marker"
    marker.mkdir()
    # The baseline measurement is its first call: trial 0 (the all-off seed) is the one cut short.
    options = {"folder": str(marker), "after": 1}
    objectives = ["accuracy", {"name": "plugins.custom_eval:SlowOnce", "options": options}]
    data = tiny_study(tmp_path, objectives=objectives, budget={"trials": 3})
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    proc = subprocess.Popen(
        [*SLIMSEARCH, "run", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # A shell starts background jobs with SIGINT ignored, and children inherit that: give
        # the run Python's usual Ctrl-C however this test process was started.
        preexec_fn=_default_sigint,
    )
    try:
        for _ in range(1200):  # the first trial (the all-off seed) is inside its 20 s sleep
            if (marker / "started").exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert (marker / "started").exists(), proc.communicate()[0].decode()[-3000:]
        proc.send_signal(sig)
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, out[-3000:]
    study = _study(tmp_path / "run")
    cut = study.trials[0]
    assert cut.state == TrialState.FAIL and cut.user_attrs["interrupted"] is True
    assert not study.get_trials(states=[TrialState.WAITING])  # nothing queued: retries are proposed
    assert "not_retried" not in cut.user_attrs
    result = run_study(study_from_mapping(data))  # resume: the retry runs first, then 2 more
    assert result.exit_code == 0
    trials = _study(tmp_path / "run").trials
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].number == cut.number + 1
    # Its whole plan and who proposed it (the seed) come back; Ctrl-C is no fault of the trial's.
    assert retry[0].params == cut.system_attrs["fixed_params"]
    assert retry[0].user_attrs["seed"] == "uniform" and retry[0].user_attrs["retries"] == 0
    assert retry[0].state == TrialState.COMPLETE
    assert result.counts["complete"] == 3  # the cut trial spent none of the budget


def test_a_trial_stopped_while_its_parameters_were_drawn(tmp_path: Path) -> None:
    data = tiny_study(tmp_path, budget={"trials": 2}, seed_uniform=False)
    run_study(study_from_mapping(data))
    study = _study(tmp_path / "run")
    name = "bert.encoder.layer.0.attention.self.query:bits"
    dist = {name: optuna.distributions.CategoricalDistribution([32, 8, 4])}
    study.enqueue_trial(dict(study.trials[0].params) | {name: 8})
    queued = study.ask(fixed_distributions=dist)  # a queued plan, claimed: its full plan is known
    sampled = study.ask(fixed_distributions=dist)  # a sampler's proposal, 1 parameter of 37 drawn
    queued_plan = study.trials[queued.number].system_attrs["fixed_params"]
    assert "fixed_params" not in study.trials[sampled.number].system_attrs
    result = run_study(study_from_mapping(data), trials=3)  # recovery, then the one retry
    assert result.exit_code == 0
    trials = _study(tmp_path / "run").trials
    assert trials[sampled.number].state == TrialState.FAIL
    assert "while the sampler was drawing its parameters" in trials[sampled.number].user_attrs["not_retried"]
    assert not any(t.user_attrs.get("retry_of") == sampled.number for t in trials)
    again = [t for t in trials if t.user_attrs.get("retry_of") == queued.number]
    assert len(again) == 1 and again[0].system_attrs["fixed_params"] == queued_plan


def test_a_run_whose_folder_is_removed_stops_with_one_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    options = {"folder": str(run), "marker": str(tmp_path / "calls")}
    objectives = ["accuracy", {"name": "plugins.custom_eval:RemovesRunFolder", "options": options}]
    data = tiny_study(tmp_path, objectives=objectives, budget={"trials": 30}, remeasure_front=False)
    result = run_study(study_from_mapping(data))
    assert result.stopped == "aborted" and result.exit_code == 1
    assert result.error is not None and "was removed or replaced" in result.error
    assert len((tmp_path / "calls").read_text()) == 3  # no trial ran after it was noticed


def test_the_same_error_again_and_again_stops_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_study(
        tmp_path,
        objectives=["accuracy", "plugins.custom_eval:AlwaysFails"],
        budget={"trials": 30},
        executor={"kind": "inprocess", "max_consecutive_failures": 3},
    )
    result = run_study(study_from_mapping(data))
    assert result.stopped == "aborted" and result.exit_code == 1
    assert result.error is not None and "3 trials in a row failed with the same error" in result.error
    assert "refused the connection" in result.error
    assert len(_study(tmp_path / "run").get_trials(states=[TrialState.FAIL])) == 3
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    out = subprocess.run(
        [*SLIMSEARCH, "run", str(path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 1 and "3 trials in a row failed" in out.stderr


def test_the_time_budget_is_the_searchs_not_the_set_ups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = driver_module.measure_baseline

    def slow_set_up(*args: object) -> dict[str, float]:
        values = original(*args)  # type: ignore[arg-type]
        time.sleep(1.5)  # set-up longer than the whole budget: before, no trial ever ran
        return values

    monkeypatch.setattr(driver_module, "measure_baseline", slow_set_up)
    data = tiny_study(tmp_path, budget={"trials": 50, "timeout": "1s"}, remeasure_front=False)
    result = run_study(study_from_mapping(data))
    assert result.stopped == "timeout" and result.counts["complete"] >= 1 and result.front


def test_a_run_always_ends_with_a_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A budget that is over before the first trial could start still waits for that trial.
    original = driver_module.Driver.loop

    def over_already(self: driver_module.Driver, *args: object, **kwargs: object) -> str:
        *rest, _deadline = args
        return original(self, *rest, time.monotonic() - 1.0, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(driver_module.Driver, "loop", over_already)
    data = tiny_study(tmp_path, budget={"trials": 50, "timeout": 1}, remeasure_front=False)
    result = run_study(study_from_mapping(data))
    assert result.counts["complete"] == 1 and result.front and result.exit_code == 0
    assert "waiting for the first one" in capsys.readouterr().err


def test_in_process_timeouts_say_what_they_cannot_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_study(tmp_path, budget={"trials": 1}, executor={"kind": "inprocess", "trial_timeout": "10m"})
    run_study(study_from_mapping(data))
    assert "native call that blocks signals runs past it" in capsys.readouterr().err
