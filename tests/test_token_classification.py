"""Token classification: tagged rows from inline data and `datasets` sources, batches that
label the first sub-token of each word, token accuracy and F1, the profile loss and the
distillation loss over labelled positions, and a study that runs, exports and loads back."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from conftest import tiny_study
from slimsearch.evaluators import EvalContext, make_evaluator
from slimsearch.search import preflight, sensitivity, tasks
from slimsearch.search.data import TaskData
from slimsearch.search.driver import run_study
from slimsearch.search.export import load
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan
from slimsearch.spaces.methods.distill import DistillRecipe, TeacherOutputs, logit_loss

TAGS = ("O", "B-PER", "B-LOC")
PEOPLE = ["anna", "ben", "carl", "dora"]
PLACES = ["paris", "rome", "oslo", "lima"]
FILLER = ["went", "to", "met", "in", "saw", "the", "city", "with"]


def tagged_rows(n: int = 48) -> list[tuple[list[str], list[str]]]:
    """Sentences whose tags a tiny model can learn word by word: names B-PER, places B-LOC."""
    rows = []
    for i in range(n):
        person, place = PEOPLE[i % 4], PLACES[(i // 4) % 4]
        words = [person, FILLER[i % 8], FILLER[(i + 3) % 8], place]
        if i % 3 == 0:
            words = [FILLER[(i + 5) % 8], *words]
        rows.append((words, ["B-PER" if w in PEOPLE else "B-LOC" if w in PLACES else "O" for w in words]))
    return rows


def _task(**extra: Any) -> dict[str, Any]:
    rows = [[words, tags] for words, tags in tagged_rows()]
    task = {"kind": "token-classification", "rows": rows, "train_size": 32, "test_size": 16, "max_length": 16}
    return task | extra


def _study(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    data = tiny_study(tmp_path, task=_task(), objectives=["accuracy", "token_f1", "size_bytes"])
    data["model"]["config"].pop("num_labels", None)
    data["model"]["finetune"] = {"epochs": 12, "learning_rate": 2e-3, "batch_size": 8}
    data["space"] = {"default": {"bits": [32, 8, 4]}}
    return data | overrides


def test_inline_rows_map_tags_to_ids_and_the_head_is_sized_to_them(tmp_path: Path) -> None:
    spec = study_from_mapping(_study(tmp_path))
    data = tasks.labelled(spec.task, spec.cache)
    assert data.names == ("B-LOC", "B-PER", "O")  # text tags: sorted
    words, tags = data.rows[0]
    assert words == tuple(tagged_rows()[0][0])
    assert tags == tuple(data.names.index(t) for t in tagged_rows()[0][1])
    assert tasks.num_labels(spec.task, spec.cache) == 3


def test_a_dataset_folder_with_a_class_label_sequence_keeps_its_declared_tags(tmp_path: Path) -> None:
    features = datasets.Features(
        {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=list(TAGS))),
        }
    )
    records = [{"tokens": w, "ner_tags": [TAGS.index(t) for t in tags]} for w, tags in tagged_rows()]
    folder = tmp_path / "ner"
    datasets.Dataset.from_list(records, features=features).save_to_disk(str(folder))
    task = {"kind": "token-classification", "data": str(folder), "train_size": 32, "test_size": 16}
    spec = study_from_mapping(tiny_study(tmp_path, task=task, constraints={}))
    data = tasks.labelled(spec.task, spec.cache)
    assert data.names == TAGS  # the default columns are tokens / ner_tags
    assert data.rows[1] == (tuple(records[1]["tokens"]), tuple(records[1]["ner_tags"]))
    preflight.check_data(spec)


def test_jsonl_rows_with_text_tags_under_named_columns(tmp_path: Path) -> None:
    path = tmp_path / "ner.jsonl"
    path.write_text("".join(json.dumps({"words": w, "tags": t}) + "\n" for w, t in tagged_rows()))
    task = {"kind": "token-classification", "data": str(path), "text_column": "words", "label_column": "tags"}
    spec = study_from_mapping(tiny_study(tmp_path, task=task | {"train_size": 32, "test_size": 16}))
    assert tasks.labelled(spec.task, spec.cache).names == ("B-LOC", "B-PER", "O")


def _wordpiece() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "play": 4, "##ing": 5, "the": 6, "oslo": 7}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def test_batches_label_the_first_sub_token_of_each_word_only() -> None:
    rows: tasks.Rows = [(("playing", "the", "oslo"), (0, 1, 2)), (("the",), (2,))]
    batches = tasks.token_batches(_wordpiece(), rows, max_length=16, batch_size=2)
    assert len(batches) == 1
    batch = batches[0]
    by_length = batch["input_ids"].tolist()
    assert by_length[0] == [2, 6, 3, 0, 0, 0] and by_length[1] == [2, 4, 5, 6, 7, 3]
    assert batch["labels"].tolist() == [[-100, 2, -100, -100, -100, -100], [-100, 0, -100, 1, 2, -100]]
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0, 0]


def test_a_truncated_row_keeps_the_labels_of_the_words_that_fit() -> None:
    rows: tasks.Rows = [(("the", "playing", "oslo"), (0, 1, 2))]
    batch = tasks.token_batches(_wordpiece(), rows, max_length=4, batch_size=1)[0]
    assert batch["input_ids"].tolist() == [[2, 6, 4, 3]]
    assert batch["labels"].tolist() == [[-100, 0, 1, -100]]


class _Fixed(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, **inputs: torch.Tensor) -> Any:
        return types.SimpleNamespace(logits=self.logits)


def _context(batch: dict[str, torch.Tensor], names: tuple[str, ...]) -> EvalContext:
    data = types.SimpleNamespace(class_names=lambda: names)
    return EvalContext(
        task="token-classification", batches=[batch], vocab_size=8, plan=CompressionPlan(), data=data
    )


def test_token_accuracy_and_f1_count_labelled_positions_only() -> None:
    # Classes O=0, PER=1, LOC=2. Gold (labelled): O PER LOC O; predicted: O PER O PER.
    labels = torch.tensor([[-100, 0, 1, 2, 0, -100]])
    pred = torch.tensor([[1, 0, 1, 0, 1, 2]])  # the unlabelled positions are wrong, and must not count
    logits = torch.nn.functional.one_hot(pred, 3).float()
    batch = {
        "input_ids": torch.ones_like(labels),
        "attention_mask": torch.ones_like(labels),
        "labels": labels,
    }
    model = _Fixed(logits)
    assert make_evaluator("accuracy").evaluate(model, _context(batch, ("O", "PER", "LOC"))) == 50.0
    # One hit (PER); two gold tags (PER, LOC); two predicted tags (PER, PER): F1 = 2 * 1 / 4.
    assert make_evaluator("token_f1").evaluate(model, _context(batch, ("O", "PER", "LOC"))) == 50.0
    # No outside tag: every tag counts, and F1 is the accuracy.
    assert make_evaluator("token_f1").evaluate(model, _context(batch, ("A", "B", "C"))) == 50.0


def test_the_profile_loss_is_the_mean_cross_entropy_of_labelled_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    labels = torch.tensor([[-100, 0, 2, -100, -100], [-100, 1, 1, 0, -100]])
    batch = {
        "input_ids": torch.ones_like(labels),
        "attention_mask": torch.ones_like(labels),
        "labels": labels,
    }
    loss = sensitivity.task_loss(_Fixed(logits), [batch], "token-classification")
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert loss == pytest.approx(float(expected), rel=1e-6)


def test_the_distillation_loss_ignores_unlabelled_positions() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([[-100, 0, 2, -100]])
    batch = {
        "input_ids": torch.ones_like(labels),
        "attention_mask": torch.ones_like(labels),
        "labels": labels,
    }
    teacher = torch.randn(1, 4, 3)
    recipe = DistillRecipe(alpha=0.5)
    outputs = TeacherOutputs("x", teacher, (), ())
    student = teacher.clone()
    same = logit_loss(student, outputs, batch, recipe, "token-classification")
    student[0, 0] += 5.0  # a special token's logits: not a labelled position
    student[0, 3] -= 5.0
    assert float(logit_loss(student, outputs, batch, recipe, "token-classification")) == pytest.approx(
        float(same)
    )
    student[0, 1] += torch.tensor([0.0, 3.0, 0.0])
    assert float(logit_loss(student, outputs, batch, recipe, "token-classification")) > float(same) + 0.1


def test_a_token_classification_study_runs_exports_and_loads_back(tmp_path: Path) -> None:
    spec = study_from_mapping(_study(tmp_path, budget={"trials": 3}))
    result = run_study(spec)
    assert result.baseline["accuracy"] > 80.0  # the fine-tuned head learned the word tags
    assert result.baseline["token_f1"] > 60.0
    from slimsearch.search.results import open_run

    run = open_run(spec.output)
    trial = run.front_numbers()[0]
    report = run.export(trial, tmp_path / "out", repeats=3)
    assert report.measured["accuracy"] == run.trial(trial).values[0]
    model, tokenizer = load(tmp_path / "out")
    assert type(model).__name__ == "BertForTokenClassification"
    assert model.config.id2label == {0: "B-LOC", 1: "B-PER", 2: "O"}
    data = TaskData(spec.task, spec.cache, tokenizer)
    context = EvalContext(
        task="token-classification",
        batches=data.test_batches(),
        vocab_size=len(tokenizer),
        plan=CompressionPlan(),
        data=data,
    )
    assert make_evaluator("accuracy").evaluate(model, context) == report.measured["accuracy"]


def test_sensitivity_seeds_and_distilled_finalists_run_on_a_token_task(tmp_path: Path) -> None:
    data = _study(
        tmp_path,
        budget={"trials": 5},
        seed_uniform=False,
        seed_sensitivity=True,
        distill={
            "mode": "finalists",
            "recipe": {"kind": "logits", "steps": 3, "batch_size": 8},
            "finalists": 1,
        },
    )
    spec = study_from_mapping(data)
    run_study(spec)
    profile = json.loads(next((spec.cache / "sensitivity").glob("*.json")).read_text())
    assert profile["metric"] == "cross-entropy" and profile["baseline_loss"] > 0
    from slimsearch.search.results import open_run

    distilled = [t for t in open_run(spec.output).complete_trials() if "distilled_from" in t.user_attrs]
    assert len(distilled) == 1
    assert distilled[0].user_attrs["records"]["distill"]["steps"] == 3


@pytest.mark.parametrize("family", ["distilbert", "deberta-v2", "qwen2", "gpt2"])
def test_token_tasks_run_on_other_families_with_structured_pruning(family: str, tmp_path: Path) -> None:
    # qwen2: a config model's word tokenizer must load back as itself, not as Qwen2's own class.
    from families import FAMILIES

    data = _study(tmp_path, budget={"trials": 2})
    data["model"]["config"] = dict(FAMILIES[family][1])
    data["space"] = {"default": {"bits": [32, 8, 4]}, "structured": {"heads": [0.0, 0.5]}}
    spec = study_from_mapping(data)
    result = run_study(spec)
    assert result.baseline["accuracy"] > 80.0
    from slimsearch.search.results import open_run

    run = open_run(spec.output)
    trial = run.front_numbers()[0]
    report = run.export(trial, tmp_path / "out", repeats=3)
    assert report.measured["accuracy"] == run.trial(trial).values[0]


@pytest.mark.parametrize(
    ("task", "words"),
    [
        ({"rows": [[["a", "b"], ["O"]], [["c"], ["O"]]]}, ["task.rows[0]", "2 words", "1 tag"]),
        ({"rows": [["a b", "O"], [["c"], ["O"]]]}, ["task.rows[0]", "list of words"]),
        ({"text_pair_column": "x"}, ["task.text_pair_column", "remove"]),
        ({"data": "builtin:movie-reviews", "rows": None}, ["task.data", "token-classification"]),
    ],
)
def test_bad_token_tasks_are_refused_when_the_study_is_read(
    task: dict[str, Any], words: list[str], tmp_path: Path
) -> None:
    base = {k: v for k, v in (_task() | task).items() if v is not None}
    with pytest.raises(StudyError) as err:
        study_from_mapping(tiny_study(tmp_path, task=base, constraints={}))
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"


def test_objectives_of_other_tasks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match=r"perplexity needs task\.kind causal-lm"):
        study_from_mapping(_study(tmp_path, objectives=["perplexity", "size_bytes"]))
    with pytest.raises(StudyError, match="token_f1"):
        study_from_mapping(tiny_study(tmp_path, objectives=["token_f1", "size_bytes"]))


def test_a_source_whose_tags_do_not_match_its_words_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "ner.jsonl"
    rows = [{"tokens": w, "ner_tags": t} for w, t in tagged_rows()]
    rows[5]["ner_tags"] = rows[5]["ner_tags"][:-1]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"kind": "token-classification", "data": str(path), "train_size": 32, "test_size": 16}
    spec = study_from_mapping(tiny_study(tmp_path, task=task))
    with pytest.raises(StudyError) as err:
        preflight.check_data(spec)
    assert "row 5" in str(err.value) and "\n" not in str(err.value)
    assert not (spec.cache / "baselines").exists()


def test_onnx_export_is_refused_for_token_classification() -> None:
    from slimsearch.search import onnx_check

    with pytest.raises(StudyError, match="token-classification"):
        onnx_check.check_task("token-classification")
