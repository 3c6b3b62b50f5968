"""Distillation inside the search: every trial, or the Pareto candidates in a second stage."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import tiny_study
from slimsearch.search.driver import run_study
from slimsearch.search.pareto import is_repeat
from slimsearch.search.results import open_run
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan


def _complete(run: Path) -> list[optuna.trial.FrozenTrial]:
    """Complete trials that measured something (a repeated plan is answered, not measured)."""
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{run / 'study.db'}")
    return [t for t in study.get_trials(states=[TrialState.COMPLETE]) if not is_repeat(t)]


def test_two_stage_flow_distils_the_pareto_candidates(tmp_path: Path) -> None:
    data = tiny_study(
        tmp_path,
        budget={"trials": 6},
        distill={
            "mode": "finalists",
            "recipe": {"kind": "logits", "steps": 3, "batch_size": 8},
            "finalists": 2,
        },
        # Without seeds still waiting at the budget (those run before the finalists).
        seed_uniform=False,
        # A deterministic third objective instead of latency: under load, latency noise left
        # fronts with a single finalist.
        objectives=["accuracy", "size_bytes", "plugins.custom_eval:CompressedLayers"],
    )
    result = run_study(study_from_mapping(data))
    trials = _complete(result.run_dir)
    stage_two = [t for t in trials if "distilled_from" in t.user_attrs]
    assert len(stage_two) == 2 and len(trials) == 8
    by_number = {t.number: t for t in trials}
    for t in stage_two:
        source = by_number[t.user_attrs["distilled_from"]]
        plan = CompressionPlan.from_dict(t.user_attrs["plan"])
        assert plan.distill is not None and plan.distill["kind"] == "logits" and plan.distill["steps"] == 3
        assert plan.layers == CompressionPlan.from_dict(source.user_attrs["plan"]).layers  # same compression
        assert t.user_attrs["records"]["distill"]["steps"] == 3
        assert t.user_attrs["before_distill"] == source.user_attrs["metrics"]
        assert "+KD(logits, 3 steps)" in plan.summary()
    # The teacher's outputs were computed once and cached on disk for other workers and runs.
    assert len(list((tmp_path / "cache" / "teacher").glob("*.safetensors"))) == 1
    # Export distils again, with the same data and seed: the very weights the trial measured.
    report = open_run(result.run_dir).export(stage_two[0].number, tmp_path / "out", repeats=2)
    assert report.identical is True
    assert report.state_sha256 == stage_two[0].user_attrs["records"]["state_sha256"]


def test_every_trial_mode_searches_recipe_knobs(tmp_path: Path) -> None:
    data = tiny_study(
        tmp_path,
        budget={"trials": 6},
        distill={
            "mode": "every-trial",
            "recipe": {"kind": "logits", "steps": 2, "batch_size": 8},
            "search": {"kind": ["off", "logits"], "steps": [1, 2]},
        },
    )
    result = run_study(study_from_mapping(data))
    trials = _complete(result.run_dir)
    assert all("distill:kind" in t.params and "distill:steps" in t.params for t in trials)
    for t in trials:
        plan = CompressionPlan.from_dict(t.user_attrs["plan"])
        if t.params["distill:kind"] == "off":
            assert plan.distill is None and "distill" not in t.user_attrs["records"]
        else:
            assert plan.distill is not None and plan.distill["steps"] == t.params["distill:steps"]
            assert t.user_attrs["records"]["distill"]["steps"] == t.params["distill:steps"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"mode": "sometimes"}, "distill.mode"),
        ({"mode": "finalists", "recipe": {"kind": "vibes"}}, "distill.recipe"),
        ({"mode": "finalists", "recipe": {"steps": -1}}, "distill.recipe"),
        ({"mode": "finalists", "search": {"kind": ["off", "logits"]}}, "need distill.mode every-trial"),
        ({"mode": "every-trial", "search": {"steps": [1, -2]}}, "distill.search.steps"),
        ({"mode": "finalists", "finalists": 0}, "distill.finalists"),
    ],
)
def test_bad_distill_sections(tmp_path: Path, section: dict[str, object], message: str) -> None:
    with pytest.raises(StudyError, match=message):
        study_from_mapping(tiny_study(tmp_path, distill=section))
