"""Tiny models with random weights and tiny in-memory data, for fast offline tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from slimsearch.spaces import CompressionPlan, LayerSettings
from slimsearch.spaces.apply import compress_linear
from slimsearch.spaces.methods import PackedLinear
from slimsearch.spaces.testing import MethodConformance


def tiny_bert_config() -> dict[str, object]:
    return {
        "model_type": "bert",
        "vocab_size": 96,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "num_labels": 2,
    }


def tiny_llama_config() -> dict[str, object]:
    return {
        "model_type": "llama",
        "vocab_size": 96,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
    }


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = {k: v for k, v in tiny_bert_config().items() if k != "model_type"}
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = {k: v for k, v in tiny_llama_config().items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_llama_untied(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = {k: v for k, v in tiny_llama_config().items() if k != "model_type"}
    cfg["tie_word_embeddings"] = False
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def wide_llama() -> LlamaForCausalLM:
    """Big enough (17 MB of fp32 weights) that its memory stands well above allocator noise."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


# Every block Linear and the tied table of a Llama at 4 bits.
LLAMA_INT4 = CompressionPlan(
    layers={r"re:model\.layers\.\d+\..*": LayerSettings(bits=4), "model.embed_tokens": LayerSettings(bits=4)}
)


# Every tiny architecture the method and export suites run over.
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "bert": tiny_bert,
    "llama": tiny_llama,
    "llama-untied": tiny_llama_untied,
}

POSITIVE = ["good fun film", "a great warm story", "lovely and moving", "great acting and fun"]
NEGATIVE = ["dull boring mess", "a bad tired plot", "awful and slow", "boring bad acting"]


def sentiment_rows(n: int = 48) -> list[tuple[str, int]]:
    """A tiny two-class corpus that a tiny model can learn."""
    rows = []
    for i in range(n):
        pool, label = (POSITIVE, 1) if i % 2 == 0 else (NEGATIVE, 0)
        rows.append((pool[(i // 2) % len(pool)] + f" number {i % 7}", label))
    return rows


LM_TEXT = " ".join("the model reads the text and the text is read by the model again" for _ in range(40))


def packed_linear(linear: nn.Linear, bits: int = 32, sparsity: float = 0.0) -> PackedLinear:
    """``linear`` stored by the registered methods at ``bits`` and ``sparsity``."""
    module = compress_linear(linear, LayerSettings(bits=bits, sparsity=sparsity))
    if not isinstance(module, PackedLinear):
        raise TypeError(f"expected a PackedLinear, got {type(module).__name__}")
    return module


class OnTinyModels(MethodConformance):
    """The conformance suite on every tiny model, with one padded row in its batch (padding
    must not count as calibration signal). Subclasses give the ``case`` fixture."""

    @pytest.fixture(params=sorted(MODELS))
    def make_model(self, request: pytest.FixtureRequest) -> Callable[[int], nn.Module]:
        return MODELS[request.param]

    @pytest.fixture
    def inputs(self) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 96, (3, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        return {"input_ids": ids, "attention_mask": mask}


def zero_removed(reference: nn.Module, units: list[Any], kept: dict[str, str]) -> None:
    """Zero, in ``reference``, the consumer columns of every group structured pruning removed
    (``kept``: prune_structured's selection), so the pruned model must compute the same."""
    from slimsearch.spaces.methods.structured import kept_indices, unit_key

    for unit in units:
        name, cols = unit.consumer
        weight = reference.get_submodule(name).weight
        with torch.no_grad():
            for g in set(range(unit.groups)) - set(kept_indices(kept[unit_key(unit)])):
                weight[:, g * cols : (g + 1) * cols] = 0
