"""Would dropping whole Transformer blocks beat uniform structured pruning on speed?

A probe, not a shipped method: slimsearch has no "drop this block" choice. Here a block is
replaced by an identity module (its weights and compute really go), after the int8
Linears and any uniform heads/neurons pruning that slimsearch does apply. Each case is
scored on the study's full test split before and after the same recovery (logits
distillation on the training split, labels mixed in at alpha 0.5), and its latency ratio
is measured with the study's own protocol (interleaved with the baseline, noise-gated) on
one thread. Target 3 of the search benchmark asks for a model within 1 point that is 1.3x
faster than the best uniform one; this is where the MiniLM note's numbers come from.

    .venv/bin/python benchmarks/depth_probe.py                 # ~4 min on 2 cores
    .venv/bin/python benchmarks/depth_probe.py --steps 0       # no recovery
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimsearch.evaluators import Accuracy, EvalContext
from slimsearch.evaluators.latency import LatencyRatio
from slimsearch.search import models
from slimsearch.search.data import TaskData
from slimsearch.search.log import say
from slimsearch.search.study_file import load_study
from slimsearch.search.worker import TrialJob, teacher_cache
from slimsearch.spaces import CompressionPlan, apply_plan
from slimsearch.spaces.methods.distill import DistillRecipe, distill
from slimsearch.spaces.plan import LayerSettings, StructuredSettings

ROOT = Path(__file__).resolve().parent.parent
LINEARS = r"re:.*\.layer\.\d+\..*"
BLOCKS = r"re:.*layer\.\d+"
# (name, uniform structured fractions, blocks dropped); every case has int8 Linears.
CASES: tuple[tuple[str, dict[str, float], tuple[int, ...]], ...] = (
    ("int8", {}, ()),
    ("int8, neurons 0.5", {"neurons": 0.5}, ()),
    ("int8, heads 0.25 neurons 0.5", {"heads": 0.25, "neurons": 0.5}, ()),
    ("int8, heads 0.5 neurons 0.5", {"heads": 0.5, "neurons": 0.5}, ()),
    ("int8, neurons 0.75", {"neurons": 0.75}, ()),
    ("int8, drop 4 5", {}, (4, 5)),
    ("int8, drop 1 3 5", {}, (1, 3, 5)),
    ("int8, drop 3 4 5", {}, (3, 4, 5)),
    ("int8, drop 4 5, neurons 0.5", {"neurons": 0.5}, (4, 5)),
)


class Skip(nn.Module):
    """A dropped block: hands its input on unchanged."""

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return hidden_states


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", type=Path, default=ROOT / "studies" / "minilm-speed.yaml")
    parser.add_argument("--steps", type=int, default=100, help="distillation steps (0: no recovery)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "depth_probe.json")
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"--steps {args.steps}: give 0 or more")
    started = time.monotonic()
    spec = load_study(args.study)
    if spec.task.kind != "classification":
        parser.error(f"{args.study} is a {spec.task.kind} study; this probe scores classifiers")
    base, tokenizer = models.load_baseline(models.prepare_baseline(spec), spec.task.kind)
    # The worker's own test batches and calibration rows (training data), as a trial uses them.
    latency = replace(spec.latency, threads=1)
    job = TrialJob(-1, "{}", "", str(spec.cache), spec.task, (), latency)
    data = TaskData(spec.task, spec.cache, tokenizer)
    test = data.test_batches()
    calibration = data.calibration_batch()
    train = data.train_batches(32)
    recipe = DistillRecipe(kind="logits", steps=args.steps, learning_rate=1e-4)
    teacher = teacher_cache(job, base, train, "logits") if args.steps else None  # cached on disk

    def context() -> EvalContext:
        return EvalContext(
            task="classification", batches=test, vocab_size=len(tokenizer), plan=CompressionPlan(),
            latency=latency, baseline={}, reference=base,
        )  # fmt: skip

    def accuracy(model: nn.Module) -> float:
        return Accuracy().evaluate(model, context())

    torch.set_num_threads(2)
    baseline_accuracy = accuracy(base)
    results = []
    for name, fractions, dropped in CASES:
        model = copy.deepcopy(base)
        if fractions:
            plan = CompressionPlan(structured={BLOCKS: StructuredSettings(**fractions)})
            apply_plan(model, plan, calibration=calibration)
        layers = model.get_submodule("bert.encoder.layer")
        for i in dropped:
            layers[i] = Skip()
        before = accuracy(model)
        if teacher is not None:
            distill(model, teacher, train, recipe, "classification")
        apply_plan(model, CompressionPlan(layers={LINEARS: LayerSettings(bits=8)}))
        after = accuracy(model.eval())
        ratio = LatencyRatio().evaluate(model, context())  # the study's protocol, on one thread
        torch.set_num_threads(2)
        results.append(
            {"case": name, "fp32_no_recovery": before, "int8_recovered": after, "latency_ratio": ratio}
        )
        say(f"{name}: {before:.1f}% -> {after:.1f}% after {args.steps} steps, latency {ratio:.3f}x")
    print(f"baseline {baseline_accuracy:.1f}%; recovery: logits distillation, {args.steps} steps")
    # Before recovery the Linears are still fp32 (int8 comes after distillation).
    print(f"{'case':<32}{'fp32, no recovery':>18}{'int8, recovered':>16}{'latency':>9}")
    for r in results:
        print(
            f"{r['case']:<32}{r['fp32_no_recovery']:>18.1f}{r['int8_recovered']:>16.1f}"
            f"{r['latency_ratio']:>9.3f}"
        )
    wall = time.monotonic() - started
    print(f"wall time {wall:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "depth_probe",
        "study": str(args.study),
        "steps": args.steps,
        "baseline_accuracy": baseline_accuracy,
        "cases": results,
        "wall_s": round(wall, 1),
    }
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
