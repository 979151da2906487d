"""Which device to run on: one check shared by training, the engine and the server."""

from __future__ import annotations

import torch


class DeviceError(ValueError):
    """A device that is not available here; the message lists the ones that are."""


def available_devices() -> list[str]:
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> the first GPU if there is one, else the CPU; anything else must exist here."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists every backend it knows, not what is here
        device = None
    ok = device is not None and (
        device.type == "cpu"
        or (device.type == "cuda" and (device.index or 0) < torch.cuda.device_count())
        or (device.type == "mps" and torch.backends.mps.is_available())
    )
    if not ok:
        raise DeviceError(
            f"device {str(name)!r} is not available here; available: auto, "
            + ", ".join(available_devices())
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on GPUs that have it and on CPUs with native bf16 matmul (AMX /
    AVX512-BF16), else fp32."""
    named = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name in named:
        return named[name]
    if name != "auto":
        raise DeviceError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
