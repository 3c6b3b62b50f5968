"""The study's device: its spelling and the settings it refuses when the study is read, the
missing GPU refused before any model is loaded, what a trial asks Ray for, and the
device-agnostic pieces (inputs follow the model's weights) on the CPU. The GPU's own paths
are tested in tests/test_gpu.py, which skips without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import tiny_study
from slimsearch.evaluators import LatencySpec
from slimsearch.evaluators import device as devices
from slimsearch.evaluators.latency import environment, quiet_key, timed
from slimsearch.search.driver import run_study
from slimsearch.search.executors import task_options
from slimsearch.search.export import export_device
from slimsearch.search.jobs import Jobs
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan
from slimsearch.spaces.methods.packed import PackedLinear
from tiny import tiny_bert, tiny_llama


@pytest.mark.parametrize(("given", "canonical"), [("cpu", "cpu"), ("CUDA", "cuda"), (" cuda:1 ", "cuda:1")])
def test_device_spellings(given: str, canonical: str) -> None:
    assert devices.parse_device(given) == canonical


@pytest.mark.parametrize("given", ["gpu", "cuda:x", "cuda:", "mps", 0, None])
def test_a_bad_device_names_the_value_and_the_spellings(given: Any) -> None:
    with pytest.raises(ValueError, match=r"is not a device; write cpu, cuda .* or cuda:N") as err:
        devices.parse_device(given)
    assert repr(given) in str(err.value)


def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_missing_gpu_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpu(monkeypatch)
    devices.check_device("cpu")
    with pytest.raises(ValueError, match=r"cuda, but .*(built without CUDA|finds no GPU).*device: cpu"):
        devices.check_device("cuda")


def test_a_gpu_number_past_the_last_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices.check_device("cuda:1")
    with pytest.raises(ValueError, match=r"cuda:2, but this machine shows 2 GPU\(s\) \(cuda:0..cuda:1\)"):
        devices.check_device("cuda:2")


def study(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return tiny_study(tmp_path, **overrides)


def test_the_study_file_reads_the_device(tmp_path: Path) -> None:
    assert study_from_mapping(study(tmp_path)).device == "cpu"
    spec = study_from_mapping(study(tmp_path, device="cuda:1"))  # in-process: any GPU number
    assert spec.device == "cuda:1" and spec.executor.gpus_per_trial == 1.0
    job = Jobs(spec, tmp_path).job(0, CompressionPlan())
    assert job.device == "cuda:1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"device": "gpu"}, r"device: 'gpu' is not a device"),
        (
            {"device": "cuda:1", "executor": {"kind": "ray"}},
            r"device: cuda:1 with executor.kind ray: .* write device: cuda",
        ),
        (
            {"device": "cuda", "latency": {"backend": "onnxruntime"}},
            r"latency.backend: onnxruntime times on the CPU, but device is cuda",
        ),
        (
            {"executor": {"kind": "inprocess", "gpus_per_trial": 0.5}},
            r"executor.gpus_per_trial: set, but device is cpu",
        ),
        (
            {"device": "cuda", "executor": {"kind": "ray", "gpus_per_trial": 0}},
            r"executor.gpus_per_trial: 0 is not valid; give a positive number",
        ),
        (
            {"device": "cuda", "executor": {"kind": "ray", "gpus_per_trial": 1.5}},
            r"executor.gpus_per_trial: 1.5 is not valid; above 1, give a whole number",
        ),
    ],
)
def test_settings_a_device_cannot_go_with_are_refused(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    data = study(tmp_path)
    for key, value in overrides.items():
        data[key] = data[key] | value if isinstance(data.get(key), dict) else value
    with pytest.raises(StudyError, match=message):
        study_from_mapping(data)


def test_a_gpu_study_on_a_machine_without_one_stops_before_any_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_gpu(monkeypatch)
    spec = study_from_mapping(study(tmp_path, device="cuda"))
    with pytest.raises(StudyError, match=r"device: cuda, but .*write device: cpu"):
        run_study(spec)
    assert not (tmp_path / "cache").exists(), "refused before the baseline was prepared"


def test_a_trial_asks_ray_for_its_share_of_a_gpu(tmp_path: Path) -> None:
    spec = study_from_mapping(study(tmp_path, device="cuda", executor={"kind": "ray", "gpus_per_trial": 0.5}))
    job = Jobs(spec, tmp_path).job(0, CompressionPlan())
    assert task_options(job, 2, 0.5) == {"num_cpus": 2, "num_gpus": 0.5}
    assert task_options(job, 2, 0.0) == {"num_cpus": 2}, "a CPU study asks for no GPU"


def test_an_export_without_the_studys_gpu_revalidates_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    no_gpu(monkeypatch)
    assert export_device("cuda") == "cpu"
    assert "Re-validating on the CPU" in capsys.readouterr().err
    assert export_device("cpu") == "cpu"


def test_inputs_follow_the_models_weights() -> None:
    assert devices.model_device(nn.ReLU()) == torch.device("cpu"), "no weights: the CPU"
    with torch.device("meta"):
        layer = nn.Linear(2, 2)
    assert devices.model_device(layer) == torch.device("meta")
    batch = {"input_ids": torch.ones(1, 2, dtype=torch.long), "note": "kept"}
    moved = devices.to_device(batch, devices.model_device(layer))
    assert moved["input_ids"].device == torch.device("meta") and moved["note"] == "kept"
    assert batch["input_ids"].device == torch.device("cpu"), "the caller's batch is left as it was"


def test_cpu_timing_and_provenance_name_no_gpu() -> None:
    calls: list[int] = []
    once = timed(lambda: calls.append(1), torch.device("cpu"))
    assert once() >= 0.0 and calls == [1]
    env = environment(LatencySpec(), torch.device("cpu"))
    assert "gpu" not in env and env["torch"] == torch.__version__
    assert devices.gpu_environment(torch.device("cpu")) == {}
    assert quiet_key(1, 8, 1, nn.Linear(2, 2)) == "b1-s8-t1-p6", "CPU keys are unchanged by the device"


PLANS = [
    {
        "re:.*q_proj|.*query": LayerSettings(bits=8),
        "re:.*k_proj|.*key": LayerSettings(bits=4),
        "re:.*v_proj|.*value": LayerSettings(bits=2),
        "re:.*o_proj|.*attention.output.dense": LayerSettings(bits=16),
        "re:.*down_proj|.*output.dense": LayerSettings(bits=4, rank=8),
        "re:.*gate_proj": LayerSettings(bits=3),
        "re:.*embed_tokens|.*word_embeddings": LayerSettings(bits=4),
    },
    {"re:.*embed_tokens|.*word_embeddings": LayerSettings(bits=16), "re:.*": LayerSettings(bits=2)},
]


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
@pytest.mark.parametrize("layers", PLANS)
def test_a_compressed_model_moves_whole_to_another_device(make: Any, layers: dict[str, Any]) -> None:
    # The meta device stands in for a GPU: a forward pass there fails on any tensor a packed
    # layer kept on the CPU (a cached kernel form, a lookup table, an index built with arange).
    # Sparse layers are left out: counting kept entries reads a value, which meta cannot.
    model = make()
    apply_plan(model, CompressionPlan(layers=layers))
    ids = torch.randint(1, 90, (1, 8))
    with torch.no_grad():
        model(input_ids=ids)  # fills the CPU kernel caches
        model.to("meta")
        out = model(input_ids=ids.to("meta")).logits
    assert out.device == torch.device("meta")
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.kernel in ("dense", "bf16") for m in packed), "no CPU kernel off the CPU"
    assert any("no meta kernel here" in m.compute_path for m in packed)
