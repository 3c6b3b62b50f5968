"""Shared fixtures: tiny study specs and one local Ray per test session."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import LM_TEXT, sentiment_rows, tiny_bert_config, tiny_llama_config


def tiny_study(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """A study mapping for a tiny BERT on in-memory sentiment rows; finishes in seconds."""
    data: dict[str, Any] = {
        "name": "tiny",
        "model": {
            "config": tiny_bert_config(),
            "finetune": {"epochs": 3, "learning_rate": 1e-3, "batch_size": 8},
        },
        "task": {
            "kind": "classification",
            "rows": sentiment_rows(48),
            "train_size": 32,
            "test_size": 16,
            "max_length": 16,
        },
        "space": {
            "default": {"bits": [32, 8, 4], "sparsity": [0.0, 0.5], "rank": [1.0, 0.5]},
            "embeddings": [32, 8],
        },
        "constraints": {"max_accuracy_drop": 10.0},
        # Tiny models time in fractions of a millisecond, where drift is jitter: gate off here
        # (tests/test_latency.py covers it), precision loose, so the suite stays fast.
        "latency": {
            "batch_size": 1,
            "seq_len": 8,
            "warmup": 1,
            "repeats": 3,
            "threads": 1,
            "precision": 0.05,
            "max_repeats": 30,
            "max_drift": 0,
        },
        "budget": {"trials": 8},
        "executor": {"kind": "inprocess"},
        "output": str(tmp_path / "run"),
        "cache": str(tmp_path / "cache"),
    }
    data.update(overrides)
    return data


def tiny_lm_study(tmp_path: Path, eval_blocks: int = 4, **overrides: Any) -> dict[str, Any]:
    """A study mapping for a tiny Llama on in-memory text (blocks of 8 tokens), perplexity and
    size, no constraints; finishes in seconds."""
    data = {
        "model": {"config": tiny_llama_config()},
        "task": {"kind": "causal-lm", "text": LM_TEXT, "block_size": 8, "eval_blocks": eval_blocks},
        "objectives": ["perplexity", "size_bytes"],
        "constraints": {},
    }
    return tiny_study(tmp_path, **(data | overrides))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Start Ray once: it costs 5-11 s and most of a GB."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    temp = tempfile.mkdtemp(prefix="ssray-")
    # Workers import test plugins (tests/plugins) too.
    env = {"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}}
    from slimsearch.search.executors import loopback_only

    with loopback_only():  # as the executor starts its own: nothing listens beyond 127.0.0.1
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=temp,
            _node_ip_address="127.0.0.1",
            logging_level="ERROR",
            runtime_env=env,
        )
    yield
    ray.shutdown()
