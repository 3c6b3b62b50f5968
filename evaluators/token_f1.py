"""Token classification F1: micro F1 over the labelled tokens whose tag is not the outside tag.

Counted per token, not per entity span (seqeval's entity F1 is not what this measures): a
token is a true positive when its predicted tag equals a gold tag other than ``outside``
(default ``"O"``), a false positive when it predicts such a tag wrongly, a false negative when
it misses one. Only positions with a label count (the first sub-token of each word). When no
class is named ``outside`` every tag counts, and the value equals token accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from slimsearch.evaluators.base import Direction, EvalContext
from slimsearch.evaluators.device import model_device, to_device
from slimsearch.evaluators.quality import require_task
from slimsearch.spaces.inputs import IGNORE, model_inputs


class TokenF1:
    name = "token_f1"
    compare = "difference"
    direction: Direction = "maximize"
    tasks = ("token-classification",)

    def __init__(self, outside: str = "O") -> None:
        self.outside = outside

    def check(self) -> None:
        if not isinstance(self.outside, str):
            raise ValueError(f"token_f1: outside={self.outside!r}; give the outside tag's name, e.g. 'O'")

    def _outside_id(self, context: EvalContext) -> int | None:
        names = context.data.class_names() if context.data is not None else ()
        return names.index(self.outside) if self.outside in names else None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        require_task(context, self.tasks, self.name)
        outside = self._outside_id(context)
        hits = predicted = gold = 0
        device = model_device(model)
        for batch in context.batches:
            batch = to_device(batch, device)
            labels = batch["labels"]
            pred = model(**model_inputs(batch)).logits.argmax(-1)
            labelled = labels != IGNORE
            tagged_gold = labelled if outside is None else labelled & (labels != outside)
            tagged_pred = labelled if outside is None else labelled & (pred != outside)
            hits += int((tagged_gold & (pred == labels)).sum())
            gold += int(tagged_gold.sum())
            predicted += int(tagged_pred.sum())
        if gold == 0 and predicted == 0:
            return 100.0
        return 100.0 * 2 * hits / max(gold + predicted, 1)
