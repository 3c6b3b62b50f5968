"""Study files are validated before any trial runs; each error names field, value and fix."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_study
from slimsearch.search.study_file import StudyError, load_study, parse_duration, study_from_mapping

REPO = Path(__file__).resolve().parent.parent


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    *path, last = dotted.split(".")
    node = data
    for key in path:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return data


_DELETE = object()

BAD = [
    ("name", "bad name!", "name"),
    ("surprise", 1, "unknown key"),
    ("model.source", "no/such/folder", "model.source"),
    ("model.source", "builtin:gpt-17", "model.source"),
    ("model.config", _DELETE, "model.source: missing"),
    ("task.kind", "regression", "task.kind"),
    ("task.test_size", 0, "task.test_size"),
    ("task.rows", _DELETE, "task.data: missing"),
    ("space.default.bits", [32, 5], "bits: 5"),
    ("space.default.sparsity", [0.0, 1.5], "sparsity: 1.5"),
    ("space.default.rank", [0], "rank: 0"),
    ("space.default.depth", [1], "unknown knob"),
    ("space.default.gptq", [False, "fast"], "gptq="),
    ("space.default.group", [64, 48], "group"),
    ("space.default.wanda", [0.0, "3:3"], "wanda="),
    ("space.structured", {"drop": [False, 1]}, "drop=1"),
    ("task.calibration_rows", 0, "task.calibration_rows"),
    ("space.embeddings", [32, 5], "space.embeddings"),
    ("space.groups", [{"bits": [8]}], "space.groups[0]"),
    ("objectives", ["accuracy", "nonsense"], "unknown evaluator 'nonsense'"),
    ("objectives", ["perplexity"], "perplexity needs task.kind causal-lm"),
    ("objectives", ["no_such_pkg.mod:Thing"], "cannot import module"),
    ("constraints.max_latency_ratio", 0.5, "needs the objective 'latency_ms'"),
    ("constraints.max_accuracy_drop", -1, "constraints.max_accuracy_drop"),
    ("latency.repeats", 0, "latency.repeats"),
    ("latency.precision", -0.1, "latency.precision=-0.1"),
    ("latency.max_drift", "5%", "latency.max_drift='5%'"),
    ("sampler.name", "grid", "sampler.name"),
    ("budget.timeout", "soon", "budget.timeout"),
    ("budget.trials", 0, "budget.trials"),
    ("executor.kind", "slurm", "executor.kind"),
    ("executor.max_in_flight", 0, "executor.max_in_flight"),
    ("storage", "redis", "storage"),
    ("seed_sensitivity", "yes", "seed_sensitivity: 'yes'"),
    ("seed_sensitivity", {"budgets": [0.5]}, "size_budgets"),
    ("seed_sensitivity", {"size_budgets": []}, "seed_sensitivity.size_budgets: []"),
    ("seed_sensitivity", {"size_budgets": [0.5, 1.5]}, "seed_sensitivity.size_budgets: 1.5"),
    ("seed_sensitivity", {"size_budgets": [0.5, 0.5]}, "list each budget once"),
]


@pytest.mark.parametrize(("field", "value", "expected"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_study_is_refused_with_a_clear_error(
    tmp_path: Path, field: str, value: Any, expected: str
) -> None:
    data = _set(tiny_study(tmp_path), field, value)
    if field == "constraints.max_latency_ratio":
        data["objectives"] = ["accuracy", "size_bytes"]
    with pytest.raises(StudyError, match=None) as err:
        study_from_mapping(data)
    assert expected in str(err.value), str(err.value)


def test_seed_sensitivity_takes_size_budgets(tmp_path: Path) -> None:
    spec = study_from_mapping(tiny_study(tmp_path, seed_sensitivity={"size_budgets": [0.45, 0.3]}))
    assert spec.seed_sensitivity is True and spec.seed_budgets == (0.45, 0.3)
    plain = study_from_mapping(tiny_study(tmp_path, seed_sensitivity=True))
    assert plain.seed_sensitivity is True and plain.seed_budgets is None


def test_no_budget_at_all_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="budget"):
        study_from_mapping(_set(tiny_study(tmp_path), "budget", {"trials": None}))


def test_layer_pattern_that_matches_nothing_is_refused_before_trials(tmp_path: Path) -> None:
    from slimsearch.spaces import SearchSpace, space_config_from_mapping
    from tiny import tiny_bert

    with pytest.raises(ValueError, match="match no Linear"):
        SearchSpace(tiny_bert(), space_config_from_mapping({"layers": "re:.*decoder.*"}))
    with pytest.raises(ValueError, match=r"groups\[0\].match"):
        SearchSpace(
            tiny_bert(), space_config_from_mapping({"groups": [{"match": "re:nothing", "bits": [8]}]})
        )


@pytest.mark.parametrize(
    ("text", "seconds"), [(90, 90.0), ("90s", 90.0), ("15m", 900.0), ("8h", 28800.0), ("1h30m", 5400.0)]
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "studies").glob("*.yaml")))
def test_shipped_studies_validate(name: str) -> None:
    spec = load_study(REPO / "studies" / name)
    assert spec.objectives and spec.budget.trials


def test_missing_study_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="does not exist"):
        load_study(tmp_path / "nope.yaml")


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(StudyError, match="YAML mapping"):
        load_study(path)


def test_calibration_rows_is_read_and_kept_out_of_old_studies_records(tmp_path: Path) -> None:
    from slimsearch.search.comparable import _task

    spec = study_from_mapping(_set(tiny_study(tmp_path), "task.calibration_rows", 24))
    assert spec.task.calibration_rows == 24 and _task(spec)["calibration_rows"] == 24
    # A study written before the key compares equal to one that leaves it at its default.
    assert "calibration_rows" not in _task(study_from_mapping(tiny_study(tmp_path)))
    # Nor does it change the fine-tuned baseline (its cache key).
    from slimsearch.search.models import baseline_key

    assert baseline_key(spec) == baseline_key(study_from_mapping(tiny_study(tmp_path)))
