"""A per-layer search space: fixed Optuna distributions in, CompressionPlan out.

Every knob of every searched layer is always a parameter ("off" is a value, never a missing
parameter), so multivariate samplers see a fixed-dimension space.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution
from torch import nn

from slimsearch.spaces.methods import max_useful_rank
from slimsearch.spaces.methods.packed import EMBEDDING_BITS, lookup_scale
from slimsearch.spaces.methods.structured import Kind, find_units, shrunk_shapes
from slimsearch.spaces.plan import ALLOWED_BITS, CompressionPlan, LayerSettings, StructuredSettings

# Linears inside numbered Transformer blocks: bert.encoder.layer.3.*, model.layers.11.*, h.0.*
DEFAULT_LAYERS = r"re:.*\b(layer|layers|h|block|blocks)\.\d+\..*"
KNOBS = ("sparsity", "bits", "rank")
STRUCTURED_KNOBS: tuple[Kind, ...] = ("heads", "neurons")
OFF_VALUES: dict[str, Any] = {"sparsity": 0.0, "bits": 32, "rank": 1.0, "heads": 0.0, "neurons": 0.0}


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


@dataclass(frozen=True)
class Choices:
    """The values each knob may take. ``rank`` is the fraction of the layer's weights kept by
    a low-rank factorization (1.0 = off): rank = fraction * in*out/(in+out)."""

    sparsity: tuple[float, ...] = (0.0,)
    bits: tuple[int, ...] = (32,)
    rank: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        for name in KNOBS:
            values = getattr(self, name)
            if not isinstance(values, tuple) or not values:
                raise ValueError(f"{name}: give a non-empty list of values, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name}: values repeat in {list(values)}; list each once")
        for s in self.sparsity:
            if not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity: {s!r} is not allowed; use fractions in [0, 1) such as 0.5")
        for b in self.bits:
            if b not in ALLOWED_BITS or isinstance(b, bool):
                raise ValueError(f"bits: {b!r} is not allowed; choose from {list(ALLOWED_BITS)}")
        for r in self.rank:
            if not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
                raise ValueError(
                    f"rank: {r!r} is not allowed; use the fraction of weights kept, in (0, 1], "
                    "with 1.0 meaning full rank (off)"
                )

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], base: Choices | None = None, where: str = "space"
    ) -> Choices:
        unknown = set(data) - set(KNOBS)
        if unknown:
            hint = " (heads and neurons go under space.structured)" if unknown & set(STRUCTURED_KNOBS) else ""
            raise ValueError(f"{where}: unknown knob(s) {sorted(unknown)}; the knobs are {list(KNOBS)}{hint}")
        start = base or cls()
        values = {}
        for name, raw in data.items():
            items = raw if isinstance(raw, (list, tuple)) else [raw]
            values[name] = tuple(items)
        try:
            return replace(start, **values)
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None


@dataclass(frozen=True)
class GroupRule:
    match: str
    choices: Mapping[str, Any]


@dataclass(frozen=True)
class StructuredChoices:
    """Structured pruning per Transformer block: fractions of attention heads (whole key/value
    groups under GQA) and of FFN neurons removed; 0.0 is off. ``blocks`` are block names or
    ``re:`` patterns (e.g. ``re:.*layer\\.[1-5]``); by default every block found."""

    heads: tuple[float, ...] = (0.0,)
    neurons: tuple[float, ...] = (0.0,)
    blocks: tuple[str, ...] = ("re:.*",)

    def __post_init__(self) -> None:
        for name in STRUCTURED_KNOBS:
            values = getattr(self, name)
            if not isinstance(values, tuple) or not values:
                raise ValueError(
                    f"space.structured.{name}: give a non-empty list of fractions, got {values!r}"
                )
            if len(set(values)) != len(values):
                raise ValueError(f"space.structured.{name}: values repeat in {list(values)}; list each once")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                    raise ValueError(
                        f"space.structured.{name}: {v!r} is not allowed; use fractions removed in "
                        "[0, 1) such as [0.0, 0.25, 0.5], with 0.0 meaning off"
                    )
        for pattern in self.blocks:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(
                        f"space.structured.blocks: {pattern!r} is not a valid regex ({exc})"
                    ) from None

    @property
    def searched(self) -> bool:
        return len(self.heads) > 1 or len(self.neurons) > 1 or self.heads != (0.0,) or self.neurons != (0.0,)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> StructuredChoices:
        if not isinstance(data, Mapping):
            raise ValueError(f"space.structured: give a mapping with heads/neurons/blocks, got {data!r}")
        allowed = {f.name for f in fields(cls)}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(
                f"space.structured: unknown key(s) {sorted(unknown)}; allowed keys are {sorted(allowed)}"
            )
        values: dict[str, Any] = {}
        for name, raw in data.items():
            items = raw if isinstance(raw, (list, tuple)) else [raw]
            values[name] = tuple(str(i) for i in items) if name == "blocks" else tuple(items)
        return cls(**values)


@dataclass(frozen=True)
class SpaceConfig:
    """Which layers are searched and what each may choose (see the study file docs)."""

    layers: tuple[str, ...] = (DEFAULT_LAYERS,)
    default: Choices = field(default_factory=Choices)
    groups: tuple[GroupRule, ...] = ()
    embeddings: tuple[int, ...] = (32,)
    lm_head: tuple[int, ...] = (32,)
    structured: StructuredChoices = field(default_factory=StructuredChoices)

    def __post_init__(self) -> None:
        for pattern in self.layers + tuple(g.match for g in self.groups):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"space: pattern {pattern!r} is not a valid regex ({exc})") from None
        allowed = {"embeddings": (32, *EMBEDDING_BITS), "lm_head": ALLOWED_BITS}
        for name, bits in allowed.items():
            for b in getattr(self, name):
                if b not in bits or isinstance(b, bool):
                    raise ValueError(f"space.{name}: bits {b!r} not allowed; choose from {list(bits)}")


@dataclass(frozen=True)
class Knob:
    layer: str
    knob: str
    choices: tuple[Any, ...]


class SearchSpace:
    """Turns a model's layers into fixed Optuna distributions and decodes params into plans."""

    def __init__(self, model: nn.Module, config: SpaceConfig) -> None:
        self.config = config
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.shapes = {n: (m.in_features, m.out_features) for n, m in linears.items()}
        targets = [n for n in linears if any(_matches(p, n) for p in config.layers)]
        if not targets:
            raise ValueError(
                f"space.layers {list(config.layers)} match no Linear layer of this model; "
                f"its Linear layers include {list(linears)[:4]}"
            )
        per_layer = {n: config.default for n in targets}
        for i, rule in enumerate(config.groups):
            hit = [n for n in targets if _matches(rule.match, n)]
            if not hit:
                raise ValueError(
                    f"space.groups[{i}].match {rule.match!r} matches none of the searched "
                    f"layers; they include {targets[:4]}"
                )
            for n in hit:
                per_layer[n] = Choices.from_mapping(rule.choices, per_layer[n], f"space.groups[{i}]")
        self.knobs: list[Knob] = []
        self.units = find_units(model)
        self._add_structured_knobs(config.structured)
        for n in targets:
            for knob in KNOBS:
                self.knobs.append(Knob(n, knob, getattr(per_layer[n], knob)))
        self._add_table_knobs(model, config)

    def _add_structured_knobs(self, choices: StructuredChoices) -> None:
        # Only when asked for, so spaces without structured pruning keep their fingerprint.
        if not choices.searched:
            return
        blocks = list(dict.fromkeys(u.block for u in self.units))
        chosen = [b for b in blocks if any(_matches(p, b) for p in choices.blocks)]
        if not blocks:
            raise ValueError(
                "space.structured: this model has no attention or MLP block that structured "
                "pruning knows; remove the structured section"
            )
        if not chosen:
            raise ValueError(
                f"space.structured.blocks {list(choices.blocks)} match no block of this model; "
                f"its blocks include {blocks[:4]}"
            )
        kinds = {(u.block, u.kind) for u in self.units}
        for kind in STRUCTURED_KNOBS:
            missing = [b for b in chosen if (b, kind) not in kinds]
            if getattr(choices, kind) != (0.0,) and missing:
                # Never search less than the study file asks for without saying so.
                layout = (
                    "attention layout (query/key/value and output projections)" if kind == "heads" else "MLP"
                )
                raise ValueError(
                    f"space.structured.{kind}: blocks {missing[:3]} have no {layout} that structured pruning "
                    f"knows, so their {kind} cannot be pruned; set {kind}: [0.0], or limit "
                    "space.structured.blocks to blocks that have them"
                )
        for block in chosen:
            for kind in STRUCTURED_KNOBS:
                if (block, kind) in kinds:
                    self.knobs.append(Knob(block, kind, getattr(choices, kind)))

    def _add_table_knobs(self, model: nn.Module, config: SpaceConfig) -> None:
        get_in = getattr(model, "get_input_embeddings", None)
        get_out = getattr(model, "get_output_embeddings", None)
        emb = get_in() if callable(get_in) else None
        head = get_out() if callable(get_out) else None
        names = {id(m): n for n, m in model.named_modules()}
        if isinstance(emb, nn.Embedding):
            if config.embeddings != (32,):
                try:
                    lookup_scale(emb)  # a table whose forward packing cannot keep is refused here
                except ValueError as exc:
                    raise ValueError(f"space.embeddings: {exc}") from None
            self.knobs.append(Knob(names[id(emb)], "bits", config.embeddings))
        tied = isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding) and head.weight is emb.weight
        if isinstance(head, nn.Linear) and not tied:
            self.knobs.append(Knob(names[id(head)], "bits", config.lm_head))

    @staticmethod
    def param_name(knob: Knob) -> str:
        return f"{knob.layer}:{knob.knob}"

    def distributions(self) -> dict[str, BaseDistribution]:
        return {
            self.param_name(k): CategoricalDistribution(list(k.choices))
            for k in self.knobs
            if len(k.choices) > 1
        }

    def fingerprint(self) -> str:
        data = [(self.param_name(k), list(k.choices)) for k in self.knobs]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]

    def decode(self, params: Mapping[str, Any]) -> CompressionPlan:
        chosen: dict[str, dict[str, Any]] = {}
        for k in self.knobs:
            value = params.get(self.param_name(k), k.choices[0])
            if value not in k.choices:
                raise ValueError(f"param {self.param_name(k)}={value!r} is not one of {list(k.choices)}")
            chosen.setdefault(k.layer, {})[k.knob] = value
        structured: dict[str, StructuredSettings] = {}
        fractions: dict[tuple[str, Kind], float] = {}
        for block, values in chosen.items():
            if not any(kind in values for kind in STRUCTURED_KNOBS):
                continue
            settings = StructuredSettings(
                heads=float(values.get("heads", 0.0)), neurons=float(values.get("neurons", 0.0))
            )
            structured[block] = settings
            fractions[(block, "heads")] = settings.heads
            fractions[(block, "neurons")] = settings.neurons
        # Ranks are fractions of the limit of the shape each Linear has after structured pruning.
        shapes = shrunk_shapes(self.units, fractions, self.shapes) if fractions else self.shapes
        layers = {}
        for layer, values in chosen.items():
            if layer in structured:
                continue
            layers[layer] = LayerSettings(
                sparsity=float(values.get("sparsity", 0.0)),
                bits=int(values.get("bits", 32)),
                rank=self._rank(shapes, layer, float(values.get("rank", 1.0))),
            )
        return CompressionPlan(layers=layers, structured=structured)

    @staticmethod
    def _rank(shapes: Mapping[str, tuple[int, int]], layer: str, fraction: float) -> int | None:
        if fraction >= 1.0:
            return None
        n_in, n_out = shapes[layer]
        return max(1, int(fraction * max_useful_rank(n_in, n_out)))

    def uniform_params(self) -> list[dict[str, Any]]:
        """Seed configurations: all off, then each non-off value of one knob in every layer
        that offers it (embeddings follow the bits choice where they offer it too), then each
        bit-width of the Linears with each width of the embedding tables, then each uniform
        structured (heads, neurons) pair with each bit-width of the Linears."""
        off = {self.param_name(k): k.choices[0] for k in self.knobs if len(k.choices) > 1}
        for k in self.knobs:
            if len(k.choices) > 1 and OFF_VALUES[k.knob] in k.choices:
                off[self.param_name(k)] = OFF_VALUES[k.knob]
        seeds = [dict(off)]

        def add(params: dict[str, Any]) -> None:
            if params != off and params not in seeds:
                seeds.append(params)

        for knob in (*STRUCTURED_KNOBS, *KNOBS):
            knobs = [k for k in self.knobs if k.knob == knob and len(k.choices) > 1]
            for value in sorted({v for k in knobs for v in k.choices} - {OFF_VALUES[knob]}):
                add(self._with(off, knobs, value))
        # Tables and Linears tolerate different widths (on MiniLM, 4-bit Linears with a 2-bit
        # table score 80.6% where all 2-bit scores 77.2% and the baseline 80.1%), so "one width
        # for the Linears, another for the tables" is an obvious setting too.
        widths = [k for k in self.knobs if k.knob == "bits" and len(k.choices) > 1]
        tables = [k for k in widths if k.layer not in self.shapes]
        linears = [k for k in widths if k.layer in self.shapes]
        for bits in sorted({v for k in linears for v in k.choices}, reverse=True):
            for width in sorted({v for k in tables for v in k.choices}, reverse=True):
                add(self._with(self._with(off, linears, bits), tables, width))
        # Structured pruning composes with the kernels too (on MiniLM, int8 with half the FFN
        # neurons of every block: 0.29x the latency at 80.2% against 80.3%), so each uniform
        # (heads, neurons) pair comes with each bit-width of the Linears (tables follow it).
        heads = [k for k in self.knobs if k.knob == "heads" and len(k.choices) > 1]
        neurons = [k for k in self.knobs if k.knob == "neurons" and len(k.choices) > 1]
        for bits in sorted({v for k in linears for v in k.choices} | {32}, reverse=True):
            for h in sorted({v for k in heads for v in k.choices} | {0.0}):
                for n in sorted({v for k in neurons for v in k.choices} | {0.0}):
                    if h or n:
                        add(self._with(self._with(self._with(off, heads, h), neurons, n), widths, bits))
        return seeds

    def _with(self, params: Mapping[str, Any], knobs: Sequence[Knob], value: Any) -> dict[str, Any]:
        """``params`` with each of ``knobs`` that offers ``value`` set to it."""
        out = dict(params)
        for k in knobs:
            if value in k.choices:
                out[self.param_name(k)] = value
        return out

    def describe(self) -> str:
        layers = sorted({k.layer for k in self.knobs})
        dims = len(self.distributions())
        return f"{len(layers)} layers, {dims} searched parameters"


def space_config_from_mapping(data: Mapping[str, Any] | None) -> SpaceConfig:
    """Build a SpaceConfig from the ``space:`` section of a study file, with clear errors."""
    data = dict(data or {})
    allowed = {f.name for f in fields(SpaceConfig)}
    if not isinstance(data.get("default") or {}, Mapping):
        raise ValueError(f"space.default: give a mapping of knob lists, got {data['default']!r}")
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"space: unknown key(s) {sorted(unknown)}; allowed keys are {sorted(allowed)}")
    layers = data.get("layers", [DEFAULT_LAYERS])
    if isinstance(layers, str):
        layers = [layers]
    default = Choices.from_mapping(data.get("default") or {}, where="space.default")
    groups = []
    for i, raw in enumerate(data.get("groups") or []):
        if not isinstance(raw, Mapping) or "match" not in raw:
            raise ValueError(f"space.groups[{i}]: each group needs 'match' plus knob lists, got {raw!r}")
        rest = {k: v for k, v in raw.items() if k != "match"}
        Choices.from_mapping(rest, default, f"space.groups[{i}]")  # validate early
        groups.append(GroupRule(str(raw["match"]), rest))
    return SpaceConfig(
        layers=tuple(str(p) for p in layers),
        default=default,
        groups=tuple(groups),
        embeddings=_bits_tuple(data.get("embeddings", [32]), "space.embeddings"),
        lm_head=_bits_tuple(data.get("lm_head", [32]), "space.lm_head"),
        structured=StructuredChoices.from_mapping(data.get("structured") or {}),
    )


def _bits_tuple(raw: Any, where: str) -> tuple[int, ...]:
    items: Sequence[Any] = raw if isinstance(raw, (list, tuple)) else [raw]
    if not items:
        raise ValueError(f"{where}: give at least one bit-width, e.g. [32, 8]")
    return tuple(items)
