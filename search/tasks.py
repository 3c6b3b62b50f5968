"""Task data: rows or text from the study's source, split with a fixed seed, tokenized."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimsearch.search import assets
from slimsearch.search.study_file import TaskSpec

Rows = list[tuple[str, int]]


@dataclass(frozen=True)
class Splits:
    train: Rows
    test: Rows


def _csv_rows(path: Path) -> Rows:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a classification CSV needs a header with 'text' and 'label' columns")
        return [(r["text"], int(r["label"])) for r in reader]


def classification_rows(task: TaskSpec, cache: Path) -> Rows:
    if task.rows is not None:
        return list(task.rows)
    if task.data == "builtin:movie-reviews":
        return assets.movie_review_rows(cache)
    if task.data == "builtin:uncertainty":
        return assets.uncertainty_rows(cache)
    return _csv_rows(Path(task.data))


def classification_splits(task: TaskSpec, cache: Path) -> Splits:
    rows = classification_rows(task, cache)
    rng = random.Random(task.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    need = task.train_size + task.test_size
    if need > len(rows):
        raise ValueError(
            f"task.train_size + task.test_size = {need} but the data has {len(rows)} rows; lower the sizes"
        )
    test = [rows[i] for i in order[: task.test_size]]
    train = [rows[i] for i in order[task.test_size : need]]
    return Splits(train=train, test=test)


def lm_text(task: TaskSpec, cache: Path) -> str:
    if task.text is not None:
        return task.text
    if task.data == "builtin:oanc":
        return assets.oanc_text(cache)
    return Path(task.data).read_text(encoding="utf-8")


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
        raise ValueError(
            f"the text gives {len(ids)} tokens, fewer than one block of task.block_size={block_size}"
        )
    blocks = torch.tensor(ids[: min(have, n_blocks) * block_size]).view(-1, block_size)
    return [{"input_ids": blocks[i : i + batch_size]} for i in range(0, len(blocks), batch_size)]
