"""The lm_eval evaluator runs a user's own lm-eval-harness task file on the model, and on a
multiple-choice task it scores exactly what choice_accuracy scores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import tiny_study
from slimsearch.evaluators import EvalContext, make_evaluator
from slimsearch.search.models import _word_tokenizer
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan
from tiny import LM_TEXT, tiny_llama, tiny_llama_config

pytest.importorskip("lm_eval")  # the lmeval extra; make setup installs it

WORDS = (
    "the film was good bad slow a great warm story dull boring mess acting fun awful lovely model reads text"
)
QUESTIONS = [
    {"question": "the film was", "choices": ["good", "bad and slow", "a great warm story"], "answer": 0},
    {"question": "a dull boring", "choices": ["mess", "film"], "answer": 1},
    {"question": "great acting and", "choices": ["fun", "awful and slow", "lovely"], "answer": 2},
    {"question": "the model reads", "choices": ["the text", "again", "model"], "answer": 0},
    {"question": "a great", "choices": ["warm story", "mess", "film", "text"], "answer": 0},
    {"question": "boring bad", "choices": ["acting", "fun"], "answer": 0},
    {"question": "lovely and", "choices": ["moving", "slow", "warm"], "answer": 0},
    {"question": "the text is", "choices": ["read", "good fun", "awful"], "answer": 0},
]


def write_task(folder: Path, questions: list[dict[str, Any]] = QUESTIONS) -> Path:
    """A local multiple-choice task: its data file and lm-eval YAML in ``folder``/tasks."""
    data = folder / "questions.jsonl"
    data.write_text("\n".join(json.dumps(q) for q in questions) + "\n")
    tasks = folder / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "choices.yaml").write_text(
        "task: slim_choices\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return tasks


@pytest.mark.parametrize("seed", [0, 1])
def test_lm_eval_scores_what_choice_accuracy_scores(seed: int, tmp_path: Path) -> None:
    tasks = write_task(tmp_path)
    harness = make_evaluator("lm_eval", {"task": "slim_choices", "include_path": str(tasks)})
    harness.check()  # type: ignore[attr-defined]
    ours = make_evaluator("choice_accuracy", {"data": str(tmp_path / "questions.jsonl")})
    tokenizer = _word_tokenizer([LM_TEXT, WORDS], 96)
    context = EvalContext(
        task="causal-lm", batches=[], vocab_size=96, plan=CompressionPlan(), tokenizer=tokenizer
    )
    model = tiny_llama(seed)
    assert harness.evaluate(model, context) == ours.evaluate(model, context)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"task": "slim_choices", "include_path": "nowhere"}, ["include_path", "not a folder"]),
        ({"task": "no_such_task"}, ["no task 'no_such_task'"]),
        ({}, ["options.task"]),
    ],
)
def test_bad_lm_eval_options_are_refused_when_the_study_is_read(
    options: dict[str, Any], words: list[str], tmp_path: Path
) -> None:
    tasks = write_task(tmp_path)
    data = tiny_study(
        tmp_path,
        model={"config": tiny_llama_config()},
        task={"kind": "causal-lm", "text": LM_TEXT},
        objectives=["perplexity", {"name": "lm_eval", "options": {"include_path": str(tasks)} | options}],
        constraints={},
    )
    with pytest.raises(StudyError) as err:
        study_from_mapping(data)
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"
