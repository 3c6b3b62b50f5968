"""Proposers: where each trial's plan comes from (see ``base.Proposer`` for the contract)."""

from slimsearch.search.proposers.base import REGISTRY, Proposal, Proposer, params_key, tried
from slimsearch.search.proposers.evolution import Evolution
from slimsearch.search.proposers.finalists import Finalists
from slimsearch.search.proposers.refinement import Refinement
from slimsearch.search.proposers.retries import Retries
from slimsearch.search.proposers.sampler import Sampler, make_sampler
from slimsearch.search.proposers.seeds import Seeds

__all__ = [
    "REGISTRY",
    "Evolution",
    "Finalists",
    "Proposal",
    "Proposer",
    "Refinement",
    "Retries",
    "Sampler",
    "Seeds",
    "make_sampler",
    "params_key",
    "tried",
]
