"""What the loop hands an executor: one TrialJob per plan, built the same way everywhere."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimsearch.evaluators.latency import merge_quietest, quiet_times
from slimsearch.search import constraints
from slimsearch.search.study_file import StudySpec
from slimsearch.search.worker import ScreenSpec, TrialJob
from slimsearch.spaces import CompressionPlan


@dataclass
class Jobs:
    spec: StudySpec
    baseline_dir: Path
    baseline: dict[str, float] = field(default_factory=dict)
    quiet_ms: dict[str, float] = field(default_factory=dict)  # quietest baseline time per shape

    def job(self, number: int, plan: CompressionPlan) -> TrialJob:
        spec = self.spec
        return TrialJob(
            number=number,
            plan_json=plan.to_json(),
            baseline_dir=str(self.baseline_dir),
            cache_dir=str(spec.cache),
            task=spec.task,
            objectives=spec.measured(),
            latency=spec.latency,
            baseline=self.baseline,
            trust_remote_code=spec.model.trust_remote_code,
            timeout_s=spec.executor.trial_timeout_s,
            screen=self.screen_spec() if number >= 0 else None,  # never screen the baseline
            quiet_ms=dict(self.quiet_ms),
            methods=spec.methods,
            layer_store_bytes=spec.layer_store_bytes,
            device=spec.device,
        )

    def screen_spec(self) -> ScreenSpec | None:
        """Classification: on with a max_accuracy_drop constraint. Causal LM: on with
        ``screening.tokens`` and a max_perplexity_ratio constraint."""
        s, task, limits = self.spec.screening, self.spec.task, self.spec.constraints
        if s is None:
            return None
        if task.kind == "causal-lm":
            ratio = constraints.limit_on(limits, "perplexity", "max_ratio")
            if s.tokens is None or ratio is None or "perplexity" not in self.baseline:
                return None
            blocks = s.blocks(task.block_size)
            return ScreenSpec(max_drop=0.0, examples=0, z=s.z, max_ratio=float(ratio), blocks=blocks)
        drop = constraints.limit_on(limits, "accuracy", "max_drop")
        if drop is None or "accuracy" not in self.baseline or task.kind != "classification":
            return None
        return ScreenSpec(max_drop=drop, examples=s.examples, z=s.z)

    def note_quiet(self, records: dict[str, Any]) -> None:
        """Keep the quietest baseline time seen per shape, for the drift gate of later jobs."""
        for kind in ("latency", "decode"):
            merge_quietest(self.quiet_ms, quiet_times(records.get(kind, {})))
