"""Multiple-choice scoring of a causal LM from a local file (lm-eval-harness style)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_study
from slimsearch.evaluators import EvalContext, make_evaluator
from slimsearch.search.driver import run_study
from slimsearch.search.models import _word_tokenizer
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan
from tiny import LM_TEXT, tiny_llama, tiny_llama_config

QUESTIONS = [
    {"question": "the film was", "choices": ["good", "bad and slow", "a great warm story"], "answer": 0},
    {"question": "a dull boring", "choices": ["mess", "film"], "answer": "film"},
    {"question": "great acting and", "choices": ["fun", "awful and slow", "lovely"], "answer": 2},
]


def _file(tmp_path: Path, rows: list[Any]) -> Path:
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _loglik(model: torch.nn.Module, tokenizer: Any, question: str, choice: str) -> float:
    """One unpadded forward per choice: the reference the batched scoring must equal."""
    prefix = tokenizer(question)["input_ids"]
    whole = tokenizer(question + " " + choice)["input_ids"]
    with torch.no_grad():
        logprobs = F.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(prefix), len(whole))))


@pytest.mark.parametrize("normalize", ["none", "length"])
def test_the_highest_likelihood_choice_wins(normalize: str, tmp_path: Path) -> None:
    tokenizer = _word_tokenizer(
        [LM_TEXT] + [" ".join(q["choices"]) + " " + q["question"] for q in QUESTIONS], 96
    )
    model = tiny_llama()
    evaluator = make_evaluator(
        "choice_accuracy", {"data": str(_file(tmp_path, QUESTIONS)), "normalize": normalize}
    )
    evaluator.check()  # type: ignore[attr-defined]
    context = EvalContext(
        task="causal-lm", batches=[], vocab_size=96, plan=CompressionPlan(), tokenizer=tokenizer
    )
    want = 0
    for q in QUESTIONS:
        scores = [_loglik(model, tokenizer, q["question"], c) for c in q["choices"]]
        if normalize == "length":
            scores = [s / len(c) for s, c in zip(scores, q["choices"], strict=True)]
        batched = evaluator._scores(model, tokenizer, q["question"], q["choices"])  # type: ignore[attr-defined]
        assert batched == pytest.approx(scores, abs=1e-4)  # padding the choices together changes nothing
        answer = q["answer"] if isinstance(q["answer"], int) else q["choices"].index(q["answer"])
        want += int(max(range(len(scores)), key=scores.__getitem__) == answer)
    assert evaluator.evaluate(model, context) == pytest.approx(100.0 * want / len(QUESTIONS))


def test_a_study_measures_and_constrains_it(tmp_path: Path) -> None:
    path = _file(tmp_path, QUESTIONS)
    data = tiny_study(
        tmp_path,
        model={"config": tiny_llama_config()},
        task={"kind": "causal-lm", "text": LM_TEXT, "block_size": 8, "eval_blocks": 2},
        objectives=["perplexity", "size_bytes"],
        metrics=[{"name": "choice_accuracy", "options": {"data": str(path)}}],
        constraints=[{"metric": "choice_accuracy", "max_drop": 100.0}],
        budget={"trials": 2},
    )
    result = run_study(study_from_mapping(data))
    assert 0.0 <= result.baseline["choice_accuracy"] <= 100.0
    assert result.counts["complete"] == 2


@pytest.mark.parametrize(
    ("rows", "options", "words"),
    [
        (None, {"data": "missing.jsonl"}, ["options.data", "no such file"]),
        (["{not json"], {}, ["line 1", "not JSON"]),
        ([{"question": "q", "choices": ["a"], "answer": 0}], {}, ["line 1", "at least two choices"]),
        ([{"question": "q", "choices": ["a", "b"], "answer": 2}], {}, ["line 1", "answer 2", "2 choices"]),
        ([{"question": "q", "choices": ["a", "b"], "answer": "c"}], {}, ["answer 'c'"]),
        (QUESTIONS, {"normalize": "bytes"}, ["normalize='bytes'", "length"]),
    ],
)
def test_a_bad_question_file_is_refused_when_the_study_is_read(
    rows: list[Any] | None, options: dict[str, Any], words: list[str], tmp_path: Path
) -> None:
    if rows is not None:
        options = {"data": str(_file(tmp_path, rows))} | options
    data = tiny_study(
        tmp_path,
        model={"config": tiny_llama_config()},
        task={"kind": "causal-lm", "text": LM_TEXT},
        objectives=["perplexity", {"name": "choice_accuracy", "options": options}],
        constraints={},
    )
    with pytest.raises(StudyError) as err:
        study_from_mapping(data)
    assert str(err.value).startswith("objectives[1].name: choice_accuracy")
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"
