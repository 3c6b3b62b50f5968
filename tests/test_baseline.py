"""The baseline a study prepares is a function of its study file: same file, same weights."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

from conftest import sentiment_rows, tiny_study
from slimsearch.search import models
from slimsearch.search.study_file import study_from_mapping
from tiny import tiny_bert_config


def _pretrained_encoder(folder: Path) -> None:
    """A saved encoder without a classification head, as a hub checkpoint would be."""
    torch.manual_seed(1)
    cfg = {k: v for k, v in tiny_bert_config().items() if k not in ("model_type", "num_labels")}
    BertModel(BertConfig(**cfg)).save_pretrained(str(folder))
    texts = [t for t, _ in sentiment_rows(48)]
    models._word_tokenizer(texts, int(cfg["vocab_size"])).save_pretrained(str(folder))  # type: ignore[call-overload]


def test_a_pretrained_source_gets_the_same_baseline_every_time(tmp_path: Path) -> None:
    source = tmp_path / "encoder"
    _pretrained_encoder(source)
    weights = []
    for run in ("a", "b"):
        data = tiny_study(tmp_path, cache=str(tmp_path / f"cache_{run}"))
        finetune = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 8}
        data["model"] = {"source": str(source), "finetune": finetune}
        torch.manual_seed(100 + len(weights))  # whatever ran before must not matter
        folder = models.prepare_baseline(study_from_mapping(data))
        weights.append(load_file(str(folder / "model.safetensors")))
    a, b = weights
    assert "classifier.weight" in a  # the head from_pretrained added, then fine-tuned
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
