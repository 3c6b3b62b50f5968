"""Is a cheap first look at a causal-LM trial a good guide to its full perplexity?

For N plans of a causal-LM study (its uniform seeds, mixes of 4-bit and 16-bit layers near a
limit, and random plans of its space; seeded),
in one process: build the plan's model once, then
- the screen: KL divergence of its next-token distribution from the baseline's, and its
  perplexity ratio with a lower confidence bound, on the first ``--tokens`` tokens of the
  evaluation text (the baseline's log-probabilities computed once);
- the full perplexity on all of the study's evaluation blocks.
It reports Spearman's rank correlation of KL and of the screen's ratio with the full
perplexity, which plans the screen would reject (and whether any of them was in fact within
the study's limit: a false rejection), and the time of the screen against the full score.

    .venv/bin/python benchmarks/lm_fidelity.py                       # smollm2-short, 24 plans
    .venv/bin/python benchmarks/lm_fidelity.py --plans 24 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimsearch.evaluators.quality import Perplexity
from slimsearch.search import constraints, models, worker
from slimsearch.search.jobs import Jobs
from slimsearch.search.log import fmt_seconds, say
from slimsearch.search.study_file import ScreeningSpec, load_study
from slimsearch.spaces import CompressionPlan, SearchSpace

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "studies" / "smollm2-short.yaml"
RESULTS = ROOT / "benchmarks" / "results"


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x: Sequence[float]) -> np.ndarray:
        values = np.asarray(x, dtype=float)
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values), dtype=float)
        for v in np.unique(values):  # ties share their mean rank
            tied = values == v
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def plan_params(space: SearchSpace, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` distinct plans: a third the space's uniform seeds (all int8, all 4-bit...);
    a third mixes near a perplexity limit (each bit-width knob 4 bits with a probability
    drawn from 0.05-0.6, else its most precise compressed width); the rest random plans of
    the space, which are mostly far past any limit."""
    dists = space.distributions()
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []

    def add(params: dict[str, Any]) -> None:
        if params not in out:
            out.append(params)

    for params in space.uniform_params()[: count // 3]:
        add(dict(params))
    off = space.uniform_params()[0]
    bits = [n for n, d in dists.items() if n.endswith(":bits") and 4 in d.choices]  # type: ignore[attr-defined]
    while len(out) < 2 * count // 3:
        share = rng.uniform(0.05, 0.6)
        params = dict(off)
        for name in bits:
            choices = [c for c in dists[name].choices if c not in (4, 32)]  # type: ignore[attr-defined]
            params[name] = 4 if rng.random() < share else max(choices, default=32)
        add(params)
    while len(out) < count:
        add({name: rng.choice(list(d.choices)) for name, d in dists.items()})  # type: ignore[attr-defined]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--study", type=Path, default=STUDY)
    parser.add_argument("--plans", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=256, help="tokens the screen scores (whole blocks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "lm_fidelity.json")
    args = parser.parse_args(argv)
    if args.plans < 3:
        parser.error(f"--plans {args.plans}: give at least 3 for a rank correlation")
    started = time.monotonic()
    torch.set_num_threads(args.threads)
    spec = load_study(args.study)
    if spec.task.kind != "causal-lm":
        parser.error(
            f"--study {args.study}: task.kind is {spec.task.kind!r}; this benchmark needs a causal LM"
        )
    spec = replace(spec, screening=ScreeningSpec(tokens=args.tokens))
    limit = constraints.limit_on(spec.constraints, "perplexity", "max_ratio")
    if limit is None:
        parser.error(f"--study {args.study}: give it a max_perplexity_ratio constraint for the screen")
    baseline_dir = models.prepare_baseline(spec)
    model, _ = models.load_baseline(baseline_dir, spec.task.kind, spec.model.trust_remote_code)
    space = SearchSpace(model, spec.space)
    del model
    jobs = Jobs(spec, baseline_dir)
    probe = jobs.job(-1, CompressionPlan())
    reference = worker.cached_baseline(probe)[0]
    data = worker.job_data(probe)
    context = worker.EvalContext(
        task="causal-lm", batches=data.test_batches(), vocab_size=0, plan=CompressionPlan()
    )
    base_ppl = Perplexity().evaluate(reference, context)
    jobs.baseline = {"perplexity": base_ppl}
    rows: list[dict[str, Any]] = []
    tokens = 0
    for i, params in enumerate(plan_params(space, args.plans, args.seed)):
        plan = space.decode(params)
        job = jobs.job(i, plan)
        assert job.screen is not None and job.screen.blocks > 0
        ids = worker.screen_blocks(data, job.screen.blocks)
        t0 = time.monotonic()
        built, _, _ = worker.measured_model(job)
        t1 = time.monotonic()
        record = worker.lm_screen_record(job, built, ids)
        t2 = time.monotonic()
        ppl = Perplexity().evaluate(built, context)
        t3 = time.monotonic()
        ratio = ppl / base_ppl
        rejected = record["lower_bound"] > record["threshold"]
        tokens = record["tokens"]
        rows.append(
            {
                "plan": plan.summary(),
                "kl": record["kl"],
                "screen_ratio": record["perplexity_ratio"],
                "screen_lower": record["lower_bound"],
                "full_ratio": ratio,
                "rejected": rejected,
                "false_rejection": rejected and ratio <= limit,
                "build_s": round(t1 - t0, 2),
                "screen_s": round(t2 - t1, 2),
                "full_s": round(t3 - t2, 2),
            }
        )
        say(
            f"plan {i + 1}/{args.plans}: KL {record['kl']:.4f}, screen {record['perplexity_ratio']:.3f}x "
            f"(>= {record['lower_bound']:.3f}x), full {ratio:.3f}x{' REJECTED' if rejected else ''} "
            f"({plan.summary()[:50]})"
        )
        del built
    finite = [r for r in rows if math.isfinite(r["full_ratio"]) and math.isfinite(r["kl"])]
    rho_kl = spearman([r["kl"] for r in finite], [r["full_ratio"] for r in finite])
    rho_ratio = spearman([r["screen_ratio"] for r in finite], [r["full_ratio"] for r in finite])
    screen_s = sum(r["screen_s"] for r in rows)
    full_s = sum(r["full_s"] for r in rows)
    wall = time.monotonic() - started
    head = f"{'plan':<44}{'KL':>9}{'screen':>9}{'lower':>9}{'full':>9}  verdict"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        verdict = ("REJECT" + (" (false)" if r["false_rejection"] else "")) if r["rejected"] else "pass"
        print(
            f"{r['plan'][:43]:<44}{r['kl']:>9.4f}{r['screen_ratio']:>9.3f}{r['screen_lower']:>9.3f}"
            f"{r['full_ratio']:>9.3f}  {verdict}"
        )
    print(
        f"Spearman vs full perplexity ({len(finite)} plans): KL {rho_kl:.3f}, screen ratio {rho_ratio:.3f}\n"
        f"rejected {sum(r['rejected'] for r in rows)} of {len(rows)} (limit {limit:g}x), "
        f"false rejections {sum(r['false_rejection'] for r in rows)}; screen on {tokens} tokens "
        f"{screen_s:.1f} s vs full {full_s:.1f} s ({screen_s / full_s:.2f}x)\n"
        f"wall time {fmt_seconds(wall)}"
    )
    report = {
        "benchmark": "lm_fidelity",
        "study": str(args.study),
        "tokens": tokens,
        "limit": limit,
        "baseline_perplexity": base_ppl,
        "spearman_kl": rho_kl,
        "spearman_screen_ratio": rho_ratio,
        "screen_s": screen_s,
        "full_s": full_s,
        "rows": rows,
        "wall_s": round(wall, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
