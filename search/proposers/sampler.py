"""The study's Optuna sampler (multivariate TPE, NSGA-II or random) as the last proposer."""

from __future__ import annotations

import warnings

import optuna

from slimsearch.search.proposers.base import Proposal, Proposer
from slimsearch.search.study_file import SamplerSpec


def make_sampler(spec: SamplerSpec) -> optuna.samplers.BaseSampler:
    if spec.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=spec.seed, population_size=spec.population_size)
    if spec.name == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, constant_liar=True)


class Sampler(Proposer):
    """Always proposes: the study's sampler draws the plan when the trial is asked for. It
    cannot know which plans were measured, so the loop answers its repeats from storage."""

    name = "sampler"
    may_repeat = True

    def propose(self, study: optuna.Study) -> Proposal | None:
        return Proposal(None)
