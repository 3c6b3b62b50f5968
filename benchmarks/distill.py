"""Does distillation recover what compression costs? Fixed MiniLM plans, side by side.

For each compressed plan (applied to the fine-tuned MiniLM sentiment baseline; structured
pruning calibrated on training sentences), measure test accuracy on the 1,000 test
sentences without distillation, then after each distillation recipe at the same step
budget, every recipe starting from the same compressed model. The teacher is the
uncompressed baseline; its outputs on the training batches are computed once
(``TeacherCache``) and shared by every plan and recipe. "recovered" is the fraction of
the accuracy the plan lost that distillation won back: (after - before) / (baseline - before).

Target (issue 4): at least half of the accuracy lost by 50% sparsity + int8 is recovered.
The default plans are that one and a harsher one (structured: half the heads and FFN
neurons of every block, then int8). "4bit" alone lost no accuracy on this baseline in a
trial run (81.0% vs 80.1%), so there is nothing to recover and it is not run by default.

    .venv/bin/python benchmarks/distill.py [--steps 100] [--plans s50-int8,4bit,...]
        [--recipes logits,logits+hidden,...] [--seeds 0,1,2] [--out benchmarks/results/distill.json]

A plan may also be a path to a plan JSON file (``CompressionPlan.to_json``, as a run's
trials store it), such as those under benchmarks/plans/: uniform and per-layer plans from
the search-efficiency benchmark, to see whether distillation changes which one wins.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimsearch.search import models, tasks
from slimsearch.search.study_file import load_study
from slimsearch.spaces import CompressionPlan, LayerSettings, StructuredSettings, apply_plan, serialized_size
from slimsearch.spaces.methods.distill import DISTILL_KINDS, DistillRecipe, TeacherCache, distill

BLOCKS = r"re:.*\.layer\.\d+\..*"
Batches = list[dict[str, Tensor]]

PLANS: dict[str, CompressionPlan] = {
    "s50-int8": CompressionPlan(layers={BLOCKS: LayerSettings(sparsity=0.5, bits=8)}),
    "4bit": CompressionPlan(layers={BLOCKS: LayerSettings(bits=4)}),
    "s50-4bit": CompressionPlan(layers={BLOCKS: LayerSettings(sparsity=0.5, bits=4)}),
    "struct50-int8": CompressionPlan(
        layers={BLOCKS: LayerSettings(bits=8)}, structured={"re:.*": StructuredSettings(0.5, 0.5)}
    ),
}


def accuracy(model: nn.Module, batches: Batches) -> float:
    """Percent of test rows whose argmax logit is the label (the deployed model: no grad, so
    int8 layers run on their kernel)."""
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return 100.0 * correct / total


def recovered(baseline: float, before: float, after: float) -> float | None:
    lost = baseline - before
    return (after - before) / lost if lost > 0 else None


def resolve_plans(items: list[str]) -> dict[str, CompressionPlan]:
    """Named plans from PLANS, or plan JSON files (named by their file stem)."""
    plans: dict[str, CompressionPlan] = {}
    for item in items:
        path = Path(item)
        if item in PLANS:
            plans[item] = PLANS[item]
        elif path.suffix == ".json" and path.is_file():
            try:
                plans[path.stem] = CompressionPlan.from_json(path.read_text())
            except (ValueError, KeyError, TypeError) as exc:
                raise SystemExit(f"--plans: {item} is not a plan JSON file ({exc})") from None
        else:
            raise SystemExit(f"--plans: {item!r} is neither a plan in {list(PLANS)} nor a plan .json file")
    return plans


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    spec = load_study("studies/minilm-sentiment.yaml")
    teacher, tokenizer = models.load_baseline(models.prepare_baseline(spec), "classification")
    teacher.eval()
    splits = tasks.classification_splits(spec.task, spec.cache)
    task = spec.task
    test = tasks.classification_batches(tokenizer, splits.test, task.max_length, task.eval_batch_size)
    recipes = [
        DistillRecipe(kind=k, steps=args.steps, learning_rate=args.lr, seed=seed)
        for k in args.recipes
        for seed in args.seeds
    ]
    batch_size = recipes[0].batch_size
    train = tasks.classification_batches(tokenizer, splits.train, task.max_length, batch_size)
    calibration = {k: train[len(train) // 2][k] for k in ("input_ids", "attention_mask")}

    baseline = accuracy(teacher, test)
    baseline_size = serialized_size(teacher, CompressionPlan())
    print(f"baseline accuracy {baseline:.1f}%  ({len(splits.test)} test rows, {len(train)} train batches)")
    tick = time.monotonic()
    richest = max(args.recipes, key=DISTILL_KINDS.index)
    cache = TeacherCache.compute(teacher, train, richest, "classification")
    cache_seconds = time.monotonic() - tick
    print(f"teacher cache ({richest}): {cache_seconds:.0f} s, {cache.nbytes() / 2**20:.0f} MiB")

    rows = []
    for plan_name, plan in args.plans.items():
        compressed = apply_plan(copy.deepcopy(teacher), plan, calibration).eval()
        size = serialized_size(compressed, plan)
        before = accuracy(compressed, test)
        print(
            f"{plan_name}: {before:.1f}% before distillation, {size / 2**20:.1f} MiB "
            f"({size / baseline_size:.3f}x the baseline's bytes)"
        )
        for recipe in recipes:
            student = copy.deepcopy(compressed)
            stats = distill(student, cache, train, recipe, "classification")
            after = accuracy(student, test)
            if abs(serialized_size(student, plan) - size) > 0.01 * size:
                raise RuntimeError(f"{plan_name}/{recipe.kind}: distillation changed the stored size")
            row = {
                "plan": plan_name,
                "plan_summary": plan.summary(),
                "recipe": recipe.kind,
                "seed": recipe.seed,
                "steps": recipe.steps,
                "accuracy_before": before,
                "accuracy_after": after,
                "recovered": recovered(baseline, before, after),
                "seconds": stats["seconds"],
                "loss_start": stats["loss_start"],
                "loss_end": stats["loss_end"],
                "size_bytes": size,
                "size_ratio": size / baseline_size,
            }
            rows.append(row)
            print_row(row)
    return {
        "baseline_accuracy": baseline,
        "baseline_size_bytes": baseline_size,
        "recipe": {k: v for k, v in recipes[0].to_dict().items() if k != "kind"},
        "teacher_cache_seconds": cache_seconds,
        "teacher_cache_mib": cache.nbytes() / 2**20,
        "train_batches": len(train),
        "rows": rows,
        "wall_seconds": time.monotonic() - started,
        "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
    }


HEADER = (
    f"{'plan':<20} {'recipe':<24} {'seed':>4} {'steps':>5} {'size':>6} {'before':>7} {'after':>7}"
    f" {'recovered':>9} {'seconds':>8}"
)


def print_row(row: dict[str, Any]) -> None:
    share = row["recovered"]
    share_text = f"{share:.0%}" if share is not None else "n/a"
    print(
        f"{row['plan']:<20} {row['recipe']:<24} {row['seed']:>4} {row['steps']:>5} "
        f"{row['size_ratio']:>6.3f} "
        f"{row['accuracy_before']:>6.1f}% "
        f"{row['accuracy_after']:>6.1f}% {share_text:>9} {row['seconds']:>8.0f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per recipe (about 1 s each)")
    parser.add_argument("--lr", type=float, default=DistillRecipe().learning_rate)
    parser.add_argument(
        "--plans", default="s50-int8,struct50-int8", help=f"from {list(PLANS)}, or plan .json files"
    )
    parser.add_argument(
        "--recipes", default="logits,logits+hidden,logits+hidden+attention", help=f"from {DISTILL_KINDS[1:]}"
    )
    parser.add_argument(
        "--seeds", default="0", help="comma-separated recipe seeds (batch order): the spread of one recipe"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/distill.json", help="where to write the JSON")
    args = parser.parse_args()
    args.recipes = args.recipes.split(",")
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    kinds = DISTILL_KINDS[1:]
    unknown = [r for r in args.recipes if r not in kinds]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {kinds}")
    args.plans = resolve_plans(args.plans.split(","))  # fails before the teacher cache is built

    result = run(args)
    print()
    print(f"baseline {result['baseline_accuracy']:.1f}%")
    print(HEADER)
    for row in result["rows"]:
        print_row(row)
    print(f"wall time {result['wall_seconds']:.0f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
