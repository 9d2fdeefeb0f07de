"""moshi-finetune's loss: text CE + audio CE over the positions `LMModel.forward` marks valid.

    loss = Σ w·CE(text) / Σ w  +  Σ w·CE(audio) / Σ w
text weights: 1, × text_padding_weight at the pad and end-of-padding ids; audio weights: 1, × the
first-codebook multiplier on codebook 0. Under data parallelism the sums run over the *global* batch:
each rank returns its partial sums divided by the global weight totals (all-reduced, no gradient), so
the sum over ranks is exactly the single-process loss of the same global batch.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F


@dataclasses.dataclass
class LossParts:
    """Weighted CE sums and weight totals of one (local) batch; sums carry the graph."""

    text_sum: torch.Tensor
    text_weight: torch.Tensor
    audio_sum: torch.Tensor
    audio_weight: torch.Tensor


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·CE, Σ w) over masked positions. logits [..., V]; target, mask, weights [...]."""
    sel = mask & (weights > 0)
    ce = F.cross_entropy(logits[sel].float(), target[sel], reduction="none")
    w = weights[sel]
    return (ce * w).sum(), w.sum()


def loss_parts(out, codes: torch.Tensor, audio_offset: int, dep_q: int, text_padding_ids: set[int],
               text_padding_weight: float, first_codebook_weight_multiplier: float) -> LossParts:
    """`out`: moshi's LMOutput of `model(codes)`; codes [B, 17, T]."""
    text_target = codes[:, :audio_offset]
    text_w = out.text_mask.float()
    for i in text_padding_ids:
        text_w = torch.where(text_target == i, text_w * text_padding_weight, text_w)
    audio_target = codes[:, audio_offset:audio_offset + dep_q]
    audio_w = out.mask.float()
    audio_w[:, 0] *= first_codebook_weight_multiplier
    ts, tw = weighted_ce(out.text_logits, text_target, out.text_mask, text_w)
    as_, aw = weighted_ce(out.logits, audio_target, out.mask, audio_w)
    return LossParts(ts, tw, as_, aw)


def global_loss(parts: LossParts, all_reduce=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, text_loss, audio_loss) of this rank's share: local sums / global weight totals.

    all_reduce: a function summing a tensor over ranks in place (None = single process).
    """
    totals = torch.stack([parts.text_weight, parts.audio_weight]).detach().clone()
    if all_reduce is not None:
        all_reduce(totals)
    text = parts.text_sum / totals[0].clamp_min(1e-12)
    audio = parts.audio_sum / totals[1].clamp_min(1e-12)
    return text + audio, text, audio
