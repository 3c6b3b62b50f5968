"""Compression methods: torch only, no Optuna. Each turns one module into its compressed form."""

from slimsearch.spaces.methods.lowrank import LowRankLinear, max_useful_rank
from slimsearch.spaces.methods.packed import PackedEmbedding, PackedLinear, TiedHead
from slimsearch.spaces.methods.pruning import magnitude_mask

__all__ = [
    "LowRankLinear",
    "PackedEmbedding",
    "PackedLinear",
    "TiedHead",
    "magnitude_mask",
    "max_useful_rank",
]
