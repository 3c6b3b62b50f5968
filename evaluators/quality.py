"""Task quality: accuracy for classifiers and token taggers, perplexity for causal LMs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimsearch.evaluators.base import Direction, EvalContext
from slimsearch.evaluators.device import model_device, to_device
from slimsearch.spaces.inputs import IGNORE, model_inputs


def require_task(context: EvalContext, kinds: tuple[str, ...], name: str) -> None:
    if context.task not in kinds:
        raise ValueError(
            f"the {name} evaluator needs a {' or '.join(kinds)} task, but this study's task is {context.task}"
        )


class Accuracy:
    """Percent of evaluation examples whose argmax logit is the label (0-100); for token
    classification, of labelled tokens (the first sub-token of each word)."""

    name = "accuracy"
    compare = "difference"
    direction: Direction = "maximize"
    tasks = ("classification", "token-classification")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        require_task(context, self.tasks, self.name)
        correct = total = 0
        device = model_device(model)
        for batch in context.batches:
            batch = to_device(batch, device)
            logits = model(**model_inputs(batch)).logits
            labels = batch["labels"]
            counted = labels != IGNORE
            correct += int(((logits.argmax(-1) == labels) & counted).sum())
            total += int(counted.sum())
        return 100.0 * correct / max(total, 1)


class Perplexity:
    """exp of the mean next-token negative log-likelihood over the evaluation blocks."""

    name = "perplexity"
    compare = "ratio"
    direction: Direction = "minimize"

    @torch.no_grad()
    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        require_task(context, ("causal-lm",), self.name)
        nll = 0.0
        count = 0
        device = model_device(model)
        for batch in context.batches:
            ids = batch["input_ids"].to(device)
            block_nll, block_count = next_token_nll(model(input_ids=ids).logits, ids)
            nll += block_nll
            count += block_count
        return math.exp(nll / max(count, 1))


def next_token_nll(logits: Tensor, ids: Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of each next token of ``ids`` under
    ``logits`` of every position: what perplexity is computed from, in torch or elsewhere."""
    shifted = logits[:, :-1].float()
    target = ids[:, 1:]
    flat = shifted.reshape(-1, shifted.size(-1))
    return float(F.cross_entropy(flat, target.reshape(-1), reduction="sum")), target.numel()
