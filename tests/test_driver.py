"""Whole tiny studies through the driver: in-process, through local Ray, with failures, resumed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import tiny_study
from slimsearch.search.cli import main
from slimsearch.search.driver import run_study
from slimsearch.search.jobs import Jobs
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan
from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.quantize import QUANTIZER_VERSION


def _trials(result_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """Finished trials (queued seeds that have not run yet are WAITING and left out)."""
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{result_dir / 'study.db'}")
    return study.get_trials(states=[TrialState.COMPLETE, TrialState.FAIL])


def test_tiny_study_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_study(study_from_mapping(tiny_study(tmp_path)))
    assert result.counts == {"complete": 8, "failed": 0, "repeats": 0}
    trials = _trials(result.run_dir)
    assert len(trials) == 8
    # Seeded first: the all-off configuration is trial 0 and equals the baseline's accuracy.
    assert CompressionPlan.from_dict(trials[0].user_attrs["plan"]).summary() == "baseline"
    assert trials[0].values[0] == result.baseline["accuracy"]
    for t in trials:
        assert set(t.user_attrs["metrics"]) == {"accuracy", "size_bytes", "latency_ms"}
        assert "constraints:max_accuracy_drop" in t.system_attrs
        CompressionPlan.from_dict(t.user_attrs["plan"])  # the stored recipe parses
        shape = t.user_attrs["records"]["latency"]["shapes"][0]
        assert {"quiet_key", "baseline_drift", "ratio_ci95"} <= set(shape)  # the drift gate's provenance
    # Compression really happened: some trial is under half the baseline's bytes.
    assert min(t.values[1] for t in trials) < 0.5 * result.baseline["size_bytes"]
    assert result.front and all(r["feasible"] for r in result.front)
    with (result.run_dir / "pareto.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(result.front)
    out = capsys.readouterr().out
    assert "Pareto front" in out and "accuracy_drop" in out


def test_jobs_carry_the_quietest_baseline_time_seen(tmp_path: Path) -> None:
    jobs = Jobs(study_from_mapping(tiny_study(tmp_path)), tmp_path, {"accuracy": 50.0})
    for ms in (9.0, 7.0, 8.0):
        jobs.note_quiet({"latency": {"shapes": [{"quiet_key": "k", "baseline_median_ms": ms}]}})
    assert jobs.job(3, CompressionPlan()).quiet_ms == {"k": 7.0}


def test_failing_plugin_fails_trials_not_the_study(tmp_path: Path) -> None:
    data = tiny_study(tmp_path, objectives=["accuracy", "size_bytes", "plugins.custom_eval:Flaky"])
    result = run_study(study_from_mapping(data))
    trials = _trials(result.run_dir)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert failed and complete and len(trials) == 8
    for t in failed:
        assert "flaky plugin cannot handle 4-bit layers" in t.user_attrs["error"]
        assert "Traceback" in t.user_attrs["traceback"]


def test_resume_keeps_trials_and_refuses_a_changed_space(tmp_path: Path) -> None:
    data = tiny_study(tmp_path, budget={"trials": 4})
    run_study(study_from_mapping(data))
    numbers = [t.number for t in _trials(tmp_path / "run")]
    result = run_study(study_from_mapping(data), trials=6)
    assert result.counts["complete"] == 6
    assert [t.number for t in _trials(tmp_path / "run")][:4] == numbers
    changed = tiny_study(tmp_path, space={"default": {"bits": [32, 8]}})
    with pytest.raises(StudyError, match=r"scored another way.*space\..*:bits: \[32, 8, 4\] -> \[32, 8\]"):
        run_study(study_from_mapping(changed))


def test_resume_warns_when_a_method_version_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_study(tmp_path, budget={"trials": 2})
    run_study(study_from_mapping(data))
    assert "other versions" not in capsys.readouterr().err
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert study.user_attrs["methods"] == registry.versions()
    study.set_user_attr("methods", {**registry.versions(), "sparsity": 0})
    run_study(study_from_mapping(data), trials=3)
    assert "other versions of sparsity (0 -> 1)" in capsys.readouterr().err
    # A study from before the registry recorded the quantizer's version only.
    study.set_user_attr("methods", None)
    study.set_user_attr("quantizer", QUANTIZER_VERSION - 1)
    run_study(study_from_mapping(data), trials=4)
    assert (
        f"other versions of bits ({QUANTIZER_VERSION - 1} -> {QUANTIZER_VERSION})" in capsys.readouterr().err
    )


def test_stale_running_trials_are_failed_and_retried_ahead_of_the_seeds(tmp_path: Path) -> None:
    data = tiny_study(tmp_path, budget={"trials": 3})
    run_study(study_from_mapping(data))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert not study.get_trials(deepcopy=False, states=[TrialState.WAITING])  # seeds are not queued ahead
    name = "bert.encoder.layer.0.attention.self.query:bits"
    dists = {name: optuna.distributions.CategoricalDistribution([32, 8, 4])}
    # The driver died inside a seed it had queued and claimed (a later seed than the next one).
    seed = dict(study.trials[0].params) | {name: 4}
    study.enqueue_trial(seed, user_attrs={"seed": "uniform"})
    orphan = study.ask(fixed_distributions=dists)
    # Budget for one more finished trial: the orphan's retry, which goes before the seeds
    # not yet run. The orphan itself, cut short by the driver's death, spends no budget.
    result = run_study(study_from_mapping(data), trials=4)
    trials = _trials(result.run_dir)
    failed = next(t for t in trials if t.number == orphan.number)
    assert failed.state == TrialState.FAIL and failed.user_attrs["orphaned"]
    retried = [t for t in trials if t.user_attrs.get("retry_of") == orphan.number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].user_attrs["seed"] == "uniform" and retried[0].user_attrs["retries"] == 1
    assert retried[0].params == seed
    assert [t.number for t in trials if t.number > orphan.number] == [retried[0].number]
    assert result.counts["complete"] == 4


def test_cli_run_and_pareto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_study(tmp_path, budget={"trials": 3})))
    assert main(["run", str(path), "--executor", "inprocess"]) == 0
    capsys.readouterr()
    assert main(["pareto", str(tmp_path / "run"), "--sort", "size_bytes"]) == 0
    assert "size_bytes" in capsys.readouterr().out
    assert main(["pareto", str(tmp_path)]) == 2  # not a run folder: a clear error, exit 2


@pytest.mark.ray
def test_tiny_study_through_local_ray(tmp_path: Path, ray_session: None) -> None:
    data = tiny_study(tmp_path, executor={"kind": "ray", "max_in_flight": 2}, budget={"trials": 6})
    result = run_study(study_from_mapping(data))
    assert result.counts == {"complete": 6, "failed": 0, "repeats": 0}
    pids = {t.user_attrs["records"]["pid"] for t in _trials(result.run_dir)}
    import os

    assert os.getpid() not in pids  # trials ran in Ray workers, not in the driver


def test_trial_past_its_timeout_fails_and_the_search_goes_on(tmp_path: Path) -> None:
    data = tiny_study(
        tmp_path,
        objectives=["accuracy", "plugins.custom_eval:Sleepy"],
        # Loose enough for the baseline and the quick trials on a busy machine; Sleepy's 30 s is past it.
        executor={"kind": "inprocess", "trial_timeout": "10s"},
        budget={"trials": 4},
    )
    result = run_study(study_from_mapping(data))
    trials = _trials(result.run_dir)
    timed_out = [t for t in trials if "timeout of 10s" in t.user_attrs.get("error", "")]
    assert timed_out and result.counts["complete"] >= 2 and len(trials) == 4


def test_identical_plans_are_answered_without_spending_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A one-knob space with two values: after both are measured, every proposal is a repeat.
    # Repeats spend no budget, so the run must end because the space is exhausted, not
    # because 6 trials ran; the front shows each plan once.
    from slimsearch.search import loop

    monkeypatch.setattr(loop, "MAX_REPEATS_IN_A_ROW", 5)
    data = tiny_study(
        tmp_path,
        space={"layers": "bert.encoder.layer.0.output.dense", "default": {"bits": [32, 8]}},
        budget={"trials": 6},
    )
    result = run_study(study_from_mapping(data))
    assert result.stopped == "exhausted"
    trials = _trials(result.run_dir)
    reused = [t for t in trials if "reused_from" in t.user_attrs["records"]]
    measured = [t for t in trials if "reused_from" not in t.user_attrs["records"]]
    assert len(measured) == 2 and len(reused) == 5
    assert result.counts == {"complete": 2, "failed": 0, "repeats": 5}
    by_number = {t.number: t for t in trials}
    for t in reused:
        assert t.values == by_number[t.user_attrs["records"]["reused_from"]].values
    plans = [row["plan"] for row in result.front]
    assert len(plans) == len(set(plans)) and {row["trial"] for row in result.front} <= {0, 1}


def test_screening_rejects_trials_below_the_threshold_early(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimsearch.search.worker import ScreenSpec

    # The tiny model keeps its accuracy under any plan, so demand the impossible (101 points
    # above the baseline) from odd trials and nothing from even ones; screening must reject
    # exactly the odd ones.
    odd = {"next": False}

    def screen_spec(self: Jobs) -> ScreenSpec:
        return ScreenSpec(max_drop=-101.0 if odd["next"] else 100.0, examples=8)

    original_job = Jobs.job

    def job(self: Jobs, number: int, *args: object) -> object:
        odd["next"] = number % 2 == 1
        return original_job(self, number, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Jobs, "screen_spec", screen_spec)
    monkeypatch.setattr(Jobs, "job", job)
    data = tiny_study(tmp_path, screening={"examples": 8})
    result = run_study(study_from_mapping(data))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{result.run_dir / 'study.db'}")
    pruned = study.get_trials(states=[TrialState.PRUNED])
    complete = study.get_trials(states=[TrialState.COMPLETE])
    assert [t.number for t in pruned] == [1, 3, 5, 7]
    assert [t.number for t in complete] == [0, 2, 4, 6]
    for t in pruned:
        scr = t.user_attrs["records"]["screen"]
        assert scr["examples"] == 8
        assert scr["upper_bound"] < scr["threshold"] == scr["baseline_accuracy"] + 101.0
        assert t.user_attrs["records"]["fidelity"] == "screen"
    for t in complete:
        assert t.user_attrs["records"]["fidelity"] == "full"
        assert t.user_attrs["records"]["screen"]["examples"] == 8  # screened, then passed


def test_screening_compares_with_the_baseline_on_the_same_rows(tmp_path: Path) -> None:
    from slimsearch.search import models
    from slimsearch.search.worker import run_trial

    spec = study_from_mapping(tiny_study(tmp_path, screening={"examples": 8}))
    baseline_dir = models.prepare_baseline(spec)
    # Say the full test split scored 50% while the screening rows are easy for this model:
    # the screen must ask for the baseline's score on those rows less 10 points, not 40%.
    result = run_trial(Jobs(spec, baseline_dir, {"accuracy": 50.0}).job(1, CompressionPlan()))
    screen = result.records["screen"]
    assert screen["baseline_accuracy"] > 60.0
    assert screen["threshold"] == screen["baseline_accuracy"] - 10.0
    # A plan that changes nothing scores exactly the baseline there, and passes.
    assert screen["accuracy"] == screen["baseline_accuracy"]
    assert not result.pruned and result.values is not None


def test_wilson_upper_bound() -> None:
    from slimsearch.search.worker import wilson_upper

    assert wilson_upper(50, 100, 2.0) == pytest.approx(59.8, abs=0.2)
    assert wilson_upper(0, 10, 2.0) > 0 and wilson_upper(10, 10, 2.0) == pytest.approx(100.0)


def test_sensitivity_seeds_run_once_each(tmp_path: Path) -> None:
    data = tiny_study(tmp_path, seed_sensitivity=True, budget={"trials": 12})
    result = run_study(study_from_mapping(data))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{result.run_dir / 'study.db'}")
    seeded = [t for t in study.get_trials() if t.user_attrs.get("seed") == "sensitivity"]
    assert seeded and len({json.dumps(t.params, sort_keys=True) for t in seeded}) == len(seeded)
    assert list((tmp_path / "cache" / "sensitivity").glob("*.json"))  # the profile is cached


def test_sensitivity_seeds_follow_the_study_size_budgets(tmp_path: Path) -> None:
    from slimsearch.search import models, sensitivity
    from slimsearch.spaces import SearchSpace

    data = tiny_study(tmp_path, seed_sensitivity={"size_budgets": [0.6]}, budget={"trials": 40})
    spec = study_from_mapping(data)
    result = run_study(spec)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{result.run_dir / 'study.db'}")
    seeded = [t.params for t in study.get_trials() if t.user_attrs.get("seed") == "sensitivity"]
    baseline_dir = models.prepare_baseline(spec)
    space = SearchSpace(models.load_baseline(baseline_dir, "classification")[0], spec.space)
    profile = sensitivity.load_or_compute_profile(spec, space, baseline_dir)
    ours = sensitivity.sensitivity_seeds(space, profile, (0.6,))
    default = sensitivity.sensitivity_seeds(space, profile)
    assert seeded and all(p in ours for p in seeded)
    assert any(p not in ours for p in default)  # the default budgets would have seeded others


def test_cli_reports_a_layer_pattern_that_matches_nothing_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_study(tmp_path, space={"layers": "re:.*decoder.*"})))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "match no Linear layer" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "study.db").exists()  # refused before any trial
