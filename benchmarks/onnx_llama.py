"""SmolLM2 decoding in ONNX Runtime with its blocks exported as transformers traces them, and
in the export form ``spaces.onnx_llama`` writes (constant reshapes, ORT's rotary operator,
key/value heads shared by broadcasting, q/k/v and gate/up as one operator each), side by side
in one process.

fp32 and the 4-bit ``integer_zero`` plan (table int8), each exported both ways with its KV
cache; a 64-token prompt, then ms per greedy token over ``--tokens`` tokens, median of
``--passes`` passes, the four sessions alternating. Also the number of graph nodes ORT runs
after its optimizations. SmolLM2's weights come from a Q4_1 GGUF file, so 4-bit is at group 64.

    .venv/bin/python benchmarks/onnx_llama.py [--threads 2] [--passes 6] [--tokens 32] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from methods import smollm2_spec  # benchmarks/methods.py
from onnx_minilm import baseline, plan_for, write  # benchmarks/onnx_minilm.py
from onnx_smollm2 import BLOCKS, PLANS  # benchmarks/onnx_smollm2.py
from onnx_threads import decode_passes, decode_run  # benchmarks/onnx_threads.py

from slimsearch.spaces import apply_plan, onnx_llama
from slimsearch.spaces.onnx import export_onnx, session

ROOT = Path(__file__).resolve().parent.parent
INT4 = "4-bit g64, integer_zero + table int8"
FORMS = ("transformers", "export form")


def optimized_nodes(path: Path, threads: int) -> int:
    """Nodes of the graph ORT runs (after all its optimizations)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return len(onnx.load(options.optimized_model_filepath).graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=6, help="decode passes per model")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_llama.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        lm, batches, vocab, _ = baseline(smollm2_spec(), "causal-lm", args.threads, 20.0)
        ids = batches[0]["input_ids"][:1, :64].numpy()
        models = {"fp32": lm, "int4": apply_plan(copy.deepcopy(lm), plan_for(lm, PLANS[INT4], BLOCKS)).eval()}
        paths: dict[tuple[str, str], Path] = {}
        supported = onnx_llama.SUPPORTED
        for form in FORMS:
            # An empty set of supported classes exports every block as transformers traces it.
            onnx_llama.SUPPORTED = supported if form == "export form" else frozenset()
            try:
                for name, model in models.items():
                    paths[(name, form)] = Path(tmp) / f"{name}-{form.replace(' ', '-')}.onnx"
                    export_onnx(model, paths[(name, form)], vocab, kv_cache=True)
            finally:
                onnx_llama.SUPPORTED = supported
        del lm, models
        nodes = {key: optimized_nodes(path, args.threads) for key, path in paths.items()}
        sessions = {key: session(path, args.threads) for key, path in paths.items()}
        times = decode_passes(sessions, ids, args.tokens, args.passes)
    rows: list[dict[str, Any]] = []
    for form in FORMS:
        fp32, int4 = (float(np.median(times[(m, form)])) for m in ("fp32", "int4"))
        rows.append(
            {
                "blocks": form,
                "nodes_fp32": nodes[("fp32", form)],
                "nodes_int4": nodes[("int4", form)],
                "decode_ms_fp32": fp32,
                "decode_ms_int4": int4,
                "decode_speedup": fp32 / int4,
                "passes_ms_fp32": times[("fp32", form)],
                "passes_ms_int4": times[("int4", form)],
            }
        )
    result = {**decode_run(args.threads, args.tokens, args.passes), "rows": rows}
    write(result, Path(args.out), table(result))


def table(result: dict[str, Any]) -> str:
    lines = [
        "| blocks exported | nodes ORT runs (fp32 / 4-bit) | decode fp32 ms/token "
        "| decode 4-bit ms/token | 4-bit vs fp32 |",
        "|---" * 5 + "|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['blocks']} | {r['nodes_fp32']} / {r['nodes_int4']} | {r['decode_ms_fp32']:.2f} | "
            f"{r['decode_ms_int4']:.2f} | {r['decode_speedup']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
