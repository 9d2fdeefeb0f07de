"""The device and dtype a command runs the model on (`infer`, `serve`, `train`). Imports torch (and no moshi)."""

from __future__ import annotations

import torch


def pick_device(name: str | None = None) -> torch.device:
    """`name`, else cuda when available, else cpu. Asking for cuda on a machine without it is an error."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return device


def pick_dtype(device: torch.device, name: str | None = None, half: bool = False) -> torch.dtype:
    """The LM dtype: `name` ("float32", "bfloat16", "float16") if given, else bfloat16 on CUDA (float16
    with `half`) and float32 on CPU (CPU kernels for bf16 matmuls are slow and moshi's are untested)."""
    if name:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {name!r}: expected float32, bfloat16 or float16")
        return dtype
    if device.type == "cuda":
        return torch.float16 if half else torch.bfloat16
    return torch.float32
