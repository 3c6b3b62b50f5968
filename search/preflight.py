"""Checks that need no model, run before any model load, fine-tune or Ray start.

Each failure is one StudyError naming the field, the value and the fix: folders that cannot
be written, a storage file that is corrupt or holds another study, a model folder whose
config is broken, whose weights are missing or pickled, or whose type the task cannot drive,
data that cannot be read or does not fit the requested sizes, a Ray address that does not
answer.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from slimsearch.evaluators import device as devices
from slimsearch.search import models, storage, tasks
from slimsearch.search.log import say
from slimsearch.search.study_file import LABELLED_KINDS, StudyError, StudySpec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Shown when a model type does not fit the task (the full lists are transformers' own).
EXAMPLES = {
    "causal-lm": "llama, mistral, qwen2, qwen3, gemma, gemma2, phi3, gpt2, gpt_neox, opt",
    "classification": "bert, roberta, electra, xlm-roberta, deberta-v2, distilbert, albert, llama, qwen2",
    "token-classification": "bert, roberta, electra, xlm-roberta, deberta-v2, distilbert, albert, llama",
}
# transformers' table of the model types each task's auto class builds.
SUPPORTED = {
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token-classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


def check_folder(where: str, path: Path) -> None:
    """``path`` is, or can be made, a folder this process can write into."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        which = "is a file" if probe == path else f"lies under {probe}, which is a file"
        raise StudyError(f"{where}: {path} {which}; give a folder path")
    try:
        handle, name = tempfile.mkstemp(prefix=".slimsearch-probe-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise StudyError(
            f"{where}: cannot write in {probe} ({exc.strerror}); give a folder you can write to"
        ) from None


def _config(spec: StudySpec) -> Any | None:
    """The model's transformers config, read without weights; None for the built-in models."""
    from transformers import AutoConfig

    source = spec.model.source
    if source.startswith("builtin:"):
        return None
    if source == "config":
        raw = dict(spec.model.config or {})
        model_type = raw.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise StudyError(f"model.config: {exc}") from None
    path = Path(source) / "config.json"
    try:
        data = json.loads(tasks.read_text_file(path, "model.source"))
    except json.JSONDecodeError as exc:
        raise StudyError(
            f"model.source: {path} is not valid JSON ({exc.msg} at line {exc.lineno}); restore it from "
            "the model's original files"
        ) from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise StudyError(
            f'model.source: {path} names no model_type; a transformers config.json has one (e.g. "bert")'
        )
    try:
        return AutoConfig.from_pretrained(str(path.parent), trust_remote_code=spec.model.trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StudyError(
            f"model.source: {path.parent} has a config transformers cannot read: {text}"
        ) from None


def check_task_fits(config: Any, kind: str, remote: bool) -> None:
    """Refuse a model type the task cannot drive (e.g. an encoder-decoder as a causal LM)."""
    from transformers.models.auto import modeling_auto

    model_type = str(getattr(config, "model_type", ""))
    if remote and getattr(config, "auto_map", None):
        return  # the model's own code says what it is
    supported = getattr(modeling_auto, SUPPORTED[kind])
    if kind == "causal-lm" and getattr(config, "is_encoder_decoder", False):
        raise StudyError(
            f"model.source: {model_type!r} is an encoder-decoder model; task.kind causal-lm drives "
            f"decoder-only models (e.g. {EXAMPLES[kind]}), and would drop the encoder. Use a "
            "decoder-only model, or task.kind classification with this one"
        )
    if model_type not in supported:
        auto = models.AUTO_CLASSES[kind]
        raise StudyError(
            f"model.source: model type {model_type!r} has no {auto} class in transformers, so task.kind "
            f"{kind} cannot drive it; supported types include {EXAMPLES[kind]} ({len(supported)} in all)"
        )


def check_weights(folder: Path, allow_pickle: bool) -> None:
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
    if pickles and allow_pickle:
        say(f"warning: loading pickle weights {pickles[0]} (model.allow_pickle is on)")
        return
    if pickles:
        raise StudyError(
            f"model.source: {folder} holds pickle weights only ({pickles[0]}), which can run code when "
            "loaded; convert them to safetensors (load the model with transformers and call "
            "save_pretrained on it), or set model.allow_pickle: true if you trust the file"
        )
    raise StudyError(
        f"model.source: {folder} holds no weights (no model.safetensors); give the folder "
        "save_pretrained wrote, or model.config for a randomly initialised model"
    )


def check_space(spec: StudySpec, config: Any) -> None:
    """The search space against the model's layers, on a weightless (meta-device) copy built
    from the config: a layer pattern that matches nothing fails before any fine-tune."""
    import torch

    from slimsearch.spaces import SearchSpace
    from slimsearch.spaces.linears import as_linears

    if spec.model.trust_remote_code and getattr(config, "auto_map", None):
        return  # the model's own code may not build on the meta device; the trial checks it
    try:
        with torch.device("meta"):
            model = models.model_class(spec.task.kind).from_config(config)
    except Exception:  # a config transformers builds only with weights: the baseline checks it
        return
    as_linears(model)
    try:
        SearchSpace(model, spec.space)
    except ValueError as exc:
        raise StudyError(str(exc)) from None


def check_model(spec: StudySpec) -> None:
    config = _config(spec)
    if config is None:
        return
    check_task_fits(config, spec.task.kind, spec.model.trust_remote_code)
    check_space(spec, config)
    if spec.model.source != "config":
        check_weights(Path(spec.model.source), spec.model.allow_pickle)
    if spec.task.kind in LABELLED_KINDS and spec.model.source == "config":
        given = (spec.model.config or {}).get("num_labels")
        classes = tasks.num_labels(spec.task, spec.cache)
        if given is not None and given != classes:
            raise StudyError(
                f"model.config.num_labels: {given}, but the task's data has {classes} classes; "
                "drop num_labels (the data sets it) or fix the data"
            )


def check_data(spec: StudySpec) -> None:
    """Reads the task's data (columns, labels, splits, sizes) before any model is loaded."""
    task = spec.task
    if task.kind in LABELLED_KINDS:
        if task.data in tasks.BUILTIN_ROWS:
            tasks.check_sizes(task, tasks.BUILTIN_ROWS[task.data])
            return
        tasks.classification_splits(task, spec.cache)
    elif (
        not task.data.startswith("builtin:")
        and task.text is None
        and not tasks.lm_text(task, spec.cache).strip()
    ):
        raise StudyError(f"task.data: {task.data} holds no text; give a non-empty UTF-8 text source")


def check_device(spec: StudySpec) -> None:
    """The study's GPU is visible here. Not asked when trials run on a Ray cluster, whose head
    may have none: the executor asks the cluster for GPUs when it connects."""
    if spec.device == "cpu" or (spec.executor.kind == "ray" and spec.executor.address):
        return
    try:
        devices.check_device(spec.device)
    except ValueError as exc:
        raise StudyError(str(exc)) from None


def preflight(spec: StudySpec) -> None:
    """Everything that can be refused without a model, cheapest first."""
    check_device(spec)
    check_folder("output", spec.output)
    check_folder("cache", spec.cache)
    storage.check_storage(spec.output, spec.storage, spec.name)
    check_data(spec)
    check_model(spec)
    if spec.executor.kind == "ray" and spec.executor.address:
        from slimsearch.search.executors import check_address

        check_address(spec.executor.address)
