"""Any measured metric as a constraint: objectives and extra metrics, relative or absolute,
validated when the study is read; the evaluator context carries tokenizer and data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from conftest import tiny_study
from slimsearch.search import constraints
from slimsearch.search.driver import run_study
from slimsearch.search.study_file import StudyError, study_from_mapping

F1 = "tests.plugins.custom_eval:MacroF1"


def _study(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return tiny_study(
        tmp_path,
        objectives=["accuracy", "size_bytes"],
        metrics=[F1, "tests.plugins.custom_eval:UsesTokenizer"],
        budget={"trials": 4},
        **extra,
    )


def test_a_metric_that_is_not_an_objective_constrains_the_search(tmp_path: Path) -> None:
    data = _study(tmp_path, constraints=[{"metric": "macro_f1", "limit": 5.0}, {"max_size_ratio": 0.9}])
    spec = study_from_mapping(data)
    assert spec.constraints == {"macro_f1.max_drop": 5.0, "max_size_ratio": 0.9}  # limit: F1's own comparison
    result = run_study(spec)
    assert {"macro_f1", "decoded_rows"} <= set(result.baseline)
    assert result.baseline["decoded_rows"] == 16.0  # the context's data object: the 16 test rows
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{result.run_dir / 'study.db'}")
    done = study.get_trials(states=[TrialState.COMPLETE])
    assert len(done) == 4
    for t in done:
        metrics = t.user_attrs["metrics"]
        want = (result.baseline["macro_f1"] - metrics["macro_f1"]) - 5.0
        assert t.system_attrs["constraints:macro_f1.max_drop"] == pytest.approx(want)
        assert len(t.values) == 2  # metrics are measured, not optimized


@pytest.mark.parametrize(
    ("given", "words"),
    [
        (
            [{"metric": "f2", "max_drop": 1}],
            ["constraints[0].metric", "'f2'", "macro_f1", "add it to objectives"],
        ),
        ([{"metric": "macro_f1", "max_drop": 1, "max": 2}], ["constraints[0]", "exactly one bound"]),
        ([{"metric": "macro_f1", "max_ratio": 0}], ["constraints[0].max_ratio", "positive"]),
        ([{"metric": "macro_f1", "max_drop": "x"}], ["constraints[0].max_drop", "not a number"]),
        (
            [{"max_memory_ratio": 0.5}],
            ["constraints.max_memory_ratio", "memory_bytes", "objectives and metrics"],
        ),
        ([{"macro_f1": 1}], ["constraints[0]", "unknown constraint"]),
        ([{"metric": "macro_f1", "max_drop": 1}, {"metric": "macro_f1", "max_drop": 2}], ["bounded twice"]),
        ("max_size_ratio", ["constraints", "mapping"]),
    ],
)
def test_bad_constraints_are_refused_when_the_study_is_read(
    given: Any, words: list[str], tmp_path: Path
) -> None:
    with pytest.raises(StudyError) as err:
        study_from_mapping(_study(tmp_path, constraints=given))
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"


def test_a_metric_listed_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="'accuracy' is already an objective"):
        study_from_mapping(tiny_study(tmp_path, metrics=["accuracy"]))


@pytest.mark.parametrize(
    ("bound", "value", "baseline", "limit", "want"),
    [
        ("max_drop", 78.0, 80.0, 1.0, 1.0),
        ("max_increase", 12.0, 10.0, 1.0, 1.0),
        ("max_ratio", 55.0, 100.0, 0.5, 0.05),
        ("min_ratio", 2.0, 1.0, 2.5, 0.5),
        ("max", 3.0, None, 2.0, 1.0),
        ("min", 3.0, None, 2.0, -1.0),
    ],
)
def test_each_bound_is_satisfied_at_or_below_zero(
    bound: str, value: float, baseline: float | None, limit: float, want: float
) -> None:
    c = constraints.Constraint(f"m.{bound}", "m", bound)
    assert c.violation(value, baseline, limit) == pytest.approx(want)


def test_a_ratio_to_a_zero_baseline_is_refused_before_any_trial() -> None:
    with pytest.raises(ValueError, match=r"constraints.m.max_ratio: the baseline's m is 0.0.*max_drop"):
        constraints.check_baseline({"m.max_ratio": 1.5}, ["m"], {"m": 0.0})
    with pytest.raises(ValueError, match="the baseline has no 'm'"):
        constraints.check_baseline({"m.max_drop": 1.0}, ["m"], {})


def test_named_keys_read_as_before() -> None:
    assert constraints.resolve("max_latency_ratio", ["latency_ratio"]).bound == "max"
    assert constraints.resolve("max_latency_ratio", ["latency_ms"]) == constraints.Constraint(
        "max_latency_ratio", "latency_ms", "max_ratio"
    )
    assert constraints.limit_on({"accuracy.max_drop": 2.0}, "accuracy", "max_drop") == 2.0
    assert constraints.limit_on({"max_accuracy_drop": 1.0}, "accuracy", "max_drop") == 1.0
