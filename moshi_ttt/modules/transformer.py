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
from moshi.modules.gating import ActivationGating
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer, create_sin_embedding
from moshi.utils.compile import no_compile

from moshi_ttt.modules.gating import TTTGating
from moshi_ttt.ttt.config import TTTConfig

TTT_KEY = ".gating.ttt."


class TTTTransformerLayer(StreamingTransformerLayer):
    """moshi's transformer layer whose gated MLP is a `TTTGating`; forward takes `x0` too."""

    def __init__(self, *args, ttt_config: TTTConfig, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.gating, ActivationGating):
            raise ValueError("TTT needs a gated MLP without weights_per_step "
                             f"(got gating={type(self.gating).__name__})")
        self.gating = TTTGating.from_gating(self.gating, ttt_config)

    def _ff_block(self, x: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
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
