"""Trial cost with and without the layer store, on the real models.

For each study, a few of its uniform seeds and random plans: the seconds to build the
trial's model (compress only) without the store, with an empty store (compute and write),
and with a warm store (read), then whole trials (build, evaluation, latency) without the
store and with the warm store, run in alternation so host noise hits both alike. Prints a
table, writes JSON, and reports the store's size on disk.

    .venv/bin/python benchmarks/trial_cost.py                   # MiniLM and SmolLM2
    .venv/bin/python benchmarks/trial_cost.py --studies minilm-size --trials 2
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from slimsearch.search import models, worker
from slimsearch.search.study_file import load_study
from slimsearch.spaces import SearchSpace
from slimsearch.spaces.store import DEFAULT_MAX_BYTES, LayerStore

ROOT = Path(__file__).parents[1]


def _seconds(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", default="minilm-size,smollm2-short")
    parser.add_argument("--plans", type=int, default=6, help="plans whose build is timed")
    parser.add_argument("--trials", type=int, default=3, help="of those, plans whose whole trial is timed")
    parser.add_argument("--out", default="benchmarks/results/trial_cost.json")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    for name in args.studies.split(","):
        spec = load_study(ROOT / "studies" / f"{name}.yaml")
        torch.set_num_threads(spec.latency.threads)
        baseline_dir = models.prepare_baseline(spec)
        store_dir = Path(tempfile.mkdtemp(prefix="layer-store-"))
        base_job = worker.TrialJob(
            0,
            "{}",
            str(baseline_dir),
            str(spec.cache),
            spec.task,
            spec.objectives,
            spec.latency,
            layer_store_bytes=None,
        )
        base, _ = worker.cached_baseline(base_job)
        worker.job_data(base_job).test_batches()  # data loading is not a trial's cost
        space = SearchSpace(base, spec.space)
        params = space.uniform_params()[1:]
        rng = random.Random(0)
        dists = space.distributions()
        mixed = [{k: rng.choice(d.choices) for k, d in dists.items()} for _ in range(2)]  # type: ignore[attr-defined]
        chosen = [*params[: max(0, args.plans - len(mixed))], *mixed]
        for i, p in enumerate(chosen):
            plan = space.decode(p)
            job = replace(base_job, number=i, plan_json=plan.to_json())
            stored = replace(job, cache_dir=str(store_dir), layer_store_bytes=DEFAULT_MAX_BYTES)
            # Statistics and calibration data are cached per worker: warm them for both alike.
            worker.build_model(job)
            off = _seconds(lambda job=job: worker.build_model(job))
            cold = _seconds(lambda s=stored: worker.build_model(s))
            warm = _seconds(lambda s=stored: worker.build_model(s))
            row: dict[str, Any] = {
                "study": name,
                "plan": plan.summary(),
                "build_s": off,
                "store_cold_s": cold,
                "store_warm_s": warm,
            }
            if i >= len(chosen) - args.trials:
                row["trial_s"] = _seconds(lambda job=job: worker.run_trial(job))
                row["trial_store_s"] = _seconds(lambda s=stored: worker.run_trial(s))
            rows.append(row)
            trial = f"{row.get('trial_s', float('nan')):7.1f} {row.get('trial_store_s', float('nan')):7.1f}"
            timing = f"build {off:6.2f}s  store cold {cold:6.2f}s warm {warm:6.2f}s  trial {trial}"
            print(f"{name:14s} {timing}  {plan.summary()[:60]}")
        sizes[name] = LayerStore(store_dir / "layers").size_bytes()
        print(f"{name}: layer store {sizes[name] / 1e6:.1f} MB for {len(chosen)} plans")
        shutil.rmtree(store_dir, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "store_bytes": sizes}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
