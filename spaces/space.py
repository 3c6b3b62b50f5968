"""A per-layer search space: fixed Optuna distributions in, CompressionPlan out.

Every knob of every searched layer is always a parameter ("off" is a value, never a missing
parameter), so multivariate samplers see a fixed-dimension space.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution
from torch import nn

from slimsearch.spaces.apply import block_layouts, block_names
from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.packed import lookup_scale
from slimsearch.spaces.methods.registry import Method
from slimsearch.spaces.plan import CompressionPlan, LayerSettings, MethodValues, StructuredSettings

# Linears inside numbered Transformer blocks: bert.encoder.layer.3.*, model.layers.11.*, h.0.*
DEFAULT_LAYERS = r"re:.*\b(layer|layers|h|block|blocks|albert_layers)\.\d+\..*"


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


def _check_values(method: Method, values: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(values, tuple) or not values:
        raise ValueError(f"{where}{method.name}: give a non-empty list of values, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where}{method.name}: values repeat in {list(values)}; list each once")
    for value in values:
        try:
            method.check_choice(value)
        except ValueError as exc:
            raise ValueError(f"{where}{exc}") from None
    return values


class _MethodChoices(MethodValues):
    """The values each method of a scope may take (a study file's lists); a method not given
    offers only its off value. Immutable; ``choices.<method>`` reads one method's tuple."""

    scope: registry.Scope = "linear"
    __slots__ = ()

    def __init__(self, **values: Any) -> None:
        kept = {}
        for name, items in values.items():
            method = self._method(name)
            kept[name] = _check_values(method, items, self._where())
        object.__setattr__(self, "_values", kept)

    @classmethod
    def _where(cls) -> str:
        return ""

    @classmethod
    def _method(cls, name: str) -> Method:
        allowed = registry.names(cls.scope)
        if name not in allowed:
            raise ValueError(f"unknown knob(s) [{name!r}]; the knobs are {list(allowed)}")
        return registry.get(name)

    def _default(self, method: Method) -> tuple[Any, ...]:
        return (method.choice_off_value(),)

    def _identity(self) -> Any:
        return tuple(self.items())

    def items(self) -> list[tuple[str, tuple[Any, ...]]]:
        """(method, values) for every registered method of the scope, in registration order."""
        return [(m.name, getattr(self, m.name)) for m in registry.methods(self.scope)]

    def given(self) -> dict[str, tuple[Any, ...]]:
        return dict(self._values)


class Choices(_MethodChoices):
    """The values each Linear method may take, e.g. ``Choices(bits=(32, 8), rank=(1.0, 0.5))``.
    ``rank`` is the fraction of the layer's weights kept by a low-rank factorization (1.0 =
    off): rank = fraction * in*out/(in+out)."""

    scope: registry.Scope = "linear"
    __slots__ = ()

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], base: Choices | None = None, where: str = "space"
    ) -> Choices:
        allowed = registry.names("linear")
        unknown = set(data) - set(allowed)
        if unknown:
            block = set(registry.names("block"))
            hint = " (heads and neurons go under space.structured)" if unknown & block else ""
            raise ValueError(
                f"{where}: unknown knob(s) {sorted(unknown)}; the knobs are {list(allowed)}{hint}"
            )
        values = dict(base.given()) if base is not None else {}
        for name, raw in data.items():
            items = raw if isinstance(raw, (list, tuple)) else [raw]
            values[name] = tuple(items)
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None


@dataclass(frozen=True)
class GroupRule:
    match: str
    choices: Mapping[str, Any]


class StructuredChoices(_MethodChoices):
    """Per Transformer block: the values each block method may take (structured pruning: the
    fractions of attention heads, whole key/value groups under GQA, and of FFN neurons
    removed; 0.0 is off). ``blocks`` are block names or ``re:`` patterns (e.g.
    ``re:.*layer\\.[1-5]``); by default every block found."""

    scope: registry.Scope = "block"
    __slots__ = ("blocks",)
    blocks: tuple[str, ...]

    def __init__(self, blocks: tuple[str, ...] = ("re:.*",), **values: Any) -> None:
        super().__init__(**values)
        for pattern in blocks:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(
                        f"space.structured.blocks: {pattern!r} is not a valid regex ({exc})"
                    ) from None
        object.__setattr__(self, "blocks", tuple(blocks))

    @classmethod
    def _where(cls) -> str:
        return "space.structured."

    def _identity(self) -> Any:
        return (tuple(self.items()), self.blocks)

    def _init_args(self) -> dict[str, Any]:
        return {**self.given(), "blocks": self.blocks}

    @property
    def searched(self) -> bool:
        return any(values != (registry.get(name).choice_off_value(),) for name, values in self.items())

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> StructuredChoices:
        if not isinstance(data, Mapping):
            raise ValueError(f"space.structured: give a mapping with heads/neurons/blocks, got {data!r}")
        allowed = {*registry.names("block"), "blocks"}
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
        method = registry.table_method()
        allowed = {"embeddings": method.table_allowed() or method.allowed(), "lm_head": method.allowed()}
        for name, values in allowed.items():
            for b in getattr(self, name):
                try:
                    method.check_choice(b)
                    ok = values is None or b in values
                except ValueError:
                    ok = False
                if not ok or isinstance(b, bool):
                    listed = f"; choose from {list(values)}" if values is not None else ""
                    raise ValueError(f"space.{name}: {method.name} {b!r} not allowed{listed}")


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
        self.layouts = block_layouts(model)
        self._add_block_knobs(config.structured)
        # A method is a parameter of every searched layer: always for the ones that predate the
        # registry (existing studies keep their fingerprint), else once some layer searches it.
        listed = [
            m
            for m in registry.methods("linear")
            if m.always_listed
            or any(getattr(per_layer[n], m.name) != (m.choice_off_value(),) for n in targets)
        ]
        for n in targets:
            for method in listed:
                self.knobs.append(Knob(n, method.name, getattr(per_layer[n], method.name)))
        self._add_table_knobs(model, config)

    def _add_block_knobs(self, choices: StructuredChoices) -> None:
        # Only when asked for, so spaces without structured pruning keep their fingerprint.
        if not choices.searched:
            return
        methods = registry.methods("block")
        per_method = {m.name: m.blocks(self.layouts[m.name]) for m in methods}
        blocks = block_names(self.layouts)
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
        for method in methods:
            name = method.name
            missing = [b for b in chosen if b not in per_method[name]]
            if getattr(choices, name) != (method.choice_off_value(),) and missing:
                # Never search less than the study file asks for without saying so.
                raise ValueError(
                    f"space.structured.{name}: blocks {missing[:3]} have no {method.block_part} that "
                    f"{name} pruning knows, so their {name} cannot be pruned; set {name}: "
                    f"[{method.choice_off_value()}], or limit space.structured.blocks to blocks "
                    "that have them"
                )
        for block in chosen:
            for method in methods:
                if block in per_method[method.name]:
                    self.knobs.append(Knob(block, method.name, getattr(choices, method.name)))

    def _add_table_knobs(self, model: nn.Module, config: SpaceConfig) -> None:
        get_in = getattr(model, "get_input_embeddings", None)
        get_out = getattr(model, "get_output_embeddings", None)
        emb = get_in() if callable(get_in) else None
        head = get_out() if callable(get_out) else None
        names = {id(m): n for n, m in model.named_modules()}
        method = registry.table_method()
        off = (method.choice_off_value(),)
        if isinstance(emb, nn.Embedding):
            if config.embeddings != off:
                try:
                    lookup_scale(emb)  # a table whose forward packing cannot keep is refused here
                except ValueError as exc:
                    raise ValueError(f"space.embeddings: {exc}") from None
            self.knobs.append(Knob(names[id(emb)], method.name, config.embeddings))
        tied = isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding) and head.weight is emb.weight
        if isinstance(head, nn.Linear) and not tied:
            self.knobs.append(Knob(names[id(head)], method.name, config.lm_head))

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
        block_knobs = set(registry.names("block"))
        structured: dict[str, StructuredSettings] = {}
        per_method: dict[str, dict[str, Any]] = {}
        for block, values in chosen.items():
            if not block_knobs & set(values):
                continue
            settings = StructuredSettings(**{n: v for n, v in values.items() if n in block_knobs})
            structured[block] = settings
            for name, value in settings.values.items():
                per_method.setdefault(name, {})[block] = value
        # Settings that depend on shape (rank) see the shape each Linear has after the block methods.
        shapes: Mapping[str, tuple[int, int]] = self.shapes
        for method, values in registry.in_stage_order(per_method):
            shapes = method.shrunk(self.layouts[method.name], values, shapes)
        layers = {}
        for layer, values in chosen.items():
            if layer in structured:
                continue
            layers[layer] = LayerSettings(
                **{n: registry.get(n).setting(v, shapes.get(layer)) for n, v in _acting(values).items()}
            )
        return CompressionPlan(layers=layers, structured=structured)

    def uniform_params(self) -> list[dict[str, Any]]:
        """Seed configurations: all off, then each non-off value of one knob in every layer
        that offers it (embeddings follow the bits choice where they offer it too), then each
        option with each width of its host, then all the options of a host width together, then each
        bit-width of the Linears with each width of the embedding tables, then each uniform
        combination of the block methods (heads, neurons) with each bit-width of the Linears."""
        off_of = {m.name: m.choice_off_value() for m in registry.methods()}
        off = {self.param_name(k): k.choices[0] for k in self.knobs if len(k.choices) > 1}
        for k in self.knobs:
            if len(k.choices) > 1 and off_of[k.knob] in k.choices:
                off[self.param_name(k)] = off_of[k.knob]
        seeds = [dict(off)]

        def add(params: dict[str, Any]) -> None:
            if params != off and params not in seeds:
                seeds.append(params)

        def searched(name: str) -> list[Knob]:
            return [k for k in self.knobs if k.knob == name and len(k.choices) > 1]

        def values_on(knobs: Sequence[Knob], name: str, reverse: bool = False) -> list[Any]:
            """The values ``knobs`` offer besides method ``name``'s off value."""
            return _ordered({v for k in knobs for v in k.choices} - {off_of[name]}, reverse=reverse)

        block_methods = registry.methods("block")
        for method in [*block_methods, *registry.methods("linear")]:
            if method.option_of is not None:
                continue
            knobs = searched(method.name)
            for value in values_on(knobs, method.name):
                add(self._with(off, knobs, value))
        # An option alone changes nothing: each of its values comes with each value of its host
        # that it acts on.
        for method in registry.methods("linear"):
            knobs = searched(method.name)
            if method.option_of is None or not knobs:
                continue
            for host in method.option_base:
                hosts = [k for k in self.knobs if k.knob == host]
                for width in values_on(hosts, host, reverse=True):
                    if not method.acts_with({host: width}):
                        continue  # the same model as the host alone, under another name
                    for value in values_on(knobs, method.name):
                        add(self._with(self._with(off, hosts, width), knobs, value))
        # Options compose (on SmolLM2 at 4 bits, AWQ's scaling with group 128 beats each of them
        # alone; README), so each width of a host also comes with every option that acts on it,
        # together, in each combination of their values.
        options = [m for m in registry.methods("linear") if m.option_of is not None]
        for host in _ordered({h for m in options for h in m.option_base}):
            hosts = [k for k in self.knobs if k.knob == host]
            for width in values_on(hosts, host, reverse=True):
                acting = []
                for m in options:
                    knobs = searched(m.name)
                    if knobs and host in m.option_base and m.acts_with({host: width}):
                        acting.append((knobs, values_on(knobs, m.name)))
                if len(acting) < 2:
                    continue  # one option: its seeds are above
                for combo in itertools.product(*(values for _, values in acting)):
                    params = self._with(off, hosts, width)
                    for (knobs, _), value in zip(acting, combo, strict=True):
                        params = self._with(params, knobs, value)
                    add(params)
        # Tables and Linears tolerate different widths (on MiniLM, 4-bit Linears with a 2-bit
        # table score 80.6% where all 2-bit scores 77.2% and the baseline 80.1%), so "one width
        # for the Linears, another for the tables" is an obvious setting too.
        table = registry.table_method()
        widths = [k for k in self.knobs if k.knob == table.name and len(k.choices) > 1]
        tables = [k for k in widths if k.layer not in self.shapes]
        linears = [k for k in widths if k.layer in self.shapes]
        for bits in sorted({v for k in linears for v in k.choices}, reverse=True):
            for width in sorted({v for k in tables for v in k.choices}, reverse=True):
                add(self._with(self._with(off, linears, bits), tables, width))
        # Structured pruning composes with the kernels too (on MiniLM, int8 with half the FFN
        # neurons of every block: 0.29x the latency at 80.2% against 80.3%), so each uniform
        # combination of the block methods comes with each bit-width of the Linears (tables
        # follow it).
        groups = [[k for k in self.knobs if k.knob == m.name and len(k.choices) > 1] for m in block_methods]
        ladders = [
            sorted({v for k in knobs for v in k.choices} | {off_of[m.name]})
            for m, knobs in zip(block_methods, groups, strict=True)
        ]
        offs = [off_of[m.name] for m in block_methods]
        for bits in sorted(
            {v for k in linears for v in k.choices} | {table.choice_off_value()}, reverse=True
        ):
            for combo in itertools.product(*ladders):
                if list(combo) == offs:
                    continue
                params = dict(off)
                for knobs, value in zip(groups, combo, strict=True):
                    params = self._with(params, knobs, value)
                add(self._with(params, widths, bits))
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


def _acting(values: Mapping[str, Any]) -> dict[str, Any]:
    """A layer's chosen values less the options that do nothing at its host's width (e.g.
    ``weight_only`` at 4 bits): the same model then gets the same plan, so a sampler's
    proposal of it is answered as a repeat instead of spending a trial."""
    out = {}
    for name, value in values.items():
        method = registry.get(name)
        hosted = method.option_of is not None and all(h in values for h in method.option_base)
        if not (hosted and method.option_base and not method.acts_with(values)):
            out[name] = value
    return out


def _ordered(values: set[Any], reverse: bool = False) -> list[Any]:
    """Numbers in order, then other values (patterns such as "2:4") in order."""
    return sorted(
        values,
        key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)),
        reverse=reverse,
    )


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
