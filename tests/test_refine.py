"""Front refinement: sensitivity-guided steps from the feasible front (search/refine.py)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from conftest import tiny_study
from slimsearch.search import refine
from slimsearch.search.driver import run_study
from slimsearch.search.proposers import Refinement
from slimsearch.search.results import open_run
from slimsearch.search.sensitivity import Option, Profile
from slimsearch.search.study_file import StudyError, study_from_mapping

UNITS = ("a", "b", "c")
# "a" is fragile at 8 bits, "b" and "c" are robust; "c" is twice the size of "b".
SIZES = {"a": 1000, "b": 1000, "c": 2000}
LOSS = {"a:bits": [(8, 0.5), (4, 0.9)], "b:bits": [(8, 0.01), (4, 0.2)], "c:bits": [(8, 0.01), (4, 0.3)]}


def profile() -> Profile:
    options = {u: [Option({f"{u}:bits": bits}, SIZES[u] * bits // 32) for bits in (32, 8, 4)] for u in UNITS}
    return Profile("k", "cross-entropy", 8, 0.3, LOSS, options)


class FakeSpace:
    """What propose() reads of a SearchSpace: the off params (via uniform_params)."""

    def uniform_params(self) -> list[dict[str, Any]]:
        return [{f"{u}:bits": 32 for u in UNITS}]


def study_with(feasible: list[dict[str, int]], infeasible: tuple[dict[str, int], ...] = ()) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    dists = {f"{u}:bits": CategoricalDistribution([32, 8, 4]) for u in UNITS}
    for i, params in enumerate([*feasible, *infeasible]):
        trial = optuna.trial.create_trial(
            params=params,
            distributions=dists,
            values=[80.0 - i, 4000.0 - 100 * i],
            constraints={"accuracy_drop": -1.0 if i < len(feasible) else 1.0},
            user_attrs={"seed": "uniform"},
        )
        study.add_trial(trial)
    return study


def test_moves_rank_bytes_saved_per_loss_added() -> None:
    off = {f"{u}:bits": 32 for u in UNITS}
    ranked = refine.moves(profile(), off, off)
    # Each unit's best next value is int8 (75% saved for little loss); "c" saves twice "b"'s
    # bytes for the same loss, the fragile "a" comes last.
    assert [(m.param, m.value) for m in ranked] == [("c:bits", 8), ("b:bits", 8), ("a:bits", 8)]
    # From int8, "b"'s next step is 4 bits (125 bytes for 0.19: 658 per unit of loss), behind
    # "a" to int8 (750 for 0.5: 1500); "c", already at its smallest, offers none.
    at8 = off | {"b:bits": 8, "c:bits": 4}
    assert [(m.param, m.value) for m in refine.moves(profile(), at8, off)] == [
        ("a:bits", 8),
        ("b:bits", 4),
    ]


def test_children_take_longer_steps_and_never_repeat_a_plan() -> None:
    study = study_with([{f"{u}:bits": 32 for u in UNITS}])
    space, prof = FakeSpace(), profile()
    seen = []
    for steps in (1, 2, 4):
        proposal = refine.propose(study, space, prof)  # type: ignore[arg-type]
        assert proposal is not None and proposal.parent == 0
        assert proposal.moves == min(steps, 3)
        changed = {k for k, v in proposal.params.items() if v != 32}
        assert len(changed) == min(steps, 3)
        assert proposal.params not in seen
        seen.append(proposal.params)
        study.enqueue_trial(proposal.params, user_attrs=proposal.user_attrs())
        study.ask()  # claims it, so the next proposal sees it as tried
    # One move compresses the best unit; two add the next best.
    assert seen[0] == {"a:bits": 32, "b:bits": 32, "c:bits": 8}
    assert seen[1] == {"a:bits": 32, "b:bits": 8, "c:bits": 8}


def test_step_sizes_double_from_the_start_then_shrink() -> None:
    assert refine.step_sizes(1, 43) == [1, 2, 4, 8, 16, 32, 43]
    assert refine.step_sizes(8, 43) == [8, 16, 32, 43, 4, 2, 1]
    assert refine.step_sizes(64, 5) == [5, 4, 2, 1]
    assert refine.step_sizes(1, 0) == []


def test_a_feasible_child_starts_at_twice_the_step_that_made_it() -> None:
    study = study_with([{f"{u}:bits": 32 for u in UNITS}])
    dists = {f"{u}:bits": CategoricalDistribution([32, 8, 4]) for u in UNITS}
    child = {"a:bits": 32, "b:bits": 32, "c:bits": 8}  # one move from the parent
    attrs = refine.Proposal(child, 0, 1).user_attrs()
    trial = optuna.trial.create_trial(
        params=child, distributions=dists, values=[79.0, 3500.0], constraints={"d": -1.0}, user_attrs=attrs
    )
    study.add_trial(trial)
    proposal = refine.propose(study, FakeSpace(), profile())  # type: ignore[arg-type]
    assert proposal is not None and proposal.parent == 1 and proposal.moves == 2  # not 1


def test_a_step_that_broke_the_constraint_rules_out_longer_ones() -> None:
    study = study_with([{f"{u}:bits": 32 for u in UNITS}])
    dists = {f"{u}:bits": CategoricalDistribution([32, 8, 4]) for u in UNITS}
    one = {"a:bits": 32, "b:bits": 32, "c:bits": 8}
    broken = optuna.trial.create_trial(
        params=one,
        distributions=dists,
        values=[60.0, 3500.0],
        constraints={"d": 1.0},  # the one-move child broke the constraint
        user_attrs=refine.Proposal(one, 0, 1).user_attrs(),
    )
    study.add_trial(broken)
    # Every longer step from trial 0 holds that move; each lower-ranked move is still tried by
    # itself, in rank order, and one of those breaking rules nothing else out.
    space, prof = FakeSpace(), profile()
    alone = []
    for _ in range(2):
        proposal = refine.propose(study, space, prof)  # type: ignore[arg-type]
        assert proposal is not None and proposal.parent == 0 and proposal.moves == 1 and proposal.alone
        alone.append({k: v for k, v in proposal.params.items() if v != 32})
        attrs = proposal.user_attrs()
        assert attrs[refine.ALONE] is True
        study.add_trial(
            optuna.trial.create_trial(
                params=proposal.params,
                distributions=dists,
                values=[60.0, 3500.0],
                constraints={"d": 1.0},
                user_attrs=attrs,
            )
        )
    assert alone == [{"b:bits": 8}, {"a:bits": 8}]
    assert refine.propose(study, space, prof) is None  # type: ignore[arg-type]


def test_every_ranked_move_is_reachable_from_a_parent() -> None:
    study = study_with([{f"{u}:bits": 32 for u in UNITS}])
    space, prof = FakeSpace(), profile()
    proposed = []
    while (proposal := refine.propose(study, space, prof)) is not None:  # type: ignore[arg-type]
        if proposal.parent == 0:
            proposed.append({k: v for k, v in proposal.params.items() if v != 32})
        study.enqueue_trial(proposal.params, user_attrs=proposal.user_attrs())
        study.ask()
        assert len(proposed) < 20
    # The prefixes (1, 2, 3 moves), then the 2nd- and 3rd-ranked moves alone.
    assert proposed[:5] == [
        {"c:bits": 8},
        {"b:bits": 8, "c:bits": 8},
        {"a:bits": 8, "b:bits": 8, "c:bits": 8},
        {"b:bits": 8},
        {"a:bits": 8},
    ]


def test_parents_come_from_the_feasible_front_fewest_children_first() -> None:
    start = {"a:bits": 32, "b:bits": 8, "c:bits": 8}
    bad = {"a:bits": 4, "b:bits": 4, "c:bits": 4}
    study = study_with([{f"{u}:bits": 32 for u in UNITS}, start], (bad,))
    space, prof = FakeSpace(), profile()
    parents = []
    for _ in range(4):
        proposal = refine.propose(study, space, prof)  # type: ignore[arg-type]
        assert proposal is not None
        parents.append(proposal.parent)
        study.enqueue_trial(proposal.params, user_attrs=proposal.user_attrs())
        study.ask()
    assert 2 not in parents  # the infeasible trial is never a parent
    # Both front members, taking turns while each has new steps (parent 0's third child would
    # repeat a plan already tried, so parent 1 goes on).
    assert parents[:2] == [0, 1] and set(parents) == {0, 1}


def _walk(study: optuna.Study, prof: Profile) -> list[dict[str, Any]]:
    """Every proposal until refinement has none left, each claimed (asked) but not told."""
    out = []
    while (proposal := refine.propose(study, FakeSpace(), prof)) is not None:  # type: ignore[arg-type]
        out.append(proposal.params)
        study.enqueue_trial(proposal.params, user_attrs=proposal.user_attrs())
        study.ask()
        assert len(out) < 30
    return out


def test_from_the_smallest_plan_each_knob_steps_one_level_up_then_refinement_stops() -> None:
    smallest = {f"{u}:bits": 4 for u in UNITS}
    study = study_with([smallest])
    # Loss taken back per byte added: "a" 0.4 / 125, "b" 0.19 / 125, "c" 0.29 / 250.
    assert _walk(study, profile()) == [
        smallest | {"a:bits": 8},
        smallest | {"b:bits": 8},
        smallest | {"c:bits": 8},
    ]
    assert refine.propose(study, FakeSpace(), profile()) is None  # type: ignore[arg-type]


def test_milder_values_the_ranking_passed_over_come_after_the_ranked_steps() -> None:
    # "b" at 4 bits costs what int8 does, so its ranked move is 4 bits and int8 is passed over.
    loss = LOSS | {"b:bits": [(8, 0.01), (4, 0.01)]}
    prof = Profile("k", "cross-entropy", 8, 0.3, loss, profile().options)
    off = {f"{u}:bits": 32 for u in UNITS}
    assert ("b:bits", 4) in [(m.param, m.value) for m in refine.moves(prof, off, off)]
    assert [(m.param, m.value) for m in refine.alternatives(prof, off, off)] == [("b:bits", 8)]
    proposed = _walk(study_with([off]), prof)
    ranked = len(refine.step_sizes(1, 3)) + 2  # the prefixes, then the 2nd and 3rd moves alone
    assert off | {"b:bits": 8} not in proposed[:ranked]
    assert off | {"b:bits": 8} in proposed[ranked:]


def test_refinement_takes_every_other_trial_after_the_seeds() -> None:
    study = study_with([{f"{u}:bits": 32 for u in UNITS}])
    refiner = Refinement(FakeSpace(), profile())  # type: ignore[arg-type]
    kinds = []
    for _ in range(6):
        proposal = refiner.propose(study)
        # the sampler's turn: a plan refinement never proposes, so none collide
        params = proposal.params if proposal is not None else {f"{u}:bits": 4 for u in UNITS}
        assert params is not None
        study.enqueue_trial(params, user_attrs=proposal.attrs if proposal is not None else {})
        trial = study.ask({f"{u}:bits": CategoricalDistribution([32, 8, 4]) for u in UNITS})
        kinds.append("refine" if proposal is not None else "sampler")
        study.tell(trial, [70.0, 5000.0])  # dominated: the front does not change
    assert kinds == ["refine", "sampler", "refine", "sampler", "refine", "sampler"]


def test_stage_two_trials_do_not_count_as_the_samplers() -> None:
    study = study_with([{f"{u}:bits": 32 for u in UNITS}])
    dists = {f"{u}:bits": CategoricalDistribution([32, 8, 4]) for u in UNITS}
    refined = {"a:bits": 32, "b:bits": 32, "c:bits": 8}
    for params, attrs in (
        (refined, refine.Proposal(refined, 0, 1).user_attrs()),
        ({f"{u}:bits": 8 for u in UNITS}, {"distill": {"kind": "logits"}, "distilled_from": 0}),
    ):
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=dists, values=[70.0, 5000.0], user_attrs=attrs
            )
        )
    # One refinement against no sampler trial: the stage-two trial is not the sampler's.
    assert not refine.should_refine(study)


def test_driver_refines_from_feasible_trials(tmp_path: Path) -> None:
    # A deterministic third objective instead of latency, whose noise decided which trials
    # were on the front (a front of one fully compressed trial leaves nothing to refine).
    data = tiny_study(
        tmp_path,
        seed_sensitivity=True,
        budget={"trials": 40},
        objectives=["accuracy", "size_bytes", "plugins.custom_eval:CompressedLayers"],
    )
    spec = study_from_mapping(data)
    assert spec.refine_front  # follows seed_sensitivity
    result = run_study(spec)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{result.run_dir / 'study.db'}")
    trials = {t.number: t for t in study.get_trials()}
    refined = [t for t in trials.values() if t.user_attrs.get("seed") == "refine"]
    assert refined
    for t in refined:
        parent = trials[t.user_attrs[refine.ATTR]]
        assert parent.state == optuna.trial.TrialState.COMPLETE
        assert parent.constraints and all(c <= 0 for c in parent.constraints.values())
        assert t.params != parent.params
    sampled = [t for t in trials.values() if "seed" not in t.user_attrs]
    assert len(refined) <= len(sampled) + 1  # every other trial after the seeds
    table = open_run(result.run_dir).trials().set_index("trial")
    for t in refined:
        assert table.loc[t.number, "source"] == f"refined from {t.user_attrs[refine.ATTR]}"
    assert table.loc[sampled[0].number, "source"] == "sampler"
    # The driver's own trials.csv says the same.
    with open(result.run_dir / "trials.csv", newline="") as f:
        written = {int(r["trial"]): r["source"] for r in csv.DictReader(f)}
    assert written == {int(k): v for k, v in table["source"].items()}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"refine_front": True}, ["refine_front", "seed_sensitivity: true"]),
        ({"refine_front": "yes", "seed_sensitivity": True}, ["refine_front", "'yes'", "true or false"]),
        ({"evolve_front": True}, ["evolve_front", "seed_sensitivity: true"]),
        ({"evolve_front": 1, "seed_sensitivity": True}, ["evolve_front", "1", "true or false"]),
    ],
)
def test_refine_front_errors_name_the_value_and_the_fix(
    tmp_path: Path, overrides: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(StudyError) as err:
        study_from_mapping(tiny_study(tmp_path, **overrides))
    for word in words:
        assert word in str(err.value)


def test_refine_front_can_be_turned_off(tmp_path: Path) -> None:
    spec = study_from_mapping(tiny_study(tmp_path, seed_sensitivity=True, refine_front=False))
    assert spec.seed_sensitivity and not spec.refine_front
    assert not study_from_mapping(tiny_study(tmp_path)).refine_front
