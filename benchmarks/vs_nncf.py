"""slimsearch's quantization and pruning methods against NNCF's ``compress_weights``, in one run.

On identical data, in one process: SmolLM2-135M perplexity on its study's 16 x 256 OANC
evaluation tokens (studies/smollm2-perplexity.yaml) and MiniLM accuracy on the 1,000 test
sentences (studies/minilm-size.yaml). Only the Linears of the Transformer blocks are
compressed, by every method here; embeddings and the LM head stay fp32. Every method that
reads data calibrates on the same training rows (never the evaluation data): ``--calib``
blocks of 256 tokens for SmolLM2, 128 training sentences for MiniLM.

Columns: method, bits/group, bytes (of the whole model as stored), quality, build seconds.
slimsearch's bytes are the safetensors file ``save_compressed`` writes; NNCF's are the bytes
of its compressed model's state (packed codes, scales and zero points, de-duplicated). SmolLM2
arrives as a Q4_1 GGUF file (blocks of 32 with a scale and a minimum), so min-max 4-bit at
group 32 reproduces its weights exactly: 4-bit methods are compared at groups 64 and 128.

NNCF is an optional benchmark extra (``pip install -e '.[bench]'``), never a runtime
dependency; without it the NNCF rows are skipped and the table says so.

    .venv/bin/python benchmarks/vs_nncf.py [--models smollm2,minilm] [--only REGEX] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from methods import quality  # benchmarks/methods.py: accuracy or perplexity, the same way
from torch import Tensor, nn

from slimsearch.search import models, tasks
from slimsearch.search.study_file import StudySpec, load_study
from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan, serialized_size
from slimsearch.spaces.apply import needs
from slimsearch.spaces.methods import max_useful_rank
from slimsearch.spaces.methods.calibration import capture

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = {"smollm2": r"re:model\.layers\.\d+\..*", "minilm": r"re:.*\.layer\.\d+\..*"}
STUDIES = {"smollm2": "smollm2-perplexity.yaml", "minilm": "minilm-size.yaml"}

Plan = Callable[[nn.Module], CompressionPlan]


def ours(pattern: str, **settings: Any) -> Plan:
    return lambda model: CompressionPlan(layers={pattern: LayerSettings(**settings)})


def lowrank(pattern: str, fraction: float, **settings: Any) -> Plan:
    regex = re.compile(pattern[3:])

    def plan(model: nn.Module) -> CompressionPlan:
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and regex.fullmatch(name):
                rank = max(1, int(fraction * max_useful_rank(module.in_features, module.out_features)))
                layers[name] = LayerSettings(rank=rank, **settings)
        return CompressionPlan(layers=layers)

    return plan


# The MLP up projections (SmolLM2) / intermediate dense layers (MiniLM) of every block.
UP = {
    BLOCKS["smollm2"]: r"re:model\.layers\.\d+\.mlp\.up_proj",
    BLOCKS["minilm"]: r"re:.*\.layer\.\d+\.intermediate\.dense",
}


def one_layer(pattern: str, **settings: Any) -> Plan:
    """``settings`` on the middle block's up projection only."""
    regex = re.compile(UP[pattern][3:])

    def plan(model: nn.Module) -> CompressionPlan:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and regex.fullmatch(n)]
        return CompressionPlan(layers={names[len(names) // 2]: LayerSettings(**settings)})

    return plan


# (name, bits/group, plan); "rtn-minmax" and "nncf ..." rows are built apart (see run_model).
def settings(pattern: str) -> list[tuple[str, str, Plan]]:
    o = lambda **s: ours(pattern, **s)  # noqa: E731
    return [
        ("bf16", "16", o(bits=16)),
        ("int8 W8A8 (dynamic activations)", "8/row", o(bits=8)),
        ("int8 weight-only", "8/row", o(bits=8, weight_only=True)),
        ("int8 weight-only + gptq", "8/row", o(bits=8, weight_only=True, gptq=True)),
        ("4-bit least squares", "4/g64", o(bits=4)),
        ("4-bit least squares", "4/g128", o(bits=4, group=128)),
        ("4-bit awq", "4/g64", o(bits=4, awq=True)),
        ("4-bit gptq", "4/g64", o(bits=4, gptq=True)),
        ("4-bit awq + gptq", "4/g64", o(bits=4, awq=True, gptq=True)),
        ("4-bit gptq", "4/g128", o(bits=4, group=128, gptq=True)),
        ("4-bit awq + gptq", "4/g128", o(bits=4, group=128, awq=True, gptq=True)),
        ("3-bit least squares", "3/g64", o(bits=3)),
        ("3-bit gptq", "3/g64", o(bits=3, gptq=True)),
        ("3-bit awq + gptq", "3/g64", o(bits=3, awq=True, gptq=True)),
        ("3-bit gptq, no act-order", "3/g64", o(bits=3, gptq="act_order=0")),
        ("3-bit gptq, weighted fit", "3/g64", o(bits=3, gptq="weighted=1")),
        ("3-bit gptq, weighted fit, no act-order", "3/g64", o(bits=3, gptq="act_order=0,weighted=1")),
        ("4-bit gptq, weighted fit", "4/g64", o(bits=4, gptq="weighted=1")),
        ("4-bit gptq, weighted fit", "4/g128", o(bits=4, group=128, gptq="weighted=1")),
        ("4-bit least squares, integer zero", "4/g64", o(bits=4, integer_zero=True)),
        ("4-bit gptq, weighted fit, integer zero", "4/g64", o(bits=4, integer_zero=True, gptq="weighted=1")),
        ("3-bit awq + gptq, weighted fit", "3/g64", o(bits=3, awq=True, gptq="weighted=1")),
        ("4-bit awq + gptq, weighted fit", "4/g64", o(bits=4, awq=True, gptq="weighted=1")),
        ("4-bit awq + gptq, weighted fit", "4/g128", o(bits=4, group=128, awq=True, gptq="weighted=1")),
        ("3-bit gptq", "3/g32", o(bits=3, group=32, gptq=True)),
        ("3-bit gptq, weighted fit, damp 0.05", "3/g64", o(bits=3, gptq="damp=0.05,weighted=1")),
        ("3-bit gptq, weighted fit, damp 0.1", "3/g64", o(bits=3, gptq="damp=0.1,weighted=1")),
        ("2-bit least squares", "2/g64", o(bits=2)),
        ("2-bit gptq", "2/g64", o(bits=2, gptq=True)),
        ("2-bit awq + gptq", "2/g32", o(bits=2, group=32, awq=True, gptq=True)),
        # 2 bits as a per-layer choice: one middle MLP layer, or every up projection, the rest fp32.
        ("2-bit on one layer (rtn)", "2/g64", one_layer(pattern, bits=2)),
        ("2-bit on one layer (awq + gptq)", "2/g64", one_layer(pattern, bits=2, awq=True, gptq=True)),
        ("2-bit on every up_proj (rtn)", "2/g64", ours(UP[pattern], bits=2)),
        ("2-bit on every up_proj (awq + gptq)", "2/g64", ours(UP[pattern], bits=2, awq=True, gptq=True)),
        ("magnitude 50%", "32", o(sparsity=0.5)),
        ("wanda 50%", "32", o(wanda=0.5)),
        ("sparsegpt 50%", "32", o(sparsegpt=0.5)),
        ("wanda 2:4", "32", o(wanda="2:4")),
        ("sparsegpt 2:4", "32", o(sparsegpt="2:4")),
        ("sparsegpt 50% + 4-bit gptq", "4/g64", o(sparsegpt=0.5, bits=4, gptq=True)),
        ("low-rank 0.5 (svd)", "32", lowrank(pattern, 0.5)),
        ("low-rank 0.5 (whitened svd)", "32", lowrank(pattern, 0.5, whiten=True)),
    ]


def data(model_key: str, spec: StudySpec, tokenizer: Any, calib: int) -> tuple[list[Any], list[Any]]:
    task = spec.task
    if task.kind == "classification":
        splits = tasks.classification_splits(task, spec.cache)
        evals = tasks.classification_batches(tokenizer, splits.test, task.max_length, task.eval_batch_size)
        rows = splits.train[: 32 * calib]
        cal = tasks.classification_batches(tokenizer, rows, task.max_length, 32)
        return evals, [{k: v for k, v in b.items() if k != "labels"} for b in cal]
    text = tasks.lm_text(task, spec.cache)
    evals = tasks.lm_blocks(tokenizer, text, task.block_size, task.eval_blocks, task.eval_batch_size)
    train = tasks.lm_train_text(task, spec.cache)
    cal = tasks.lm_blocks(tokenizer, train, task.block_size, calib, 4)
    return evals, cal


def minmax_rtn(model: nn.Module, pattern: str, bits: int = 4, group: int = 64) -> nn.Module:
    """Plain round-to-nearest with min-max group scales (the textbook baseline), in place."""
    regex = re.compile(pattern[3:])
    levels = 2**bits - 1
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and regex.fullmatch(name):
            parts = []
            for g in module.weight.detach().split(group, dim=1):  # the last group may be short
                low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                scale = ((high - low) / levels).clamp_min(1e-12)
                parts.append(torch.round((g - low) / scale).clamp(0, levels) * scale + low)
            module.weight.data = torch.cat(parts, dim=1)
    return model


def state_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += tensor.untyped_storage().nbytes()
    return total


def nncf_rows() -> list[tuple[str, str, dict[str, Any]]]:
    # NNCF 3.4's torch backend refuses gptq=True, so it has no GPTQ row. At group 128 it
    # refuses SmolLM2's 576-column layers unless told to adjust their group (to 64 there).
    return [
        ("nncf data-free", "4/g64", {"group_size": 64}),
        ("nncf data-free", "4/g128", {"group_size": 128}),
        ("nncf awq + scale estimation", "4/g64", {"group_size": 64, "awq": True, "scale_estimation": True}),
        ("nncf awq + scale estimation", "4/g128", {"group_size": 128, "awq": True, "scale_estimation": True}),
        ("nncf ratio 0.8 int4/int8", "4+8/g64", {"group_size": 64, "ratio": 0.8}),
        (
            "nncf ratio 0.8 + awq + scale est.",
            "4+8/g64",
            {"group_size": 64, "ratio": 0.8, "awq": True, "scale_estimation": True},
        ),
    ]


def run_nncf(
    base: nn.Module, kwargs: dict[str, Any], calib: list[dict[str, Tensor]], skip: list[str]
) -> nn.Module:
    import nncf

    model = copy.deepcopy(base)
    # NNCF's graph names a module's weight by its path with "/" or "." separators: ignore the
    # embedding table (tied with the LM head) and every Linear outside the blocks.
    ignored = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)] + skip
    patterns = [".*" + re.escape(n).replace(r"\.", "[./]") + "([./].*)?$" for n in ignored]
    dataset = nncf.Dataset(calib)
    extra = dict(kwargs)
    ratio = extra.pop("ratio", 1.0)
    if extra.get("group_size") == 128:
        from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

        extra["advanced_parameters"] = AdvancedCompressionParameters(
            group_size_fallback_mode=GroupSizeFallbackMode.ADJUST
        )
    return nncf.compress_weights(
        model,
        mode=nncf.CompressWeightsMode.INT4_ASYM,
        ratio=ratio,
        all_layers=True,
        ignored_scope=nncf.IgnoredScope(patterns=patterns, validate=False),
        dataset=dataset,
        backup_mode=nncf.BackupMode.INT8_ASYM,
        **extra,
    )


def run_model(
    key: str,
    calib_blocks: int,
    only: re.Pattern[str] | None,
    with_nncf: bool,
    checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    spec = load_study(ROOT / "studies" / STUDIES[key])
    pattern = BLOCKS[key]
    folder = models.prepare_baseline(spec)
    base, tokenizer = models.load_baseline(folder, spec.task.kind)
    base.eval()
    evals, calib = data(key, spec, tokenizer, calib_blocks)
    kind = spec.task.kind
    metric = "accuracy" if kind == "classification" else "perplexity"
    torch.set_num_threads(2)
    fp32_bytes = serialized_size(base, CompressionPlan())
    fp32 = quality(base, kind, evals)
    rows: list[dict[str, Any]] = [
        {"method": "fp32", "config": "32", "bytes": fp32_bytes, metric: fp32, "build_s": 0.0}
    ]
    print(f"[{key}] fp32 {metric} {fp32:.2f}, {fp32_bytes / 1e6:.2f} MB", flush=True)
    started = time.monotonic()
    stats = capture(base, calib, {"act_sq", "hessian"})
    capture_s = time.monotonic() - started
    tokens = stats.tokens
    print(f"[{key}] calibration: {tokens} tokens, statistics in {capture_s:.1f} s", flush=True)

    def add(name: str, config: str, build: Callable[[], tuple[nn.Module, int]]) -> None:
        add_row(name, config, build)
        if checkpoint is not None:
            checkpoint(rows)  # a stopped run keeps every row it measured

    def add_row(name: str, config: str, build: Callable[[], tuple[nn.Module, int]]) -> None:
        label = f"{name} {config}"
        if only is not None and not only.search(label):
            return
        t0 = time.monotonic()
        try:
            model, size = build()
        except Exception as exc:  # a peer's failure is a row, not the end of the run
            print(f"[{key}] {label}: failed ({type(exc).__name__}: {exc})", flush=True)
            rows.append({"method": name, "config": config, "error": f"{type(exc).__name__}: {exc}"})
            return
        build_s = time.monotonic() - t0
        score = quality(model.eval(), kind, evals)
        change = (score / fp32 - 1) * 100 if kind != "classification" else score - fp32
        rows.append(
            {
                "method": name,
                "config": config,
                "bytes": size,
                metric: score,
                "change": change,
                "build_s": build_s,
            }
        )
        unit = "%" if kind != "classification" else " points"
        print(
            f"[{key}] {label}: {metric} {score:.2f} ({change:+.1f}{unit}), {size / 1e6:.2f} MB, "
            f"built in {build_s:.1f} s",
            flush=True,
        )

    for name, config, make in settings(pattern):

        def build(make: Plan = make) -> tuple[nn.Module, int]:
            plan = make(base)
            model = apply_plan(copy.deepcopy(base), plan, stats=stats if needs(plan) else None)
            return model, serialized_size(model, plan)

        add(name, config, build)
    rtn_bytes = next((r["bytes"] for r in rows if r["config"] == "4/g64" and "bytes" in r), None)
    for group in (64, 128):

        def rtn(group: int = group) -> tuple[nn.Module, int]:
            model = minmax_rtn(copy.deepcopy(base), pattern, 4, group)
            same = ours(pattern, bits=4, **({} if group == 64 else {"group": group}))(base)
            return model, serialized_size(apply_plan(copy.deepcopy(base), same), same)

        add("round-to-nearest min-max", f"4/g{group}", rtn)
    _ = rtn_bytes
    if with_nncf:
        try:
            import nncf  # noqa: F401
        except ImportError:
            print(
                f"[{key}] NNCF is not installed (pip install -e '.[bench]'): its rows are skipped", flush=True
            )
            with_nncf = False
    if with_nncf:
        head = [
            n
            for n, m in base.named_modules()
            if isinstance(m, nn.Linear) and not re.fullmatch(pattern[3:], n)
        ]
        for name, config, kwargs in nncf_rows():

            def peer(kwargs: dict[str, Any] = kwargs) -> tuple[nn.Module, int]:
                model = run_nncf(base, kwargs, calib, head)
                return model, state_bytes(model)

            add(name, config, peer)
    return {
        "model": key,
        "study": STUDIES[key],
        "metric": metric,
        "calibration_tokens": tokens,
        "statistics_s": capture_s,
        "nncf": with_nncf,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    metric = result["metric"]
    unit = "%" if metric == "perplexity" else "pt"
    lines = [
        f"{result['model']} ({result['study']}; calibration {result['calibration_tokens']} tokens)",
        f"{'method':<36} {'bits/group':>10} {'MB':>8} {metric:>11} {'change':>9} {'build s':>8}",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['method']:<36} {r['config']:>10}  failed: {r['error'][:60]}")
            continue
        change = f"{r.get('change', 0.0):+.1f}{unit}"
        lines.append(
            f"{r['method']:<36} {r['config']:>10} {r['bytes'] / 1e6:>8.2f} {r[metric]:>11.2f} {change:>9} "
            f"{r['build_s']:>8.1f}"
        )
    if not result["nncf"]:
        lines.append("(NNCF not installed: no NNCF rows; pip install -e '.[bench]')")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", default="smollm2,minilm", help="comma-separated: smollm2, minilm")
    parser.add_argument("--calib", type=int, default=16, help="calibration blocks (LM) / batches of 32 rows")
    parser.add_argument("--only", default=None, help="regex: run only the rows whose 'method config' matches")
    parser.add_argument("--no-nncf", action="store_true", help="skip the NNCF rows")
    parser.add_argument("--out", default="benchmarks/results/vs_nncf.json")
    args = parser.parse_args()
    only = re.compile(args.only) if args.only else None
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in STUDIES]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {sorted(STUDIES)}")
    started = time.monotonic()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []

    def checkpoint(model: str) -> Callable[[list[dict[str, Any]]], None]:
        def write(rows: list[dict[str, Any]]) -> None:
            partial = [*results, {"model": model, "rows": rows, "partial": True}]
            out.write_text(json.dumps({"calib": args.calib, "results": partial}, indent=2))

        return write

    for m in chosen:
        results.append(run_model(m, args.calib, only, not args.no_nncf, checkpoint(m)))
    wall = time.monotonic() - started
    for result in results:
        print()
        print(table(result))
    print(f"\nwall time {wall / 60:.1f} min")
    out.write_text(json.dumps({"wall_s": wall, "calib": args.calib, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
