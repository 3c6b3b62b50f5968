"""Task data: rows or text from the study's source, split with a fixed seed, tokenized."""

from __future__ import annotations

import csv
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimsearch.search import assets
from slimsearch.search.study_file import StudyError, TaskSpec

Rows = list[tuple[str, int]]


@dataclass(frozen=True)
class Splits:
    train: Rows
    test: Rows


BUILTIN_ROWS = {"builtin:movie-reviews": 4000, "builtin:uncertainty": 3000}


def read_text_file(path: Path, where: str = "task.data") -> str:
    """A data file's text; StudyError naming the file and the byte that is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise StudyError(
            f"{where}: {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
            "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None
    except OSError as exc:
        raise StudyError(f"{where}: cannot read {path} ({exc.strerror})") from None


def label_ids(labels: list[Any]) -> dict[Any, int]:
    """Each distinct label to a class id: sorted numerically when every label is a whole
    number (so 0/1 labels keep their ids), else as text."""
    distinct = set(labels)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in distinct):
        return {v: i for i, v in enumerate(sorted(distinct))}
    return {v: i for i, v in enumerate(sorted(distinct, key=str))}


def _as_int(text: str) -> int | str:
    stripped = text.strip()
    return int(stripped) if re.fullmatch(r"[+-]?\d+", stripped) else stripped


def _csv_rows(path: Path) -> Rows:
    text = read_text_file(path)
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if not {"text", "label"} <= set(columns):
        raise StudyError(
            f"task.data: {path} has columns {columns}; a classification CSV needs a header row with "
            "'text' and 'label' columns"
        )
    raw: list[tuple[str, int | str]] = []
    for number, record in enumerate(reader, 2):
        record = {(k or "").strip(): v for k, v in record.items()}
        if record.get("label") in (None, "") or record.get("text") is None:
            raise StudyError(
                f"task.data: {path} line {number} has no label or no text; fill it in or drop it"
            )
        raw.append((record["text"], _as_int(record["label"])))
    return _mapped(raw, f"task.data: {path}")


def _mapped(raw: list[tuple[str, Any]], where: str) -> Rows:
    """Rows with their labels as class ids; StudyError when fewer than two classes."""
    if len(raw) < 2:
        raise StudyError(
            f"{where} has {len(raw)} row(s); a classification task needs at least 2 labelled rows"
        )
    ids = label_ids([label for _, label in raw])
    if len(ids) < 2:
        raise StudyError(f"{where}: every row has the label {next(iter(ids))!r}; give at least two classes")
    return [(text, ids[label]) for text, label in raw]


def classification_rows(task: TaskSpec, cache: Path) -> Rows:
    if task.rows is not None:
        return _mapped(list(task.rows), "task.rows")
    if task.data == "builtin:movie-reviews":
        return assets.movie_review_rows(cache)
    if task.data == "builtin:uncertainty":
        return assets.uncertainty_rows(cache)
    return _csv_rows(Path(task.data))


def num_labels(task: TaskSpec, cache: Path) -> int:
    """How many classes the task's data has (the classifier head's width)."""
    if task.data in BUILTIN_ROWS:
        return 2
    return len({label for _, label in classification_rows(task, cache)})


def check_sizes(task: TaskSpec, rows: int) -> None:
    need = task.train_size + task.test_size
    if need > rows:
        raise StudyError(
            f"task.train_size + task.test_size = {task.train_size} + {task.test_size} = {need}, but "
            f"{task.data} has {rows} rows; lower the sizes so they fit"
        )


def classification_splits(task: TaskSpec, cache: Path) -> Splits:
    rows = classification_rows(task, cache)
    rng = random.Random(task.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    check_sizes(task, len(rows))
    need = task.train_size + task.test_size
    test = [rows[i] for i in order[: task.test_size]]
    train = [rows[i] for i in order[task.test_size : need]]
    return Splits(train=train, test=test)


def lm_text(task: TaskSpec, cache: Path) -> str:
    if task.text is not None:
        return task.text
    if task.data == "builtin:oanc":
        return assets.oanc_text(cache)
    return read_text_file(Path(task.data))


def classification_batches(
    tokenizer: Any, rows: Rows, max_length: int, batch_size: int
) -> list[dict[str, Tensor]]:
    """Batches sorted by length with padding only to each batch's longest row (cheaper than
    padding everything to max_length; results do not depend on the order)."""
    encoded = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        labels = torch.tensor([rows[i][1] for i in idx])
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def eval_chars(block_size: int, n_blocks: int) -> int:
    """Characters at the start of an LM text reserved for evaluation (~8 a token is generous);
    training and calibration text comes only after them."""
    return block_size * n_blocks * 8


def lm_train_text(task: TaskSpec, cache: Path) -> str:
    """The LM text held apart from the perplexity text."""
    return lm_text(task, cache)[eval_chars(task.block_size, task.eval_blocks) :]


def lm_blocks(
    tokenizer: Any, text: str, block_size: int, n_blocks: int, batch_size: int
) -> list[dict[str, Tensor]]:
    """The first ``n_blocks`` contiguous blocks of ``block_size`` tokens, batched.

    Evaluation takes text from the start; training (if any) must use text after it.
    """
    ids = tokenizer(text[: eval_chars(block_size, n_blocks)])["input_ids"]
    have = len(ids) // block_size
    if have < 1:
        raise StudyError(
            f"task.block_size: the text gives {len(ids)} tokens, fewer than one block of "
            f"{block_size}; lower task.block_size or give more text"
        )
    blocks = torch.tensor(ids[: min(have, n_blocks) * block_size]).view(-1, block_size)
    return [{"input_ids": blocks[i : i + batch_size]} for i in range(0, len(blocks), batch_size)]
