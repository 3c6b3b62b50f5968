"""CompressionPlan: the plain-data recipe of one trial.

A plan maps layer names (exact module names or ``re:`` patterns) to that layer's settings.
It is the only thing needed to rebuild a trial's model from the baseline, so it is JSON
with a version tag and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from slimsearch.spaces.methods import registry

# Version 1 plans written before structured pruning carry no "structured" key; they read
# as "no structured pruning", so the version did not need to change.
PLAN_VERSION = 1


class MethodValues:
    """Immutable values keyed by registered method name; ``values.<method>`` reads one
    (``_default`` when not given). Subclasses say which methods they take (``_method``) and
    what a method not given reads as."""

    __slots__ = ("_values",)
    _values: dict[str, Any]

    @classmethod
    def _method(cls, name: str) -> registry.Method:
        raise NotImplementedError

    def _default(self, method: registry.Method) -> Any:
        raise NotImplementedError

    def _identity(self) -> Any:
        """What equality and hashing compare."""
        return tuple(sorted(self._values.items()))

    def _init_args(self) -> dict[str, Any]:
        """The keyword arguments that build an equal object (copies and pickles use them)."""
        return dict(self._values)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self._init_args()))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            method = self._method(name)
        except ValueError as exc:
            raise AttributeError(str(exc)) from None
        return self._values[name] if name in self._values else self._default(method)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: build a new one")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._identity() == self._identity()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._identity()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"{type(self).__name__}({inner})"


class Settings(MethodValues):
    """What to do to one layer (or block): a value per registered method of this scope. The
    defaults are "off": a method not given stays off and the layer exactly as it was.

    Immutable and hashable; ``settings.<method>`` reads a method's value (its off value when
    not set), so ``LayerSettings(bits=8).rank`` is None.
    """

    scopes: tuple[registry.Scope, ...] = ()
    where = "layer"
    __slots__ = ()

    def __init__(self, *args: Any, **values: Any) -> None:
        # Positional values, as the dataclasses these replaced took them, fill the methods that
        # were there before the registry (sparsity, bits, rank; heads, neurons).
        listed = [m.name for m in self._scope_methods() if m.always_listed]
        if len(args) > len(listed):
            raise TypeError(f"{type(self).__name__} takes at most {len(listed)} positional values ({listed})")
        values = {**dict(zip(listed, args, strict=False)), **values}
        kept: dict[str, Any] = {}
        for name, value in values.items():
            method = self._method(name)
            value = method.check(value)
            if not method.is_off(value):
                kept[name] = value
        object.__setattr__(self, "_values", kept)

    @classmethod
    def _scope_methods(cls) -> list[registry.Method]:
        """The registered methods of this settings' scopes, once each, in listing order."""
        return list(dict.fromkeys(m for scope in cls.scopes for m in registry.methods(scope)))

    @classmethod
    def _method(cls, name: str) -> registry.Method:
        allowed = [m.name for m in cls._scope_methods()]
        if name not in allowed:
            raise ValueError(
                f"{cls.where} settings: unknown method {name!r}; "
                f"the {cls.where} methods are {sorted(allowed)}"
            )
        return registry.get(name)

    def _default(self, method: registry.Method) -> Any:
        return method.off

    @property
    def values(self) -> dict[str, Any]:
        """The methods switched on, by name, with their values."""
        return dict(self._values)

    @property
    def is_off(self) -> bool:
        return not self._values

    def steps(self) -> list[tuple[registry.Method, Any]]:
        """The methods switched on, in the order they run."""
        return list(registry.in_stage_order(self._values))

    def short(self) -> str:
        return "+".join(m.short(v) for m, v in self.steps()) or "off"

    def realized(self) -> dict[str, str]:
        """Each active method of this setting and what it is realized for ("speed", "size",
        "speed+size"), as the methods declare it."""
        steps = self.steps()
        out = {m.realized_key(v): m.realized(v) for m, v in steps if m.option_of is None}
        for method, value in steps:
            method.amend_realized(value, self._values, out)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every method of the scope that is always listed (off or not), then the others that
        are on, in registration order."""
        out: dict[str, Any] = {}
        for method in self._scope_methods():
            if method.always_listed or method.name in self._values:
                out[method.name] = self._values.get(method.name, method.off)
        return out


def _rebuild(cls: type[MethodValues], kwargs: dict[str, Any]) -> MethodValues:
    return cls(**kwargs)


class LayerSettings(Settings):
    """Settings of one Linear or embedding table, e.g. ``LayerSettings(bits=8, sparsity=0.5)``.
    ``rank`` is an absolute rank for Linear layers (None keeps full rank); embeddings accept
    only the methods of table scope (bits)."""

    scopes = ("linear", "table")
    where = "layer"
    __slots__ = ()


class StructuredSettings(Settings):
    """Structured pruning of one Transformer block, e.g. the fraction of attention heads
    (whole key/value groups under grouped-query attention) and of FFN neurons removed."""

    scopes = ("block",)
    where = "structured"
    __slots__ = ()


@dataclass(frozen=True)
class CompressionPlan:
    """Ordered mapping from layer name or ``re:`` pattern to LayerSettings.

    Lookup: an exact name wins; otherwise the first pattern that fully matches.
    ``structured`` maps Transformer block names (e.g. ``bert.encoder.layer.3``,
    ``model.layers.3``) or ``re:`` patterns to StructuredSettings, looked up the same way.

    Whatever order the mappings list things in, apply_plan runs the methods in stage order
    (registry.STAGES: structured, depth, factorize, sparsify, quantize).
    """

    layers: Mapping[str, LayerSettings] = field(default_factory=dict)
    distill: Mapping[str, Any] | None = None
    version: int = PLAN_VERSION
    structured: Mapping[str, StructuredSettings] = field(default_factory=dict)
    # Which heads / neurons structured pruning kept, by unit ("<owner>:heads"): a hex mask of
    # the kept groups (bit i: group i). Filled in when a plan is applied (``compress``), so a
    # plan that carries it rebuilds exactly the same model without calibration data.
    selection: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise ValueError(
                f"plan version {self.version!r} is not supported by this slimsearch "
                f"(it reads version {PLAN_VERSION}); re-run the study with this version"
            )
        for unit, mask in self.selection.items():
            if ":" not in unit or not isinstance(mask, str) or not re.fullmatch(r"[0-9a-f]+", mask):
                raise ValueError(
                    f"plan selection {unit!r}: {mask!r} is not '<module>:<kind>' -> a hex mask of kept "
                    "groups; was the plan edited by hand?"
                )
        for key in [*self.layers, *self.structured]:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise ValueError(f"plan layer pattern {key!r} is not a valid regex: {exc}") from None

    def settings_for(self, name: str) -> LayerSettings | None:
        return _lookup(self.layers, name)

    def structured_for(self, block: str) -> StructuredSettings | None:
        return _lookup(self.structured, block)

    def active(self, names: Iterable[str]) -> dict[str, LayerSettings]:
        """The non-off settings that apply to each of ``names``."""
        out = {}
        for name in names:
            settings = self.settings_for(name)
            if settings is not None and not settings.is_off:
                out[name] = settings
        return out

    @property
    def is_off(self) -> bool:
        return (
            all(s.is_off for s in self.layers.values())
            and all(s.is_off for s in self.structured.values())
            and not self.distill
        )

    def realized(self) -> dict[str, str]:
        """Every method the plan uses, and what each is realized for (for records and docs)."""
        out: dict[str, str] = {}
        for settings in [*self.layers.values(), *self.structured.values()]:
            out.update(settings.realized())
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "distill": dict(self.distill) if self.distill else None,
        }
        if self.structured:
            data["structured"] = {k: v.to_dict() for k, v in self.structured.items()}
        if self.selection:
            data["selection"] = dict(self.selection)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        if "version" not in data or "layers" not in data:
            raise ValueError("a plan needs 'version' and 'layers' keys; got " + repr(sorted(data)))
        layers = {str(k): LayerSettings(**v) for k, v in data["layers"].items()}
        structured = {str(k): StructuredSettings(**v) for k, v in (data.get("structured") or {}).items()}
        return cls(
            layers=layers,
            distill=data.get("distill"),
            version=int(data["version"]),
            structured=structured,
            selection={str(k): str(v) for k, v in (data.get("selection") or {}).items()},
        )

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """A short human summary: counts of each distinct setting."""
        counts: dict[str, int] = {}
        every: list[StructuredSettings | LayerSettings] = [*self.structured.values(), *self.layers.values()]
        for settings in every:
            if not settings.is_off:
                counts[settings.short()] = counts.get(settings.short(), 0) + 1
        text = ", ".join(f"{n}x{k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        if self.distill and self.distill.get("kind", "off") != "off":
            kd = f" +KD({self.distill.get('kind')}, {self.distill.get('steps')} steps)"
            text = (text or "baseline") + kd
        return text or "baseline"


def _lookup(table: Mapping[str, Any], name: str) -> Any:
    if name in table:
        return table[name]
    for key, settings in table.items():
        if key.startswith("re:") and re.fullmatch(key[3:], name):
            return settings
    return None
