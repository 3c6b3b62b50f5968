"""What makes the trials of one study comparable, and what changed when a resume breaks it.

A study's trials are one front only if they were scored the same way: the same model and
baseline, the same data and split, the same search space, objectives (with their options),
constraints and, when latency is an objective, the same latency shapes and threads. The
driver stores this record with the study and refuses a resume that changes any of it,
naming each changed field with its old and new value. Budgets, the sampler, seeding,
screening and the executor may change freely.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from slimsearch.search.study_file import StudySpec
from slimsearch.search.worker import timing_objectives
from slimsearch.spaces import SearchSpace

FORMAT = 1
WORKLOAD_OBJECTIVES = {"ttft_ms", "decode_tokens_per_s", "decode_speedup", "memory_bytes"}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _task(spec: StudySpec) -> dict[str, Any]:
    task = spec.task.identity()
    task.pop("eval_batch_size")  # how rows are batched does not change a score
    if task.get("calibration_rows") is None:
        task.pop("calibration_rows", None)  # the default: studies from before the key compare equal
    for key in ("rows", "text"):  # inline data: its digest, not a copy of it
        if task[key] is not None:
            task[key] = hashlib.sha256(json.dumps(task[key]).encode()).hexdigest()[:16]
    source = Path(spec.task.data)
    if not spec.task.data.startswith("builtin:") and source.is_file():
        task["data_sha256"] = _file_digest(source)
    elif not spec.task.data.startswith("builtin:") and source.is_dir():  # a save_to_disk folder
        files = sorted(p for p in source.rglob("*") if p.is_file())
        task["data_sha256"] = hashlib.sha256(
            json.dumps([[str(p.relative_to(source)), _file_digest(p)] for p in files]).encode()
        ).hexdigest()[:16]
    return task


def record(spec: StudySpec, space: SearchSpace, baseline_key: str) -> dict[str, Any]:
    """The study's comparability record (plain JSON)."""
    model = asdict(spec.model)
    model.pop("allow_pickle")  # how weights may be read, not which weights
    data: dict[str, Any] = {
        "format": FORMAT,
        "model": model,
        "baseline": baseline_key,
        "task": _task(spec),
        "space": {space.param_name(k): list(k.choices) for k in space.knobs},
        "objectives": [
            {"name": o.name, "ref": o.ref, "direction": o.direction, "options": dict(o.options)}
            for o in spec.objectives
        ],
        "constraints": dict(sorted(spec.constraints.items())),
        "distill": {"mode": spec.distill.mode, "recipe": dict(spec.distill.recipe)}
        | {"search": {k: list(v) for k, v in spec.distill.search.items()}},
    }
    if spec.metrics:  # only when present, so records from before metrics existed compare equal
        data["metrics"] = [{"name": o.name, "ref": o.ref, "options": dict(o.options)} for o in spec.metrics]
    if timing_objectives(spec.objectives):
        lat = spec.latency
        data["latency"] = {
            "shapes": [list(s) for s in lat.all_shapes()],
            "threads": lat.threads,
            "target": lat.target,
        }
    names = {o.name for o in spec.objectives}
    if names & WORKLOAD_OBJECTIVES:  # these run the prompt and decode_tokens generated tokens
        lat = spec.latency
        data.setdefault("latency", {}).update(
            shapes=[list(s) for s in lat.all_shapes()], decode_tokens=lat.decode_tokens
        )
    return json.loads(json.dumps(data, default=str))  # what storage gives back


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out |= _flat(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: value}


def differences(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``field: old -> new`` for each field that differs (missing fields read as absent)."""
    old, new = _flat(stored), _flat(now)
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            lines.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
    return lines
