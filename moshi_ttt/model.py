"""Moshi with In-Place TTT layers: subclasses of moshi's transformer pieces plus explicit X0 plumbing.

X0 — the TTT target source — is exactly the tensor `LMModel.forward_text` feeds the main transformer:
the sum of the 16 audio-codebook embeddings and the text embedding, plus `sum_condition` when the
model is conditioned by summation (that sum *is* the transformer input, so conditioning is part of
X0), before any sinusoidal positional embedding the transformer adds itself. `TTTStreamingTransformer`
takes its own input as X0 and passes it to its TTT layers only, so `forward_text`, `LMModel.forward`
(training), gradient checkpointing and moshi's unchanged `LMGen` all deliver it with no extra wiring.

Nothing here modifies a moshi class: non-TTT layers are moshi's `StreamingTransformerLayer`, the
depformer never gets TTT, and importing this module changes nothing for code that does not use it.
"""

from __future__ import annotations

import typing as tp
from contextlib import ExitStack

import torch
from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer, create_sin_embedding
from moshi.utils.compile import no_compile
from torch import nn

from .config import TTTConfig, TTTModelConfig
from .layer import TTTGating

TTT_KEY = ".gating.ttt."


class TTTTransformerLayer(StreamingTransformerLayer):
    """moshi's transformer layer whose gated MLP is a `TTTGating`; forward takes `x0` too."""

    def __init__(self, *args, ttt_config: TTTConfig, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.gating, ActivationGating):
            raise ValueError("TTT needs a gated MLP without weights_per_step "
                             f"(got gating={type(self.gating).__name__})")
        self.gating = TTTGating.from_gating(self.gating, ttt_config)

    def _ff_block(self, x: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        x_orig = x
        update = self.gating(self.norm2(x), x0)
        return x_orig.to(update) + self.layer_scale_2(update)

    def forward(self, x: torch.Tensor, cross_attention_src: torch.Tensor | None = None,
                x0: torch.Tensor | None = None) -> torch.Tensor:
        with ExitStack() as stack:
            if x.device.type != "cuda":
                stack.enter_context(no_compile())
            x = self._sa_block(x)
            if self.cross_attention is not None:
                assert cross_attention_src is not None
                x = self._cross_attention_block(x, cross_attention_src)
            else:
                assert cross_attention_src is None
            x = self._ff_block(x, x0)
            state = self._streaming_state
            if state:
                state.offset_cpu += x.shape[1]
            return x


class TTTLayerFactory:
    """`layer_class` for moshi's StreamingTransformer: builds layer i as a TTT layer iff i is listed.

    StreamingTransformer calls its layer_class once per layer, in order, so a counter gives the index.
    """

    def __init__(self, layer_indices: tp.Iterable[int], cfg: TTTConfig, num_layers: int):
        self.layer_indices = set(layer_indices)
        self.cfg = cfg
        self.num_layers = num_layers
        self._next = 0

    def __call__(self, **kwargs) -> StreamingTransformerLayer:
        i = self._next
        if i >= self.num_layers:
            raise RuntimeError(f"TTTLayerFactory asked for layer {i} of a {self.num_layers}-layer transformer")
        self._next += 1
        if i in self.layer_indices:
            return TTTTransformerLayer(ttt_config=self.cfg, **kwargs)
        return StreamingTransformerLayer(**kwargs)


class TTTStreamingTransformer(StreamingTransformer):
    """StreamingTransformer whose input is also handed, as `x0`, to its TTT layers."""

    @classmethod
    def adopt(cls, base: StreamingTransformer) -> TTTStreamingTransformer:
        """Same modules, parameters and settings as `base` (nothing is rebuilt or copied): moshi's
        LMModel constructs a plain StreamingTransformer, and this only changes how forward routes x0."""
        if type(base) is not StreamingTransformer:
            raise TypeError(f"expected a moshi StreamingTransformer, got {type(base).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(base.__dict__)
        return new

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        B, T, C = x.shape
        x0 = x
        dtype_input = x.dtype
        state = self._streaming_state
        offsets = torch.zeros(1, dtype=torch.long, device=x.device) if state is None else state.offsets
        if self.positional_embedding in {"sin", "sin_rope"}:
            positions = torch.arange(T, device=x.device).view(1, -1, 1) + offsets.view(-1, 1, 1)
            pos_emb = create_sin_embedding(positions, C, max_period=self.max_period, dtype=x.dtype)
            x = x + self.positional_scale * pos_emb
        for layer in self.layers:
            layer_kwargs = dict(kwargs, x0=x0) if isinstance(layer, TTTTransformerLayer) else kwargs
            if self.checkpointing:
                x = torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False,
                                                      determinism_check="none", preserve_rng_state=False,
                                                      **layer_kwargs)
            else:
                x = layer(x, *args, **layer_kwargs)
        if state is not None:
            state.offsets[:] = torch.where(state.exec_mask, state.offsets + T, state.offsets)
        return x.to(dtype_input)


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
        """Only the TTT slow parameters (what `checkpoint.save_ttt` writes)."""
        return {k: v for k, v in self.state_dict().items() if TTT_KEY in k}

    def ttt_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if TTT_KEY in n]

    def ttt_telemetry(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per TTT layer: `TTTGating.telemetry()` (per streaming item). Needs streaming mode."""
        return {i: g.telemetry() for i, g in self.ttt_gatings().items()}

    def ttt_fold(self, items: tp.Sequence[int]) -> None:
        """Folds the completed chunk of each listed streaming item in every TTT layer (host side, between
        steps; see `stream`). `generate.TTTLMGen` calls it; other drivers let the layers fold themselves."""
        for g in self.ttt_gatings().values():
            g.fold(items)

    def ttt_set_host_folds(self, enabled: bool) -> None:
        """Declares (streaming mode) that a driver calls `ttt_fold` after every step, so the layers never
        fold on their own and the captured step holds no host logic."""
        for g in self.ttt_gatings().values():
            g._require_state().host_folds = enabled

    def ttt_state_bytes(self) -> int:
        """Fast-state bytes per conversation summed over TTT layers (needs streaming mode)."""
        return sum(g._require_state().bytes for g in self.ttt_gatings().values())


def build_ttt_lm(lm_kwargs: dict, ttt: TTTModelConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> TTTLMModel:
    """A randomly initialised TTT-Moshi in eval mode (like `loaders.get_moshi_lm(None, ...)`)."""
    model = TTTLMModel(ttt=ttt, device=device, dtype=dtype, **lm_kwargs)
    return model.eval()
