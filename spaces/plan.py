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

PLAN_VERSION = 1
ALLOWED_BITS = (32, 16, 8, 4)


@dataclass(frozen=True)
class LayerSettings:
    """What to do to one layer. The defaults are "off": the layer stays exactly as it was.

    ``rank`` is an absolute rank for Linear layers (None keeps full rank); embeddings
    accept only ``bits``.
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


@dataclass(frozen=True)
class CompressionPlan:
    """Ordered mapping from layer name or ``re:`` pattern to LayerSettings.

    Lookup: an exact name wins; otherwise the first pattern that fully matches.
    """

    layers: Mapping[str, LayerSettings] = field(default_factory=dict)
    distill: Mapping[str, Any] | None = None
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        if self.version != PLAN_VERSION:
            raise ValueError(
                f"plan version {self.version!r} is not supported by this slimsearch "
                f"(it reads version {PLAN_VERSION}); re-run the study with this version"
            )
        for key in self.layers:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise ValueError(f"plan layer pattern {key!r} is not a valid regex: {exc}") from None

    def settings_for(self, name: str) -> LayerSettings | None:
        if name in self.layers:
            return self.layers[name]
        for key, settings in self.layers.items():
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return settings
        return None

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
        return all(s.is_off for s in self.layers.values()) and not self.distill

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "layers": {k: asdict(v) for k, v in self.layers.items()},
            "distill": dict(self.distill) if self.distill else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        if "version" not in data or "layers" not in data:
            raise ValueError("a plan needs 'version' and 'layers' keys; got " + repr(sorted(data)))
        layers = {str(k): LayerSettings(**v) for k, v in data["layers"].items()}
        return cls(layers=layers, distill=data.get("distill"), version=int(data["version"]))

    @classmethod
    def from_json(cls, text: str) -> CompressionPlan:
        return cls.from_dict(json.loads(text))

    def summary(self) -> str:
        """A short human summary: counts of each distinct setting."""
        counts: dict[str, int] = {}
        for settings in self.layers.values():
            if not settings.is_off:
                counts[settings.short()] = counts.get(settings.short(), 0) + 1
        if not counts:
            return "baseline"
        return ", ".join(f"{n}x{k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
