"""What the beyond-window recipe costs at Moshi 7B, computed from FLOPs (not measured): GPU-hours on one H100
per hour of training audio, for the recipe of moshi_ttt/train/example.yaml (read from it; docs/training.md).

Per frame, a forward pass costs 2 FLOPs per weight it multiplies by (the temporal transformer once, the
depformer's per-step weights once per codebook step, the text head once; embeddings are lookups) plus the
attention over the training window (QKᵀ and AV: 4 · context · d per layer) and the TTT terms (apply, update,
target: 4·d·h + 2·d² per TTT layer). A step is forward + backward: the backward of activations is another forward;
weight gradients (trainable: full) a third, TTT-only training adds none worth counting; gradient
checkpointing recomputes one forward. moshi's attention in training is `scaled_dot_product_attention` with a
dense boolean mask, so it computes all T² scores of a T-frame segment, not only the window's: that is counted
as 4 · T · d per frame and layer.

    python -m moshi_ttt.experiments.spoken.cost --out docs/recipe_cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from moshi_ttt.models.streams import FRAME_RATE

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 (NVIDIA's datasheet; 1979e12 is with sparsity)


EXAMPLE = Path(__file__).parents[2] / "train" / "example.yaml"
MFU = 0.35  # assumed model-FLOPs utilisation


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What the cost depends on; `of_config` reads it from a `moshi-ttt train` YAML (the shipped recipe:
    moshi_ttt/train/example.yaml) for Moshi 7B's 32 layers and 3000-frame window."""

    context: int
    segment_frames: int
    chunk: int
    ttt_layers: int
    trainable: str
    gradient_checkpointing: bool
    mfu: float = MFU

    @classmethod
    def of_config(cls, path: str | Path = EXAMPLE, num_layers: int = 32, checkpoint_context: int = 3000,
                  **changes) -> Recipe:
        from moshi_ttt.train.config import TrainConfig
        from moshi_ttt.ttt.config import load_ttt_config

        cfg = TrainConfig.load(path)
        if cfg.model.ttt_config is None:
            raise ValueError(f"{path}: model.ttt_config is not set (the recipe's TTT layers and chunk)")
        ttt = load_ttt_config(cfg.model.ttt_config)
        r = cls(context=cfg.model.context or checkpoint_context, segment_frames=cfg.data.segment_frames,
                chunk=ttt.layer.chunk_size, ttt_layers=len(ttt.layer_indices(num_layers)),
                trainable=cfg.trainable, gradient_checkpointing=cfg.gradient_checkpointing)
        return dataclasses.replace(r, **changes)


def moshi7b_counts() -> dict:
    """Weight counts of Moshi 7B (moshi's own config, built on the meta device): temporal transformer, one
    depformer step's weights, the text head; and d, h, layers, codebook steps."""
    import torch
    from moshi.models.lm import LMModel

    from moshi_ttt.models.loaders import moshi_private

    kw = moshi_private().lm_kwargs
    with torch.device("meta"):
        m = LMModel(**kw)
    named = dict(m.named_parameters())
    temporal = sum(p.numel() for n, p in named.items() if n.startswith("transformer."))
    dep = sum(p.numel() for n, p in named.items() if n.startswith("depformer.") and "emb" not in n)
    dep_in = sum(p.numel() for n, p in named.items() if n.startswith("depformer_in"))
    heads = sum(p.numel() for n, p in named.items() if n.startswith("linears."))
    text_head = sum(p.numel() for n, p in named.items() if n.startswith("text_linear"))
    total = sum(p.numel() for p in m.parameters())
    d = kw["dim"]
    return {"params": total, "temporal": temporal, "depformer_per_step": (dep + dep_in + heads) / kw["dep_q"],
            "dep_q": kw["dep_q"], "text_head": text_head, "d": d, "h": int(2 * kw["hidden_scale"] * d / 3),
            "layers": kw["num_layers"], "context": kw["context"]}


def flops_per_frame(c: dict, r: Recipe) -> dict:
    fwd_weights = 2 * (c["temporal"] + c["dep_q"] * c["depformer_per_step"] + c["text_head"])
    attention = 4 * r.segment_frames * c["d"] * c["layers"]  # dense mask: every one of the T² scores
    attention_window = 4 * min(r.context, r.segment_frames) * c["d"] * c["layers"]
    ttt = r.ttt_layers * (4 * c["d"] * c["h"] + 2 * c["d"] ** 2)
    fwd = fwd_weights + attention + ttt
    passes = 2 + (1 if r.trainable == "full" else 0) + (1 if r.gradient_checkpointing else 0)
    return {"forward": fwd, "forward_weights": fwd_weights, "attention_dense": attention,
            "attention_if_windowed": attention_window, "ttt": ttt, "passes": passes, "step": passes * fwd}


def cost(r: Recipe) -> dict:
    c = moshi7b_counts()
    f = flops_per_frame(c, r)
    frames_per_hour = 3600 * FRAME_RATE
    seconds = f["step"] * frames_per_hour / (H100_BF16_DENSE * r.mfu)
    return {"recipe": dataclasses.asdict(r), "model": c, "flops_per_frame": f,
            "flops_per_audio_hour": f["step"] * frames_per_hour, "h100_seconds_per_audio_hour": seconds,
            "h100_hours_per_audio_hour": seconds / 3600, "h100_bf16_dense_flops": H100_BF16_DENSE}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.experiments.spoken.cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout only)")
    a = p.parse_args(argv)
    recipe = Recipe.of_config()
    rows = {f"{recipe.trainable} (the recipe)": cost(recipe)}
    rows.update({t: cost(dataclasses.replace(recipe, trainable=t)) for t in ("ttt", "ttt+lora", "full")
                 if t != recipe.trainable})
    text = json.dumps(rows, indent=1) + "\n"
    if a.out:
        Path(a.out).write_text(text)
    for name, r in rows.items():
        print(f"{name}: {r['flops_per_frame']['step'] / 1e9:.1f} GFLOP per frame, "
              f"{r['h100_seconds_per_audio_hour']:.1f} H100-seconds per hour of audio "
              f"({r['h100_hours_per_audio_hour']:.4f} GPU-h) at {r['recipe']['mfu']:.0%} MFU", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
