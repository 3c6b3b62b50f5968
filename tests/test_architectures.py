"""Architectures whose layers are more than plain Linears and lookups: every one either keeps
its behaviour under compression or is refused with a clear error, never silently changed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
)

from conftest import tiny_study
from slimsearch.search import preflight
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import (
    CompressionPlan,
    LayerSettings,
    SearchSpace,
    apply_plan,
    space_config_from_mapping,
)
from slimsearch.spaces.methods import PackedEmbedding
from slimsearch.spaces.methods.structured import find_units, prune_structured
from tiny import LM_TEXT, tiny_bert, zero_removed

GEMMAS = [
    (GemmaConfig, GemmaForCausalLM),
    (Gemma2Config, Gemma2ForCausalLM),
    (Gemma3TextConfig, Gemma3ForCausalLM),
]


def _gemma(config_cls: type, model_cls: type) -> nn.Module:
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
    )
    model: nn.Module = model_cls(config).eval()
    return model


@pytest.mark.parametrize(("config_cls", "model_cls"), GEMMAS, ids=lambda c: c.__name__)
def test_gemma_embeddings_keep_their_scale(config_cls: type, model_cls: type) -> None:
    model = _gemma(config_cls, model_cls)
    scale = float(model.get_input_embeddings().embed_scale)
    assert scale == 8.0  # sqrt(hidden): dropping it moves every logit
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    for bits, tolerance in ((16, 0.02), (8, 0.03)):
        plan = CompressionPlan(layers={"model.embed_tokens": LayerSettings(bits=bits)})
        packed = apply_plan(copy.deepcopy(model), plan)
        table = packed.get_submodule("model.embed_tokens")
        assert isinstance(table, PackedEmbedding) and table.lookup_scale == scale
        with torch.no_grad():
            # The looked-up rows carry the scale; the stored table (which the tied head reads) does not.
            rows = table(ids)
            assert torch.allclose(rows, table.dense_weight()[ids] * scale)
            error = float((packed(ids).logits - reference).norm() / reference.norm())
        assert error < tolerance, f"{bits}-bit table moved the logits by {error:.1%}"


class _ShiftedEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + 1.0


def test_an_embedding_that_is_more_than_a_lookup_is_refused() -> None:
    model = tiny_bert()
    old = model.bert.embeddings.word_embeddings
    model.bert.embeddings.word_embeddings = _ShiftedEmbedding(old.num_embeddings, old.embedding_dim)
    with pytest.raises(ValueError, match=r"space.embeddings: .*_ShiftedEmbedding.*more than a row lookup"):
        SearchSpace(model, space_config_from_mapping({"embeddings": [32, 8]}))
    SearchSpace(model, space_config_from_mapping({}))  # left at 32 bits it is fine
    plan = CompressionPlan(layers={"bert.embeddings.word_embeddings": LayerSettings(bits=8)})
    with pytest.raises(ValueError, match="more than a row lookup"):
        apply_plan(model, plan)


def _deberta(share_att_key: bool) -> nn.Module:
    torch.manual_seed(0)
    config = DebertaV2Config(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        share_att_key=share_att_key,
        position_buckets=8,
        max_relative_positions=16,
    )
    model: nn.Module = DebertaV2ForSequenceClassification(config).eval()
    with torch.no_grad():  # large enough weights that every head matters
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("share_att_key", [False, True])
def test_deberta_v2_heads_are_pruned_like_zeroed_heads(share_att_key: bool) -> None:
    model = _deberta(share_att_key)
    units = find_units(model)
    heads = [u for u in units if u.kind == "heads"]
    assert len(heads) == 2 and len([u for u in units if u.kind == "neurons"]) == 2
    assert len(heads[0].producers) == (3 if share_att_key else 5)  # + pos_query_proj, pos_key_proj
    reference = copy.deepcopy(model)
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kept = prune_structured(model, {(u.block, "heads"): 0.5 for u in heads}, batch)
    zero_removed(reference, heads, kept)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=1e-5)
    space = SearchSpace(_deberta(False), space_config_from_mapping({"structured": {"heads": [0.0, 0.5]}}))
    assert sum(k.knob == "heads" for k in space.knobs) == 2


def test_heads_asked_of_blocks_without_attention_are_refused() -> None:
    model = tiny_bert()
    del model.bert.encoder.layer[1].attention.self.query  # an attention layout it cannot read
    with pytest.raises(
        ValueError, match=r"structured.heads: blocks \['bert.encoder.layer.1'\] have no attention"
    ):
        SearchSpace(model, space_config_from_mapping({"structured": {"heads": [0.0, 0.5]}}))
    SearchSpace(
        model, space_config_from_mapping({"structured": {"neurons": [0.0, 0.5]}})
    )  # neurons still fine


def _saved(model: nn.Module, folder: Path) -> str:
    model.save_pretrained(str(folder))
    return str(folder)


def test_an_encoder_decoder_is_refused_as_a_causal_lm_before_any_work(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=96,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
    )
    source = _saved(BartForConditionalGeneration(config), tmp_path / "bart")
    data = tiny_study(
        tmp_path, model={"source": source}, task={"kind": "causal-lm", "text": LM_TEXT, "block_size": 8}
    )
    data["objectives"] = ["perplexity", "size_bytes"]
    data["constraints"] = {}
    spec = study_from_mapping(data)
    with pytest.raises(
        StudyError, match=r"'bart' is an encoder-decoder model; task.kind causal-lm drives decoder-only"
    ):
        preflight.preflight(spec)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "baselines").exists()


def test_a_model_type_the_task_cannot_drive_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    (folder / "model.safetensors").write_bytes(b"")
    spec = study_from_mapping(tiny_study(tmp_path, model={"source": str(folder)}))
    with pytest.raises(StudyError, match=r"model type 'vit' has no AutoModelForSequenceClassification"):
        preflight.preflight(spec)
