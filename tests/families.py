"""Tiny random-weight models of 22 transformers families (and two more Falcon attention
layouts), built and saved as a user would (`save_pretrained` plus a tokenizer), for the
architecture matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

V = 128
COMMON = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
)
FALCON = dict(model_type="falcon", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "bert": ("classification", dict(model_type="bert", **COMMON)),
    "roberta": ("classification", dict(model_type="roberta", **COMMON, pad_token_id=0)),
    "electra": ("classification", dict(model_type="electra", **COMMON, embedding_size=32)),
    "xlm-roberta": ("classification", dict(model_type="xlm-roberta", **COMMON, pad_token_id=0)),
    "distilbert": (
        "classification",
        dict(
            model_type="distilbert",
            vocab_size=V,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=128,
        ),
    ),
    "albert": ("classification", dict(model_type="albert", **COMMON, embedding_size=16)),
    "deberta-v2": (
        "classification",
        dict(
            model_type="deberta-v2",
            **COMMON,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=32,
            pos_att_type=["p2c", "c2p"],
        ),
    ),
    "llama": ("causal-lm", dict(model_type="llama", **COMMON, num_key_value_heads=2)),
    "qwen2": ("causal-lm", dict(model_type="qwen2", **COMMON, num_key_value_heads=2)),
    "qwen3": ("causal-lm", dict(model_type="qwen3", **COMMON, num_key_value_heads=2, head_dim=8)),
    "mistral": ("causal-lm", dict(model_type="mistral", **COMMON, num_key_value_heads=2)),
    "gemma": ("causal-lm", dict(model_type="gemma", **COMMON, num_key_value_heads=2, head_dim=8)),
    "gemma2": ("causal-lm", dict(model_type="gemma2", **COMMON, num_key_value_heads=2, head_dim=8)),
    "gemma3_text": (
        "causal-lm",
        dict(model_type="gemma3_text", **COMMON, num_key_value_heads=2, head_dim=8),
    ),
    "stablelm": ("causal-lm", dict(model_type="stablelm", **COMMON, num_key_value_heads=2)),
    "opt": (
        "causal-lm",
        dict(
            model_type="opt",
            vocab_size=V,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        ),
    ),
    "gpt_neox": ("causal-lm", dict(model_type="gpt_neox", **COMMON)),
    "phi3": ("causal-lm", dict(model_type="phi3", **COMMON, num_key_value_heads=2, pad_token_id=0)),
    "falcon": ("causal-lm", dict(FALCON, new_decoder_architecture=False, multi_query=True)),
    # Falcon's two other attention layouts: grouped key/value heads, and head by head.
    "falcon-gqa": ("causal-lm", dict(FALCON, num_kv_heads=2, new_decoder_architecture=True)),
    "falcon-mha": ("causal-lm", dict(FALCON, new_decoder_architecture=False, multi_query=False)),
    "bloom": ("causal-lm", dict(model_type="bloom", vocab_size=V, hidden_size=32, n_layer=2, n_head=4)),
    "mpt": (
        "causal-lm",
        dict(model_type="mpt", vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=128),
    ),
    "gpt2": (
        "causal-lm",
        dict(model_type="gpt2", vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128),
    ),
}

# What structured pruning offers each family: its attention heads, its MLP neurons.
STRUCTURED: dict[str, tuple[str, ...]] = {name: ("heads", "neurons") for name in FAMILIES} | {
    "albert": ("heads", "neurons"),  # its one shared block, which every layer runs
    "phi3": ("heads", "neurons"),
    "falcon": ("heads", "neurons"),
    "falcon-gqa": ("heads", "neurons"),
    "falcon-mha": ("heads", "neurons"),
    "bloom": ("heads", "neurons"),  # heads: the ALiBi bias picked for the kept ones
    "mpt": ("heads", "neurons"),  # heads: the ALiBi bias picked for the kept ones
}


def build(name: str, seed: int = 0) -> nn.Module:
    kind, cfg = FAMILIES[name]
    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    model: nn.Module = auto.from_config(config)
    return model.eval()


def save_family(name: str, folder: Path, texts: list[str]) -> str:
    """The family's tiny model and a word tokenizer over ``texts`` in ``folder``; its task kind."""
    from slimsearch.search.models import _word_tokenizer

    build(name).save_pretrained(str(folder))
    _word_tokenizer(texts, V).save_pretrained(str(folder))
    return FAMILIES[name][0]
