"""Bad input is one line naming the field, the value and the fix, before any model is loaded;
a resume that would mix incomparable trials is refused; readers never race the driver."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from conftest import tiny_study
from slimsearch.search import storage
from slimsearch.search.cli import main
from slimsearch.search.driver import run_study
from slimsearch.search.results import open_run
from slimsearch.search.study_file import StudyError, study_from_mapping
from tiny import sentiment_rows, tiny_bert


def _csv(path: Path, text: str | bytes) -> str:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def _rows_csv(path: Path, rows: list[tuple[str, Any]], header: str = "text,label") -> str:
    lines = [header] + [f"{t},{label}" for t, label in rows]
    return _csv(path, "\n".join(lines) + "\n")


def _model_folder(tmp_path: Path, config: str | None = None, weights: bool = True) -> str:
    folder = tmp_path / "model"
    tiny_bert().save_pretrained(str(folder))
    if config is not None:
        (folder / "config.json").write_text(config)
    if not weights:
        (folder / "model.safetensors").unlink()
    return str(folder)


def _task(data: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "classification", "data": data, "train_size": 8, "test_size": 8, "max_length": 16} | extra


# Each case: (study overrides built in tmp_path, words the single error line must hold).
CASES = {
    "corrupt config.json": (
        lambda p: {"model": {"source": _model_folder(p, config="{not json")}},
        ["model.source", "config.json is not valid JSON", "restore it"],
    ),
    "model folder without weights": (
        lambda p: {"model": {"source": _model_folder(p, weights=False)}},
        ["model.source", "holds no weights", "save_pretrained"],
    ),
    "csv without a label column": (
        lambda p: {"task": _task(_csv(p / "d.csv", "text,sentiment\na,1\nb,0\n"))},
        ["task.label_column", "columns are ['text', 'sentiment']", "no column 'label'"],
    ),
    "one-row csv": (
        lambda p: {"task": _task(_csv(p / "d.csv", "text,label\nonly one,1\n"))},
        ["task.data", "1 row(s)", "at least 2"],
    ),
    "one class only": (
        lambda p: {"task": _task(_rows_csv(p / "d.csv", [("a", "pos"), ("b", "pos")]))},
        ["task.data", "every row has the label 'pos'", "two classes"],
    ),
    "sizes larger than the data": (
        lambda p: {"task": _task(_rows_csv(p / "d.csv", sentiment_rows(10)), train_size=30)},
        ["task.train_size + task.test_size = 30 + 8 = 38", "has 10 rows", "lower the sizes"],
    ),
    "builtin sizes larger than the data": (
        lambda p: {"task": _task("builtin:movie-reviews", train_size=3500, test_size=1000)},
        ["task.train_size + task.test_size", "4000 rows"],
    ),
    "invalid utf-8": (
        lambda p: {"task": _task(_csv(p / "d.csv", b"text,label\ncaf\xe9,1\nok,0\n"))},
        ["task.data", "is not UTF-8", "byte 0xe9 at offset 14", "iconv"],
    ),
    "data that is not a csv": (
        lambda p: {"task": _task(_csv(p / "d.txt", "some text"))},
        ["task.data", "causal-lm text", "classifiers need labelled rows"],
    ),
    "output is a file": (
        lambda p: {"output": _csv(p / "a-file", "x")},
        ["output", "is a file", "give a folder path"],
    ),
    "output under a file": (
        lambda p: {"output": str(Path(_csv(p / "a-file", "x")) / "run")},
        ["output", "lies under", "which is a file"],
    ),
    "unwritable output": (
        lambda p: {"output": "/proc/slimsearch-run"},
        ["output", "cannot write in /proc", "a folder you can write to"],
    ),
    "corrupt study.db": (
        lambda p: _with_storage(p, b"these are not the bytes of a database" * 10),
        ["storage", "is not an SQLite database", "--output"],
    ),
    "foreign sqlite file": (
        lambda p: _with_storage(p, "foreign"),
        ["storage", "not an Optuna study", "['recipes']"],
    ),
    "storage of another study": (
        lambda p: _with_storage(p, "other-study"),
        ["storage", "holds the study 'someone-else', not 'tiny'", "its own output folder"],
    ),
}


def _with_storage(tmp_path: Path, what: bytes | str) -> dict[str, Any]:
    run = tmp_path / "run"
    run.mkdir()
    db = run / "study.db"
    if isinstance(what, bytes):
        db.write_bytes(what)
    elif what == "foreign":
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE recipes (name TEXT)")
    else:
        optuna.create_study(study_name="someone-else", storage=f"sqlite:///{db}")
    return {}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_error_before_any_model_load(case: str, tmp_path: Path) -> None:
    build, words = CASES[case]
    data = tiny_study(tmp_path, **build(tmp_path))
    with pytest.raises(StudyError) as err:
        run_study(study_from_mapping(data))
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert not (tmp_path / "cache" / "baselines").exists()  # no model was loaded or fine-tuned


def test_the_cli_prints_bad_input_as_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tiny_study(tmp_path, task=_task(_csv(tmp_path / "d.csv", b"text,label\n\xff\xfe,1\n")))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimsearch: error: task.data:")


def test_string_labels_and_three_classes_run(tmp_path: Path) -> None:
    names = ["neg", "neutral", "pos"]
    rows = [(text, names[i % 3]) for i, (text, _) in enumerate(sentiment_rows(36))]
    data = tiny_study(tmp_path, task=_task(_rows_csv(tmp_path / "d.csv", rows), train_size=24, test_size=12))
    data["model"]["config"] = {k: v for k, v in data["model"]["config"].items() if k != "num_labels"}
    data["budget"] = {"trials": 2}
    result = run_study(study_from_mapping(data))
    assert result.exit_code == 0 and result.counts["complete"] == 2
    config = json.loads((Path(open_run(result.run_dir).baseline_dir()) / "config.json").read_text())
    assert len(config["id2label"]) == 3  # the head is as wide as the data has classes


# -- resuming ------------------------------------------------------------------------------
RESUME_CHANGES = {
    "test_size": ({"task": {"test_size": 12}}, "task.test_size: 16 -> 12"),
    "a new constraint": (
        {"constraints": {"max_accuracy_drop": 10.0, "max_size_ratio": 0.5}},
        "constraints.max_size_ratio",
    ),
    "a constraint's limit": (
        {"constraints": {"max_accuracy_drop": 5.0}},
        "constraints.max_accuracy_drop: 10.0 -> 5.0",
    ),
    "an evaluator's options": (
        {"objectives": ["accuracy", {"name": "plugins.custom_eval:Slow", "options": {"seconds": 0.01}}]},
        "objectives",
    ),
    "the model": (
        {"model": {"finetune": {"epochs": 1, "learning_rate": 1e-3, "batch_size": 8}}},
        "model.finetune.epochs: 3",
    ),
    "the latency threads": ({"latency": {"threads": 2}}, "latency.threads: 1 -> 2"),
}


@pytest.mark.parametrize("change", sorted(RESUME_CHANGES))
def test_a_resume_that_would_mix_incomparable_trials_is_refused(change: str, tmp_path: Path) -> None:
    base = tiny_study(
        tmp_path, objectives=["accuracy", {"name": "plugins.custom_eval:Slow", "options": {"seconds": 0}}]
    )
    base["objectives"] += ["size_bytes", "latency_ms"]
    base["budget"] = {"trials": 2}
    run_study(study_from_mapping(base))
    overrides, words = RESUME_CHANGES[change]
    changed = json.loads(json.dumps(base))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(changed.get(key), dict):
            changed[key] = changed[key] | value
        else:
            changed[key] = value
    if change == "an evaluator's options":
        changed["objectives"] += ["size_bytes", "latency_ms"]
    with pytest.raises(StudyError) as err:
        run_study(study_from_mapping(changed))
    assert "scored another way" in str(err.value) and words in str(err.value), str(err.value)


def test_a_resume_may_change_budgets_sampler_and_screening(tmp_path: Path) -> None:
    data = tiny_study(tmp_path, budget={"trials": 2})
    run_study(study_from_mapping(data))
    data |= {"budget": {"trials": 3}, "sampler": {"name": "random", "seed": 3}, "screening": False}
    result = run_study(study_from_mapping(data))
    assert result.counts["complete"] == 3


def test_a_changed_data_file_is_refused_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    data = tiny_study(tmp_path, task=_task(_rows_csv(path, sentiment_rows(24))), budget={"trials": 1})
    run_study(study_from_mapping(data))
    _rows_csv(path, [(t + " edited", label) for t, label in sentiment_rows(24)])
    with pytest.raises(StudyError, match=r"task\.data_sha256"):
        run_study(study_from_mapping(data))


# -- readers and the driver ---------------------------------------------------------------
def test_readers_never_create_a_storage(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "study_name": "tiny",
                "storage": "sqlite",
                "url": f"sqlite:///{run / 'study.db'}",
                "objectives": [],
            }
        )
    )
    with pytest.raises(StudyError, match="has not created its storage yet"):
        open_run(run)
    assert not (run / "study.db").exists()  # before, opening it created an empty schema
    sqlite3.connect(run / "study.db").close()  # an empty database: the driver has not filled it
    with pytest.raises(StudyError, match="holds no study yet"):
        open_run(run)
    with sqlite3.connect(run / "study.db") as con:
        assert con.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0


def test_the_driver_creates_its_storage_whole_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the schema and the study are being written, study.db does not exist under its
    # name, so no reader can open it half made (a reader creating tables meanwhile killed
    # the driver: "table trial_system_attributes already exists").
    seen: list[bool] = []
    create = optuna.create_study

    def watching(*args: Any, **kwargs: Any) -> optuna.Study:
        seen.append((tmp_path / "run" / "study.db").exists())
        return create(*args, **kwargs)

    monkeypatch.setattr(storage.optuna, "create_study", watching)
    result = run_study(study_from_mapping(tiny_study(tmp_path, budget={"trials": 1})))
    # The storage's creation, before study.db exists; then the driver's own create_study,
    # which finds the study there and loads it.
    assert seen == [False, True] and result.counts["complete"] == 1
    assert not list((tmp_path / "run").glob("study.db.creating-*"))


def test_a_second_driver_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    from slimsearch.search.locks import run_lock

    spec = study_from_mapping(tiny_study(tmp_path))
    with run_lock(spec.output), pytest.raises(StudyError, match="is in use by another slimsearch run"):
        run_study(spec)


@pytest.mark.parametrize("kind", ["journal", "sqlite-schema-only"])
def test_the_driver_creates_its_study_in_any_storage_it_may_use(tmp_path: Path, kind: str) -> None:
    # A journal is created by appending to it; an SQLite file whose tables another tool
    # (optuna-dashboard) created holds no study yet: the driver adds its own to either.
    data = tiny_study(tmp_path, budget={"trials": 2})
    if kind == "journal":
        data["storage"] = "journal"
    else:
        (tmp_path / "run").mkdir()
        optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'run' / 'study.db'}")  # tables, no study
    assert run_study(study_from_mapping(data)).counts["complete"] == 2
    assert run_study(study_from_mapping(data), trials=3).counts["complete"] == 3  # and resumes


def test_a_layer_pattern_matching_nothing_fails_before_the_fine_tune(tmp_path: Path) -> None:
    space = {"layers": ["re:.*\\bblocks\\.\\d+\\..*"], "default": {"bits": [32, 8]}}
    data = tiny_study(tmp_path, space=space)
    assert data["model"]["finetune"]  # the baseline would be fine-tuned first
    with pytest.raises(StudyError, match=r"space.layers .* match no Linear layer.*bert.encoder.layer.0"):
        run_study(study_from_mapping(data))
    assert not (tmp_path / "cache" / "baselines").exists()
