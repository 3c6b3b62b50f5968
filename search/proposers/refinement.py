"""Front refinement: every other trial after the seeds, one sensitivity-guided step from the
feasible front (see ``search/refine.py`` for how a step is chosen)."""

from __future__ import annotations

import optuna

from slimsearch.search import refine
from slimsearch.search.proposers.base import Proposal, Proposer
from slimsearch.search.sensitivity import Profile
from slimsearch.spaces import SearchSpace


class Refinement(Proposer):
    name = "refinement"

    def __init__(self, space: SearchSpace, profile: Profile) -> None:
        self.space = space
        self.profile = profile

    def propose(self, study: optuna.Study) -> Proposal | None:
        if not refine.should_refine(study):
            return None
        step = refine.propose(study, self.space, self.profile)
        return None if step is None else Proposal(step.params, step.user_attrs())
