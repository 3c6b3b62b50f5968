"""The evolution proposer: level switches at constant size from the feasible front."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import optuna
from test_proposer_conformance import DISTS, OFF, SIZES, FakeSpace, evaluate, plan_of, profile, study_of

from conftest import tiny_study
from slimsearch.search.driver import run_study
from slimsearch.search.proposers import Evolution, Refinement, Sampler
from slimsearch.search.proposers.default import default_proposers
from slimsearch.search.proposers.evolution import TOLERANCE, mutate, should_evolve
from slimsearch.search.record import TrialRecord
from slimsearch.search.study_file import study_from_mapping


def size(params: dict[str, Any]) -> float:
    return sum(SIZES[name.split(":")[0]] * bits / 32 for name, bits in params.items())


def test_a_switch_moves_bytes_between_units_and_keeps_the_size() -> None:
    # a at 8 bits and b at 4: a one level down saves what b one level up adds.
    parent = {"a:bits": 8, "b:bits": 4, "c:bits": 32}
    seen = set()
    for seed in range(40):
        drawn = mutate(random.Random(seed), profile(), parent)
        assert drawn is not None
        child, switches = drawn
        assert switches >= 1
        assert abs(size(child) - size(parent)) <= TOLERANCE * 125
        seen.add(tuple(sorted(child.items())))
    assert (("a:bits", 4), ("b:bits", 8), ("c:bits", 32)) in seen


def test_without_a_switch_a_parent_takes_one_single_level_step() -> None:
    # Everything uncompressed: no unit can grow, so no switch exists.
    for seed in range(20):
        drawn = mutate(random.Random(seed), profile(), OFF)
        assert drawn is not None
        child, switches = drawn
        assert switches == 0
        changed = {k: v for k, v in child.items() if v != OFF[k]}
        assert len(changed) == 1 and set(changed.values()) == {8}  # one level: 32 -> 8


def test_evolution_proposes_from_the_front_with_who_proposed_it() -> None:
    study = study_of([OFF, {"a:bits": 8, "b:bits": 4, "c:bits": 8}])
    proposal = Evolution(FakeSpace(), profile()).propose(study)  # type: ignore[arg-type]
    assert proposal is not None and proposal.params is not None
    assert proposal.attrs["seed"] == "evolve"
    parent = study.trials[proposal.attrs["evolved_from"]]
    assert parent in study.best_trials
    assert proposal.params != parent.params


def test_evolution_takes_turns_with_the_sampler() -> None:
    study = study_of([OFF])  # one sampler trial
    assert should_evolve(study)
    for _ in range(2):
        study.add_trial(
            optuna.trial.create_trial(
                params={**OFF, "a:bits": 8},
                distributions=DISTS,
                values=list(evaluate({**OFF, "a:bits": 8})),
                user_attrs={"seed": "evolve", "evolved_from": 0, "plan": plan_of({**OFF, "a:bits": 8})},
            )
        )
    assert not should_evolve(study)  # two evolution steps against one sampler trial


def test_evolution_steps_name_their_parent_in_the_source_column() -> None:
    assert TrialRecord(3, {"seed": "evolve", "evolved_from": 1}).source == "evolved from 1"


def test_the_driver_runs_evolution_steps_when_asked(tmp_path: Path) -> None:
    data = tiny_study(
        tmp_path,
        seed_sensitivity=True,
        evolve_front=True,
        budget={"trials": 24},
        objectives=["accuracy", "size_bytes", "plugins.custom_eval:CompressedLayers"],
    )
    spec = study_from_mapping(data)
    assert spec.evolve_front and not study_from_mapping(tiny_study(tmp_path)).evolve_front
    result = run_study(spec)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{result.run_dir / 'study.db'}")
    trials = {t.number: t for t in study.get_trials()}
    evolved = [t for t in trials.values() if t.user_attrs.get("seed") == "evolve"]
    assert evolved
    for t in evolved:
        parent = trials[t.user_attrs["evolved_from"]]
        assert parent.number < t.number and parent.state == optuna.trial.TrialState.COMPLETE
        assert t.params != parent.params
    keys = [tuple(sorted(t.params.items())) for t in evolved]
    assert len(keys) == len(set(keys))


def test_default_proposers_put_evolution_after_refinement(tmp_path: Path, monkeypatch: Any) -> None:
    spec = study_from_mapping(tiny_study(tmp_path, seed_sensitivity=True, evolve_front=True))
    from slimsearch.search import sensitivity

    monkeypatch.setattr(sensitivity, "load_or_compute_profile", lambda *a: profile())
    monkeypatch.setattr(sensitivity, "sensitivity_seeds", lambda *a: [])

    class Space:
        def uniform_params(self) -> list[dict[str, Any]]:
            return [dict(OFF)]

    kinds = [type(p) for p in default_proposers(spec, Space(), {}, tmp_path)]  # type: ignore[arg-type]
    assert kinds.index(Refinement) < kinds.index(Evolution) < kinds.index(Sampler)
