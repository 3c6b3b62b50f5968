"""Plain progress messages on stderr, so stdout stays the results."""

from __future__ import annotations

import sys
import time

_START = time.monotonic()


def quiet_libraries() -> None:
    """Silence per-call progress bars and info logs of the libraries we drive."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def say(message: str) -> None:
    elapsed = time.monotonic() - _START
    print(f"[slimsearch {elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


def fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
