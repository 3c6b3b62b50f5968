"""What a trial costs as the model grows: randomly initialised Llama-shaped models of the
sizes of SmolLM2-135M, SmolLM2-360M and Llama-3.2-1B (random weights, so quality numbers
mean nothing; cost is what is measured), on this machine's CPU.

For each size: building the model, capturing calibration statistics (activation norms, what
AWQ / Wanda read) on 2 blocks of 256 tokens, filling the layer store with every block
Linear at 4 bits in groups of 64 (cold: computed and written), and one trial from the warm
store (copy, assemble, perplexity on 4 blocks of 256 tokens). Prints a table, writes JSON.
With ``--device cuda`` the trial's model is moved to the GPU and evaluated there, as a study
with ``device: cuda`` does; calibration and compression stay on the CPU, as they do in a study.

    .venv/bin/python benchmarks/scale.py                    # 135m,360m,1b
    .venv/bin/python benchmarks/scale.py --sizes 135m
    .venv/bin/python benchmarks/scale.py --device cuda --out benchmarks/results/scale_cuda.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from slimsearch.evaluators import EvalContext, Perplexity
from slimsearch.evaluators.device import check_device, gpu_environment, parse_device, synchronize
from slimsearch.spaces import CompressionPlan, LayerSettings, compress
from slimsearch.spaces.methods.calibration import capture
from slimsearch.spaces.space import DEFAULT_LAYERS
from slimsearch.spaces.store import LayerStore

SHAPES: dict[str, dict[str, Any]] = {
    "135m": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "360m": dict(
        hidden_size=960,
        num_hidden_layers=32,
        num_attention_heads=15,
        num_key_value_heads=5,
        intermediate_size=2560,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}
BLOCK = 256


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(size: str, threads: int, device: torch.device) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=2048, **SHAPES[size])
    build_s, model = _timed(lambda: LlamaForCausalLM(config).eval())
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calibration = {"input_ids": torch.randint(0, config.vocab_size, (2, BLOCK), generator=g)}
    evaluation = [
        {"input_ids": torch.randint(0, config.vocab_size, (1, BLOCK), generator=g)} for _ in range(4)
    ]
    with torch.no_grad():
        calib_s, stats = _timed(lambda: capture(model, [calibration], {"act_sq"}))
    plan = CompressionPlan(layers={DEFAULT_LAYERS: LayerSettings(bits=4, group=64)})
    with tempfile.TemporaryDirectory() as folder:
        store = LayerStore(folder, 64 << 30)
        fill_s, _ = _timed(lambda: compress(copy.deepcopy(model), plan, stats=stats, store=store))
        store_bytes = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())

        def assemble() -> torch.nn.Module:
            candidate = copy.deepcopy(model)
            compress(candidate, plan, stats=stats, store=store)
            return candidate.eval()

        def evaluate(candidate: torch.nn.Module) -> float:
            candidate = candidate.to(device)
            context = EvalContext(
                task="causal-lm", batches=evaluation, vocab_size=config.vocab_size, plan=plan
            )
            value = Perplexity().evaluate(candidate, context)
            synchronize(device)
            return value

        assemble_s, candidate = _timed(assemble)
        evaluate_s, _ = _timed(partial(evaluate, candidate))
    return {
        "size": size,
        "parameters": params,
        "build_s": round(build_s, 2),
        "calibration_s": round(calib_s, 2),
        "store_fill_s": round(fill_s, 2),
        "store_bytes": store_bytes,
        "trial_warm_store_s": round(assemble_s + evaluate_s, 2),
        "assemble_s": round(assemble_s, 2),
        "evaluate_s": round(evaluate_s, 2),
        "device": str(device),
        "threads": threads,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="135m,360m,1b")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="where each trial is evaluated: cpu, cuda, cuda:N")
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; choose from {list(SHAPES)}")
    try:
        check_device(parse_device(args.device, "--device"), "--device")
    except ValueError as exc:
        parser.error(str(exc))
    device = torch.device(parse_device(args.device))
    torch.set_num_threads(args.threads)
    rows = []
    for size in sizes:
        rows.append(measure(size, args.threads, device))
        print(json.dumps(rows[-1]), flush=True)
    head = [
        "size",
        "parameters",
        "build_s",
        "calibration_s",
        "store_fill_s",
        "trial_warm_store_s",
        "assemble_s",
        "evaluate_s",
        "peak_rss_gib",
    ]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in head) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"machine": platform.processor() or platform.machine(), "device": str(device), "rows": rows}
            | gpu_environment(device),
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
