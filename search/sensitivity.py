"""Per-layer sensitivity: how much the task loss moves when only ONE layer is compressed.

For every searched unit (a Linear, the embedding table, or a Transformer block under
structured pruning) and every non-off value of each of its knobs, compress that unit alone
and measure the task loss on a small fixed subset of the training split (cross-entropy for
classifiers, next-token NLL on a few blocks for causal LMs). The exact serialized bytes of
every combination of the unit's knob values are measured too, so seeds can be fitted to a
size budget without guessing how bits, sparsity and rank compose.

The profile is computed once per (baseline, task, space) and cached as JSON under
``<cache>/sensitivity/<key>.json``. ``sensitivity_seeds`` then turns it into a few Optuna
params dicts, one per (family, size budget), by greedily compressing where the loss moves
least: the "fast" family keeps Linears on bf16/int8 kernels, "low-bit" mixes only the
space's widths of 4 bits and under (a ladder down from all-4-bit), "any" may use every value.

    profile = load_or_compute_profile(spec, space, baseline_dir)
    proposer = Seeds("sensitivity", sensitivity_seeds(space, profile))  # search/proposers
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimsearch.search import models
from slimsearch.search.data import TaskData
from slimsearch.search.log import fmt_seconds, say
from slimsearch.search.study_file import LABELLED_KINDS, StudySpec, TaskSpec
from slimsearch.spaces import CompressionPlan, SearchSpace, apply_plan, serialized_size
from slimsearch.spaces.apply import compress_linear, layer_stats
from slimsearch.spaces.inputs import IGNORE, model_inputs
from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.calibration import CalibrationStats
from slimsearch.spaces.methods.quantize import GROUPED_BITS
from slimsearch.spaces.methods.registry import SPEED
from slimsearch.spaces.plan import LayerSettings
from slimsearch.spaces.space import Knob

PROFILE_FORMAT = 2
PROFILE_ROWS = 128  # labelled rows of the TRAINING split the loss is measured on
# Causal-LM blocks of task.block_size tokens (held out from the perplexity text). A profile
# is ~5 forward passes per searched Linear: SmolLM2 takes 0.4 s per 128-token block on one
# thread, so 4 blocks cost ~30 min once. With 2, seeds fitted to 256 tokens did worse on
# the 1,024 scored ones (0.35x of the bytes: 10.8% more perplexity; see the README).
PROFILE_LM_BLOCKS = 4
# Fractions of the searched layers' uncompressed bytes. All-int8 sits near 0.25 on MiniLM
# and all-4-bit near 0.14, so budgets above ~0.35 only rebuild what the uniform seeds try;
# those below 0.14 need 2-bit choices (a smaller budget out of reach just gives the smallest).
SIZE_BUDGETS = (0.35, 0.25, 0.18, 0.12, 0.10, 0.08)
# The low-bit family is a ladder with a known top (all at LOW_BITS) and bottom (all at the
# fewest bits): it takes this many rungs evenly spaced in bytes between them instead of the
# budgets above. On MiniLM fixed budgets put one rung where 11 of 37 units were at 2 bits
# and the next at 36: the 1-point accuracy limit fell between them.
LADDER_RUNGS = 12
# Seed families: "any" may use every value; "fast" keeps each searched Linear at a bit-width
# whose kernel beats fp32 at every batch (bf16/int8), so its seeds also gain latency. The
# int4 kernel (4, 3 and 2 bits) is faster only for a few rows at a time (decoding): at 64
# rows it is slower than fp32 (benchmarks/kernels.py), and a seed no faster than the
# baseline adds nothing to a hypervolume whose latency reference is the baseline. "low-bit" changes
# only bits, among widths <= LOW_BITS, so it starts from all-4-bit and moves the least
# sensitive units to 2 bits. On MiniLM the "any" seeds under 12% were all rejected (the
# summed single-layer deltas of sparsity, rank and 2-bit stacked badly), while this ladder
# kept 0.113x of the bytes within 0.7 points (min-max 2-bit; 0.108x with least squares).
FAMILIES = ("fast", "low-bit", "any")
LOW_BITS = 4
# One thread: on 2 shared cores a busy neighbour made 2-thread OpenMP work crawl (an SVD of a
# 1536x384 layer took 5 s instead of 0.07 s; a forward pass 2x longer). Numbers do not change.
PROFILE_THREADS = 1
_EPS = 1e-9


@dataclass(frozen=True)
class Option:
    """One combination of a unit's knob values and the unit's exact serialized bytes with it."""

    params: Mapping[str, Any]
    bytes: int


@dataclass(frozen=True)
class Profile:
    """Loss deltas per (param, value) against the uncompressed loss, and bytes per option.

    ``loss[param]`` lists ``(value, delta)`` pairs for every non-off value; ``options[unit]``
    lists every combination of the unit's searched values (the all-off one included).
    """

    key: str
    metric: str
    rows: int
    baseline_loss: float
    loss: Mapping[str, Sequence[tuple[Any, float]]]
    options: Mapping[str, Sequence[Option]]
    seconds: float = 0.0

    def delta(self, param: str, value: Any) -> float:
        for v, d in self.loss.get(param, ()):
            if v == value:
                return d
        return 0.0  # off values (and knobs with one choice) cost nothing

    def option_delta(self, param: str, value: Any, params: Mapping[str, Any]) -> float:
        """An option's loss change over its host method at the host value ``params`` hold
        (0 where the host is off or was not measured)."""
        found = [
            (*key[len(param) + 1 :].partition("=")[::2], pairs)
            for key, pairs in self.loss.items()
            if key.startswith(param + "|")
        ]
        for host, host_value, pairs in found:
            # A host knob with one value is not among a unit's params: its one entry applies.
            if json.dumps(params.get(host)) == host_value or (host not in params and len(found) == 1):
                return next((d for v, d in pairs if v == value), 0.0)
        return 0.0

    def off_bytes(self, unit: str, off: Mapping[str, Any]) -> int:
        return _off_option(self.options[unit], off).bytes

    def compressible_bytes(self, off: Mapping[str, Any]) -> int:
        """Bytes of every searched unit left uncompressed: what the size budgets are fractions of."""
        return sum(self.off_bytes(u, off) for u in self.options)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "key": self.key,
            "metric": self.metric,
            "rows": self.rows,
            "baseline_loss": self.baseline_loss,
            "seconds": round(self.seconds, 1),
            "loss": {p: [[v, d] for v, d in pairs] for p, pairs in self.loss.items()},
            "options": {
                u: [{"params": dict(o.params), "bytes": o.bytes} for o in opts]
                for u, opts in self.options.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(
                f"sensitivity profile format {data.get('format')!r} is not {PROFILE_FORMAT}; "
                "delete the file so it is computed again"
            )
        return cls(
            key=str(data["key"]),
            metric=str(data["metric"]),
            rows=int(data["rows"]),
            baseline_loss=float(data["baseline_loss"]),
            loss={p: [(v, float(d)) for v, d in pairs] for p, pairs in data["loss"].items()},
            options={
                u: [Option(dict(o["params"]), int(o["bytes"])) for o in opts]
                for u, opts in data["options"].items()
            },
            seconds=float(data.get("seconds", 0.0)),
        )


# -- where profiles live ----------------------------------------------------------------------
def profile_key(baseline_dir: Path, task: TaskSpec, space: SearchSpace | str) -> str:
    """Hash of everything that decides a profile: baseline folder, task, space (or its
    fingerprint, as a run's study stores it), subset size."""
    parts = {
        "format": PROFILE_FORMAT,
        "methods": registry.versions(),
        "baseline": str(Path(baseline_dir).resolve()),
        "task": task.identity(),
        "space": space if isinstance(space, str) else space.fingerprint(),
        "rows": PROFILE_ROWS,
    }
    if task.kind == "causal-lm":
        parts["lm_blocks"] = PROFILE_LM_BLOCKS
        parts["lm_text"] = "held-out"  # earlier LM profiles were measured on the perplexity blocks
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def profile_path(cache: Path, key: str) -> Path:
    return Path(cache) / "sensitivity" / f"{key}.json"


def read_profile(path: Path) -> Profile | None:
    if not path.is_file():
        return None
    return Profile.from_dict(json.loads(path.read_text()))


def write_profile(profile: Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(profile.to_dict(), indent=1))
    tmp.replace(path)  # appears whole or not at all


def load_or_compute_profile(spec: StudySpec, space: SearchSpace, baseline_dir: Path) -> Profile:
    """The cached profile for this baseline, task and space; computed (and cached) the first time."""
    key = profile_key(baseline_dir, spec.task, space)
    path = profile_path(spec.cache, key)
    cached = read_profile(path)
    if cached is not None:
        return cached
    model, tokenizer = models.load_baseline(Path(baseline_dir), spec.task.kind, spec.model.trust_remote_code)
    from slimsearch.search.worker import task_data

    data = task_data(str(baseline_dir), str(spec.cache), spec.task, tokenizer)
    batches = loss_batches(data)
    stats = _calibration_stats(space, model, Path(baseline_dir), data)
    threads = torch.get_num_threads()
    torch.set_num_threads(PROFILE_THREADS)
    try:
        profile = compute_profile(model, space, batches, spec.task.kind, key, stats)
    finally:
        torch.set_num_threads(threads)
    write_profile(profile, path)
    say(f"sensitivity profile written to {path} ({fmt_seconds(profile.seconds)})")
    return profile


def _calibration_stats(
    space: SearchSpace, model: nn.Module, baseline_dir: Path, data: TaskData
) -> CalibrationStats | None:
    """The statistics trials use (the worker's, from training rows, of this baseline), where a
    searched method reads them."""
    wanted: set[str] = set()
    for knob in space.knobs:
        method = registry.get(knob.knob)
        if knob.choices != (method.choice_off_value(),):
            wanted |= method.needs
    if not wanted:
        return None
    from slimsearch.search.worker import calibration_stats

    return calibration_stats(model, str(baseline_dir), data, frozenset(wanted))


def loss_batches(data: TaskData) -> list[dict[str, Tensor]]:
    """Data the trials are NOT scored on, so the test data cannot steer the seeds: a fixed
    random subset of the training split (classification) or the first blocks of the text
    after the perplexity blocks (causal LM; the perplexity text itself only when nothing
    else is left, with a warning)."""
    task = data.task
    if task.kind in LABELLED_KINDS:
        return data.rows_batches(data.profile_rows(PROFILE_ROWS), task.eval_batch_size)
    try:
        return data.blocks(data.held_out_text(), PROFILE_LM_BLOCKS, task.eval_batch_size)
    except ValueError:
        say(
            "sensitivity: the text has no block left after the perplexity blocks; profiling on "
            "the perplexity text itself, so the seeds are fitted to the data that scores them"
        )
        return data.blocks(data.text(), PROFILE_LM_BLOCKS, task.eval_batch_size)


@torch.no_grad()
def task_loss(model: nn.Module, batches: Sequence[Mapping[str, Tensor]], kind: str) -> float:
    """Mean cross-entropy per example (classification), per labelled token (token
    classification) or per predicted token (causal LM)."""
    total, count = 0.0, 0
    for batch in batches:
        if kind in LABELLED_KINDS:
            logits = model(**model_inputs(batch)).logits.float()
            labels = batch["labels"].reshape(-1)
            flat = logits.reshape(-1, logits.shape[-1])
            total += float(F.cross_entropy(flat, labels, ignore_index=IGNORE, reduction="sum"))
            count += int((labels != IGNORE).sum())
        else:
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            total += float(
                F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum")
            )
            count += int(target.numel())
    return total / max(count, 1)


# -- computing a profile ----------------------------------------------------------------------
def off_params(space: SearchSpace) -> dict[str, Any]:
    """Every searched param at its off value: the first of ``space.uniform_params()``."""
    return dict(space.uniform_params()[0])


def searched_units(space: SearchSpace) -> dict[str, list[Knob]]:
    """Searched knobs (more than one choice) grouped by the unit they belong to, in space order."""
    units: dict[str, list[Knob]] = {}
    for k in space.knobs:
        if len(k.choices) > 1:
            units.setdefault(k.layer, []).append(k)
    return units


def _combos(knobs: Sequence[Knob]) -> list[dict[str, Any]]:
    names = [SearchSpace.param_name(k) for k in knobs]
    return [
        dict(zip(names, values, strict=True)) for values in itertools.product(*(k.choices for k in knobs))
    ]


class _Measurer:
    """Compresses one unit of a working copy of the model at a time and puts it back."""

    def __init__(
        self,
        model: nn.Module,
        space: SearchSpace,
        batches: Sequence[Mapping[str, Tensor]],
        kind: str,
        stats: CalibrationStats | None,
    ) -> None:
        self.pristine = model
        self.work = copy.deepcopy(model).eval()  # Linears are swapped in place here
        self.space = space
        self.batches = batches
        self.kind = kind
        self.stats = stats
        self.off = off_params(space)
        self.full_bytes = serialized_size(model, CompressionPlan())
        self.factors: dict[Any, Any] = {}
        self.sizes: dict[tuple[str, LayerSettings], int] = {}

    def compress(self, unit: str, linear: nn.Linear, settings: LayerSettings) -> nn.Module:
        """``apply.compress_linear``, with each layer factorized once per value: the bytes of
        every combination with that factorization reuse it."""
        stats = layer_stats(self.stats, unit, linear)
        return compress_linear(linear, settings, stats, where=unit, memo=self.factors)

    def measure(self, unit: str, params: Mapping[str, Any], with_loss: bool) -> tuple[int, float | None]:
        """(bytes of the unit, task loss or None) with only ``params`` changed from off."""
        plan = self.space.decode(self.off | dict(params))
        original = self.work.get_submodule(unit)
        settings = plan.layers.get(unit)
        if isinstance(original, nn.Linear) and settings is not None:
            if not with_loss:
                # A rounding option chooses codes on its host's grid: the bytes are the host's.
                settings = LayerSettings(
                    **{n: v for n, v in settings.values.items() if not registry.get(n).rounds}
                )
                if (unit, settings) not in self.sizes:
                    compressed = self.compress(unit, original, settings) if not settings.is_off else original
                    self.sizes[(unit, settings)] = serialized_size(compressed, CompressionPlan())
                return self.sizes[(unit, settings)], None
            # Swap one Linear in place: far cheaper than copying the whole model per value.
            compressed = self.compress(unit, original, settings) if not settings.is_off else original
            size = serialized_size(compressed, CompressionPlan())
            self.sizes[(unit, settings)] = size
            self.work.set_submodule(unit, compressed)
            try:
                return size, task_loss(self.work, self.batches, self.kind)
            finally:
                self.work.set_submodule(unit, original)
        # Embeddings and structured blocks: apply the one-unit plan to a fresh copy.
        only = CompressionPlan(
            layers={unit: plan.layers[unit]} if unit in plan.layers else {},
            structured={unit: plan.structured[unit]} if unit in plan.structured else {},
        )
        model = apply_plan(copy.deepcopy(self.pristine), only, stats=self.stats).eval()
        off_size = serialized_size(self.pristine.get_submodule(unit), CompressionPlan())
        size = off_size + serialized_size(model, CompressionPlan()) - self.full_bytes
        return size, task_loss(model, self.batches, self.kind) if with_loss else None


def _host_values(m: _Measurer, unit: str, method: registry.Method) -> list[tuple[str, Any]]:
    """(host param, value) pairs an option is measured at: each non-off value the unit offers
    its host method (the knob ``option_base`` names)."""
    out: list[tuple[str, Any]] = []
    for host in method.option_base:
        for k in m.space.knobs:
            if k.layer == unit and k.knob == host:
                param = SearchSpace.param_name(k)
                out += [(param, v) for v in k.choices if v != registry.get(host).choice_off_value()]
    return out


def _measure_option(
    m: _Measurer, unit: str, knob: Knob, loss: dict[str, list[tuple[Any, float]]], base_loss: float
) -> int:
    """Loss changes of an option's values over its host at each host value, stored under
    ``"<param>|<host param>=<json value>"``; returns how many were measured."""
    method = registry.get(knob.knob)
    param = SearchSpace.param_name(knob)
    count = 0
    for host, host_value in _host_values(m, unit, method):
        # The host alone was measured among the unit's single-knob choices (where it is searched).
        known = [d for v, d in loss.get(host, ()) if v == host_value]
        host_loss = base_loss + known[0] if known else m.measure(unit, {host: host_value}, with_loss=True)[1]
        pairs = []
        for value in knob.choices:
            if value == m.off[param]:
                continue
            measured = m.measure(unit, {host: host_value, param: value}, with_loss=True)[1]
            pairs.append((value, float(measured) - float(host_loss)))  # type: ignore[arg-type]
            count += 1
        loss[f"{param}|{host}={json.dumps(host_value)}"] = pairs
    return count


def compute_profile(
    model: nn.Module,
    space: SearchSpace,
    batches: Sequence[Mapping[str, Tensor]],
    kind: str,
    key: str = "",
    stats: CalibrationStats | None = None,
) -> Profile:
    """Measure every (param, non-off value) loss delta and every option's bytes; shows progress."""
    started = time.monotonic()
    m = _Measurer(model.eval(), space, batches, kind, stats)
    base_loss = task_loss(m.work, batches, kind)
    units = searched_units(space)
    if not units:
        raise ValueError("the search space has no searched knob (each offers one value); nothing to profile")
    total = sum(
        (len(k.choices) - 1) * (len(_host_values(m, unit, registry.get(k.knob))) if _is_option(k.knob) else 1)
        for unit, ks in units.items()
        for k in ks
    )
    done = 0
    loss: dict[str, list[tuple[Any, float]]] = {}
    options: dict[str, list[Option]] = {}
    say(
        f"sensitivity profile: {total} single-layer choices over {len(units)} layers, "
        f"loss on {len(batches)} batches"
    )
    for i, (unit, knobs) in enumerate(units.items()):
        for k in knobs:
            param = SearchSpace.param_name(k)
            if registry.get(k.knob).option_of is not None:
                continue
            pairs = []
            for value in k.choices:
                if value == m.off[param]:
                    continue
                _, measured = m.measure(unit, {param: value}, with_loss=True)
                delta = float(measured) - base_loss  # type: ignore[arg-type]
                pairs.append((value, delta))
                done += 1
            loss[param] = pairs
        for k in knobs:
            if registry.get(k.knob).option_of is not None:
                done += _measure_option(m, unit, k, loss, base_loss)
        options[unit] = [
            Option(combo, m.measure(unit, combo, with_loss=False)[0]) for combo in _combos(knobs)
        ]
        if (i + 1) % 6 == 0 or i + 1 == len(units):
            elapsed = time.monotonic() - started
            eta = fmt_seconds(elapsed / max(done, 1) * (total - done))
            say(f"sensitivity: {i + 1}/{len(units)} layers, {done}/{total} choices, ETA {eta}")
    return Profile(
        key=key,
        metric="cross-entropy" if kind in LABELLED_KINDS else "next-token nll",
        rows=sum(int(b["input_ids"].shape[0]) for b in batches),
        baseline_loss=base_loss,
        loss=loss,
        options=options,
        seconds=round(time.monotonic() - started, 1),
    )


# -- seeds ------------------------------------------------------------------------------------
def matching_option(options: Sequence[Option], params: Mapping[str, Any]) -> Option | None:
    """The unit's option whose knob values ``params`` all take, if the profile measured it."""
    for o in options:
        if all(params.get(p) == v for p, v in o.params.items()):
            return o
    return None


def cost_floor(profile: Profile) -> float:
    """Added to every loss cost before dividing by it, on the loss's scale: zero-cost moves
    stay ordered by bytes saved instead of dividing by zero."""
    return max(_EPS, 1e-6 * max(abs(profile.baseline_loss), 1.0))


def _off_option(options: Sequence[Option], off: Mapping[str, Any]) -> Option:
    option = matching_option(options, off)
    if option is not None:
        return option
    raise ValueError(
        f"no all-off option among {[dict(o.params) for o in options][:3]}; recompute the profile"
    )


def option_cost(profile: Profile, option: Option, off: Mapping[str, Any]) -> float:
    """Estimated damage of an option: the sum of its knobs' single-knob loss changes, taken
    as magnitudes. A layer whose loss happened to drop on the subset still moved the model;
    counting that as free made the greedy stack rank, sparsity and 4-bit on such layers, and
    the stacked result failed the accuracy constraint on MiniLM. Method options (GPTQ, AWQ,
    a group size) add their signed change over their host at its value (measured so), so an
    option that repairs 2 bits makes 2 bits cheaper; the total never goes below zero."""
    changed = {p: v for p, v in option.params.items() if v != off.get(p)}
    main = sum(abs(profile.delta(p, v)) for p, v in changed.items() if not _is_option(p))
    repair = sum(profile.option_delta(p, v, option.params) for p, v in changed.items() if _is_option(p))
    return max(main + repair, 0.0)


def _is_option(param: str) -> bool:
    return registry.get(_knob(param)).option_of is not None


def _check(space: SearchSpace, profile: Profile, budgets: Sequence[float]) -> dict[str, Any]:
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b <= 1.0:
            raise ValueError(
                f"size_budgets: {b!r} is not a fraction of the compressible bytes; use values in (0, 1] "
                "such as (0.5, 0.35, 0.25)"
            )
    units = searched_units(space)
    if set(units) != set(profile.options):
        raise ValueError(
            f"the sensitivity profile {profile.key!r} was computed for another search space "
            f"({len(profile.options)} units, this space has {len(units)}); delete it so it is recomputed"
        )
    return off_params(space)


def allowed_options(space: SearchSpace, profile: Profile, family: str) -> dict[str, list[Option]]:
    """Each unit's options a seed family may use (see FAMILIES)."""
    if family not in FAMILIES:
        raise ValueError(f"seed family {family!r} is unknown; choose from {list(FAMILIES)}")
    out: dict[str, list[Option]] = {}
    off = off_params(space)
    for unit, options in profile.options.items():
        keep = list(options)
        if family == "fast" and unit in space.shapes:  # a Linear: only kernels that run faster
            fast = [o for o in options if _fast_only(o)]
            keep = fast or keep  # a layer offering no fast width keeps its options
        elif family == "low-bit":
            low = [o for o in options if _low_bit_only(o, off)]
            keep = low or [_off_option(options, off)]  # no low width: left alone
        out[unit] = keep
    return out


def _knob(param: str) -> str:
    return param.rsplit(":", 1)[-1]


def _fast_only(option: Option) -> bool:
    """Whether the option stores the layer at a width whose kernel beats fp32 at any batch
    (see FAMILIES) and every quantize-stage value of it is realized for speed."""
    values = {_knob(p): v for p, v in option.params.items()}
    quantize = LayerSettings(**{k: v for k, v in values.items() if registry.get(k).stage == "quantize"})
    width = registry.table_method()
    bits = values.get(width.name, width.off)
    on_a_fast_kernel = not width.is_off(bits) and bits not in GROUPED_BITS
    return on_a_fast_kernel and all(SPEED in r for r in quantize.realized().values())


def _low_bit_only(option: Option, off: Mapping[str, Any]) -> bool:
    """Whether the option compresses only by bit-width (the table method's knob), to
    LOW_BITS or fewer, with or without the quantize options (GPTQ, a group size)."""
    width = registry.table_method().name
    changed = {p: v for p, v in option.params.items() if v != off.get(p)}
    widths = {p: v for p, v in changed.items() if _knob(p) == width}
    quantize_options = [p for p in changed if registry.get(_knob(p)).option_of == "quantize"]
    return (
        bool(widths)
        and all(v <= LOW_BITS for v in widths.values())
        and len(widths) + len(quantize_options) == len(changed)
    )


def greedy_choice(
    profile: Profile,
    off: Mapping[str, Any],
    budget_bytes: float,
    allowed: Mapping[str, Sequence[Option]] | None = None,
) -> dict[str, Option]:
    """Start each unit at its cheapest allowed option (all off when everything is allowed);
    repeatedly take the move (any unit to any smaller allowed option) with the most bytes
    saved per unit of estimated loss added, until the units fit in ``budget_bytes``."""
    options = allowed if allowed is not None else profile.options
    cost_of = {id(o): option_cost(profile, o, off) for opts in options.values() for o in opts}
    current = {u: min(opts, key=lambda o: (cost_of[id(o)], o.bytes)) for u, opts in options.items()}
    total = sum(o.bytes for o in current.values())
    floor = cost_floor(profile)
    while total > budget_bytes:
        best: tuple[float, str, Option] | None = None
        for unit, opts in options.items():
            for o in opts:
                saved = current[unit].bytes - o.bytes
                if saved <= 0:
                    continue
                added = cost_of[id(o)] - cost_of[id(current[unit])]
                ratio = saved / (max(added, 0.0) + floor)
                if best is None or ratio > best[0]:
                    best = (ratio, unit, o)
        if best is None:  # nothing left to shrink: the budget is out of reach
            break
        _, unit, o = best
        total -= current[unit].bytes - o.bytes
        current[unit] = o
    return current


def sensitivity_seeds(
    space: SearchSpace,
    profile: Profile,
    size_budgets: Sequence[float] | None = None,
    families: Sequence[str] = FAMILIES,
) -> list[dict[str, Any]]:
    """Optuna params dicts, one per (family, size budget): the greedy least-sensitive
    configuration whose searched units fit in that fraction of their uncompressed bytes
    (``size_budgets``; None: SIZE_BUDGETS, as a study without its own budgets).
    Duplicates are dropped, so fewer may come back."""
    if size_budgets is None:
        size_budgets = SIZE_BUDGETS
    off = _check(space, profile, size_budgets)
    compressible = profile.compressible_bytes(off)
    seeds: list[dict[str, Any]] = []
    for family in families:
        allowed = allowed_options(space, profile, family)
        if family == "low-bit":
            targets = ladder_rungs(profile, off, allowed)
        else:
            targets = [b * compressible for b in size_budgets]
        for target in targets:
            chosen = greedy_choice(profile, off, target, allowed)
            params = dict(off)
            for option in chosen.values():
                params.update(option.params)
            if params not in seeds:
                seeds.append(params)
    return seeds


def ladder_rungs(
    profile: Profile,
    off: Mapping[str, Any],
    allowed: Mapping[str, Sequence[Option]],
    rungs: int = LADDER_RUNGS,
) -> list[float]:
    """Byte budgets from the greedy's start (each unit at its least damaging allowed option)
    down to its end (each at its smallest), the end included, ``rungs`` in all."""
    start = greedy_choice(profile, off, math.inf, allowed)
    top = sum(o.bytes for o in start.values())
    bottom = sum(min(o.bytes for o in opts) for opts in allowed.values())
    return [top - (top - bottom) * k / rungs for k in range(1, rungs + 1)]


def seed_bytes(profile: Profile, params: Mapping[str, Any], off: Mapping[str, Any]) -> int:
    """The searched units' bytes under ``params``, from the profile's measured options."""
    chosen = dict(off) | dict(params)
    total = 0
    for options in profile.options.values():
        match = matching_option(options, chosen)
        if match is None:
            raise ValueError(f"params choose values the profile never measured: {dict(options[0].params)}")
        total += match.bytes
    return total


def heatmap_rows(profile: Profile) -> dict[str, dict[str, float]]:
    """{"knob=value": {unit: loss delta}}: the table a heatmap draws (NaN where not offered)."""
    out: dict[str, dict[str, float]] = {}
    for param, pairs in profile.loss.items():
        unit, knob = param.rsplit(":", 1)
        for value, delta in pairs:
            out.setdefault(f"{knob}={value:g}", {})[unit] = delta
    units = list(profile.options)
    return {row: {u: cells.get(u, math.nan) for u in units} for row, cells in out.items()}
