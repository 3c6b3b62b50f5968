"""The printed front: each distinct plan once, and non-dominated on the numbers it shows."""

from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution

from slimsearch.search import pareto
from slimsearch.spaces import CompressionPlan, LayerSettings

OBJECTIVES = ["accuracy", "size_bytes", "latency_ms"]


def _add(study: optuna.Study, values: list[float], bits: int, reused_from: int | None = None) -> int:
    plan = CompressionPlan(layers={"x": LayerSettings(bits=bits)})
    records = {"reused_from": reused_from} if reused_from is not None else {}
    trial = optuna.trial.create_trial(
        params={"x:bits": bits},
        distributions={"x:bits": CategoricalDistribution([32, 16, 8, 4])},
        values=values,
        user_attrs={"plan": plan.to_dict(), "records": records},
        system_attrs={"constraints:max_accuracy_drop": -1.0},
    )
    study.add_trial(trial)
    return study.trials[-1].number


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(directions=["maximize", "minimize", "minimize"])


def test_a_plan_answered_again_is_shown_once() -> None:
    study = _study()
    first = _add(study, [80.0, 10.0, 5.0], 8)
    _add(study, [80.0, 10.0, 5.0], 8, reused_from=first)  # the sampler proposed it again
    _add(study, [79.0, 5.0, 6.0], 4)
    rows = pareto.front_rows(study, OBJECTIVES, {"accuracy": 80.0, "size_bytes": 20.0, "latency_ms": 10.0})
    assert [r["trial"] for r in rows] == [0, 2]
    assert len(study.best_trials) == 3  # Optuna's own set holds the repeat too


def test_the_front_is_taken_again_on_re_measured_latency() -> None:
    study = _study()
    _add(study, [80.0, 10.0, 5.0], 8)
    _add(study, [80.0, 12.0, 4.0], 16)  # on the front only by its search-time latency
    _add(study, [79.0, 5.0, 6.0], 4)
    baseline = {"accuracy": 80.0, "size_bytes": 20.0, "latency_ms": 10.0}
    assert [r["trial"] for r in pareto.front_rows(study, OBJECTIVES, baseline)] == [0, 1, 2]
    # Re-measured in fresh processes, trial 1 is slower than trial 0: dominated on the
    # numbers the table shows, so it is not printed as a front point.
    study.set_user_attr("final_latency", {"0": {"latency_ms": 5.0}, "1": {"latency_ms": 5.5}})
    rows = pareto.front_rows(study, OBJECTIVES, baseline)
    assert [r["trial"] for r in rows] == [0, 2]
    assert rows[0]["latency_ms"] == 5.0
