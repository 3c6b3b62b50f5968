"""Multiple-choice accuracy of a causal LM from a local JSON Lines file, scored the way
lm-eval-harness scores its multiple-choice tasks: each choice's log-likelihood as the
continuation of the question, the highest wins.

One question per line: ``{"question": "...", "choices": ["...", ...], "answer": 1}``
(``answer``: the index of the right choice, or its text). The continuation is tokenized as
lm-eval does: the tokens of question + choice after the question's own tokens.
``normalize: length`` divides each log-likelihood by the choice's length in characters
(lm-eval's ``acc_norm``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.evaluators.base import Direction, EvalContext
from slimsearch.evaluators.device import model_device

NORMALIZE = ("none", "length")


class ChoiceAccuracy:
    name = "choice_accuracy"
    compare = "difference"
    direction: Direction = "maximize"
    tasks = ("causal-lm",)

    def __init__(
        self, data: str = "", normalize: str = "none", limit: int | None = None, separator: str = " "
    ):
        self.data = data
        self.normalize = normalize
        self.limit = limit
        self.separator = separator
        self._rows: list[tuple[str, list[str], int]] | None = None

    def check(self) -> None:
        """Read and validate the file (called when the study is read, before any model)."""
        if self.normalize not in NORMALIZE:
            raise ValueError(
                f"choice_accuracy: normalize={self.normalize!r}; choose one of {list(NORMALIZE)}"
            )
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"choice_accuracy: limit={self.limit!r}; give a whole number >= 1")
        self.rows()

    def rows(self) -> list[tuple[str, list[str], int]]:
        if self._rows is None:
            self._rows = _read(self.data)[: self.limit]
        return self._rows

    @torch.no_grad()
    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        if context.tokenizer is None:
            raise ValueError("choice_accuracy needs the context's tokenizer; run it through slimsearch")
        correct = 0
        rows = self.rows()
        for question, choices, answer in rows:
            scores = self._scores(model, context.tokenizer, question, choices)
            correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
        return 100.0 * correct / len(rows)

    def _scores(self, model: nn.Module, tokenizer: Any, question: str, choices: list[str]) -> list[float]:
        prefix = tokenizer(question)["input_ids"]
        whole = [tokenizer(question + self.separator + c)["input_ids"] for c in choices]
        width = max(len(w) for w in whole)
        ids = torch.zeros((len(whole), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, w in enumerate(whole):
            ids[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w)] = 1
        device = model_device(model)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
        scores = []
        for i, (w, choice) in enumerate(zip(whole, choices, strict=True)):
            start = max(1, min(len(prefix), len(w) - 1))  # at least one continuation token
            targets = torch.tensor(w[start:])
            total = float(logprobs[i, start - 1 : len(w) - 1].gather(-1, targets[:, None]).sum())
            scores.append(total / max(1, len(choice)) if self.normalize == "length" else total)
        return scores


def _read(path: str) -> list[tuple[str, list[str], int]]:
    where = f"choice_accuracy: options.data {path!r}"
    if not path:
        raise ValueError("choice_accuracy: give options.data, a .jsonl file of {question, choices, answer}")
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"{where}: no such file (a relative path is taken from the folder slimsearch runs in)"
        )
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where} line {number}: not JSON ({exc.msg})") from None
        question, choices, answer = (
            item.get(k) if isinstance(item, dict) else None for k in ("question", "choices", "answer")
        )
        if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2:
            raise ValueError(f"{where} line {number}: give a question (text) and at least two choices")
        if not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where} line {number}: every choice must be non-empty text")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(
                f"{where} line {number}: answer {answer!r} is neither an index into its "
                f"{len(choices)} choices nor one of them"
            )
        rows.append((question, choices, answer))
    if not rows:
        raise ValueError(f"{where}: holds no questions")
    return rows
