"""Every built-in evaluator and the plugin examples pass the evaluator conformance suite."""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from slimsearch.evaluators import EvalContext, LatencySpec, evaluator_names, make_evaluator
from slimsearch.evaluators.testing import EvaluatorConformance
from slimsearch.search.models import _word_tokenizer
from slimsearch.spaces import CompressionPlan
from tiny import tiny_bert, tiny_llama

FAST = LatencySpec(
    batch_size=1, seq_len=8, warmup=1, repeats=3, threads=1, precision=0, max_drift=0, decode_tokens=2
)
CAUSAL_ONLY = {"perplexity", "ttft_ms", "decode_tokens_per_s", "decode_speedup", "choice_accuracy", "lm_eval"}
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "good", "bad", "film"]
TOKEN_ONLY = {"token_f1"}
PLUGINS = ["tests.plugins.custom_eval:MacroF1", "tests.plugins.custom_eval:ParamCount"]


def _kind(ref: str) -> str:
    if ref in TOKEN_ONLY:
        return "token-classification"
    return "causal-lm" if ref in CAUSAL_ONLY else "classification"


def _tagger() -> nn.Module:
    from transformers import BertConfig, BertForTokenClassification

    from tiny import tiny_bert_config

    config = {k: v for k, v in tiny_bert_config().items() if k != "model_type"} | {"num_labels": 3}
    torch.manual_seed(0)
    return BertForTokenClassification(BertConfig(**config))


class TestEvaluators(EvaluatorConformance):
    @pytest.fixture(params=[*evaluator_names(), *PLUGINS])
    def ref(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture
    def evaluator(self, ref: str, tmp_path: Path) -> Any:
        if ref == "lm_eval":
            pytest.importorskip("lm_eval")
            from test_lm_eval import write_task

            evaluator = make_evaluator(
                ref, {"task": "slim_choices", "include_path": str(write_task(tmp_path))}
            )
            evaluator.check()  # type: ignore[attr-defined]
            return evaluator
        if ref != "choice_accuracy":
            return make_evaluator(ref)
        path = tmp_path / "mc.jsonl"
        lines = [{"question": "the cat sat on", "choices": ["a mat", "far away", "the dog"], "answer": 0}] * 2
        path.write_text("\n".join(json.dumps(line) for line in lines))
        evaluator = make_evaluator(ref, {"data": str(path)})
        evaluator.check()  # type: ignore[attr-defined]
        return evaluator

    @pytest.fixture
    def model(self, ref: str) -> nn.Module:
        makers = {"causal-lm": tiny_llama, "classification": tiny_bert, "token-classification": _tagger}
        return makers[_kind(ref)]().eval()

    @pytest.fixture
    def context(self, ref: str, model: nn.Module) -> EvalContext:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 96, (4, 8), generator=g)
        data = None
        if _kind(ref) == "causal-lm":
            batches = [{"input_ids": ids}]
        elif _kind(ref) == "token-classification":
            tags = torch.randint(0, 3, ids.shape, generator=g)
            tags[:, 0] = -100
            batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": tags}]
            data = types.SimpleNamespace(class_names=lambda: ("O", "B-PER", "B-LOC"))
        else:
            batches = [
                {
                    "input_ids": ids,
                    "attention_mask": torch.ones_like(ids),
                    "labels": torch.tensor([0, 1, 1, 0]),
                }
            ]
        return EvalContext(
            task=_kind(ref),  # type: ignore[arg-type]
            batches=batches,
            vocab_size=96,
            plan=CompressionPlan(),
            latency=FAST,
            baseline={},
            reference=copy.deepcopy(model),
            tokenizer=_word_tokenizer(WORDS, 96),
            data=data,
        )


class ChangesTheModel:
    name = "changes_the_model"
    direction = "minimize"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return 1.0


def test_the_suite_catches_an_evaluator_that_changes_the_model() -> None:
    model = tiny_bert().eval()
    ids = torch.ones((1, 4), dtype=torch.long)
    context = EvalContext(
        task="classification", batches=[{"input_ids": ids}], vocab_size=96, plan=CompressionPlan()
    )
    with pytest.raises(AssertionError):
        EvaluatorConformance().test_changes_neither_the_model_nor_the_data(ChangesTheModel(), model, context)
