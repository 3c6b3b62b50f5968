"""Opening a run's Optuna study: storage, sampler, directions, and the refusal of a resume
whose stored trials were scored another way."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import yaml

from slimsearch.search import comparable, storage
from slimsearch.search.log import say
from slimsearch.search.proposers import make_sampler
from slimsearch.search.study_file import StudyError, StudySpec
from slimsearch.spaces import SearchSpace
from slimsearch.spaces.methods import registry

RUN_INFO = "run.json"


def storage_url(spec: StudySpec) -> str:
    return storage.storage_url(spec.output, spec.storage)


def open_study(spec: StudySpec, space: SearchSpace, baseline_dir: Path) -> optuna.Study:
    """The run's study, created or loaded; refuses other directions or incomparable trials."""
    run_dir = spec.output
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    directions = [o.direction for o in spec.objectives]
    study = optuna.create_study(  # loads it when the storage holds it (always, but for a journal)
        study_name=spec.name,
        storage=storage.open_for_driver(run_dir, spec.storage, spec.name, directions),
        sampler=make_sampler(spec.sampler),
        directions=directions,
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != directions:
        raise StudyError(
            f"output: {run_dir} holds the study {spec.name!r} with directions "
            f"{[d.name.lower() for d in study.directions]}, not {directions}; resume with the original "
            "study file, or give a new output folder (--output)"
        )
    check_comparable(spec, study, space, baseline_dir)
    changed = changed_methods(study.user_attrs)
    if changed:
        # Not refused: the stored trials are still real measurements, just of other results.
        say(
            f"warning: {run_dir} was measured with other versions of "
            + ", ".join(f"{name} ({was} -> {now})" for name, (was, now) in changed.items())
            + "; results from before and after are not comparable, and a plan proposed again "
            "reuses its old result. Give a new output folder (--output) for comparable numbers"
        )
    info = {
        "study_name": spec.name,
        "storage": spec.storage,
        "url": storage_url(spec),
        "objectives": [o.name for o in spec.objectives],
        "task": spec.task.kind,
        "baseline_dir": str(baseline_dir),
        "cache_dir": str(spec.cache),
    }
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2))
    (run_dir / "study.yaml").write_text(yaml.safe_dump(dict(spec.raw), sort_keys=False))
    return study


def check_comparable(spec: StudySpec, study: optuna.Study, space: SearchSpace, baseline_dir: Path) -> None:
    """Refuse a resume whose trials would not be comparable with the stored ones; record
    what they are scored by in a new study."""
    objectives = [o.name for o in spec.objectives]
    fingerprint: dict[str, Any] = {"space": space.fingerprint(), "objectives": objectives}
    if spec.distill.search:
        fingerprint["distill"] = {k: list(v) for k, v in spec.distill.search.items()}
    now = comparable.record(spec, space, baseline_dir.name)
    stored = study.user_attrs.get("comparable")
    if stored is None and (legacy := study.user_attrs.get("fingerprint")) not in (None, fingerprint):
        stored = {"space": legacy.get("space"), "objectives": legacy.get("objectives")}
        now = {"space": fingerprint["space"], "objectives": objectives}
    if stored is not None and stored != now:
        changes = comparable.differences(stored, now)
        raise StudyError(
            f"output: {spec.output} holds trials scored another way; resuming would mix them into "
            f"one front. Changed since they ran: {'; '.join(changes[:8])}"
            + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
            + ". Resume with the original study file, or give a new output folder (--output)"
        )
    if "comparable" not in study.user_attrs:  # a new study, or one from before this record
        study.set_user_attr("comparable", now)
    if "fingerprint" not in study.user_attrs:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("methods", registry.versions())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(objectives)


def changed_methods(attrs: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The methods whose version differs from the one a study was measured with: name ->
    (then, now). Studies from before the registry recorded only the bit-width quantizer's
    version ("quantizer")."""
    now = registry.versions()
    then = attrs.get("methods")
    if not isinstance(then, dict):
        width = registry.table_method().name
        then = {width: attrs.get("quantizer", 1)}
    return {name: (int(was), now[name]) for name, was in then.items() if name in now and now[name] != was}
