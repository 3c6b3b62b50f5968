"""Every registered proposer passes the conformance suite (search/proposers/testing.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution

from slimsearch.search.proposers import (
    REGISTRY,
    Evolution,
    Finalists,
    Proposal,
    Proposer,
    Refinement,
    Retries,
    Sampler,
    Seeds,
)
from slimsearch.search.proposers.testing import check_proposer
from slimsearch.search.sensitivity import Option, Profile
from slimsearch.spaces import CompressionPlan
from slimsearch.spaces.plan import LayerSettings

UNITS = ("a", "b", "c")
SIZES = {"a": 1000, "b": 1000, "c": 2000}
LOSS = {"a:bits": [(8, 0.5), (4, 0.9)], "b:bits": [(8, 0.01), (4, 0.2)], "c:bits": [(8, 0.01), (4, 0.3)]}
DISTS = {f"{u}:bits": CategoricalDistribution([32, 8, 4]) for u in UNITS}
OFF = {f"{u}:bits": 32 for u in UNITS}


class FakeSpace:
    """What the refinement reads of a SearchSpace: the off params (via uniform_params)."""

    def uniform_params(self) -> list[dict[str, Any]]:
        return [dict(OFF)]


def profile() -> Profile:
    options = {u: [Option({f"{u}:bits": bits}, SIZES[u] * bits // 32) for bits in (32, 8, 4)] for u in UNITS}
    return Profile("k", "cross-entropy", 8, 0.3, LOSS, options)


def evaluate(params: Mapping[str, Any]) -> tuple[float, float]:
    """(accuracy, bytes): each unit loses what the profile says at its bits."""
    loss = sum(dict(LOSS[name]).get(bits, 0.0) for name, bits in params.items())
    size = sum(SIZES[name.split(":")[0]] * bits / 32 for name, bits in params.items())
    return 90.0 - 2 * loss, size


def plan_of(params: Mapping[str, Any]) -> dict[str, Any]:
    layers = {name.split(":")[0]: LayerSettings(bits=bits) for name, bits in params.items() if bits != 32}
    return CompressionPlan(layers=layers).to_dict()


def study_of(trials: list[dict[str, int]], **attrs: Any) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for params in trials:
        values = evaluate(params)
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=DISTS,
                values=list(values),
                constraints={"accuracy_drop": 90.0 - values[0] - 1.0},
                user_attrs={"plan": plan_of(params)},
            )
        )
    return study


def interrupted_study() -> optuna.Study:
    """Two trials cut short by a stopped run, and one that was not."""
    study = study_of([OFF])
    for bits, attrs in ((8, {"interrupted": True, "seed": "uniform"}), (4, {"orphaned": True, "retries": 1})):
        study.add_trial(
            optuna.trial.create_trial(
                params={f"{u}:bits": bits for u in UNITS},
                distributions=DISTS,
                state=optuna.trial.TrialState.FAIL,
                user_attrs=attrs | {"error": "cancelled"},
            )
        )
    return study


GRID = [{"a:bits": a, "b:bits": b, "c:bits": c} for a in (32, 8, 4) for b in (32, 8, 4) for c in (32, 8, 4)]
# name -> (study to start from, factory)
CASES: dict[str, tuple[Callable[[], optuna.Study], Callable[[optuna.Study], Proposer]]] = {
    "retries": (interrupted_study, lambda study: Retries(DISTS)),
    "seeds": (lambda: study_of([OFF]), lambda study: Seeds("uniform", GRID[::3])),
    "refinement": (lambda: study_of([OFF]), lambda study: Refinement(FakeSpace(), profile())),  # type: ignore[arg-type]
    "evolution": (
        lambda: study_of([OFF, {"a:bits": 8, "b:bits": 4, "c:bits": 8}]),
        lambda study: Evolution(FakeSpace(), profile()),  # type: ignore[arg-type]
    ),
    "finalists": (
        lambda: study_of(GRID[1::4]),
        lambda study: Finalists(3, {"kind": "logits", "steps": 2}),
    ),
    "sampler": (lambda: study_of([OFF]), lambda study: Sampler()),
}


def test_every_registered_proposer_has_a_conformance_case() -> None:
    assert set(REGISTRY) == set(CASES), "add a case for a new proposer to CASES"


@pytest.mark.parametrize("name", sorted(CASES))
def test_proposer_conformance(name: str) -> None:
    start, make = CASES[name]
    check_proposer(make, start(), DISTS, evaluate)


def test_retries_propose_each_cut_trial_once_with_who_proposed_it() -> None:
    made = check_proposer(lambda study: Retries(DISTS), interrupted_study(), DISTS, evaluate)
    assert [p.attrs["retry_of"] for p in made] == [1, 2]
    # Who proposed the original comes back; what happened to it (interrupted, error) does not.
    assert made[0].attrs == {"seed": "uniform", "retries": 0, "retry_of": 1}
    assert made[1].attrs == {"retries": 1, "retry_of": 2}


def test_seeds_run_in_order_and_skip_plans_already_tried() -> None:
    study = study_of([OFF, GRID[3]])
    made = check_proposer(lambda study: Seeds("uniform", GRID[:5]), study, DISTS, evaluate)
    assert [p.params for p in made] == [GRID[1], GRID[2], GRID[4]]
    assert all(p.attrs == {"seed": "uniform"} for p in made)


def test_finalists_distil_each_chosen_front_trial_once() -> None:
    study = study_of(GRID[1::4])
    finalists = Finalists(2, {"kind": "logits"})
    made = check_proposer(lambda s: finalists, study, DISTS, evaluate)
    assert len(made) == 2 and len({p.attrs["distilled_from"] for p in made}) == 2


class _Repeats(Proposer):
    def propose(self, study: optuna.Study) -> Proposal:
        return Proposal(dict(OFF))


class _Writes(Proposer):
    def propose(self, study: optuna.Study) -> Proposal:
        study.enqueue_trial(dict(OFF))
        return Proposal(None)


@pytest.mark.parametrize(("bad", "why"), [(_Repeats, "twice"), (_Writes, "wrote to the study")])
def test_the_suite_catches_a_broken_proposer(bad: type[Proposer], why: str) -> None:
    with pytest.raises(AssertionError, match=why):
        check_proposer(lambda study: bad(), study_of([]), DISTS, evaluate)
