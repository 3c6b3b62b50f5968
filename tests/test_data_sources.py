"""Task data through `datasets`: every format reads to the same rows, columns and splits are
the study's to name, labels of any kind map to ids, and bad data is one clear line."""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pytest
import torch

from conftest import tiny_study
from slimsearch.evaluators import EvalContext, make_evaluator
from slimsearch.search import preflight, sensitivity, tasks
from slimsearch.search.driver import run_study
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan
from tiny import sentiment_rows

LABELS = ("neg", "neutral", "pos")


def _records(n: int = 48) -> list[dict[str, Any]]:
    """Three classes with text labels, under column names a user's own data might have."""
    return [
        {"review": text, "stars": LABELS[(i + label) % 3] if i % 4 == 0 else LABELS[2 * label], "id": i}
        for i, (text, label) in enumerate(sentiment_rows(n))
    ]


def _dataset(n: int = 48) -> datasets.Dataset:
    return datasets.Dataset.from_list(_records(n))


def _arrow_file(path: Path, ds: datasets.Dataset) -> None:
    table = ds.data.table
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


WRITERS: dict[str, Callable[[Path], Path]] = {
    "csv": lambda d: _written(d / "d.csv", lambda p: _dataset().to_csv(p, index=False)),
    "tsv": lambda d: _written(d / "d.tsv", lambda p: _dataset().to_csv(p, index=False, sep="\t")),
    "json": lambda d: _written(d / "d.json", lambda p: p.write_text(json.dumps(_records()))),
    "jsonl": lambda d: _written(d / "d.jsonl", lambda p: _dataset().to_json(p, lines=True)),
    "parquet": lambda d: _written(d / "d.parquet", lambda p: _dataset().to_parquet(p)),
    "arrow": lambda d: _written(d / "d.arrow", lambda p: _arrow_file(p, _dataset())),
    "save_to_disk": lambda d: _written(d / "saved", lambda p: _dataset().save_to_disk(str(p))),
    "save_to_disk splits": lambda d: _written(
        d / "saved-dict", lambda p: datasets.DatasetDict(train=_dataset()).save_to_disk(str(p))
    ),
}


def _written(path: Path, write: Callable[[Path], Any]) -> Path:
    write(path)
    return path


def _task(data: str, **extra: Any) -> dict[str, Any]:
    task = {
        "kind": "classification",
        "data": data,
        "text_column": "review",
        "label_column": "stars",
        "train_size": 32,
        "test_size": 16,
        "max_length": 16,
    }
    return task | extra


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_format_reads_to_the_same_rows(fmt: str, tmp_path: Path) -> None:
    source = WRITERS[fmt](tmp_path)
    spec = study_from_mapping(tiny_study(tmp_path, task=_task(str(source))))
    data = tasks.labelled(spec.task, spec.cache)
    want = [(r["review"], LABELS.index(r["stars"])) for r in _records()]
    assert data.rows == want
    assert data.names == LABELS
    assert tasks.num_labels(spec.task, spec.cache) == 3
    splits = tasks.classification_splits(spec.task, spec.cache)
    assert (len(splits.train), len(splits.test)) == (32, 16)


def test_a_three_class_jsonl_study_runs_and_the_baseline_names_its_classes(tmp_path: Path) -> None:
    source = WRITERS["jsonl"](tmp_path)
    data = tiny_study(tmp_path, task=_task(str(source)), budget={"trials": 2})
    data["model"]["config"].pop("num_labels", None)  # the data sets the head's width
    spec = study_from_mapping(data)
    result = run_study(spec)
    assert len(result.front) >= 1
    config = json.loads((spec.cache / "baselines").glob("*/config.json").__next__().read_text())
    assert config["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert len(config["id2label"]) == 3


def test_named_splits_slices_and_class_label_order(tmp_path: Path) -> None:
    features = datasets.Features(
        {
            "review": datasets.Value("string"),
            "stars": datasets.ClassLabel(names=["pos", "neg", "neutral"]),  # not sorted: kept as declared
        }
    )
    rows = [{"review": r["review"], "stars": r["stars"]} for r in _records(60)]
    whole = datasets.Dataset.from_list(rows, features=features)
    folder = tmp_path / "dd"
    datasets.DatasetDict(train=whole.select(range(40)), validation=whole.select(range(40, 60))).save_to_disk(
        str(folder)
    )
    task = _task(str(folder), split="train[:30]", test_split="validation[5:]", train_size=30, test_size=15)
    spec = study_from_mapping(tiny_study(tmp_path, task=task))
    data = tasks.labelled(spec.task, spec.cache)
    assert data.names == ("pos", "neg", "neutral")
    assert len(data.rows) == 30 and len(data.test_rows) == 15
    assert data.test_rows[0] == (rows[45]["review"], ("pos", "neg", "neutral").index(rows[45]["stars"]))
    splits = tasks.classification_splits(spec.task, spec.cache)
    assert {t for t, _ in splits.test} == {r["review"] for r in rows[45:60]}
    too_many = study_from_mapping(tiny_study(tmp_path, task=task | {"test_size": 16}))
    with pytest.raises(StudyError, match=r"task.test_size = 16, but validation\[5:\] .* has 15 rows"):
        preflight.check_data(too_many)


def test_text_pairs_are_tokenized_as_pairs(tmp_path: Path) -> None:
    records = [{"premise": t, "hypothesis": t.split()[0], "label": y} for t, y in sentiment_rows(48)]
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(path))
    task = _task(str(path), text_column="premise", text_pair_column="hypothesis", label_column="label")
    spec = study_from_mapping(tiny_study(tmp_path, task=task, budget={"trials": 1}))
    assert tasks.labelled(spec.task, spec.cache).rows[0] == (
        (records[0]["premise"], records[0]["hypothesis"]),
        1,
    )
    result = run_study(spec)
    assert result.baseline["accuracy"] >= 0
    from transformers import AutoTokenizer

    folder = next((spec.cache / "baselines").glob("*/config.json")).parent
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    from slimsearch.search.data import TaskData

    batch = TaskData(spec.task, spec.cache, tokenizer).test_batches()[0]
    single = tokenizer([records[0]["premise"]])["input_ids"][0]
    pair = tokenizer([records[0]["premise"]], [records[0]["hypothesis"]])["input_ids"][0]
    assert len(pair) > len(single)  # the second text is in the input
    assert batch["input_ids"].shape[1] >= len(single)
    # BERT's segment ids come with the pair: 1 over the second text, 0 over the first and padding.
    segments = batch["token_type_ids"]
    assert segments.shape == batch["input_ids"].shape and int(segments.max()) == 1
    assert bool((segments * (1 - batch["attention_mask"])).eq(0).all())


class _Spy(torch.nn.Module):
    """Records the keyword arguments of each forward call; returns fixed logits."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.calls: list[set[str]] = []

    def forward(self, **inputs: torch.Tensor) -> Any:
        self.calls.append(set(inputs))
        rows = inputs["input_ids"].shape[0]
        return types.SimpleNamespace(logits=torch.zeros(rows, self.classes))


def test_accuracy_and_the_profile_loss_pass_segment_ids_to_the_model() -> None:
    ids = torch.ones((2, 4), dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids, "token_type_ids": ids, "labels": torch.zeros(2).long()}
    for score in (
        lambda m: make_evaluator("accuracy").evaluate(
            m, EvalContext(task="classification", batches=[batch], vocab_size=8, plan=CompressionPlan())
        ),
        lambda m: sensitivity.task_loss(m, [batch], "classification"),
    ):
        spy = _Spy(2)
        score(spy)
        assert spy.calls == [{"input_ids", "attention_mask", "token_type_ids"}]


def test_causal_lm_text_from_a_jsonl_column(tmp_path: Path) -> None:
    path = tmp_path / "lm.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"line {i} of the corpus"}) for i in range(5)) + "\n")
    spec = study_from_mapping(
        tiny_study(
            tmp_path, task={"kind": "causal-lm", "data": str(path), "text_column": "body"}, constraints={}
        )
    )
    assert tasks.lm_text(spec.task, spec.cache) == "\n\n".join(f"line {i} of the corpus" for i in range(5))


BAD: dict[str, tuple[Callable[[Path], dict[str, Any]], list[str]]] = {
    "no such text column": (
        lambda p: _task(str(WRITERS["jsonl"](p)), text_column="body"),
        ["task.text_column", "no column 'body'", "'review'", "'stars'"],
    ),
    "no such split": (
        lambda p: _task(str(WRITERS["save_to_disk splits"](p)), split="test"),
        ["task.split", "no split 'test'", "['train']"],
    ),
    "fractional labels": (
        lambda p: _task(
            str(_written(p / "f.csv", lambda q: q.write_text("review,stars\na,0.5\nb,1.0\n"))),
        ),
        ["task.label_column", "0.5", "does not regress"],
    ),
    "missing label": (
        lambda p: _task(
            str(_written(p / "m.jsonl", lambda q: q.write_text('{"review":"a","stars":null}\n')))
        ),
        ["task.label_column", "row 0", "no label"],
    ),
    "numbers as text": (
        lambda p: _task(str(WRITERS["jsonl"](p)), text_column="id"),
        ["task.text_column", "int", "not text"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_one_line_before_any_model(case: str, tmp_path: Path) -> None:
    build, words = BAD[case]
    spec = study_from_mapping(tiny_study(tmp_path, task=build(tmp_path)))
    with pytest.raises(StudyError) as err:
        preflight.check_data(spec)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert not (spec.cache / "baselines").exists()


@pytest.mark.parametrize(
    ("task", "words"),
    [
        ({"data": "d.xlsx"}, ["task.data", "nothing at"]),
        ({"split": "train[a:b]"}, ["task.split", "train[:2000]"]),
        ({"kind": "causal-lm", "data": "lm.txt", "test_split": "test"}, ["task.test_split", "remove"]),
        ({"text_column": ""}, ["task.text_column", "column name"]),
    ],
)
def test_bad_reading_options_are_refused_when_the_study_is_read(
    task: dict[str, Any], words: list[str], tmp_path: Path
) -> None:
    (tmp_path / "lm.txt").write_text("some text")
    (tmp_path / "d.csv").write_text("review,stars\na,x\nb,y\n")
    base = _task("d.csv") | task
    with pytest.raises(StudyError) as err:
        study_from_mapping(tiny_study(tmp_path, task=base, constraints={}), base_dir=tmp_path)
    for word in words:
        assert word in str(err.value), f"{word!r} not in: {err.value}"


def test_an_unreachable_hub_name_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = study_from_mapping(tiny_study(tmp_path, task=_task("hub:someone/not-here")))
    with pytest.raises(StudyError) as err:
        preflight.check_data(spec)
    assert str(err.value).startswith("task.data: cannot read hub:someone/not-here (")
    assert "\n" not in str(err.value)
