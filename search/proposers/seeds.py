"""Seeds: a fixed list of plans, run in order before the sampler's (uniform, sensitivity)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optuna

from slimsearch.search.proposers.base import Proposal, Proposer, params_key, tried
from slimsearch.search.record import SEED


class Seeds(Proposer):
    """The first of ``plans`` no trial holds yet, tagged ``seed: <kind>``. ``plans`` may be a
    callable, called on the first proposal (a sensitivity profile costs minutes)."""

    name = "seeds"

    def __init__(self, kind: str, plans: Sequence[dict[str, Any]] | Callable[[], Sequence[dict[str, Any]]]):
        self.kind = kind
        self._plans = plans
        self._done = False  # every plan tried: later calls skip the scan

    def plans(self) -> Sequence[dict[str, Any]]:
        if callable(self._plans):
            self._plans = list(self._plans())
        return self._plans

    def propose(self, study: optuna.Study) -> Proposal | None:
        if self._done:
            return None
        plans = self.plans()
        names = {name for params in plans for name in params}
        seen = tried(study, names)
        for params in plans:
            if params_key(params, names) not in seen:
                return Proposal(dict(params), {SEED: self.kind})
        self._done = True
        return None
