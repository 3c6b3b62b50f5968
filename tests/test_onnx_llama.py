"""Llama attention in its export form: the same function, and no shape arithmetic per block."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slimsearch.spaces.onnx import export_onnx
from slimsearch.spaces.onnx_llama import exportable, rotary_tables
from tiny import tiny_bert


def grouped_llama(blocks: int) -> LlamaForCausalLM:
    """Six query heads sharing two key/value heads: three per group."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=96,
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
    assert swapped == 4  # two attention modules and two MLPs
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


def _ops(path: Path) -> Counter[str]:
    import onnx

    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_a_deeper_decoder_adds_no_shape_operators(tmp_path: Path) -> None:
    """Shapes are read once for the whole model (the mask, the positions), not per block: as
    transformers traces it, each block adds several ``Shape`` operators."""
    pytest.importorskip("onnx")
    counts = []
    for blocks in (1, 3):
        path = tmp_path / f"d{blocks}.onnx"
        export_onnx(grouped_llama(blocks), path, vocab_size=96, kv_cache=True)
        ops = _ops(path)
        assert ops["RotaryEmbedding"] == 2 * blocks  # queries and keys, one operator each
        counts.append(ops["Shape"])
    assert counts[0] == counts[1]


def test_rotary_tables_are_transformers_cos_and_sin_and_refuse_dynamic_scaling() -> None:
    model = grouped_llama(1)
    tables = rotary_tables(model)
    assert tables is not None
    cos, sin = tables
    positions = torch.tensor([[0, 5, 63]])
    want_cos, want_sin = model.model.rotary_emb(torch.zeros(1), positions)
    half = cos.shape[1]
    assert cos.shape == (64, 8) and torch.equal(cos[positions[0]], want_cos[0, :, :half])
    assert torch.equal(sin[positions[0]], want_sin[0, :, half:])
    model.model.rotary_emb.rope_type = "dynamic"  # frequencies that change with the length
    assert rotary_tables(model) is None


@pytest.mark.parametrize(
    ("k_proj", "nbits"),
    [
        ({"bits": 4, "integer_zero": True}, 4 + 1),  # q/k/v as one, o, gate/up as one, down; the head
        ({"bits": 8, "weight_only": True}, 6 + 1),  # k in another format: q, k and v apart
    ],
)
def test_linears_reading_one_input_run_as_one_operator_where_they_share_a_format(
    k_proj: dict[str, object], nbits: int, tmp_path: Path
) -> None:
    import numpy as np

    from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan
    from slimsearch.spaces.onnx import feeds, session

    layers = {
        r"re:model\.layers\.\d+\.self_attn\.k_proj": LayerSettings(**k_proj),  # type: ignore[arg-type]
        r"re:model\.layers\.\d+\..*": LayerSettings(bits=4, integer_zero=True),
        "model.embed_tokens": LayerSettings(bits=8),
    }
    model = apply_plan(grouped_llama(1), CompressionPlan(layers=layers)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, vocab_size=96, int8_compute=False, kv_cache=True)
    assert _ops(path)["MatMulNBits"] == nbits
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    sess = session(path, 1)
    got = sess.run(None, feeds(sess, {"input_ids": ids}))[0]
    want = model(input_ids=ids, use_cache=False).logits.detach().numpy()
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_fp32_projections_run_as_one_matmul(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    export_onnx(grouped_llama(1), path, vocab_size=96, kv_cache=True)
    assert _ops(path)["MatMul"] == 4 + 2 + 1  # qkv, o, gate/up, down; two attention products; head
