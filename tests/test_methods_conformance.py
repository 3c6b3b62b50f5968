"""Every compression method slimsearch ships passes the conformance suite, on tiny BERT,
tiny Llama (tied head, grouped-query attention) and tiny Llama with an untied head."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from slimsearch.spaces.methods import registry
from slimsearch.spaces.testing import MethodCase, MethodConformance, registry_cases
from tiny import MODELS


class TestStandardMethods(MethodConformance):
    @pytest.fixture(params=registry_cases(), ids=lambda c: c.name)
    def case(self, request: pytest.FixtureRequest) -> MethodCase:
        case: MethodCase = request.param
        return case

    @pytest.fixture(params=sorted(MODELS))
    def make_model(self, request: pytest.FixtureRequest) -> Callable[[int], nn.Module]:
        return MODELS[request.param]

    @pytest.fixture
    def inputs(self) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 96, (3, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # one padded row: padding must not count as calibration signal
        return {"input_ids": ids, "attention_mask": mask}


def test_generated_cases_cover_every_registered_method_and_stage_pair() -> None:
    from slimsearch.spaces import realized_table

    cases = registry_cases()
    covered = {r for case in cases for r in case.realizes}
    assert covered == set(realized_table())
    names = {c.name for c in cases}
    assert {"bits=8", "sparsity=0.5", "rank=4", "heads=0.5", "neurons=0.5", "bits=4@embeddings"} <= names
    assert {"sparsity=0.5+bits=4", "sparsity=0.5+rank=4", "bits=4+rank=4", "all-combined"} <= names
    assert {m.name for m in registry.methods()} == {"sparsity", "bits", "rank", "heads", "neurons"}
