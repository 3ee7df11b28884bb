"""The one reading of a `--device` setting, so `auto` means the same in every command, and what the CPU runs natively."""

from __future__ import annotations

import torch

from .errors import ClipforgeError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` is the first CUDA GPU when one is visible, else the CPU; a CUDA name without a GPU is an error."""
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ClipforgeError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClipforgeError("device cuda was requested but no CUDA GPU is available")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether bf16 matmuls run in hardware here (AVX512-BF16 or AMX); elsewhere torch emulates them, slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: say no rather than promise speed
        return False
