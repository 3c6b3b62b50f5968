"""Export one trial's model to a folder, and load such a folder back.

An export folder holds ``model.safetensors`` (the compressed state, its plan in the metadata,
tied tensors stored once), the baseline's ``config.json``, ``slimsearch_plan.json``, the
tokenizer files, ``slimsearch_export.json`` (the measurements, machine-readable) and a
``README.md`` model card. ``load`` needs nothing but that folder: it builds the model class
from the config, applies the plan to create the compressed module structure, and puts the
saved tensors in place of the skeleton's.

``export_trial`` rebuilds a trial from its stored plan and the baseline folder only,
re-validates it on the full test split and re-measures latency against the baseline with
interleaved timed passes, so the model card's numbers are true of the files beside it.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from optuna.trial import FrozenTrial
from safetensors import safe_open
from torch import Tensor, nn

from slimsearch.evaluators import EvalContext, LatencySpec, make_evaluator
from slimsearch.evaluators.device import check_device
from slimsearch.evaluators.latency import measure_all
from slimsearch.search import gguf_export, models, onnx_check
from slimsearch.search.log import quiet_libraries, say
from slimsearch.search.study_file import LABELLED_KINDS, StudyError
from slimsearch.search.worker import (
    TrialJob,
    cached_baseline,
    device_baseline,
    job_data,
    measured_model,
    varying_objectives,
)
from slimsearch.spaces import CompressionPlan, apply_plan, save_compressed
from slimsearch.spaces.inputs import IGNORE
from slimsearch.spaces.linears import as_linears
from slimsearch.spaces.methods import PackedEmbedding, PackedLinear, registry
from slimsearch.spaces.methods.registry import BOTH, SIZE, SPEED

if TYPE_CHECKING:
    from slimsearch.search.results import Run

WEIGHTS = "model.safetensors"
PLAN_FILE = "slimsearch_plan.json"
INFO_FILE = "slimsearch_export.json"
CARD_FILE = "README.md"
EXPORT_FORMAT = 1
# Objectives that export measures itself: size is the written file, latency is interleaved.
MEASURED_HERE = ("size_bytes", "latency_ms")
FORMATS = ("hf", "gguf", "onnx")


# -- latency ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyComparison:
    """The candidate timed against the baseline, pass by pass in alternation (the latency
    evaluator's protocol), summed over the study's input shapes."""

    candidate_ms: float
    baseline_ms: float
    ratio: float  # geometric mean over shapes of the per-shape median ratios
    ratio_ci95: tuple[float, float] | None  # bootstrap interval, primary shape
    noisy: bool
    repeats: int
    threads: int
    shapes: tuple[tuple[int, int], ...]

    @classmethod
    def from_record(cls, record: Mapping[str, Any], spec: LatencySpec) -> LatencyComparison:
        shapes = list(record["shapes"])
        baseline_ms = sum(float(s["baseline_median_ms"]) for s in shapes)
        ci = shapes[0].get("ratio_ci95")
        return cls(
            candidate_ms=float(record["median_ms"]),
            baseline_ms=baseline_ms,
            ratio=float(record.get("ratio", float(record["median_ms"]) / baseline_ms)),
            ratio_ci95=(float(ci[0]), float(ci[1])) if ci else None,
            noisy=bool(record.get("noisy", False)),
            repeats=spec.repeats,
            threads=spec.threads,
            shapes=tuple((int(s["batch_size"]), int(s["seq_len"])) for s in shapes),
        )


# -- writing a folder ---------------------------------------------------------------------
def check_out_folder(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise StudyError(f"export folder {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise StudyError(f"export folder {out} is not empty; choose a new folder or pass overwrite (--force)")


def _prepare_folder(out: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of ``out``; the export appears whole or not at all."""
    check_out_folder(out, overwrite)
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_export(
    model: nn.Module,
    tokenizer: Any,
    plan: CompressionPlan,
    out: str | Path,
    *,
    info: Mapping[str, Any] | None = None,
    card: str | None = None,
    overwrite: bool = False,
) -> int:
    """Write an export folder for an already compressed ``model``; returns the weight bytes.

    ``info`` is stored in slimsearch_export.json with the byte count added; ``card`` is the
    README.md text (a short default when None).
    """
    out = Path(out)
    tmp = _prepare_folder(out, overwrite)
    size = save_compressed(model, plan, tmp / WEIGHTS)
    on_disk = (tmp / WEIGHTS).stat().st_size
    if size != on_disk:  # cannot happen unless the file system lies; the size claim rests on it
        raise RuntimeError(f"wrote {size} bytes of weights but {WEIGHTS} holds {on_disk}")
    # Name the model's class in the config (as save_pretrained of a model does), so load()
    # builds the right class; a copy, so the caller's model is left as it was.
    config: Any = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2))
    data = {"format": EXPORT_FORMAT, **dict(info or {}), "size_bytes": size}
    (tmp / INFO_FILE).write_text(json.dumps(data, indent=2, default=str))
    (tmp / CARD_FILE).write_text(
        card or f"# slimsearch export\n\nPlan: {plan.summary()}\n\nWeights: {size} bytes\n"
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return size


# -- loading a folder ---------------------------------------------------------------------
def _read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, str], CompressionPlan | None]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    aliases = json.loads(meta.get("aliases", "{}"))
    plan_text = meta.get("slimsearch_plan")
    return tensors, aliases, CompressionPlan.from_json(plan_text) if plan_text else None


def _skeleton(config: Any, task: str | None, trust_remote_code: bool) -> nn.Module:
    """A randomly initialised model of the config's class; its values are replaced later."""
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is not None:
        model: nn.Module = cls(config)
        as_linears(model)  # as the baseline was when the trial compressed it
        return model
    if task is None:
        raise ValueError(
            f"config.json names architectures {archs}, which transformers does not have, and "
            f"{INFO_FILE} gives no task kind; add 'task': 'classification' or 'causal-lm' to it"
        )
    auto = models.model_class(task)
    built: nn.Module = auto.from_config(config, trust_remote_code=trust_remote_code)
    as_linears(built)
    return built


def _place(model: nn.Module, name: str, value: Tensor | nn.Parameter) -> None:
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:  # state_dict named it, so this is a bug in the walk, not in the file
        raise RuntimeError(f"{name}: neither a parameter nor a buffer of {type(module).__name__}")


def assign_state(model: nn.Module, tensors: Mapping[str, Tensor], aliases: Mapping[str, str]) -> None:
    """Replace the model's parameters and buffers by ``tensors`` (not copy_: the packed
    buffers' lengths depend on the saved weights, not on the skeleton's random ones).

    An alias gets the very object of the name it points to, so tied weights stay tied.
    """
    state = model.state_dict(keep_vars=True)
    expected = set(state)
    given = set(tensors) | set(aliases)
    if expected != given:
        missing = sorted(expected - given)[:5]
        extra = sorted(given - expected)[:5]
        raise ValueError(
            f"the saved weights do not fit the model the plan builds: missing {missing}, unexpected {extra}; "
            "was this folder written by another slimsearch version or edited by hand?"
        )
    objects: dict[str, Tensor | nn.Parameter] = {}
    for name, tensor in tensors.items():
        current = state[name]
        if isinstance(current, nn.Parameter):
            if tuple(current.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{name}: saved shape {tuple(tensor.shape)} but the config builds "
                    f"{tuple(current.shape)}; config.json and model.safetensors come from different models"
                )
            objects[name] = nn.Parameter(tensor, requires_grad=current.requires_grad)
        else:
            objects[name] = tensor
    for name, target in aliases.items():
        if target not in objects:
            raise ValueError(f"alias {name} -> {target}: {target} is not among the saved tensors")
        objects[name] = objects[target]
    for name, value in objects.items():
        _place(model, name, value)
    for module in model.modules():
        if isinstance(module, (PackedLinear, PackedEmbedding)):
            module._cache.clear()  # derived compute forms of the old values


def load(folder: str | Path, *, trust_remote_code: bool = False) -> tuple[nn.Module, Any]:
    """A ready (eval-mode) transformers model and its tokenizer from an export folder."""
    from transformers import AutoConfig

    folder = Path(folder)
    for name in (WEIGHTS, "config.json", PLAN_FILE):
        if not (folder / name).is_file():
            raise ValueError(
                f"{folder} is not a slimsearch export (no {name}); write one with "
                "`slimsearch export RUN --trial N OUT`"
            )
    quiet_libraries()
    info = json.loads((folder / INFO_FILE).read_text()) if (folder / INFO_FILE).is_file() else {}
    for method in info.get("methods") or []:
        registry.resolve(method)  # the study's own methods: their package must be importable here
    plan = CompressionPlan.from_dict(json.loads((folder / PLAN_FILE).read_text()))
    tensors, aliases, stored_plan = _read_weights(folder / WEIGHTS)
    if stored_plan is not None and stored_plan != plan:
        raise ValueError(
            f"{folder / PLAN_FILE} differs from the plan inside {WEIGHTS}; the folder was edited: "
            f"restore {PLAN_FILE} from the weights' metadata or export again"
        )
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    model = _skeleton(config, info.get("task"), trust_remote_code)
    apply_plan(model, plan, skeleton=True)
    assign_state(model, tensors, aliases)
    tokenizer = models.load_tokenizer(folder, trust_remote_code)
    return model.eval(), tokenizer


# -- the model card -----------------------------------------------------------------------
def realization(model: nn.Module) -> dict[str, int]:
    """How many layers run each compute path (what speed can come from): every compressed
    module says its own (``compute_path``)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        path = getattr(module, "compute_path", None)
        if isinstance(path, str):
            counts[path] = counts.get(path, 0) + 1
    return counts


REALIZED_TEXT = {
    BOTH: "fewer bytes and a cheaper computation",
    SPEED: "a cheaper computation, the same bytes",
    SIZE: "realized for size only: the file holds its compact form, but the forward pass computes "
    "with a dense fp32 copy, so it brings no speed-up (and can cost a little)",
}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def model_card(report: ExportReport) -> str:
    lines = [f"# {report.study} - trial {report.trial} (slimsearch export)", ""]
    if not report.on_front:
        lines += ["> Note: this trial is **not** on the study's Pareto front.", ""]
    lines += [
        f"Compression plan: {report.plan_summary}",
        "",
        "## Measurements (re-validated at export)",
        "",
        "| metric | this model | baseline | ratio | during the search |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, value in report.measured.items():
        base = report.baseline.get(name)
        ratio = f"{value / base:.3f}" if base else ""
        search = report.search.get(name)
        lines.append(
            f"| {name} | {_fmt(value)} | {_fmt(base) if base is not None else ''} | {ratio} | "
            f"{_fmt(search) if search is not None else ''} |"
        )
    lat = report.latency
    lines += [
        "",
        f"- Weights: `{WEIGHTS}` is exactly {report.size_bytes} bytes "
        f"({report.size_bytes / 1e6:.2f} MB); the baseline serializes to "
        f"{report.baseline.get('size_bytes', float('nan')):.0f} bytes.",
        f"- Latency: median of {lat.repeats} forward passes each, baseline and this model timed in "
        f"alternation (shapes (batch, sequence) {', '.join(map(str, lat.shapes))}, {lat.threads} "
        f"threads): {lat.candidate_ms:.3f} ms vs {lat.baseline_ms:.3f} ms, ratio {lat.ratio:.3f}"
        + (f" (95% interval {lat.ratio_ci95[0]:.3f}-{lat.ratio_ci95[1]:.3f})" if lat.ratio_ci95 else "")
        + (" - the machine was noisy: treat the ratio as rough." if lat.noisy else "."),
        "- Rebuild: "
        + {
            True: f"the weights are bit for bit the model the search measured (state sha256 "
            f"`{report.state_sha256[:16]}`).",
            False: "**differs from the model the search measured** (exported with --allow-mismatch).",
            None: "the trial predates state digests; checked by re-validation only.",
        }[report.identical],
        f"- Quality was measured on the study's full test split ({report.eval_examples} examples"
        f"{' of ' + str(report.eval_tokens) + ' tokens' if report.eval_tokens else ''}).",
        "",
        "## What is real here",
        "",
    ]
    lines += [f"- {key}: {REALIZED_TEXT.get(value, value)}." for key, value in report.realized.items()] or [
        "- nothing is compressed"
    ]
    lines += [
        "",
        "Layers by compute path:",
        "",
    ]
    lines += [f"- {n} x {path}" for path, n in sorted(report.paths.items(), key=lambda kv: -kv[1])] or [
        "- none"
    ]
    lines += gguf_export.card(report.gguf) + onnx_check.card(report.onnx)
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "import slimsearch",
        f'model, tokenizer = slimsearch.load("{report.out.name}")',
        "```",
        "",
        "The modules are slimsearch's own (packed weights), so loading needs slimsearch installed; "
        f"`{PLAN_FILE}` is the recipe, applied to the baseline it rebuilds this model.",
        "",
        f"Exported {report.created} from run `{report.run}`.",
        "",
    ]
    return "\n".join(lines)


# -- exporting a trial --------------------------------------------------------------------
class ExportMismatch(RuntimeError):
    """The rebuilt model is not the one the search measured."""


# Re-validation runs the same model on the same rows: quality may move only by float
# rounding (one example flipped at a near-tie, a relative 1e-3 elsewhere).
REVALIDATION_RTOL = 1e-3


def measured_records(run: Run, trial: FrozenTrial) -> dict[str, Any]:
    """The records of the trial that measured this one's plan (a repeat points to it)."""
    records = dict(trial.user_attrs.get("records", {}))
    seen = {trial.number}
    while "reused_from" in records and int(records["reused_from"]) not in seen:
        source = run.all_trials[int(records["reused_from"])]
        seen.add(source.number)
        records = dict(source.user_attrs.get("records", {}))
    return records


def check_rebuild(trial: int, digest: str, expected: str | None, allow_mismatch: bool) -> bool | None:
    if expected is None:
        say(f"warning: trial {trial} predates state digests: the rebuild is checked by re-validation only")
        return None
    if digest == expected:
        say(f"rebuild check: the weights are bit for bit the searched model's (sha256 {digest[:12]})")
        return True
    message = (
        f"trial {trial}: the rebuilt model differs from the one the search measured (state sha256 "
        f"{digest[:12]}, measured {expected[:12]}); the baseline folder, the data or the slimsearch version "
        "changed since the trial ran, or it ran on a machine whose kernels round differently"
    )
    if not allow_mismatch:
        raise ExportMismatch(message + "; nothing was written. Re-run the trial, or pass --allow-mismatch")
    say(f"warning: {message}; writing it anyway (--allow-mismatch)")
    return False


def check_revalidation(
    trial: int,
    measured: Mapping[str, float],
    searched: Mapping[str, float],
    varying: set[str],
    examples: int,
    allow_mismatch: bool,
) -> None:
    """Quality re-measured at export must be what the search measured, within rounding
    (timing and memory, in ``varying``, are re-measured and reported, not compared)."""
    off = []
    for name, value in measured.items():
        if name in varying or name not in searched:
            continue
        before = searched[name]
        tolerance = 100.0 / max(examples, 1) if name == "accuracy" else REVALIDATION_RTOL * abs(before)
        if abs(value - before) > tolerance + 1e-12:
            off.append(f"{name} {value:.6g} now, {before:.6g} in the search")
    if not off:
        return
    message = f"trial {trial}: re-validation differs from the search beyond rounding: {'; '.join(off)}"
    if not allow_mismatch:
        raise ExportMismatch(message + "; nothing was written. Pass --allow-mismatch to write it anyway")
    say(f"warning: {message}; writing it anyway (--allow-mismatch)")


@dataclass
class ExportReport:
    out: Path
    run: str
    study: str
    trial: int
    task: str
    on_front: bool
    plan_summary: str
    size_bytes: int
    measured: dict[str, float]
    search: dict[str, float]
    baseline: dict[str, float]
    latency: LatencyComparison
    eval_examples: int
    eval_tokens: int = 0
    paths: dict[str, int] = field(default_factory=dict)
    realized: dict[str, str] = field(default_factory=dict)
    methods: tuple[str, ...] = ()  # the study's own methods, which loading imports
    created: str = ""
    state_sha256: str = ""
    identical: bool | None = None  # the rebuild's state equals the searched model's (None: unknown)
    gguf: dict[str, Any] | None = None  # --format gguf: what was written and how it checked
    onnx: dict[str, Any] | None = None  # --format onnx: the same

    def info(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["latency"] = asdict(self.latency)
        return data


def _eval_sizes(batches: list[dict[str, Tensor]], task: str) -> tuple[int, int]:
    if task in LABELLED_KINDS:  # what accuracy counts: examples, or a token task's labelled tokens
        return sum(int((b["labels"] != IGNORE).sum()) for b in batches), 0
    return sum(int(b["input_ids"].shape[0]) for b in batches), sum(
        int(b["input_ids"].numel()) for b in batches
    )


def export_trial(
    run: Run | str | Path,
    trial: int,
    out: str | Path,
    *,
    overwrite: bool = False,
    repeats: int | None = None,
    allow_mismatch: bool = False,
    format: str = "hf",
) -> ExportReport:
    """Rebuild ``trial`` of ``run`` from its plan and the baseline folder, check that it is
    the model the search measured (the same state digest, and the same quality on the full
    test split), and write an export folder at ``out``.

    A rebuild that differs is refused (``ExportMismatch``) unless ``allow_mismatch``; then the
    export is written and its card says so. ``format="gguf"`` also writes ``model.gguf``
    (Llama-architecture decoders, see gguf_export.py), reads it back and, where llama.cpp is
    installed, measures its perplexity there; a plan GGUF cannot express is refused first."""
    from slimsearch.search.results import Run, open_run

    run = run if isinstance(run, Run) else open_run(run)
    frozen = run.trial(trial)
    front = run.front_numbers()
    if trial not in front:
        say(f"warning: trial {trial} is not on the Pareto front (front: {front}); exporting it anyway")
    spec = run.spec
    plan = CompressionPlan.from_dict(frozen.user_attrs["plan"])
    records = measured_records(run, frozen)
    baseline_dir = run.baseline_dir()
    out = Path(out).resolve()
    check_out_folder(out, overwrite)  # before minutes of work, not after
    if format not in FORMATS:
        raise StudyError(f"--format {format!r}: choose one of {list(FORMATS)}")
    if format == "gguf":
        gguf_export.check_plan(plan, models.model_type(baseline_dir), spec.task.kind)
    if format == "onnx":
        onnx_check.check_task(spec.task.kind)
    torch.set_num_threads(spec.latency.threads)

    job = TrialJob(
        number=trial,
        plan_json=plan.to_json(),
        baseline_dir=str(baseline_dir),
        cache_dir=str(run.cache_dir()),
        task=spec.task,
        objectives=spec.objectives,
        latency=spec.latency,
        baseline=dict(run.baseline),
        trust_remote_code=spec.model.trust_remote_code,
        methods=spec.methods,
        layer_store_bytes=spec.layer_store_bytes,
        device=export_device(spec.device),
    )
    say(f"rebuilding trial {trial} ({plan.summary()}) from {baseline_dir}")
    selection = records.get("selection")
    if plan.structured and not selection:
        say(
            "warning: this trial predates recorded structured selections: its heads and neurons are "
            "chosen again on the worker's calibration batch, and the rebuild is checked by re-validation"
        )
    candidate, plan, built = measured_model(job, selection)
    digest = str(built["state_sha256"])
    candidate = candidate.to(job.device)
    base_model, tokenizer = device_baseline(job), cached_baseline(job)[1]
    identical = check_rebuild(trial, digest, records.get("state_sha256"), allow_mismatch)

    data = job_data(job)
    batches = data.test_batches()
    timing = replace(spec.latency, repeats=repeats or max(spec.latency.repeats, 20))
    context = EvalContext(
        task=spec.task.kind,  # type: ignore[arg-type]
        batches=batches,
        vocab_size=len(tokenizer),
        plan=plan,
        latency=timing,
        baseline=dict(run.baseline),
        reference=base_model,  # latency evaluators time the candidate against it, interleaved
        tokenizer=tokenizer,
        data=data,
    )
    measured: dict[str, float] = {}
    for objective in spec.measured():
        if objective.name == "size_bytes":
            continue  # the bytes of the file written below, not an estimate
        say(f"re-measuring {objective.name}")
        evaluator = make_evaluator(objective.ref, dict(objective.options))
        measured[objective.name] = float(evaluator.evaluate(candidate, context))
    searched = {k: float(v) for k, v in dict(frozen.user_attrs.get("metrics", {})).items()}
    examples, tokens = _eval_sizes(batches, spec.task.kind)
    varying = {o.name for o in varying_objectives(spec.measured())}
    check_revalidation(trial, measured, searched, varying, examples, allow_mismatch)
    # Latency against the baseline even when the study did not optimize it (cached otherwise).
    latency = LatencyComparison.from_record(measure_all(candidate, context, base_model), timing)
    if latency.noisy:
        say(
            "warning: the latency passes varied a lot (other processes on these cores?); the ratio is "
            "rough: export again on a quiet machine for one to trust"
        )
    del context
    candidate, base_model = candidate.cpu(), cached_baseline(job)[0]  # files are written from the CPU

    report = ExportReport(
        out=out,
        run=str(run.path),
        study=run.name,
        trial=trial,
        task=spec.task.kind,
        on_front=trial in front,
        plan_summary=plan.summary(),
        size_bytes=0,
        measured=measured,
        search=searched,
        baseline={k: float(v) for k, v in run.baseline.items()} | {"latency_ms": latency.baseline_ms},
        latency=latency,
        eval_examples=examples,
        eval_tokens=tokens,
        paths=realization(candidate),
        realized=plan.realized(),
        methods=spec.methods,
        state_sha256=digest,
        identical=identical,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
    # The size is only known once written; write, then fill in the card and info with it.
    size = write_export(candidate, tokenizer, plan, out, overwrite=overwrite)
    report.size_bytes = size
    report.measured["size_bytes"] = float(size)
    report.measured.setdefault("latency_ms", latency.candidate_ms)
    if format == "gguf":
        source = models.source_gguf(spec)
        threads = spec.latency.threads
        report.gguf = gguf_export.write_and_check(
            candidate, tokenizer, out, source, batches, threads, report.measured
        )
    if format == "onnx":
        report.onnx = onnx_check.write_and_check(
            candidate, base_model, out, spec.latency, batches, len(tokenizer), spec.task.kind, report.measured
        )
    (out / INFO_FILE).write_text(
        json.dumps({"format": EXPORT_FORMAT, **report.info()}, indent=2, default=str)
    )
    (out / CARD_FILE).write_text(model_card(report))
    say(f"exported trial {trial} to {out} ({size} bytes of weights)")
    return report


def export_device(device: str) -> str:
    """The study's device where this machine has it; else the CPU, with a warning, so a front
    searched on a GPU can still be exported (and re-validated) on a machine without one."""
    try:
        check_device(device)
    except ValueError as exc:
        say(
            f"warning: {exc}. Re-validating on the CPU instead: quality may differ in the last digits, "
            "and latency and memory are the CPU's"
        )
        return "cpu"
    return device
