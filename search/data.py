"""One task's data, tokenized for one baseline: the single object that trials, screening,
calibration, distillation, sensitivity and export read their batches from.

Each kind of batch is built on first use and kept, so a worker that runs many trials reads
and tokenizes its data once. Which rows each use takes is fixed by ``task.seed``: test rows
score, training rows calibrate, distil and profile, so test data never steers compression.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torch import Tensor

from slimsearch.search import tasks
from slimsearch.search.study_file import LABELLED_KINDS, TaskSpec

Batch = dict[str, Tensor]
T = TypeVar("T")

CALIBRATION_ROWS = 32
CALIBRATION_BLOCKS = 2  # enough for norms; Hessian methods warn on fewer than worker.HESSIAN_TOKENS
LM_DISTILL_BLOCKS = 64


def calibration_count(task: TaskSpec) -> int:
    """How many training sentences (labelled tasks) or blocks of ``block_size`` tokens
    (causal LM) the calibration statistics are captured on."""
    default = CALIBRATION_ROWS if task.kind in LABELLED_KINDS else CALIBRATION_BLOCKS
    return task.calibration_rows or default


@dataclass
class TaskData:
    task: TaskSpec
    cache: Path
    tokenizer: Any
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)

    def _kept(self, key: Any, build: Callable[[], T]) -> T:
        if key not in self._memo:
            self._memo[key] = build()
        value: T = self._memo[key]
        return value

    def splits(self) -> tasks.Splits:
        return self._kept("splits", lambda: tasks.classification_splits(self.task, self.cache))

    def text(self) -> str:
        return self._kept("text", lambda: tasks.lm_text(self.task, self.cache))

    def held_out_text(self) -> str:
        """LM text after the perplexity text (training, calibration, profiling)."""
        return tasks.held_out(self.task, self.text())

    def class_names(self) -> tuple[str, ...]:
        """A labelled task's class (or tag) names in id order."""
        return tasks.labelled(self.task, self.cache).names

    def rows_batches(self, rows: tasks.Rows, batch_size: int) -> list[Batch]:
        return tasks.labelled_batches(self.tokenizer, rows, self.task.max_length, batch_size, self.task.kind)

    def blocks(self, text: str, n_blocks: int, batch_size: int) -> list[Batch]:
        return tasks.lm_blocks(self.tokenizer, text, self.task.block_size, n_blocks, batch_size)

    def test_batches(self) -> list[Batch]:
        """What a trial is scored on: the test split, or the first blocks of the LM text."""
        task = self.task

        def build() -> list[Batch]:
            if task.kind in LABELLED_KINDS:
                return self.rows_batches(self.splits().test, task.eval_batch_size)
            return self.blocks(self.text(), task.eval_blocks, task.eval_batch_size)

        return self._kept("test", build)

    def screen_batches(self, examples: int) -> list[Batch]:
        """A fixed random subset of the test split (not the length-sorted head of it)."""

        def build() -> list[Batch]:
            test = self.splits().test
            subset = random.Random(self.task.seed + 1).sample(test, min(examples, len(test)))
            return self.rows_batches(subset, self.task.eval_batch_size)

        return self._kept(("screen", examples), build)

    def calibration_batch(self) -> Batch:
        """Training examples (never test data) the calibration statistics are captured on:
        ``task.calibration_rows`` sentences or blocks (default 32 sentences, 2 blocks)."""
        task = self.task

        def build() -> Batch:
            if task.kind in LABELLED_KINDS:
                splits = self.splits()
                train = splits.train or splits.test
                wanted = calibration_count(task)
                rows = random.Random(task.seed + 2).sample(train, min(wanted, len(train)))
                batch = self.rows_batches(rows, len(rows))[0]
            else:
                text = self.held_out_text() or self.text()
                blocks = calibration_count(task)
                batch = self.blocks(text, blocks, blocks)[0]
            return {k: v for k, v in batch.items() if k != "labels"}

        return self._kept("calibration", build)

    def train_batches(self, batch_size: int) -> list[Batch]:
        """Training data for distillation: the train split, or LM text after the evaluation text."""

        def build() -> list[Batch]:
            if self.task.kind in LABELLED_KINDS:
                train = self.splits().train
                if not train:
                    raise ValueError("distillation needs training rows: set task.train_size above 0")
                return self.rows_batches(train, batch_size)
            return self.blocks(self.held_out_text(), LM_DISTILL_BLOCKS, batch_size)

        return self._kept(("train", batch_size), build)

    def profile_rows(self, n: int) -> tasks.Rows:
        """A fixed random subset of the training split (the sensitivity profile's data)."""
        train = self.splits().train
        return random.Random(self.task.seed + 3).sample(train, min(n, len(train)))
