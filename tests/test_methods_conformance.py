"""Every compression method slimsearch ships passes the conformance suite, on tiny BERT,
tiny Llama (tied head, grouped-query attention) and tiny Llama with an untied head."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from slimsearch.spaces.testing import STANDARD_CASES, MethodCase, MethodConformance
from tiny import MODELS


class TestStandardMethods(MethodConformance):
    @pytest.fixture(params=STANDARD_CASES, ids=lambda c: c.name)
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


def test_standard_cases_cover_every_realized_method() -> None:
    from slimsearch.spaces import REALIZED

    covered = {r for case in STANDARD_CASES for r in case.realizes}
    assert covered == set(REALIZED)
