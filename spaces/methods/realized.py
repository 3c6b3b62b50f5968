"""What each compression method really buys on this code base: speed, size, or both.

Each registered method declares it (``Method.realized``); this is the table of all of them,
for docs and trial records. "speed" means the compressed layer runs a cheaper computation
(smaller matmuls, int8 or bf16 kernels); "size" means its stored bytes shrink. A method
realized for size only still runs on a dense fp32 copy, so it claims no latency gain; the
latency evaluator measures what really happens anyway.
"""

from __future__ import annotations

from slimsearch.spaces.methods import registry
from slimsearch.spaces.methods.registry import BOTH, NOTHING, SIZE, SPEED

__all__ = ["BOTH", "NOTHING", "SIZE", "SPEED", "realized_table"]


def realized_table() -> dict[str, str]:
    """Every registered method's example values, by the key a plan's ``realized()`` uses
    (options, which a plan does not list, by what they make of the method they modify)."""
    from slimsearch.spaces.plan import LayerSettings

    out = {}
    for method in registry.methods():
        for value in method.examples():
            if method.option_of is None:
                out[method.realized_key(value)] = method.realized(value)
            else:
                out.update(LayerSettings(**{**method.option_base, method.name: value}).realized())
    return out
