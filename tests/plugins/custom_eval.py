"""User-style evaluator plugins, loaded by study files as tests.plugins.custom_eval:Name."""

from __future__ import annotations

from torch import nn

from slimsearch.evaluators import EvalContext


class ParamCount:
    """Counts the tensors' elements in the state dict (a user-defined size measure)."""

    name = "param_count"
    direction = "minimize"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        return float(sum(t.numel() for t in model.state_dict().values()))


class Flaky:
    """Raises for every plan that quantizes to 4 bits: a plugin bug the search must survive."""

    name = "flaky"
    direction = "minimize"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        if any(s.bits == 4 for s in context.plan.layers.values()):
            raise RuntimeError("flaky plugin cannot handle 4-bit layers")
        return 1.0


class NotAnEvaluator:
    name = "broken"


class Sleepy:
    """Sleeps for plans that use 4 bits: a trial that hangs past its timeout."""

    name = "sleepy"
    direction = "minimize"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        import time

        if any(s.bits == 4 for s in context.plan.layers.values()):
            time.sleep(30)
        return 1.0


class SlowOnce:
    """Writes its pid and sleeps on the first call per marker folder (after ``after`` quick
    ones), so a test can kill the worker mid-trial; later calls (the retry) return at once."""

    name = "slow_once"
    direction = "minimize"

    def __init__(self, folder: str, seconds: float = 20.0, after: int = 0) -> None:
        self.folder = folder
        self.seconds = seconds
        self.after = after

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        import os
        import time
        from pathlib import Path

        calls = Path(self.folder) / "calls"
        calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
        marker = Path(self.folder) / "started"
        if len(calls.read_text()) > self.after and not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(self.seconds)
        return 1.0


class Slow:
    """Takes a fixed time per trial, so a test can kill the driver between trials."""

    name = "slow"
    direction = "minimize"

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        import time

        time.sleep(self.seconds)
        return 1.0


class CompressedLayers:
    """How many layers the plan compresses: against size, a deterministic trade-off (fewer
    compressed layers, more bytes), so a test's front has many points without timing noise."""

    name = "compressed_layers"
    direction = "minimize"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        return float(sum(not s.is_off for s in context.plan.layers.values()))


class AlwaysFails:
    """A systematic fault: every trial that compresses anything raises the same error (with a
    number that changes); the baseline and the all-off plan pass."""

    name = "always_fails"
    direction = "minimize"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        import random

        if context.plan.is_off:
            return 1.0
        raise RuntimeError(f"the metrics server at port {random.randint(1000, 9999)} refused the connection")


class RemovesRunFolder:
    """Deletes the run folder while the third trial is being measured."""

    name = "removes_run_folder"
    direction = "minimize"

    def __init__(self, folder: str, marker: str) -> None:
        self.folder = folder
        self.marker = marker

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        import shutil
        from pathlib import Path

        calls = Path(self.marker)
        calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
        if len(calls.read_text()) == 3:
            shutil.rmtree(self.folder)
        return 1.0


class MacroF1:
    """Macro-averaged F1 over the classes, in percent: a user's quality metric, usable as an
    objective, as a metric and as a constraint."""

    name = "macro_f1"
    direction = "maximize"
    compare = "difference"
    tasks = ("classification",)

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        import torch

        predicted, truth = [], []
        with torch.no_grad():
            for batch in context.batches:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                predicted.append(model(**inputs).logits.argmax(-1))
                truth.append(batch["labels"])
        p, t = torch.cat(predicted), torch.cat(truth)
        scores = []
        for c in torch.unique(torch.cat([p, t])).tolist():
            tp = int(((p == c) & (t == c)).sum())
            fp, fn = int(((p == c) & (t != c)).sum()), int(((p != c) & (t == c)).sum())
            scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return 100.0 * sum(scores) / len(scores)


class UsesTokenizer:
    """Reads the context's tokenizer and data object: the vocabulary size seen by decoding
    the first test batch back to text, and the number of test rows."""

    name = "decoded_rows"
    direction = "maximize"

    def evaluate(self, model: nn.Module, context: EvalContext) -> float:
        if context.tokenizer is None or context.data is None:
            raise RuntimeError("the context has no tokenizer or no data object")
        texts = context.tokenizer.batch_decode(context.batches[0]["input_ids"], skip_special_tokens=True)
        if not all(isinstance(t, str) for t in texts):
            raise RuntimeError("the tokenizer did not decode")
        return float(len(context.data.splits().test))
