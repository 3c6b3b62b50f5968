"""Stage two of ``distill.mode: finalists``: the Pareto candidates, distilled one by one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from slimsearch.search import pareto
from slimsearch.search import record as attr
from slimsearch.search.proposers.base import Proposal, Proposer
from slimsearch.search.record import TrialRecord
from slimsearch.spaces import CompressionPlan


class Finalists(Proposer):
    """The first ``count`` not-yet-distilled front trials (constraints ignored: distillation
    may bring an infeasible trial back), smallest first objective first, chosen on the
    first call of ``candidates``; each is proposed once with ``recipe``."""

    name = "finalists"

    def __init__(self, count: int, recipe: Mapping[str, Any]) -> None:
        self.count = count
        self.recipe = dict(recipe)
        self.chosen: list[FrozenTrial] | None = None

    def candidates(self, study: optuna.Study) -> list[FrozenTrial]:
        """The chosen front trials, chosen once (a distilled trial joins no front here)."""
        if self.chosen is None:
            self.chosen = self._choose(study)
        return self.chosen

    def _choose(self, study: optuna.Study) -> list[FrozenTrial]:
        trials = study.get_trials(deepcopy=False)
        done = {t.user_attrs.get(attr.DISTILLED_FROM) for t in trials}
        plain = [t for t in trials if t.state == TrialState.COMPLETE and not TrialRecord.of(t).distilled]
        directions = study.directions
        front = [t for t in plain if not any(dominates(o, t, directions) for o in plain)]
        first = 1 if directions[0] == optuna.study.StudyDirection.MINIMIZE else -1
        front.sort(key=lambda t: first * t.values[0])
        chosen = [t for t in front if t.number not in done and not pareto.is_repeat(t)]
        chosen = [
            t
            for t in chosen
            if CompressionPlan.from_dict(TrialRecord.of(t).plan or {}).summary() != "baseline"
        ]
        return chosen[: self.count]

    def propose(self, study: optuna.Study) -> Proposal | None:
        done = {t.user_attrs.get(attr.DISTILLED_FROM) for t in study.get_trials(deepcopy=False)}
        for t in self.candidates(study):
            if t.number not in done:
                return Proposal(dict(t.params), {attr.DISTILL: self.recipe, attr.DISTILLED_FROM: t.number})
        return None


def dominates(a: FrozenTrial, b: FrozenTrial, directions: list[optuna.study.StudyDirection]) -> bool:
    signs = [1 if d == optuna.study.StudyDirection.MINIMIZE else -1 for d in directions]
    pa = [s * v for s, v in zip(signs, a.values, strict=True)]
    pb = [s * v for s, v in zip(signs, b.values, strict=True)]
    return all(x <= y for x, y in zip(pa, pb, strict=True)) and pa != pb
