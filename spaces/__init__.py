"""What can be chosen and how a choice is applied: search spaces, plans, compression methods."""

from slimsearch.spaces.apply import apply_plan, compressible_modules
from slimsearch.spaces.plan import PLAN_VERSION, CompressionPlan, LayerSettings
from slimsearch.spaces.serialize import save_compressed, serialized_size
from slimsearch.spaces.space import Choices, SearchSpace, SpaceConfig, space_config_from_mapping

__all__ = [
    "PLAN_VERSION",
    "Choices",
    "CompressionPlan",
    "LayerSettings",
    "SearchSpace",
    "SpaceConfig",
    "apply_plan",
    "compressible_modules",
    "save_compressed",
    "serialized_size",
    "space_config_from_mapping",
]
