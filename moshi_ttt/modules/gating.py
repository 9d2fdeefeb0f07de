"""The In-Place TTT gated MLP: a drop-in replacement for moshi's `ActivationGating`.

Parameters keep moshi's names and shapes — `linear_in.weight` = [W_gate; W_up] (2h×d),
`linear_out.weight` = W⁽⁰⁾ = W_down (d×h) — so a Kyutai state dict loads strictly. TTT's slow
parameters live in `ttt` (`ttt.conv.weight` [d, 1, K] depthwise, `ttt.w_target` [d, d]).

Two paths compute the same function (checked against `moshi_ttt.ttt.naive.naive_ttt_mlp` in tests):
* parallel (no streaming state): whole sequences, any T, autograd — training and prefill. It adds the
  TTT term in fp32 (fp64 for fp64 models) to the base output and casts the sum back to the model dtype;
* streaming (inside `with module.streaming(B)`): 1+ frames per call; the down-projection uses each
  conversation's fast weight W⁽ⁱ⁾ (fp32, or bf16 with `state_dtype: bfloat16`; applied in the model
  dtype) instead of W⁽⁰⁾, and completed chunks are folded between frames (`moshi_ttt.ttt.stream.TTTState`
  owns that state).
"""

from __future__ import annotations

import typing as tp

import torch
from moshi.modules.gating import ActivationGating
from moshi.modules.streaming import StreamingModule
from torch import nn

from moshi_ttt.ttt.chunk import parallel_extra
from moshi_ttt.ttt.config import TTTConfig
from moshi_ttt.ttt.stream import TTTState


class TTTTarget(nn.Module):
    """Slow parameters producing the target V̂ = Conv1D(src) · W_target.

    conv: depthwise Conv1d(d, d, K, groups=d, bias=False) (absent with use_conv=False).
    w_target: [d, d] (absent with use_target_proj=False ⇒ identity). A plain Parameter, not an
    nn.Linear, so moshi's LoRA conversion (which wraps every nn.Linear) leaves it alone.
    """

    def __init__(self, dim: int, cfg: TTTConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        self.conv: nn.Conv1d | None = None
        self.w_target: nn.Parameter | None = None
        if cfg.use_conv:
            self.conv = nn.Conv1d(dim, dim, cfg.kernel_size, groups=dim, bias=False, device=device, dtype=dtype)
        if cfg.use_target_proj:
            self.w_target = nn.Parameter(torch.empty(dim, dim, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """`zero`: V̂ = 0, exactly the base MLP — conv = 0 and W_target = I, or W_target = 0 when there
        is no conv. `ntp`: conv picks frame t+1 (tap index past+1), W_target = I; without conv,
        V̂ = src · I."""
        if self.w_target is not None and self.w_target.device.type != "meta":
            eye = torch.eye(self.w_target.shape[0], dtype=self.w_target.dtype)
            self.w_target.copy_(eye if (self.conv is not None or self.cfg.init == "ntp") else 0 * eye)
        if self.conv is not None and self.conv.weight.device.type != "meta":
            self.conv.weight.zero_()
            if self.cfg.init == "ntp":
                self.conv.weight[:, 0, self.cfg.past_frames + 1] = 1.

    @property
    def conv_weight(self) -> torch.Tensor | None:
        return None if self.conv is None else self.conv.weight


class TTTGating(StreamingModule[TTTState]):
    """Gated MLP with In-Place TTT on W_down. forward(x [B, T, d], x0 [B, T, d] | None) → [B, T, d].

    x is the (normalised) MLP input H; x0 the token embeddings, required when cfg.target == "x0".
    """

    def __init__(self, dim: int, dim_feedforward: int, activation: tp.Callable, cfg: TTTConfig,
                 device=None, dtype=None):
        super().__init__()
        base = ActivationGating(dim, dim_feedforward, activation, device=device, dtype=dtype)
        self._adopt(base.linear_in, base.linear_out, activation, cfg)

    @classmethod
    def from_gating(cls, gating: ActivationGating, cfg: TTTConfig) -> TTTGating:
        """Wraps an existing moshi gating, taking over its linear_in / linear_out modules."""
        self = cls.__new__(cls)
        StreamingModule.__init__(self)
        self._adopt(gating.linear_in, gating.linear_out, gating.activation, cfg)
        return self

    def _adopt(self, linear_in: nn.Module, linear_out: nn.Module, activation, cfg: TTTConfig) -> None:
        if not isinstance(cfg, TTTConfig):
            raise TypeError(f"cfg must be a TTTConfig, got {type(cfg).__name__}")
        self.linear_in = linear_in
        self.linear_out = linear_out
        self.activation = activation
        self.cfg = cfg
        w = linear_out.weight if isinstance(linear_out, nn.Linear) else linear_out.frozen_W.weight
        self.dim, self.hidden = w.shape
        self.ttt = TTTTarget(self.dim, cfg, device=w.device, dtype=w.dtype)

    # -- shared pieces ----------------------------------------------------------------------------

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Z = φ(x W_gateᵀ) ⊙ (x W_upᵀ), [B, T, h] — same ops as moshi's gating kernel."""
        y = self.linear_in(x)
        B, T, _ = y.shape
        y = y.view(B, T, 2, -1)
        return self.activation(y[..., 0, :]) * y[..., 1, :]

    def _src(self, x: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.target == "mlp_input":
            return x
        if x0 is None:
            raise ValueError("TTTGating with target='x0' needs the token embeddings: call forward(x, x0)")
        if x0.shape != x.shape:
            raise ValueError(f"x0 shape {tuple(x0.shape)} does not match the MLP input {tuple(x.shape)}")
        return x0

    @staticmethod
    def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        src = self._src(x, x0)
        z = self.activations(x)
        state = self._streaming_state
        if state is not None:
            return self._stream(state, z, src)
        base = self.linear_out(z)
        acc = self._acc_dtype(base.dtype)
        extra = parallel_extra(z.to(acc), src.to(acc), self.ttt.conv_weight, self.ttt.w_target, self.cfg)[0]
        return (base.to(acc) + extra).to(base.dtype)

    @torch.no_grad()
    def _stream(self, state: TTTState, z: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Frame by frame: the per-frame step, then (unless a driver folds) the fold of completed chunks."""
        T = z.shape[1]
        if state.host_folds and T != 1:
            raise ValueError(f"with a folding driver (TTTLMGen) the TTT layer steps one frame per call, got {T}")
        outs = []
        for t in range(T):
            outs.append(state.step(z[:, t:t + 1], src[:, t:t + 1]))
            if not state.host_folds:
                self._self_fold(state)
        return outs[0] if T == 1 else torch.cat(outs, dim=1)

    def _self_fold(self, state: TTTState) -> None:
        if _capturing():
            raise RuntimeError("a TTT layer is being captured in a CUDA graph without a folding driver: its "
                               "per-chunk fold would be frozen into the graph. Drive the model with "
                               "moshi_ttt.models.lm.TTTLMGen (a drop-in LMGen), or set NO_CUDA_GRAPH=1")
        self.fold(state.due())

    def fold(self, items: tp.Sequence[int]) -> None:
        """Folds the completed chunks of the listed streaming items (host side, between steps)."""
        self.ttt_state().fold(items, self.cfg)

    def _base_weight(self) -> torch.Tensor:
        """W⁽⁰⁾ [d, h] as the base MLP applies it (a LoRA-wrapped linear_out is merged)."""
        lo = self.linear_out
        if isinstance(lo, nn.Linear):
            return lo.weight.detach()
        w = lo.frozen_W.weight
        return (w + lo.scaling * (lo.lora_B.weight @ lo.lora_A.weight).to(w.dtype)).detach()

    def _init_streaming_state(self, batch_size: int) -> TTTState:
        w0, cfg = self._base_weight(), self.cfg
        acc = self._acc_dtype(w0.dtype)
        state = torch.bfloat16 if cfg.state_dtype == "bfloat16" else acc  # the fast weight's dtype
        return TTTState(batch_size, cfg.chunk_size, w0, acc, self.ttt.w_target, self.ttt.conv_weight, cfg.past_frames,
                        state_dtype=state, stochastic=cfg.state_rounding == "stochastic",
                        rounding_seed=cfg.rounding_seed)

    # -- telemetry (host side, any time; never called from the per-frame path) ---------------------

    def fast_weight_delta(self) -> torch.Tensor:
        """W − W⁽⁰⁾ per streaming item, [B, d, h]."""
        return self.ttt_state().delta()

    def telemetry(self) -> dict[str, torch.Tensor]:
        """Per item [B]: updates applied, clips, skipped non-finite deltas, ‖last ΔW‖ (raw), drift
        ‖W − W⁽⁰⁾‖, and frames until the next update."""
        state = self.ttt_state()
        drift = torch.linalg.matrix_norm(self.fast_weight_delta())
        return {
            "updates": state.updates.clone(), "clips": state.clips.clone(), "skipped": state.skipped.clone(),
            "last_delta_norm": state.last_norm.clone(),
            "drift": drift, "frames_to_update": self.cfg.chunk_size - state.pos,
        }

    def ttt_state(self) -> TTTState:
        """The streaming fast-weight state (one row per streaming item); RuntimeError outside streaming mode."""
        if self._streaming_state is None:
            raise RuntimeError("TTT telemetry needs streaming mode (`with model.streaming(B):`)")
        return self._streaming_state


def _capturing() -> bool:
    """True while a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
