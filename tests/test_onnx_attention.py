"""Llama attention in its export form: the same function, and no shape arithmetic per block."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimsearch.spaces.onnx import export_onnx
from slimsearch.spaces.onnx_attention import exportable
from tiny import tiny_bert


def grouped_llama(blocks: int) -> LlamaForCausalLM:
    """Six query heads sharing two key/value heads: three per group."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        num_hidden_layers=blocks,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def test_the_export_form_computes_what_transformers_computes() -> None:
    model = grouped_llama(2)
    ids = torch.randint(1, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a padded row: its first positions may attend nowhere
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        with exportable(model) as swapped:
            got = model(input_ids=ids, attention_mask=mask).logits
            # Through the cache too: the last three tokens after the first eight.
            first = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
            past = first.past_key_values
            step = model(input_ids=ids[:, 8:], attention_mask=mask, past_key_values=past).logits
    assert swapped == 2
    assert (got - want).abs().max() < 1e-5
    assert (step - want[:, 8:]).abs().max() < 1e-5


def test_the_swap_is_undone_on_error_and_leaves_other_attention_alone() -> None:
    model = grouped_llama(2)
    attention = model.model.layers[0].self_attn
    with pytest.raises(RuntimeError, match="inside"), exportable(model):
        assert "forward" in vars(attention)
        raise RuntimeError("inside")
    assert "forward" not in vars(attention)
    with exportable(tiny_bert()) as swapped:
        assert swapped == 0


def _shape_ops(path: Path) -> int:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)["Shape"]


def test_a_deeper_decoder_adds_no_shape_operators(tmp_path: Path) -> None:
    """Shapes are read once for the whole model (the mask, the positions), not per block: as
    transformers traces it, each block adds several ``Shape`` operators."""
    pytest.importorskip("onnx")
    counts = []
    for blocks in (1, 3):
        path = tmp_path / f"d{blocks}.onnx"
        export_onnx(grouped_llama(blocks), path, vocab_size=96, kv_cache=True)
        counts.append(_shape_ops(path))
    assert counts[0] == counts[1]
