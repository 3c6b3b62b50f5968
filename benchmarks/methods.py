"""Each compression method at a few settings against fp32, measured side by side in one run.

For every model and setting: build the compressed model from the fp32 baseline with
``apply_plan`` (calibrated on training text, never on the test data), then measure
- bytes: the safetensors file ``save_compressed`` would write (the size objective);
- quality: accuracy on the 1,000 test sentences (MiniLM) or perplexity on OANC blocks
  (SmolLM2, whose weights already carry Q4_1 rounding from its GGUF file);
- latency at batch 1, seq 64, 2 threads, interleaved pass by pass with the fp32 model
  (evaluators/latency.py), so both see the same machine; reported as a ratio with a 95%
  bootstrap interval.
Prints a table and writes JSON. No compressed model is fine-tuned here: structured pruning
numbers are one-shot, before any recovery training or distillation.

    .venv/bin/python benchmarks/methods.py [--quick] [--models minilm,smollm2] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimsearch.evaluators.base import LatencySpec
from slimsearch.evaluators.latency import environment, measure
from slimsearch.search import models, tasks
from slimsearch.search.study_file import StudySpec, load_study, study_from_mapping
from slimsearch.spaces import CompressionPlan, LayerSettings, StructuredSettings, apply_plan, serialized_size
from slimsearch.spaces.methods import max_useful_rank

BLOCKS = r"re:.*\b(layer|layers)\.\d+\..*"
TARGET_RATIO = 0.45  # MiniLM: structured 50% + int8 at or under this fraction of fp32 latency


def layers(**settings: Any) -> Callable[[nn.Module], CompressionPlan]:
    return lambda model: CompressionPlan(layers={BLOCKS: LayerSettings(**settings)})


def structured(heads: float, neurons: float, **settings: Any) -> Callable[[nn.Module], CompressionPlan]:
    def plan(model: nn.Module) -> CompressionPlan:
        block_layers = {BLOCKS: LayerSettings(**settings)} if settings else {}
        return CompressionPlan(layers=block_layers, structured={"re:.*": StructuredSettings(heads, neurons)})

    return plan


def lowrank(fraction: float) -> Callable[[nn.Module], CompressionPlan]:
    def plan(model: nn.Module) -> CompressionPlan:
        ranks = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layer" in name:
                limit = max_useful_rank(module.in_features, module.out_features)
                ranks[name] = LayerSettings(rank=max(1, int(fraction * limit)))
        return CompressionPlan(layers=ranks)

    return plan


def embeddings(bits: int) -> Callable[[nn.Module], CompressionPlan]:
    def plan(model: nn.Module) -> CompressionPlan:
        names = {id(m): n for n, m in model.named_modules()}
        table = model.get_input_embeddings()  # type: ignore[operator]
        return CompressionPlan(layers={names[id(table)]: LayerSettings(bits=bits)})

    return plan


SETTINGS: list[tuple[str, Callable[[nn.Module], CompressionPlan], bool]] = [
    # (name, plan, in --quick)
    ("bf16", layers(bits=16), True),
    ("int8", layers(bits=8), True),
    ("int4 (g64)", layers(bits=4), True),
    ("int2 (g64)", layers(bits=2), False),
    ("sparsity 0.5", layers(sparsity=0.5), True),
    ("sparsity 0.5 + int8", layers(sparsity=0.5, bits=8), False),
    ("low-rank 0.5", lowrank(0.5), False),
    ("embeddings int4", embeddings(4), False),
    ("heads 0.5", structured(0.5, 0.0), False),
    ("neurons 0.5", structured(0.0, 0.5), False),
    ("heads+neurons 0.25", structured(0.25, 0.25), False),
    ("heads+neurons 0.5", structured(0.5, 0.5), True),
    ("heads+neurons 0.5 + int8", structured(0.5, 0.5, bits=8), True),
]


def minilm_spec() -> StudySpec:
    return load_study(Path(__file__).resolve().parent.parent / "studies" / "minilm-sentiment.yaml")


def smollm2_spec() -> StudySpec:
    return study_from_mapping(
        {
            "name": "smollm2-perplexity",
            "model": {"source": "builtin:smollm2-135m"},
            "task": {
                "kind": "causal-lm",
                "data": "builtin:oanc",
                "block_size": 256,
                "eval_blocks": 8,
                "eval_batch_size": 4,
            },
            "objectives": ["perplexity", "size_bytes", "latency_ms"],
        }
    )


def data(spec: StudySpec, tokenizer: Any) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """Evaluation batches, and a calibration batch taken from outside the evaluation data."""
    task = spec.task
    if task.kind == "classification":
        splits = tasks.classification_splits(task, spec.cache)
        evals = tasks.classification_batches(tokenizer, splits.test, task.max_length, task.eval_batch_size)
        calib = tasks.classification_batches(tokenizer, splits.train[:32], task.max_length, 32)[0]
        return evals, {k: v for k, v in calib.items() if k != "labels"}
    text = tasks.lm_text(task, spec.cache)
    evals = tasks.lm_blocks(tokenizer, text, task.block_size, task.eval_blocks, task.eval_batch_size)
    after = text[task.block_size * task.eval_blocks * 8 :]  # lm_blocks reads at most this much
    calib = tasks.lm_blocks(tokenizer, after, task.block_size, 4, 4)[0]
    return evals, calib


@torch.no_grad()
def quality(model: nn.Module, kind: str, batches: list[dict[str, Tensor]]) -> float:
    if kind == "classification":
        correct = total = 0
        for b in batches:
            pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
            correct += int((pred == b["labels"]).sum())
            total += int(b["labels"].numel())
        return 100.0 * correct / total
    nll, count = 0.0, 0
    for b in batches:
        ids = b["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll += float(
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum")
        )
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def run_model(key: str, spec: StudySpec, quick: bool, latency: LatencySpec) -> dict[str, Any]:
    folder = models.prepare_baseline(spec)
    base, tokenizer = models.load_baseline(folder, spec.task.kind)
    evals, calib = data(spec, tokenizer)
    vocab = len(tokenizer)
    metric = "accuracy" if spec.task.kind == "classification" else "perplexity"
    torch.set_num_threads(latency.threads)
    fp32_bytes = serialized_size(base, CompressionPlan())
    rows: list[dict[str, Any]] = [
        {
            "setting": "fp32",
            metric: quality(base, spec.task.kind, evals),
            "bytes": fp32_bytes,
            "size_ratio": 1.0,
            "latency_ratio": 1.0,
            "realized": {},
        }
    ]
    print(f"[{key}] fp32: {rows[0][metric]:.2f} {metric}, {fp32_bytes / 1e6:.1f} MB", flush=True)
    for name, make_plan, in_quick in SETTINGS:
        if quick and not in_quick:
            continue
        plan = make_plan(base)
        started = time.monotonic()
        model = apply_plan(copy.deepcopy(base), plan, calibration=calib).eval()
        build_s = time.monotonic() - started
        size = serialized_size(model, plan)
        score = quality(model, spec.task.kind, evals)
        timing = measure(model, latency, vocab, reference=base)
        row = {
            "setting": name,
            "plan": json.loads(plan.to_json()),
            "realized": plan.realized(),
            metric: score,
            "bytes": size,
            "size_ratio": size / fp32_bytes,
            "latency_ms": timing["median_ms"],
            "fp32_latency_ms": timing["baseline_median_ms"],
            "latency_ratio": timing["ratio"],
            "latency_ratio_ci95": timing["ratio_ci95"],
            "noisy": timing["noisy"],
            "build_s": round(build_s, 2),
        }
        rows.append(row)
        print(
            f"[{key}] {name}: {score:.2f} {metric}, {size / 1e6:.2f} MB, latency x{row['latency_ratio']:.2f}",
            flush=True,
        )
        del model
    return {"model": key, "source": spec.model.source, "metric": metric, "rows": rows}


def table(result: dict[str, Any]) -> str:
    metric = result["metric"]
    lines = [
        f"{result['model']} ({result['source']})",
        f"{'setting':<26} {metric:>10} {'MB':>7} {'size x':>7} {'latency x':>10} {'95% CI':>13}  realized",
    ]
    for r in result["rows"]:
        ci = r.get("latency_ratio_ci95")
        ci_text = f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else ""
        realized = ", ".join(sorted(set(r["realized"].values()))) or "-"
        lines.append(
            f"{r['setting']:<26} {r[metric]:>10.2f} {r['bytes'] / 1e6:>7.2f} {r['size_ratio']:>7.3f} "
            f"{r['latency_ratio']:>10.3f} {ci_text:>13}  {realized}{' (noisy)' if r.get('noisy') else ''}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default="minilm", help="comma-separated: minilm, smollm2")
    parser.add_argument("--quick", action="store_true", help="fewer settings (a couple of minutes)")
    parser.add_argument("--out", default="benchmarks/results/methods.json", help="where to write the JSON")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    specs = {"minilm": minilm_spec, "smollm2": smollm2_spec}
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in specs]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(specs)}")
    latency = LatencySpec(batch_size=1, seq_len=64, warmup=10, repeats=args.repeats, threads=args.threads)
    results = [run_model(m, specs[m](), args.quick, latency) for m in chosen]
    report: dict[str, Any] = {
        "latency": {"batch_size": 1, "seq_len": 64, "threads": args.threads, "repeats": args.repeats},
        "environment": environment(latency) | {"python": platform.python_version()},
        "results": results,
    }
    for result in results:
        print()
        print(table(result))
        if result["model"] == "minilm":
            target = next((r for r in result["rows"] if r["setting"] == "heads+neurons 0.5 + int8"), None)
            if target is not None:
                ok = target["latency_ratio"] <= TARGET_RATIO
                report["minilm_target"] = {
                    "ratio": target["latency_ratio"],
                    "target": TARGET_RATIO,
                    "met": ok,
                }
                print(
                    f"target: heads+neurons 0.5 + int8 at x{target['latency_ratio']:.3f} fp32 latency "
                    f"({'meets' if ok else 'misses'} <= {TARGET_RATIO})"
                )
    int8 = [r for res in results for r in res["rows"] if r["setting"] == "int8"]
    if int8:
        print("int8 faster than fp32: " + ", ".join(f"x{r['latency_ratio']:.2f}" for r in int8))
        report["int8_speedup"] = [1.0 / r["latency_ratio"] for r in int8]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
