"""CompressionPlan: the plain-data recipe of one trial.

A plan maps layer names (exact module names or ``re:`` patterns) to that layer's settings.
It is the only thing needed to rebuild a trial's model from the baseline, so it is JSON
with a version tag and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from slimsearch.spaces.methods.realized import REALIZED

# Version 1 plans written before structured pruning carry no "structured" key; they read
# as "no structured pruning", so the version did not need to change.
PLAN_VERSION = 1
ALLOWED_BITS = (32, 16, 8, 4, 2)


@dataclass(frozen=True)
class LayerSettings:
    """What to do to one layer. The defaults are "off": the layer stays exactly as it was.

    ``rank`` is an absolute rank for Linear layers (None keeps full rank); embeddings
    accept only ``bits``. Bits: 32 off, 16 bf16, 8 int8 (per-row scales, int8 kernels),
    4 and 2 packed codes with group-wise scales (size only).
    """

    sparsity: float = 0.0
    bits: int = 32
    rank: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f"sparsity={self.sparsity!r} is out of range: use a fraction in [0, 1), "
                "e.g. 0.5 to zero half of the weights"
            )
        if self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported: choose one of {ALLOWED_BITS}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive integer, or None for full rank")

    @property
    def is_off(self) -> bool:
        return self.sparsity == 0.0 and self.bits == 32 and self.rank is None

    def short(self) -> str:
        parts = []
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        if self.sparsity:
            parts.append(f"s{self.sparsity:g}")
        if self.bits != 32:
            parts.append(f"{self.bits}b")
        return "+".join(parts) or "off"

    def realized(self) -> dict[str, str]:
        """Each active method of this setting and what it is realized for ("speed", "size",
        "speed+size"), from the methods' table."""
        out = {}
        if self.rank is not None:
            out["rank"] = REALIZED["rank"]
        if self.sparsity:
            out["sparsity"] = REALIZED["sparsity"]
        if self.bits != 32:
            out[f"bits{self.bits}"] = REALIZED[f"bits{self.bits}"]
        return out


@dataclass(frozen=True)
class StructuredSettings:
    """Structured pruning of one Transformer block: the fraction of attention heads (whole
    key/value groups under grouped-query attention) and of FFN neurons removed. 0.0 is off."""

    heads: float = 0.0
    neurons: float = 0.0

    def __post_init__(self) -> None:
        for name in ("heads", "neurons"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(
                    f"structured {name}={value!r} is out of range: use the fraction removed, "
                    "in [0, 1), e.g. 0.5 to remove half"
                )

    @property
    def is_off(self) -> bool:
        return self.heads == 0.0 and self.neurons == 0.0

    def short(self) -> str:
        parts = []
        if self.heads:
            parts.append(f"h{self.heads:g}")
        if self.neurons:
            parts.append(f"n{self.neurons:g}")
        return "+".join(parts) or "off"


@dataclass(frozen=True)
class CompressionPlan:
    """Ordered mapping from layer name or ``re:`` pattern to LayerSettings.

    Lookup: an exact name wins; otherwise the first pattern that fully matches.
    ``structured`` maps Transformer block names (e.g. ``bert.encoder.layer.3``,
    ``model.layers.3``) or ``re:`` patterns to StructuredSettings, looked up the same way.

    Whatever order the mappings list things in, apply_plan runs the methods in one fixed
    order: structured pruning, then factorization, then sparsity, then quantization.
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
        for settings in self.layers.values():
            out.update(settings.realized())
        for block in self.structured.values():
            for name in ("heads", "neurons"):
                if getattr(block, name):
                    out[name] = REALIZED[name]
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": self.version,
            "layers": {k: asdict(v) for k, v in self.layers.items()},
            "distill": dict(self.distill) if self.distill else None,
        }
        if self.structured:
            data["structured"] = {k: asdict(v) for k, v in self.structured.items()}
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
