"""The TTT-Moshi model and its generator: `TTTLMModel` (moshi's `LMModel` with TTT layers in the main
transformer), `TTTLMGen` (a drop-in `LMGen` that folds completed chunks between steps) and `FoldClock`.

Invariant kept by `TTTLMGen`: after every step, each conversation whose chunk that step completed has been
folded in every TTT layer, from the host's frame count alone (the captured step holds no host logic).
"""

from __future__ import annotations

import typing as tp

import numpy as np
import torch
from moshi.models.lm import LMGen, LMModel
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

from moshi_ttt.modules.gating import TTTGating
from moshi_ttt.modules.transformer import TTT_KEY, TTTLayerFactory, TTTStreamingTransformer
from moshi_ttt.ttt.config import TTTModelConfig


class TTTLMModel(LMModel):
    """moshi's LMModel with In-Place TTT in the main transformer layers chosen by `ttt`.

    All other arguments are moshi's `LMModel` kwargs (`lm_kwargs` of a Kyutai config.json).
    """

    def __init__(self, *, ttt: TTTModelConfig, **lm_kwargs):
        for k in ("layer_class", "depformer_layer_class"):
            if k in lm_kwargs:
                raise ValueError(f"TTTLMModel chooses {k} itself; got {k}={lm_kwargs[k]!r}")
        if lm_kwargs.get("quantize"):
            raise ValueError("TTT layers do not support quantize=True (int8 weights cannot hold a fast-weight "
                             "delta); load the bf16 checkpoint instead")
        if "num_layers" not in lm_kwargs:
            raise ValueError("lm_kwargs must give num_layers")
        num_layers = lm_kwargs["num_layers"]
        self.ttt_config = ttt
        indices = ttt.layer_indices(num_layers)
        super().__init__(layer_class=TTTLayerFactory(indices, ttt.layer, num_layers),
                         depformer_layer_class=StreamingTransformerLayer, **lm_kwargs)
        self.transformer = TTTStreamingTransformer.adopt(self.transformer)
        self.ttt_layer_indices: list[int] = indices

    def ttt_gatings(self) -> dict[int, TTTGating]:
        """Layer index → its TTTGating."""
        return {i: self.transformer.layers[i].gating for i in self.ttt_layer_indices}

    def ttt_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the TTT slow parameters (what `loaders.save_ttt` writes)."""
        return {k: v for k, v in self.state_dict().items() if TTT_KEY in k}

    def ttt_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if TTT_KEY in n]

    def ttt_telemetry(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per TTT layer: `TTTGating.telemetry()` (per streaming item). Needs streaming mode."""
        return {i: g.telemetry() for i, g in self.ttt_gatings().items()}

    def ttt_fold(self, items: tp.Sequence[int]) -> None:
        """Folds the completed chunk of each listed streaming item in every TTT layer (host side, between
        steps; see `TTTState.fold`). `TTTLMGen` calls it; other drivers let the layers fold themselves."""
        for g in self.ttt_gatings().values():
            g.fold(items)

    def ttt_set_host_folds(self, enabled: bool) -> None:
        """Declares (streaming mode) that a driver calls `ttt_fold` after every step, so the layers never
        fold on their own and the captured step holds no host logic."""
        for g in self.ttt_gatings().values():
            g.ttt_state().host_folds = enabled

    def ttt_state_bytes(self) -> int:
        """Fast-state bytes per conversation summed over TTT layers (needs streaming mode)."""
        return sum(g.ttt_state().bytes for g in self.ttt_gatings().values())


def build_ttt_lm(lm_kwargs: dict, ttt: TTTModelConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> TTTLMModel:
    """A randomly initialised TTT-Moshi in eval mode (like `loaders.get_moshi_lm(None, ...)`)."""
    model = TTTLMModel(ttt=ttt, device=device, dtype=dtype, **lm_kwargs)
    return model.eval()


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
