"""Method parity: compress MiniLM with every seed plan of the shipped MiniLM studies (and a
few random plans per study) and print each plan's sha256 of weights and serialized bytes.

Run it on two versions of the code and compare the JSON: equal digests mean the same
bytes and therefore the same accuracy. Needs the MiniLM baseline in the cache (any
``slimsearch run`` of a MiniLM study builds it).

    .venv/bin/python benchmarks/method_parity.py --out parity.json
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
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from slimsearch.spaces import SearchSpace, compress, serialized_size, space_config_from_mapping, state_digest

STUDIES = ("minilm-sentiment", "minilm-size", "minilm-speed", "minilm-distill")
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


def baseline_folder() -> Path:
    root = Path.home() / ".cache" / "slimsearch" / "baselines"
    for folder in sorted(root.glob("*")):
        meta = folder / "slimsearch_baseline.json"
        if meta.is_file() and "minilm" in json.loads(meta.read_text()).get("source", ""):
            return folder
    raise SystemExit(f"no MiniLM baseline under {root}: run a MiniLM study once to build it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/method_parity.json")
    parser.add_argument("--random", type=int, default=3, help="random plans per study")
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = baseline_folder()
    base = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    rows = []
    for name in STUDIES:
        data = yaml.safe_load((Path(__file__).parents[1] / "studies" / f"{name}.yaml").read_text())
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
            rows.append(
                {
                    "study": name,
                    "plan": i,
                    "summary": plan.summary(),
                    "sha256": state_digest(model),
                    "bytes": serialized_size(model, applied),
                    "logits_sum": float(logits.double().sum()),
                    "compress_s": round(seconds, 3),
                }
            )
            digest, size = rows[-1]["sha256"][:12], rows[-1]["bytes"]
            print(f"{name:18s} {i:3d} {size:>11,d} {digest} {seconds:6.2f}s  {plan.summary()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
