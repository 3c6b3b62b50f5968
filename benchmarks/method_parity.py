"""Method parity: compress the real models with every seed plan of the shipped studies
(and a few random plans per study), optionally distil some, and print each result's sha256
of weights and serialized bytes.

Run it on two versions of the code and compare the JSON: equal digests mean the same
bytes and therefore the same accuracy. Needs the baselines in the cache (a run of each
study builds them).

    .venv/bin/python benchmarks/method_parity.py --out parity.json
    .venv/bin/python benchmarks/method_parity.py --studies smollm2-short,smollm2-perplexity --random 2
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from slimsearch.spaces import SearchSpace, compress, serialized_size, space_config_from_mapping, state_digest
from slimsearch.spaces.methods.distill import DistillRecipe, TeacherCache, distill

STUDIES = "minilm-sentiment,minilm-size,minilm-speed,minilm-distill"
SENTENCES = [
    "a gripping, beautifully shot film",
    "the plot never comes together",
    "an utter bore",
    "one of the best performances of the year",
    "it was fine, nothing more",
    "i laughed, i cried",
    "a mess from start to finish",
    "quietly moving and well acted",
]


def baseline_folder(source: str) -> Path:
    root = Path.home() / ".cache" / "slimsearch" / "baselines"
    for folder in sorted(root.glob("*")):
        meta = folder / "slimsearch_baseline.json"
        if meta.is_file() and json.loads(meta.read_text()).get("source") == source:
            return folder
    raise SystemExit(f"no {source} baseline under {root}: run a study of it once to build it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default=STUDIES)
    parser.add_argument("--out", default="benchmarks/results/method_parity.json")
    parser.add_argument("--random", type=int, default=3, help="random plans per study")
    parser.add_argument("--distill", type=int, default=0, help="plans per study also distilled (3 steps)")
    args = parser.parse_args()
    rows = []
    for name in args.studies.split(","):
        torch.manual_seed(0)
        data = yaml.safe_load((Path(__file__).parents[1] / "studies" / f"{name}.yaml").read_text())
        lm = data["task"]["kind"] == "causal-lm"
        folder = baseline_folder(data["model"]["source"])
        loader = AutoModelForCausalLM if lm else AutoModelForSequenceClassification
        base = loader.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        calibration = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
        batch = dict(calibration) | ({} if lm else {"labels": torch.arange(len(SENTENCES)) % 2})
        kind = "causal-lm" if lm else "classification"
        recipe = DistillRecipe(kind="logits", steps=3, batch_size=len(SENTENCES), learning_rate=1e-4)
        cache = TeacherCache.compute(base, [batch], "logits", kind) if args.distill else None
        space = SearchSpace(base, space_config_from_mapping(data["space"]))
        params = space.uniform_params()
        rng = random.Random(0)
        dists = space.distributions()
        for _ in range(args.random):
            params.append({k: rng.choice(d.choices) for k, d in dists.items()})  # type: ignore[attr-defined]
        for i, p in enumerate(params):
            plan = space.decode(p)
            model = copy.deepcopy(base)
            start = time.perf_counter()
            applied = compress(model, plan, calibration=calibration)
            seconds = time.perf_counter() - start
            with torch.no_grad():
                logits = model.eval()(**calibration).logits
            row = {
                "study": name,
                "plan": i,
                "summary": plan.summary(),
                "sha256": state_digest(model),
                "bytes": serialized_size(model, applied),
                "logits_sum": float(logits.double().sum()),
                "compress_s": round(seconds, 3),
            }
            if cache is not None and 0 < i <= args.distill:
                distill(model, cache, [batch], recipe, kind)
                row["distilled_sha256"] = state_digest(model)
            rows.append(row)
            digest, size = row["sha256"][:12], row["bytes"]
            print(f"{name:18s} {i:3d} {size:>11,d} {digest} {seconds:6.2f}s  {plan.summary()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
