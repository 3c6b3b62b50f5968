"""What can be chosen and how a choice is applied: search spaces, plans, compression methods."""

from slimsearch.spaces.apply import apply_plan, compress, compressible_modules, structured_blocks
from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.realized import realized_table
from slimsearch.spaces.plan import PLAN_VERSION, CompressionPlan, LayerSettings, StructuredSettings
from slimsearch.spaces.serialize import load_compressed, save_compressed, serialized_size, state_digest
from slimsearch.spaces.space import (
    Choices,
    SearchSpace,
    SpaceConfig,
    StructuredChoices,
    space_config_from_mapping,
)

__all__ = [
    "PLAN_VERSION",
    "Choices",
    "CompressionPlan",
    "LayerSettings",
    "SearchSpace",
    "SpaceConfig",
    "StructuredChoices",
    "StructuredSettings",
    "apply_plan",
    "compress",
    "compressible_modules",
    "load_compressed",
    "realized_table",
    "registry",
    "save_compressed",
    "serialized_size",
    "space_config_from_mapping",
    "state_digest",
    "structured_blocks",
]
