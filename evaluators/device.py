"""The device a study runs its models on: ``cpu``, ``cuda`` or ``cuda:N``.

Parsing and the availability check are separate: a study file is read (and its device
spelling refused) on any machine, while whether the GPU exists is asked where the trials run,
before any model is loaded. Evaluators never take a device argument: they run where the
model's weights are (``model_device``) and move their inputs there (``to_device``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

DEVICES = ("cpu", "cuda", "cuda:N")


def parse_device(value: Any, where: str = "device") -> str:
    """The canonical spelling of a device (``cpu``, ``cuda``, ``cuda:N``), or a ValueError
    naming the value and the spellings allowed."""
    text = value.strip().lower() if isinstance(value, str) else None
    if text is None or not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise ValueError(
            f"{where}: {value!r} is not a device; write cpu, cuda (the first GPU) or cuda:N (GPU number N)"
        )
    return text


def cuda_index(device: str) -> int | None:
    """The GPU number a canonical device names (0 for plain ``cuda``); None for the CPU."""
    if not device.startswith("cuda"):
        return None
    return int(device.split(":", 1)[1]) if ":" in device else 0


def check_device(device: str, where: str = "device") -> None:
    """Refuse a GPU this process cannot use, with what torch sees and the fix."""
    index = cuda_index(device)
    if index is None:
        return
    if not torch.cuda.is_available():
        built = torch.version.cuda
        if built is None:
            why = f"this torch ({torch.__version__}) was built without CUDA"
        else:
            why = (
                f"torch {torch.__version__} (CUDA {built}) finds no GPU (no driver, or CUDA_VISIBLE_DEVICES)"
            )
        raise ValueError(f"{where}: {device}, but {why}; write device: cpu, or run where a GPU is visible")
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"{where}: {device}, but this machine shows {count} GPU(s) (cuda:0..cuda:{count - 1}); "
            "give one of those numbers"
        )


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are (the CPU for a model with none)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def to_device(batch: Mapping[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    """A copy of ``batch`` with every tensor on ``device`` (no copy when it is there)."""
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose ops return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_environment(device: torch.device) -> dict[str, Any]:
    """The GPU's provenance for a measurement's record: model, memory, compute capability,
    CUDA runtime and driver versions. Empty on the CPU."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {
        "device": str(device),
        "gpu": props.name,
        "gpu_memory_bytes": int(props.total_memory),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "driver": driver_version(),
    }


def driver_version() -> str | None:
    """The NVIDIA driver's version from nvidia-smi (torch does not report it); None without it."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None
