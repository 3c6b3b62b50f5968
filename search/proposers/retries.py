"""Retries: a trial cut short by a stopped run (killed driver, Ctrl-C) runs again first."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from slimsearch.search import retry
from slimsearch.search.proposers.base import Proposal, Proposer
from slimsearch.search.record import RETRY_OF


class Retries(Proposer):
    """The oldest failed trial due a retry (``retry.retry_due``) that no trial retries yet."""

    name = "retries"

    def __init__(self, distributions: Mapping[str, Any]) -> None:
        self.distributions = distributions

    def propose(self, study: optuna.Study) -> Proposal | None:
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get(RETRY_OF) for t in trials}
        for t in trials:
            if t.number in retried:
                continue
            params = retry.retry_due(t, self.distributions)
            if params is not None:
                return Proposal(params, retry.retry_attrs(t))
        return None
