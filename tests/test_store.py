"""The layer store gives back exactly what compressing would, and never a stale result."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor

from slimsearch.spaces import compress, state_digest
from slimsearch.spaces.methods import registry
from slimsearch.spaces.store import LayerStore
from slimsearch.spaces.testing import MethodCase, registry_cases
from tiny import MODELS


def _inputs() -> dict[str, Tensor]:
    ids = torch.randint(3, 96, (3, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("case", registry_cases(), ids=lambda c: c.name)
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_stored_layers_are_the_computed_ones(case: MethodCase, model_name: str, tmp_path: Path) -> None:
    base = MODELS[model_name](0)
    plan = case.plan(base)
    if plan is None:
        pytest.skip(f"{case.name} does not apply to {model_name}")
    computed = copy.deepcopy(base)
    compress(computed, plan, _inputs())
    store = LayerStore(tmp_path)
    first, second = copy.deepcopy(base), copy.deepcopy(base)
    compress(first, plan, _inputs(), store=store)
    misses = store.misses
    compress(second, plan, _inputs(), store=store)
    assert state_digest(first) == state_digest(second) == state_digest(computed)
    assert store.misses == misses and store.hits == misses  # the second build read every layer
    with torch.no_grad():
        assert torch.equal(second.eval()(**_inputs()).logits, computed.eval()(**_inputs()).logits)


def test_a_new_method_version_or_other_weights_are_other_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from slimsearch.spaces import CompressionPlan, LayerSettings

    plan = CompressionPlan(layers={r"re:.*layer\.0\..*": LayerSettings(bits=4)})
    store = LayerStore(tmp_path)
    compress(MODELS["bert"](0), plan, store=store)
    stored = store.misses
    assert stored > 0
    compress(MODELS["bert"](0), plan, store=store)
    assert store.misses == stored
    monkeypatch.setattr(type(registry.get("bits")), "version", 99)
    compress(MODELS["bert"](0), plan, store=store)
    assert store.misses == 2 * stored  # recomputed, not reused
    compress(MODELS["bert"](1), plan, store=store)  # another baseline
    assert store.misses == 3 * stored


def test_a_damaged_entry_is_computed_again(tmp_path: Path) -> None:
    from slimsearch.spaces import CompressionPlan, LayerSettings

    plan = CompressionPlan(layers={r"re:.*layer\.0\.attention\.self\.query": LayerSettings(bits=8)})
    store = LayerStore(tmp_path)
    expected = MODELS["bert"](0)
    compress(expected, plan, store=store)
    (entry,) = list(tmp_path.rglob("*.safetensors"))
    entry.write_bytes(b"not a safetensors file")
    again = MODELS["bert"](0)
    compress(again, plan, store=store)
    assert state_digest(again) == state_digest(expected) and store.misses == 2
    assert store.size_bytes() == entry.stat().st_size > 0


def test_the_store_keeps_under_its_cap(tmp_path: Path) -> None:
    from slimsearch.spaces import CompressionPlan, LayerSettings

    probe = LayerStore(tmp_path / "probe")
    compress(
        MODELS["bert"](0), CompressionPlan(layers={r"re:.*layer\.0\..*": LayerSettings(bits=8)}), store=probe
    )
    one_plan = probe.size_bytes()
    store = LayerStore(tmp_path / "capped", max_bytes=int(1.5 * one_plan))
    for bits in (8, 4, 2):
        compress(
            MODELS["bert"](0),
            CompressionPlan(layers={r"re:.*layer\.0\..*": LayerSettings(bits=bits)}),
            store=store,
        )
    assert 0 < store.size_bytes() <= 1.5 * one_plan


def test_study_file_layer_store_setting(tmp_path: Path) -> None:
    from conftest import tiny_study
    from slimsearch.search.study_file import StudyError, study_from_mapping

    assert study_from_mapping(tiny_study(tmp_path)).layer_store_bytes == 8 << 30
    assert study_from_mapping(tiny_study(tmp_path, layer_store=False)).layer_store_bytes is None
    assert study_from_mapping(tiny_study(tmp_path, layer_store={"max_gb": 0.5})).layer_store_bytes == 1 << 29
    with pytest.raises(StudyError, match=r"layer_store.*\{max_gb: 8\}"):
        study_from_mapping(tiny_study(tmp_path, layer_store={"max": 1}))
