"""The proposers a study runs, in the order the loop asks them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimsearch.search import sensitivity
from slimsearch.search.proposers.base import Proposer
from slimsearch.search.proposers.evolution import Evolution
from slimsearch.search.proposers.refinement import Refinement
from slimsearch.search.proposers.retries import Retries
from slimsearch.search.proposers.sampler import Sampler
from slimsearch.search.proposers.seeds import Seeds
from slimsearch.search.study_file import StudySpec
from slimsearch.spaces import SearchSpace


def default_proposers(
    spec: StudySpec, space: SearchSpace, distributions: dict[str, Any], baseline_dir: Path
) -> list[Proposer]:
    """Retries, then the seeds, then every other trial a refinement step (and of the rest,
    every other an evolution step when ``evolve_front`` is on), then the sampler.
    The sensitivity profile (minutes, cached) is computed here when the study uses it."""
    out: list[Proposer] = [Retries(distributions)]
    if spec.seed_uniform:
        out.append(Seeds("uniform", space.uniform_params()))
    if spec.seed_sensitivity or spec.refine_front or spec.evolve_front:
        profile = sensitivity.load_or_compute_profile(spec, space, baseline_dir)
        if spec.seed_sensitivity:
            out.append(Seeds("sensitivity", sensitivity.sensitivity_seeds(space, profile, spec.seed_budgets)))
        if spec.refine_front:
            out.append(Refinement(space, profile))
        if spec.evolve_front:
            out.append(Evolution(space, profile, spec.sampler.seed))
    return [*out, Sampler()]
