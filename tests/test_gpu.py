"""The GPU's own paths: CUDA-event timing, the allocator's peak as memory, GPU provenance,
compressed models computing on the GPU as they do on the CPU, and a tiny study with
``device: cuda`` end to end (in process and on Ray). Every test skips without a GPU; the
device-agnostic pieces are tested on the CPU in tests/test_device.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import tiny_study
from slimsearch.evaluators import EvalContext, LatencySpec, make_evaluator
from slimsearch.evaluators import device as devices
from slimsearch.evaluators.latency import timed
from slimsearch.search.driver import run_study
from slimsearch.search.study_file import study_from_mapping
from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan
from tiny import tiny_bert, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible to torch here")


def test_cuda_event_timing_counts_the_kernels_not_the_launch() -> None:
    device = torch.device("cuda")
    a = torch.randn(2048, 2048, device=device)
    small = timed(lambda: a @ a, device)
    large = timed(lambda: [a @ a for _ in range(20)], device)
    small(), large()  # warm-up: cuBLAS picks its kernels
    assert 0.0 < small() < large(), "twenty matmuls take longer than one on the GPU's own clock"


def test_gpu_provenance_names_the_gpu_and_its_software() -> None:
    env = devices.gpu_environment(torch.device("cuda"))
    assert env["gpu"] == torch.cuda.get_device_name(0)
    assert env["cuda"] == torch.version.cuda and env["gpu_memory_bytes"] > 0
    assert env["compute_capability"].count(".") == 1
    assert "driver" in env  # None only where nvidia-smi is missing


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_a_compressed_model_computes_on_the_gpu_as_on_the_cpu(make: Any) -> None:
    model = make()
    apply_plan(
        model,
        CompressionPlan(
            layers={
                "re:.*q_proj|.*query": LayerSettings(bits=8),
                "re:.*k_proj|.*key": LayerSettings(bits=4),
                "re:.*v_proj|.*value": LayerSettings(sparsity=0.5),
                "re:.*down_proj|.*output.dense": LayerSettings(rank=8),
            }
        ),
    )
    ids = torch.randint(1, 90, (2, 8))
    with torch.no_grad():
        on_cpu = model(input_ids=ids).logits
        model.to("cuda")
        on_gpu = model(input_ids=ids.to("cuda")).logits
    assert on_gpu.device.type == "cuda"
    # int8 activations round differently on the two devices' kernels; the rest is float math.
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=0.05, rtol=0.05)


def test_memory_on_a_gpu_is_the_allocators_peak() -> None:
    model = tiny_llama().to("cuda")
    spec = LatencySpec(batch_size=1, seq_len=8, warmup=1, repeats=5, threads=1, decode_tokens=6)
    context = EvalContext(task="causal-lm", batches=[], vocab_size=96, plan=CompressionPlan(), latency=spec)
    value = make_evaluator("memory_bytes").evaluate(model, context)
    record = context.records["memory"]
    assert record["counted_by"] == "cuda allocator" and record["peak_reset"] is True
    assert value == record["resident_bytes"] > 0
    assert record["loaded_bytes"] >= sum(p.numel() * p.element_size() for p in model.parameters())


def _trials(run_dir: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / 'study.db'}")
    return study.get_trials(states=[TrialState.COMPLETE])


@pytest.mark.parametrize("executor", [{"kind": "inprocess"}, {"kind": "ray", "gpus_per_trial": 0.5}])
def test_a_study_on_the_gpu_times_its_trials_there(tmp_path: Path, executor: dict[str, Any]) -> None:
    data = tiny_study(tmp_path, device="cuda", executor=executor, budget={"trials": 4})
    result = run_study(study_from_mapping(data))
    assert result.counts["complete"] == 4 and result.counts["failed"] == 0
    for trial in _trials(result.run_dir, "tiny"):
        env = trial.user_attrs["records"]["latency"]["environment"]
        assert env["gpu"] == torch.cuda.get_device_name(0) and env["device"].startswith("cuda")
        assert trial.user_attrs["records"]["latency"]["shapes"][0]["quiet_key"].endswith("-cuda:0")
