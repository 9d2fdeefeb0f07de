"""What every command sets before torch and moshi are imported (standard library only, so the entry points
`moshi-ttt`, `python -m moshi_ttt.server` and `python -m moshi_ttt.infer` can call it first)."""

from __future__ import annotations

import os


def compile_only_on_cuda() -> None:
    """`NO_TORCH_COMPILE=1` unless it is set or CUDA is in sight: moshi reads it when its modules are imported,
    and torch.compile helps on CUDA only (on CPU it costs seconds per first call)."""
    if not (os.environ.get("CUDA_VISIBLE_DEVICES") or os.path.exists("/dev/nvidia0")):
        os.environ.setdefault("NO_TORCH_COMPILE", "1")
