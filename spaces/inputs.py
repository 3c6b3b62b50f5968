"""The keys of a batch that are model inputs: everything else (labels) stays out of forward().

``token_type_ids`` is present only where the tokenizer gives it for a text pair (BERT-style
segment ids); leaving it out would score the pair as one segment.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
# A label no loss or metric counts: special tokens, padding and a word's later sub-tokens in
# token classification (the transformers convention, which its losses already ignore).
IGNORE = -100


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: batch[k] for k in INPUT_KEYS if k in batch}
