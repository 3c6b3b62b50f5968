"""What each compression method really buys on this code base: speed, size, or both.

The table is the single source for docs and trial records. "speed" means the compressed
layer runs a cheaper computation (smaller matmuls, int8 or bf16 kernels); "size" means its
stored bytes shrink. A method realized for size only still runs on a dense fp32 copy, so
it claims no latency gain; the latency evaluator measures what really happens anyway.
"""

from __future__ import annotations

from typing import Final

SPEED: Final = "speed"
SIZE: Final = "size"
BOTH: Final = "speed+size"

REALIZED: Final[dict[str, str]] = {
    # Structured pruning shrinks Linear shapes: fewer weights and fewer FLOPs.
    "heads": BOTH,
    "neurons": BOTH,
    # A factorization within the rank limit has fewer weights and fewer multiply-adds.
    "rank": BOTH,
    # Bitmask + kept values: smaller on disk, but computed densely (no sparse kernel gain).
    "sparsity": SIZE,
    # bf16 matmuls (this CPU has avx512_bf16) and half the bytes.
    "bits16": BOTH,
    # fbgemm int8 dynamic-quantized matmuls and a quarter of the bytes.
    "bits8": BOTH,
    # Packed codes with group-wise scales; dequantized to a dense fp32 copy to compute.
    "bits4": SIZE,
    "bits2": SIZE,
}
