"""slimsearch: per-layer compression search for Transformer language models.

The public entry points, imported lazily so that ``import slimsearch`` (and the CLI's
start-up) does not pay for torch, transformers and Optuna until one is used:

- ``run_study(path_or_spec)``: run or resume a study;
- ``open_run(path)``: a run folder's results (``.pareto()``, ``.trials()``, ``.export()``);
- ``load(folder)``: a (model, tokenizer) pair from an export folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimsearch.search.driver import run_study
    from slimsearch.search.export import load
    from slimsearch.search.results import open_run

__all__ = ["load", "open_run", "run_study"]

_WHERE = {
    "run_study": "slimsearch.search.driver",
    "load": "slimsearch.search.export",
    "open_run": "slimsearch.search.results",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'slimsearch' has no attribute {name!r}; its API is {__all__}")
