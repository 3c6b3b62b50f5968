"""Every compression method slimsearch ships passes the conformance suite, on tiny BERT,
tiny Llama (tied head, grouped-query attention) and tiny Llama with an untied head."""

from __future__ import annotations

import pytest

from slimsearch.spaces.methods import registry
from slimsearch.spaces.testing import MethodCase, registry_cases
from tiny import OnTinyModels


class TestStandardMethods(OnTinyModels):
    @pytest.fixture(params=registry_cases(), ids=lambda c: c.name)
    def case(self, request: pytest.FixtureRequest) -> MethodCase:
        case: MethodCase = request.param
        return case


def test_generated_cases_cover_every_registered_method_and_stage_pair() -> None:
    from slimsearch.spaces import realized_table

    cases = registry_cases()
    covered = {r for case in cases for r in case.realizes}
    assert covered == set(realized_table())
    names = {c.name for c in cases}
    assert {"bits=8", "sparsity=0.5", "rank=4", "heads=0.5", "neurons=0.5", "bits=4@embeddings"} <= names
    assert {"sparsity=0.5+bits=4", "sparsity=0.5+rank=4", "bits=4+rank=4", "all-combined"} <= names
    assert {m.name for m in registry.methods()} == {
        *("sparsity", "wanda", "sparsegpt", "bits", "group", "integer_zero", "weight_only", "awq", "gptq"),
        *("rank", "whiten", "heads", "neurons", "drop"),
    }
    # Each option is checked with the method it modifies, and all of them together.
    assert {"gptq=True+bits=4", "awq=True+bits=4", "whiten=True+rank=4", "options-combined"} <= names
    assert "drop=True@last-block+bits=4" in names
