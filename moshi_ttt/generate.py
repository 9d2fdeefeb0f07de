"""`TTTLMGen`: moshi's `LMGen` that runs the TTT fold outside the (CUDA-graphed) per-frame step.

moshi's `LMGen` replays `forward_text` as a CUDA graph on GPU, so the data-dependent fold of a
completed chunk cannot live inside it (see `stream`). The host, however, decides every exec mask and
every reset, so it knows each conversation's frame count without reading the device: `FoldClock`
mirrors it, and after each step `TTTLMGen` folds exactly the conversations whose chunk that step
completed (`TTTLMModel.ttt_fold`). Everything else is moshi's `LMGen`, unchanged; the clock only
sees masks given to *this* object (`set_exec_mask`, `reset_streaming`), so drive exec masks and resets
through it, not through `lm_model` directly. Pass CPU masks: a GPU mask costs a host sync to read.
"""

from __future__ import annotations

import numpy as np
import torch
from moshi.models.lm import LMGen

from .model import TTTLMModel


class FoldClock:
    """Host-side count of the frames each conversation has put into its current chunk.

    Mirrors the device's `pos` exactly: +1 per step for executing items, 0 on reset (which also
    re-enables execution, as moshi's `State.reset` does)."""

    def __init__(self, batch_size: int, chunk: int):
        self.chunk = chunk
        self.frames = np.zeros(batch_size, dtype=np.int64)
        self.exec = np.ones(batch_size, dtype=bool)

    @staticmethod
    def _host(mask: torch.Tensor, n: int) -> np.ndarray:
        m = mask.detach().to("cpu", torch.bool).numpy().reshape(-1)
        if m.shape != (n,):
            raise ValueError(f"mask of shape {tuple(mask.shape)} for a batch of {n} conversations")
        return m

    def set_exec_mask(self, mask: torch.Tensor) -> None:
        self.exec = self._host(mask, len(self.frames)).copy()

    def reset(self, mask: torch.Tensor | None) -> None:
        m = np.ones_like(self.exec) if mask is None else self._host(mask, len(self.frames))
        self.frames[m] = 0
        self.exec[m] = True

    def step(self) -> list[int]:
        """Advances one frame; returns the conversations whose chunk this frame completed."""
        self.frames[self.exec] += 1
        done = self.exec & (self.frames == self.chunk)
        self.frames[done] = 0
        return np.flatnonzero(done).tolist()


class TTTLMGen(LMGen):
    """Drop-in `LMGen` for a `TTTLMModel`: same arguments, same outputs; folds per chunk between steps."""

    def __init__(self, lm_model: TTTLMModel, **kwargs):
        if not isinstance(lm_model, TTTLMModel):
            raise TypeError(f"TTTLMGen needs a TTTLMModel, got {type(lm_model).__name__} (use moshi's LMGen)")
        super().__init__(lm_model, **kwargs)

    def _init_streaming_state(self, batch_size: int):
        state = super()._init_streaming_state(batch_size)  # enters lm_model.streaming(B, or 2B with CFG)
        self.lm_model.ttt_set_host_folds(True)
        state.fold_clock = FoldClock(batch_size, self.lm_model.ttt_config.layer.chunk_size)
        return state

    def _clock(self) -> FoldClock:
        state = self._streaming_state
        if state is None:
            raise RuntimeError("TTTLMGen is not streaming: wrap calls in `with lm_gen.streaming(B):`")
        return state.fold_clock

    def set_exec_mask(self, exec_mask: torch.Tensor) -> None:
        self._clock().set_exec_mask(exec_mask)
        super().set_exec_mask(exec_mask)

    def reset_streaming(self, reset_mask: torch.Tensor | None = None) -> None:
        super().reset_streaming(reset_mask)
        self._clock().reset(reset_mask)

    @torch.no_grad()
    def _step(self, input_tokens: torch.Tensor, depformer_replace_tokens: torch.Tensor | None = None):
        out = super()._step(input_tokens, depformer_replace_tokens)
        items = self._clock().step()
        if items:
            if self.cfg_coef != 1.:  # the conditional and unconditional twins of a conversation
                items = items + [i + self._streaming_state.batch_size for i in items]
            self.lm_model.ttt_fold(items)
        return out


def make_lm_gen(lm_model, **kwargs) -> LMGen:
    """The generator for `lm_model`: `TTTLMGen` for a TTT model, moshi's `LMGen` otherwise."""
    return TTTLMGen(lm_model, **kwargs) if isinstance(lm_model, TTTLMModel) else LMGen(lm_model, **kwargs)
