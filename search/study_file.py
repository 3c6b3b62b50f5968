"""Study files: YAML in, a validated, frozen StudySpec out.

Everything is checked before any trial runs, and every error names the field, the value
and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from slimsearch.evaluators import LatencySpec, evaluator_names
from slimsearch.evaluators.base import ONNX_TASKS
from slimsearch.evaluators.device import parse_device
from slimsearch.search.constraints import NAMED, parse_listed, resolve
from slimsearch.spaces import SpaceConfig, space_config_from_mapping
from slimsearch.spaces.methods import registry
from slimsearch.spaces.store import DEFAULT_MAX_BYTES

TASK_KINDS = ("classification", "token-classification", "causal-lm")
# Kinds whose data are labelled rows (a class per text, or a tag per word).
LABELLED_KINDS = ("classification", "token-classification")
# A token task's columns by default: the names the `datasets` NER sets use.
TOKEN_COLUMNS = {"text_column": "tokens", "label_column": "ner_tags"}
BUILTIN_MODELS = ("builtin:all-minilm-l6-v2", "builtin:smollm2-135m")
BUILTIN_DATA = ("builtin:movie-reviews", "builtin:uncertainty", "builtin:oanc")
SAMPLERS = ("tpe", "nsga2", "random")
EXECUTORS = ("ray", "inprocess")
STORAGES = ("sqlite", "journal")


class StudyError(ValueError):
    """A study file problem: names the field, the value and the fix."""


def _fail(where: str, value: Any, allowed: str) -> StudyError:
    return StudyError(f"{where}: {value!r} is not valid; {allowed}")


def parse_duration(value: Any, where: str = "budget.timeout") -> float | None:
    """Seconds from 90, '90s', '15m', '8h' or '1h30m'; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise _fail(where, value, "give a positive number of seconds or a duration like '8h'")
        return float(value)
    text = str(value).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or parts is None or not any(parts.groups()):
        raise _fail(where, value, "write a duration like '90s', '15m', '8h' or '1h30m'")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    seconds = h * 3600 + m * 60 + s
    if seconds <= 0:
        raise _fail(where, value, "the duration must be positive")
    return seconds


@dataclass(frozen=True)
class FinetuneSpec:
    epochs: float = 2.0
    learning_rate: float = 5e-5
    batch_size: int = 32


@dataclass(frozen=True)
class ModelSpec:
    source: str
    config: Mapping[str, Any] | None = None
    finetune: FinetuneSpec | None = None
    trust_remote_code: bool = False
    # Pickle weights (pytorch_model.bin) can run code when loaded: refused unless asked for.
    allow_pickle: bool = False


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    data: str
    # Inline data (tests, notebooks): (text, label) rows, or (words, tags) for token tasks.
    rows: tuple[tuple[Any, Any], ...] | None = None
    text: str | None = None  # inline LM text
    train_size: int = 3000
    test_size: int = 1000
    max_length: int = 64
    eval_batch_size: int = 64
    block_size: int = 256
    eval_blocks: int = 32
    seed: int = 0
    # Rows the calibration statistics are captured on (training sentences, or blocks of
    # block_size tokens); None: the defaults of search/data.py (32 sentences, 2 blocks).
    calibration_rows: int | None = None
    # How a `datasets` source is read (search/sources.py): its columns, the split rows come
    # from (None: its only split, or 'train') and, when set, the split the test rows come
    # from (else the test rows are drawn from `split`).
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    split: str | None = None
    test_split: str | None = None

    def identity(self) -> dict[str, Any]:
        """The fields as a dict for cache keys, leaving out the `datasets` reading options
        at their defaults, so keys made before they existed still match."""
        out = asdict(self)
        for name, default in _READING_DEFAULTS.items():
            if out[name] == default:
                del out[name]
        return out


_READING = ("text_column", "text_pair_column", "label_column", "split", "test_split")
_READING_DEFAULTS = {f.name: f.default for f in fields(TaskSpec) if f.name in _READING}


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    direction: str
    ref: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SamplerSpec:
    name: str = "tpe"
    seed: int = 0
    population_size: int = 20


@dataclass(frozen=True)
class ScreeningSpec:
    examples: int = 200  # classification: test rows scored first
    z: float = 2.0
    tokens: int | None = None  # causal LM: evaluation tokens scored first (whole blocks); None: off

    def blocks(self, block_size: int) -> int:
        """Evaluation blocks a causal-LM screen scores: ``tokens`` rounded up to whole blocks."""
        return math.ceil((self.tokens or 0) / block_size)


DISTILL_MODES = ("off", "every-trial", "finalists")


@dataclass(frozen=True)
class DistillSpec:
    """Distillation: ``every-trial`` distils each trial with ``recipe`` (``search`` lists make
    recipe fields searched knobs); ``finalists`` screens without it, then distils up to
    ``finalists`` Pareto candidates in a second stage."""

    mode: str = "off"
    recipe: Mapping[str, Any] = field(default_factory=dict)
    search: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    finalists: int = 4


@dataclass(frozen=True)
class BudgetSpec:
    trials: int | None = 30
    timeout_s: float | None = None


@dataclass(frozen=True)
class ExecutorSpec:
    kind: str = "ray"
    address: str | None = None
    max_in_flight: int = 1
    trial_timeout_s: float | None = None
    # Stop the run when this many trials in a row fail with the same error (a systematic
    # fault: a broken plugin, a full disk); None never stops.
    max_consecutive_failures: int | None = 10
    # GPUs each Ray trial reserves when the study's device is a GPU: a fraction lets several
    # trials' quality work share one (timing still holds the machine alone).
    gpus_per_trial: float = 1.0


@dataclass(frozen=True)
class StudySpec:
    name: str
    model: ModelSpec
    task: TaskSpec
    space: SpaceConfig
    objectives: tuple[ObjectiveSpec, ...]
    constraints: Mapping[str, float]
    latency: LatencySpec
    sampler: SamplerSpec
    seed_uniform: bool
    remeasure_front: bool
    screening: ScreeningSpec | None
    distill: DistillSpec
    seed_sensitivity: bool
    budget: BudgetSpec
    executor: ExecutorSpec
    storage: str
    output: Path
    cache: Path
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)
    # Size budgets of the sensitivity seeds (fractions of the searched units' bytes); None:
    # sensitivity_seeds' defaults.
    seed_budgets: tuple[float, ...] | None = None
    # Half of the trials after the seeds step from the feasible front where the sensitivity
    # profile says it hurts least (search/refine.py); needs the profile, so it follows
    # seed_sensitivity unless the file says otherwise.
    refine_front: bool = False
    # Evolution steps from the feasible front (search/proposers/evolution.py): moves
    # compression between layers at constant size; needs the profile too. Off by default.
    evolve_front: bool = False
    # Compression methods from the user's packages ("package.module:ClassName"), imported and
    # registered before the space is read; workers import them too.
    methods: tuple[str, ...] = ()
    # The layer store (spaces/store.py): None off, else the bytes it may keep on disk.
    layer_store_bytes: int | None = DEFAULT_MAX_BYTES
    # Where the baseline and every trial's model are evaluated and timed: cpu, cuda, cuda:N.
    device: str = "cpu"

    # Evaluators measured on every trial but not optimized (for constraints and the report).
    metrics: tuple[ObjectiveSpec, ...] = ()

    def measured(self) -> tuple[ObjectiveSpec, ...]:
        """The objectives, then the metrics: everything a trial measures."""
        return self.objectives + self.metrics

    def objective(self, name: str) -> ObjectiveSpec | None:
        return next((o for o in self.objectives if o.name == name), None)


_TOP_KEYS = {
    "name",
    "model",
    "task",
    "space",
    "objectives",
    "constraints",
    "latency",
    "sampler",
    "seed_uniform",
    "budget",
    "executor",
    "storage",
    "output",
    "cache",
    "remeasure_front",
    "screening",
    "distill",
    "seed_sensitivity",
    "refine_front",
    "evolve_front",
    "methods",
    "layer_store",
    "metrics",
    "device",
}


def _section(data: Mapping[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
    raw = data.get(key) or {}
    if not isinstance(raw, Mapping):
        raise _fail(key, raw, f"'{key}' must be a mapping with keys {sorted(allowed)}")
    unknown = set(raw) - allowed
    if unknown:
        raise StudyError(f"{key}: unknown key(s) {sorted(unknown)}; allowed keys are {sorted(allowed)}")
    return dict(raw)


def _int(value: Any, where: str, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _fail(where, value, f"give a whole number >= {low}")
    return value


def _num(value: Any, where: str, low: float = 0.0) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= low:
        raise _fail(where, value, f"give a number > {low}")
    return float(value)


def _choice(value: Any, where: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise _fail(where, value, f"choose one of {list(allowed)}")
    return str(value)


def _path(base: Path, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    return (path if path.is_absolute() else base / path).resolve()


def _model(data: Mapping[str, Any], base_dir: Path) -> ModelSpec:
    raw = _section(data, "model", {"source", "config", "finetune", "trust_remote_code", "allow_pickle"})
    source = raw.get("source")
    config = raw.get("config")
    if source is None and config is None:
        raise StudyError(
            f"model.source: missing; give one of {list(BUILTIN_MODELS)}, a path to a saved "
            "transformers model folder, or model.config for a randomly initialised model"
        )
    if source is not None and not isinstance(source, str):
        raise _fail("model.source", source, f"give a string: one of {list(BUILTIN_MODELS)} or a folder path")
    if source is None:
        if not isinstance(config, Mapping) or "model_type" not in config:
            raise _fail("model.config", config, "give a transformers config mapping with a 'model_type'")
        source = "config"
    elif source.startswith("builtin:"):
        _choice(source, "model.source", BUILTIN_MODELS)
    else:
        path = _path(base_dir, source)
        if not (path / "config.json").is_file():
            raise _fail(
                "model.source",
                source,
                f"no transformers model folder (with config.json) at {path}; "
                f"give an existing folder or one of {list(BUILTIN_MODELS)}",
            )
        source = str(path)
    finetune = None
    if raw.get("finetune") is not None:
        ft = _section(raw, "finetune", {"epochs", "learning_rate", "batch_size"})
        finetune = FinetuneSpec(
            epochs=_num(ft.get("epochs", 2.0), "model.finetune.epochs"),
            learning_rate=_num(ft.get("learning_rate", 5e-5), "model.finetune.learning_rate"),
            batch_size=_int(ft.get("batch_size", 32), "model.finetune.batch_size"),
        )
    trust = raw.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise _fail("model.trust_remote_code", trust, "write true or false")
    pickle = raw.get("allow_pickle", False)
    if not isinstance(pickle, bool):
        raise _fail("model.allow_pickle", pickle, "write true or false")
    return ModelSpec(
        source=str(source), config=config, finetune=finetune, trust_remote_code=trust, allow_pickle=pickle
    )


def _task(data: Mapping[str, Any], base_dir: Path) -> TaskSpec:
    from slimsearch.search.sources import FILE_FORMATS, HUB, check_split, describe_formats

    keys = {
        "kind",
        "data",
        "rows",
        "text",
        "train_size",
        "test_size",
        "max_length",
        "eval_batch_size",
        "block_size",
        "eval_blocks",
        "seed",
        "calibration_rows",
        "text_column",
        "text_pair_column",
        "label_column",
        "split",
        "test_split",
    }
    raw = _section(data, "task", keys)
    kind = _choice(raw.get("kind"), "task.kind", TASK_KINDS)
    rows = raw.get("rows")
    text = raw.get("text")
    source = raw.get("data")
    if rows is not None:
        rows = _tagged_rows(rows) if kind == "token-classification" else _labelled_rows(rows)
        source = source or "inline"
    elif text is not None:
        source = source or "inline"
    elif source is None:
        raise StudyError(f"task.data: missing; give one of {list(BUILTIN_DATA)} or {describe_formats()}")
    elif str(source).startswith("builtin:"):
        _choice(source, "task.data", BUILTIN_DATA)
        if kind == "token-classification":
            raise _fail(
                "task.data",
                source,
                "no built-in data is tagged per word for token-classification; "
                "give a file or folder with word and tag columns (tokens / ner_tags)",
            )
    elif not str(source).startswith(HUB):
        path = _path(base_dir, source)
        if not path.exists():
            raise _fail("task.data", source, f"nothing at {path}; give {describe_formats()}")
        if path.is_file() and path.suffix.lower() not in FILE_FORMATS:
            raise _fail(
                "task.data", source, f"unknown file suffix {path.suffix!r}; give {describe_formats()}"
            )
        if kind in LABELLED_KINDS and path.suffix.lower() == ".txt":
            raise _fail("task.data", source, "a .txt file is causal-lm text; classifiers need labelled rows")
        source = str(path)
    columns: dict[str, Any] = {}
    for key in ("text_column", "label_column", "text_pair_column"):
        default = TOKEN_COLUMNS.get(key) if kind == "token-classification" else None
        value = raw.get(key, default or _READING_DEFAULTS[key])
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise _fail(f"task.{key}", value, "give a column name")
        columns[key] = value
    if kind != "classification" and columns["text_pair_column"] is not None:
        raise StudyError(
            f"task.text_pair_column: pairs of texts are for classification, not {kind}; remove it"
        )
    splits = {}
    for key in ("split", "test_split"):
        value = raw.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise _fail(f"task.{key}", value, "give a split such as 'train' or 'train[:2000]'")
            check_split(value, f"task.{key}")
        splits[key] = value
    if kind == "causal-lm" and splits["test_split"] is not None:
        raise StudyError(
            "task.test_split: a causal-lm task scores the start of its text and trains after it; "
            "remove test_split (task.split picks the text)"
        )
    if kind == "causal-lm" and rows is not None:
        raise StudyError("task.rows: inline rows are for classification; a causal-lm task takes task.text")
    spec = TaskSpec(
        kind=kind,
        data=str(source),
        rows=rows,
        text=None if text is None else str(text),
        train_size=_int(raw.get("train_size", 3000), "task.train_size", 0),
        test_size=_int(raw.get("test_size", 1000), "task.test_size"),
        max_length=_int(raw.get("max_length", 64), "task.max_length", 2),
        eval_batch_size=_int(raw.get("eval_batch_size", 64), "task.eval_batch_size"),
        block_size=_int(raw.get("block_size", 256), "task.block_size", 2),
        eval_blocks=_int(raw.get("eval_blocks", 32), "task.eval_blocks"),
        seed=_int(raw.get("seed", 0), "task.seed", 0),
        calibration_rows=(
            None
            if raw.get("calibration_rows") is None
            else _int(raw["calibration_rows"], "task.calibration_rows")
        ),
        text_column=columns["text_column"],
        text_pair_column=columns["text_pair_column"],
        label_column=columns["label_column"],
        split=splits["split"],
        test_split=splits["test_split"],
    )
    return spec


def _labelled_rows(rows: Any) -> tuple[tuple[str, int | str], ...]:
    if not isinstance(rows, (list, tuple)) or not rows:
        raise _fail("task.rows", rows, "give a list of [text, label] pairs")
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 2 or isinstance(row[1], (bool, float)):
            raise _fail(f"task.rows[{i}]", row, "give a [text, label] pair (label: a whole number or a name)")
    return tuple((str(t), label if isinstance(label, int) else str(label)) for t, label in rows)


def _tagged_rows(rows: Any) -> tuple[tuple[tuple[str, ...], tuple[int | str, ...]], ...]:
    """Inline token-classification rows: ``[[words...], [tags...]]``, one tag per word."""
    if not isinstance(rows, (list, tuple)) or not rows:
        raise _fail("task.rows", rows, "give a list of [[words...], [tags...]] pairs")
    out = []
    for i, row in enumerate(rows):
        ok = isinstance(row, (list, tuple)) and len(row) == 2
        words, tags = (row[0], row[1]) if ok else (None, None)
        if not ok or not isinstance(words, (list, tuple)) or not isinstance(tags, (list, tuple)):
            raise _fail(f"task.rows[{i}]", row, "give a [list of words, list of tags] pair")
        if not words or not all(isinstance(w, str) for w in words):
            raise _fail(f"task.rows[{i}]", row, "its first item must be a non-empty list of words (strings)")
        if any(isinstance(t, (bool, float)) or not isinstance(t, (int, str)) for t in tags):
            raise _fail(f"task.rows[{i}]", row, "each tag must be a whole number or a name")
        if len(words) != len(tags):
            raise _fail(
                f"task.rows[{i}]",
                row,
                f"it has {len(words)} words and {len(tags)} tags; give one tag per word",
            )
        out.append((tuple(words), tuple(tags)))
    return tuple(out)


def _metrics(
    data: Mapping[str, Any], kind: str, objectives: tuple[ObjectiveSpec, ...]
) -> tuple[ObjectiveSpec, ...]:
    """Evaluators measured on every trial (and the baseline) but not optimized: for
    constraints and for the report."""
    raw = data.get("metrics")
    if raw is None or raw == []:
        return ()
    out = _evaluator_specs(raw, kind, "metrics")
    for spec in out:
        if spec.name in {o.name for o in objectives}:
            raise StudyError(f"metrics: {spec.name!r} is already an objective; list it once")
    return out


def _objectives(data: Mapping[str, Any], kind: str) -> tuple[ObjectiveSpec, ...]:
    raw = data.get("objectives")
    if raw is None:
        raw = ["accuracy" if kind in LABELLED_KINDS else "perplexity", "size_bytes", "latency_ms"]
    out = _evaluator_specs(raw, kind, "objectives")
    names = [o.name for o in out]
    if kind in LABELLED_KINDS and "perplexity" in names:
        raise StudyError(f"objectives: perplexity needs task.kind causal-lm; use accuracy for {kind}")
    return out


def _evaluator_specs(raw: Any, kind: str, section: str) -> tuple[ObjectiveSpec, ...]:
    from slimsearch.evaluators import make_evaluator

    if not isinstance(raw, list) or not raw:
        raise _fail(section, raw, "give a list such as [accuracy, size_bytes, latency_ms]")
    out = []
    for i, item in enumerate(raw):
        where = f"{section}[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or "name" not in item:
            raise _fail(where, item, "give an evaluator name or {name: ..., direction: ..., options: {...}}")
        unknown = set(item) - {"name", "direction", "options"}
        if unknown:
            raise StudyError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: name, direction, options")
        ref = str(item["name"])
        options = dict(item.get("options") or {})
        try:
            evaluator = make_evaluator(ref, options)
            check = getattr(evaluator, "check", None)
            if callable(check):
                check()  # the evaluator's own inputs (a data file), before any model is loaded
        except (ValueError, TypeError) as exc:
            raise StudyError(f"{where}.name: {exc}") from None
        tasks = getattr(evaluator, "tasks", None)
        if tasks is not None and kind not in tasks:
            raise StudyError(
                f"{where}.name: {ref!r} measures task kind(s) {list(tasks)}, and this study's "
                f"task.kind is {kind!r}; use {'perplexity' if kind == 'causal-lm' else 'accuracy'} for its "
                "quality, latency_ms or latency_ratio for its speed"
            )
        direction = item.get("direction", evaluator.direction)
        _choice(direction, f"{where}.direction", ("minimize", "maximize"))
        out.append(ObjectiveSpec(name=evaluator.name, direction=direction, ref=ref, options=options))
    names = [o.name for o in out]
    if len(set(names)) != len(names):
        raise _fail(section, names, "each evaluator may appear once")
    return tuple(out)


def constraint_metric(key: str, objective_names: set[str] | list[str]) -> str | None:
    """The metric a constraint reads, when the study measures it."""
    metric = resolve(key, objective_names).metric
    return metric if metric in objective_names else None


def _constraints(data: Mapping[str, Any], measured: tuple[ObjectiveSpec, ...]) -> dict[str, float]:
    from slimsearch.evaluators import make_evaluator

    raw = data.get("constraints") or {}
    items: list[tuple[str, Any]] = []
    if isinstance(raw, Mapping):
        items = [(f"constraints.{k}", {k: v}) for k, v in raw.items()]
    elif isinstance(raw, list):
        items = [(f"constraints[{i}]", item) for i, item in enumerate(raw)]
    else:
        raise _fail("constraints", raw, "give a mapping such as {max_accuracy_drop: 1.0} or a list of them")
    names = {o.name for o in measured}
    evaluators = {o.name: make_evaluator(o.ref, dict(o.options)) for o in measured}
    out: dict[str, float] = {}
    for where, item in items:
        if isinstance(item, Mapping) and "metric" in item:
            try:
                key, limit = parse_listed(item, where, evaluators)
            except ValueError as exc:
                raise StudyError(str(exc)) from None
        elif isinstance(item, Mapping) and len(item) == 1 and next(iter(item)) in NAMED:
            key, value = next(iter(item.items()))
            if value is None:
                continue
            if constraint_metric(key, names) is None:
                raise StudyError(
                    f"constraints.{key}: needs the objective {NAMED[key][0]!r}, which this study "
                    f"does not have (objectives and metrics: {sorted(names)})"
                )
            low = -1e-12 if key == "max_accuracy_drop" else 0.0
            limit = _num(value, f"constraints.{key}", low)
        else:
            raise StudyError(
                f"{where}: unknown constraint {item!r}; use one of {sorted(NAMED)} or "
                "{metric: NAME, max_drop | max_increase | max_ratio | min_ratio | max | min | limit: value}"
            )
        if key in out:
            raise StudyError(f"{where}: {key} is bounded twice; keep one")
        out[key] = limit
    return out


def _check_onnxruntime(kind: str) -> None:
    import importlib.util

    if kind not in ONNX_TASKS:
        raise StudyError(
            f"latency.backend: onnxruntime times classifiers and causal LMs here, and task.kind is {kind!r}; "
            "use backend torch"
        )
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise StudyError(
            "latency.backend: onnxruntime needs the onnxruntime and onnx packages: pip install -e '.[onnx]'"
        )


def _distill(data: Mapping[str, Any]) -> DistillSpec:
    from slimsearch.spaces.methods.distill import DistillRecipe

    raw = _section(data, "distill", {"mode", "recipe", "search", "finalists"})
    if not raw:
        return DistillSpec()
    mode = _choice(raw.get("mode", "finalists"), "distill.mode", DISTILL_MODES)
    recipe = dict(raw.get("recipe") or {})
    try:
        DistillRecipe.from_dict(recipe)
    except (TypeError, ValueError) as exc:
        raise StudyError(f"distill.recipe: {exc}") from None
    search: dict[str, tuple[Any, ...]] = {}
    for key, values in dict(raw.get("search") or {}).items():
        if not isinstance(values, list) or not values:
            raise _fail(f"distill.search.{key}", values, "give a non-empty list of values to search")
        for value in values:
            try:
                DistillRecipe.from_dict(recipe | {key: value})
            except (TypeError, ValueError) as exc:
                raise StudyError(f"distill.search.{key}: {exc}") from None
        search[key] = tuple(values)
    if search and mode != "every-trial":
        raise StudyError("distill.search: searched recipe knobs need distill.mode every-trial")
    return DistillSpec(
        mode=mode,
        recipe=recipe,
        search=search,
        finalists=_int(raw.get("finalists", 4), "distill.finalists"),
    )


def _check_lm_screening(screening: ScreeningSpec, task: TaskSpec) -> None:
    tokens = screening.tokens
    if task.kind != "causal-lm":
        raise _fail(
            "screening.tokens",
            tokens,
            f"it screens causal LMs; a {task.kind} study screens screening.examples rows: remove tokens",
        )
    blocks = screening.blocks(task.block_size)
    if blocks >= task.eval_blocks:
        raise _fail(
            "screening.tokens",
            tokens,
            f"it takes {blocks} of the {task.eval_blocks} evaluation blocks of {task.block_size} tokens, "
            f"so a screen would cost a full score; give at most {(task.eval_blocks - 1) * task.block_size}",
        )


def _screening(data: Mapping[str, Any]) -> ScreeningSpec | None:
    raw = data.get("screening", {})
    if raw is False or raw is None:
        return None
    if raw is True:
        return ScreeningSpec()
    if not isinstance(raw, Mapping):
        raise _fail("screening", raw, "write false, or a mapping {examples: 200, z: 2.0, tokens: 256}")
    raw = _section(data, "screening", {"examples", "z", "tokens"})
    tokens = raw.get("tokens")
    return ScreeningSpec(
        examples=_int(raw.get("examples", 200), "screening.examples"),
        z=_num(raw.get("z", 2.0), "screening.z"),
        tokens=None if tokens is None else _int(tokens, "screening.tokens"),
    )


def load_study(path: str | Path, overrides: Mapping[str, Any] | None = None) -> StudySpec:
    """Read and validate a study file. ``overrides`` replace top-level sections."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {str(path)!r} does not exist; the shipped studies are in studies/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise StudyError(f"{path}: a study file is a YAML mapping, got {type(data).__name__}")
    merged = dict(data)
    merged.update(overrides or {})
    return study_from_mapping(merged)


def study_from_mapping(data: Mapping[str, Any], base_dir: str | Path = ".") -> StudySpec:
    """Validate a study given as a mapping (what a YAML file holds).

    Relative paths (model, data, output, cache) are taken from ``base_dir``, by default the
    current directory.
    """
    base = Path(base_dir).resolve()
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise StudyError(f"study: unknown key(s) {sorted(unknown)}; allowed keys are {sorted(_TOP_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise _fail("name", name, "give a name of letters, digits, '.', '_' or '-'")
    model = _model(data, base)
    task = _task(data, base)
    methods = _methods(data.get("methods"))
    try:
        space = space_config_from_mapping(data.get("space"))
    except ValueError as exc:
        raise StudyError(str(exc)) from None
    objectives = _objectives(data, task.kind)
    metrics = _metrics(data, task.kind, objectives)
    constraints = _constraints(data, objectives + metrics)

    lat = _section(
        data,
        "latency",
        {
            "batch_size",
            "seq_len",
            "warmup",
            "repeats",
            "threads",
            "max_cv",
            "retries",
            "precision",
            "max_repeats",
            "max_drift",
            "shapes",
            "target",
            "time_budget",
            "decode_tokens",
            "backend",
        },
    )
    if lat.get("time_budget") not in (None, 0):
        lat["time_budget"] = parse_duration(lat["time_budget"], "latency.time_budget")
    if "shapes" in lat:
        shapes = lat["shapes"]
        if not isinstance(shapes, list):
            raise _fail(
                "latency.shapes", shapes, "give a list of [batch_size, seq_len] pairs, e.g. [[16, 128]]"
            )
        lat["shapes"] = tuple(tuple(s) if isinstance(s, list) else s for s in shapes)
    try:
        latency = LatencySpec(**lat)
    except (TypeError, ValueError) as exc:
        raise StudyError(str(exc)) from None
    if latency.backend == "onnxruntime":
        _check_onnxruntime(task.kind)

    smp = _section(data, "sampler", {"name", "seed", "population_size"})
    sampler = SamplerSpec(
        name=_choice(smp.get("name", "tpe"), "sampler.name", SAMPLERS),
        seed=_int(smp.get("seed", 0), "sampler.seed", 0),
        population_size=_int(smp.get("population_size", 20), "sampler.population_size", 2),
    )
    bud = _section(data, "budget", {"trials", "timeout"})
    trials = bud.get("trials", 30)
    budget = BudgetSpec(
        trials=None if trials is None else _int(trials, "budget.trials"),
        timeout_s=parse_duration(bud.get("timeout")),
    )
    if budget.trials is None and budget.timeout_s is None:
        raise StudyError("budget: give budget.trials, budget.timeout, or both, so the search ends")
    exe = _section(
        data,
        "executor",
        {"kind", "address", "max_in_flight", "trial_timeout", "max_consecutive_failures", "gpus_per_trial"},
    )
    failures = exe.get("max_consecutive_failures", 10)
    executor = ExecutorSpec(
        kind=_choice(exe.get("kind", "ray"), "executor.kind", EXECUTORS),
        address=exe.get("address"),
        max_in_flight=_int(exe.get("max_in_flight", 1), "executor.max_in_flight"),
        trial_timeout_s=parse_duration(exe.get("trial_timeout"), "executor.trial_timeout"),
        max_consecutive_failures=None
        if failures is None
        else _int(failures, "executor.max_consecutive_failures"),
        gpus_per_trial=_gpus_per_trial(exe.get("gpus_per_trial", 1.0)),
    )
    device = _device(data.get("device", "cpu"), executor, "gpus_per_trial" in exe, latency)
    if executor.address is not None and not isinstance(executor.address, str):
        raise _fail(
            "executor.address", executor.address, "give a Ray address like '127.0.0.1:6379' or 'auto'"
        )
    seed_uniform = data.get("seed_uniform", True)
    if not isinstance(seed_uniform, bool):
        raise _fail("seed_uniform", seed_uniform, "write true or false")
    seed_sensitivity, seed_budgets = _seed_sensitivity(data.get("seed_sensitivity", False))
    refine_front = _front_steps(data, "refine_front", seed_sensitivity, seed_sensitivity)
    evolve_front = _front_steps(data, "evolve_front", False, seed_sensitivity)
    remeasure = data.get("remeasure_front", True)
    if not isinstance(remeasure, bool):
        raise _fail("remeasure_front", remeasure, "write true or false")
    screening = _screening(data)
    if screening is not None and screening.tokens is not None:
        _check_lm_screening(screening, task)
    distill = _distill(data)
    output = data.get("output", f"runs/{name}")
    cache = data.get("cache", str(Path.home() / ".cache" / "slimsearch"))
    return StudySpec(
        name=name,
        model=model,
        task=task,
        space=space,
        objectives=objectives,
        constraints=constraints,
        metrics=metrics,
        latency=latency,
        sampler=sampler,
        seed_uniform=seed_uniform,
        remeasure_front=remeasure,
        screening=screening,
        distill=distill,
        seed_sensitivity=seed_sensitivity,
        seed_budgets=seed_budgets,
        refine_front=refine_front,
        evolve_front=evolve_front,
        budget=budget,
        executor=executor,
        storage=_choice(data.get("storage", "sqlite"), "storage", STORAGES),
        output=_path(base, output),
        cache=_path(base, cache),
        raw=dict(data),
        methods=methods,
        layer_store_bytes=_layer_store(data.get("layer_store", True)),
        device=device,
    )


def _gpus_per_trial(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _fail(
            "executor.gpus_per_trial", value, "give a positive number: 1 (a GPU each), or 0.5 to share one"
        )
    if value > 1 and value != int(value):
        raise _fail("executor.gpus_per_trial", value, "above 1, give a whole number of GPUs")
    return float(value)


def _device(value: Any, executor: ExecutorSpec, gpus_given: bool, latency: LatencySpec) -> str:
    """The study's device, with the settings that cannot go with it refused (``gpus_given``:
    the file sets executor.gpus_per_trial)."""
    try:
        device = parse_device(value)
    except ValueError as exc:
        raise StudyError(str(exc)) from None
    if device == "cpu":
        if gpus_given:
            raise StudyError(
                "executor.gpus_per_trial: set, but device is cpu; set device: cuda, or drop gpus_per_trial"
            )
        return device
    if latency.backend != "torch":
        raise StudyError(
            f"latency.backend: {latency.backend} times on the CPU, but device is {device}; drop "
            "latency.backend (torch times on the GPU), or set device: cpu"
        )
    if ":" in device and executor.kind == "ray":
        raise StudyError(
            f"device: {device} with executor.kind ray: Ray gives each trial its own GPU, so write "
            "device: cuda (CUDA_VISIBLE_DEVICES chooses the GPUs Ray may use), or executor.kind inprocess"
        )
    return device


def _layer_store(raw: Any) -> int | None:
    """``true`` (8 GB), ``false`` (off), or ``{max_gb: N}``."""
    if raw is True:
        return DEFAULT_MAX_BYTES
    if raw is False:
        return None
    if isinstance(raw, Mapping) and set(raw) == {"max_gb"}:
        size = raw["max_gb"]
        if not isinstance(size, bool) and isinstance(size, (int, float)) and size > 0:
            return int(size * (1 << 30))
    raise _fail("layer_store", raw, "write true, false, or {max_gb: 8} (the disk the store may use)")


def _methods(raw: Any) -> tuple[str, ...]:
    """Import and register each ``package.module:ClassName`` the study lists."""
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else None
    if items is None or not all(isinstance(i, str) and ":" in i for i in items):
        raise _fail("methods", raw, "give a list of 'package.module:ClassName' references to Method classes")
    for item in items:
        try:
            registry.resolve(item)
        except ValueError as exc:
            raise StudyError(f"methods: {exc}") from None
    return tuple(items)


def _front_steps(data: Mapping[str, Any], key: str, default: bool, seed_sensitivity: bool) -> bool:
    """refine_front / evolve_front: a bool, and only with the profile the steps are chosen by."""
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise _fail(key, value, "write true or false")
    if value and not seed_sensitivity:
        raise _fail(
            key, value, f"{key} steps need the sensitivity profile: set seed_sensitivity: true, or drop {key}"
        )
    return value


def _seed_sensitivity(value: Any) -> tuple[bool, tuple[float, ...] | None]:
    """``true``/``false``, or ``{size_budgets: [0.45, 0.3]}`` to fit the sensitivity seeds to
    your own fractions of the searched layers' bytes (the defaults suit MiniLM's 2-bit space)."""
    if isinstance(value, bool):
        return value, None
    hint = "write true, false, or {size_budgets: [0.45, 0.35, 0.25]}"
    if not isinstance(value, Mapping) or set(value) != {"size_budgets"}:
        raise _fail("seed_sensitivity", value, hint)
    budgets = value["size_budgets"]
    if not isinstance(budgets, list) or not budgets:
        raise _fail("seed_sensitivity.size_budgets", budgets, "give a non-empty list of fractions in (0, 1]")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b <= 1.0:
            raise _fail(
                "seed_sensitivity.size_budgets",
                b,
                "each budget is a fraction of the searched layers' uncompressed bytes, in (0, 1]",
            )
    if len(set(budgets)) != len(budgets):
        raise _fail("seed_sensitivity.size_budgets", budgets, "list each budget once")
    return True, tuple(float(b) for b in budgets)


__all__ = ["StudyError", "StudySpec", "evaluator_names", "load_study", "parse_duration", "study_from_mapping"]
