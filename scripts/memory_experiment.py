"""Does In-Place TTT remember beyond the attention window? A synthetic key→value recall experiment.

A tiny Moshi-architecture LM (moshi's LMModel / TTTLMModel: text stream + 1 audio codebook, RoPE,
causal attention limited to `--context` frames) is trained from scratch on sequences where key→value
pairs are shown (text stream: key at frame t, its value at t+1; the audio stream carries the same
symbols) among filler tokens, and later queried: the key appears again and the model must predict its
value. Queries are split by distance to the pair: inside the attention window (attention can see the
pair) or beyond it (only a memory such as the TTT fast weights can help).

Variants: base (no TTT), ttt (conv + W_target), ttt_noconv (V̂ = X0·W_target), ttt_noproj
(W_target = I). TTT variants start from the `ntp` target (key frame → next frame's embedding) and
train everything. Prints a table (mean ± std over seeds) and writes results JSON + a PNG plot.

    python scripts/memory_experiment.py --out docs/memory_experiment   # ≈ 10–20 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel

from moshi_ttt.config import TTTConfig, TTTModelConfig
from moshi_ttt.model import TTTLMModel

PAD, N_KEYS = 3, 16
KEY0, VAL0, FILL0 = 8, 8 + N_KEYS, 8 + 2 * N_KEYS
TEXT_CARD = FILL0 + 32

LM_KWARGS = dict(
    text_card=TEXT_CARD, existing_text_padding_id=PAD, n_q=1, dep_q=0, card=TEXT_CARD, num_heads=4,
    hidden_scale=4.125, causal=True, layer_scale=None, max_period=10000, gating="silu",
    norm="rms_norm_f32", positional_embedding="rope", delays=[0, 0])

VARIANTS = {
    "base": None,
    "ttt": dict(),
    "ttt_noconv": dict(use_conv=False),
    "ttt_noproj": dict(use_target_proj=False),
}


@dataclasses.dataclass
class Task:
    T: int = 256
    pairs: int = 6
    queries: int = 10
    context: int = 32


def make_batch(task: Task, B: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [B, 2, T]; answer_pos [B, Q] (frame whose *next-token* prediction is the value, i.e. the
    query key frame); dist [B, Q] frames from the pair to the query."""
    T = task.T
    text = FILL0 + torch.randint(0, TEXT_CARD - FILL0, (B, T), generator=gen)
    answer = torch.zeros(B, task.queries, dtype=torch.long)
    dist = torch.zeros(B, task.queries, dtype=torch.long)
    for b in range(B):
        keys = torch.randperm(N_KEYS, generator=gen)[:task.pairs]
        vals = torch.randint(0, N_KEYS, (task.pairs,), generator=gen)
        # pairs in the first 60% of the sequence at even frames, queries after them
        slots = torch.randperm(int(0.6 * T) // 2, generator=gen)[:task.pairs] * 2
        for k, v, s in zip(keys.tolist(), vals.tolist(), slots.tolist()):
            text[b, s], text[b, s + 1] = KEY0 + k, VAL0 + v
        used = set()
        for q in range(task.queries):
            i = int(torch.randint(0, task.pairs, (1,), generator=gen))
            s = int(slots[i])
            lo = s + 4
            for _ in range(100):
                pos = int(torch.randint(lo, T - 1, (1,), generator=gen))
                if pos % 2 == 1 and pos not in used and pos + 1 not in used and pos - 1 not in used:
                    break
            used.add(pos)
            text[b, pos], text[b, pos + 1] = text[b, s], text[b, s + 1]
            answer[b, q], dist[b, q] = pos, pos - s
    codes = torch.stack([text, text], dim=1)  # audio stream mirrors the text symbols
    return codes, answer, dist


def build(variant: str, dim: int, layers: int, task: Task, chunk: int, lr: float, seed: int) -> LMModel:
    torch.manual_seed(seed)
    kw = dict(LM_KWARGS, dim=dim, num_layers=layers, context=task.context)
    if VARIANTS[variant] is None:
        return LMModel(**kw)
    cfg = TTTConfig(chunk_size=chunk, lr=lr, init="ntp", **VARIANTS[variant])
    return TTTLMModel(ttt=TTTModelConfig(layer=cfg, every=1, start=layers - 1), **kw)


def run_one(variant: str, seed: int, args) -> dict:
    task = Task(T=args.T, pairs=args.pairs, queries=args.queries, context=args.context)
    model = build(variant, args.dim, args.layers, task, args.chunk, args.ttt_lr, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    for step in range(args.steps):
        codes, _, _ = make_batch(task, args.batch, gen)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 50)
        _, logits = model.forward_text(codes)
        loss = F.cross_entropy(logits[:, 0, :-1].reshape(-1, TEXT_CARD), codes[:, 0, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    egen = torch.Generator().manual_seed(99)  # same eval set for every variant and seed
    hits = {"inside": [], "beyond": []}
    losses = {"inside": [], "beyond": []}
    with torch.no_grad():
        for _ in range(args.eval_batches):
            codes, ans, dist = make_batch(task, args.batch, egen)
            _, logits = model.forward_text(codes)
            lp = logits[:, 0].float().log_softmax(-1)
            for b in range(codes.shape[0]):
                for q in range(ans.shape[1]):
                    pos = int(ans[b, q])
                    target = int(codes[b, 0, pos + 1])
                    where = "inside" if int(dist[b, q]) < task.context else "beyond"
                    hits[where].append(float(lp[b, pos].argmax() == target))
                    losses[where].append(float(-lp[b, pos, target]))
    return {k: {"acc": statistics.mean(hits[k]), "loss": statistics.mean(losses[k]), "n": len(hits[k])}
            for k in hits}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/memory_experiment")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--queries", type=int, default=10)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ttt-lr", type=float, default=0.1)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    t0 = time.time()
    for variant in args.variants.split(","):
        for seed in range(args.seeds):
            t = time.time()
            r = run_one(variant, seed, args)
            results.setdefault(variant, []).append(r)
            print(f"{variant:<11} seed {seed}: inside acc {r['inside']['acc']:.3f}  beyond acc "
                  f"{r['beyond']['acc']:.3f}  ({time.time() - t:.0f} s)", flush=True)
    summary = {}
    for v, rs in results.items():
        summary[v] = {f"{w}_{m}": (statistics.mean(r[w][m] for r in rs),
                                   statistics.pstdev(r[w][m] for r in rs))
                      for w in ("inside", "beyond") for m in ("acc", "loss")}
    chance = 1 / N_KEYS
    lines = ["| variant | acc inside window | acc beyond window | loss inside | loss beyond |",
             "|---|---|---|---|---|"]
    for v, s in summary.items():
        lines.append(f"| {v} | " + " | ".join(f"{s[k][0]:.3f} ± {s[k][1]:.3f}" for k in
                                               ("inside_acc", "beyond_acc", "inside_loss", "beyond_loss")) + " |")
    table = "\n".join(lines)
    print(table)
    print(f"chance accuracy {chance:.3f}; {args.seeds} seeds; total {time.time() - t0:.0f} s")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results, "summary": summary,
                                                  "chance": chance}, indent=1))
    (out / "table.md").write_text(table + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(summary)
    for j, where in enumerate(("inside", "beyond")):
        ax.bar([i + 0.38 * j for i in range(len(names))], [summary[n][f"{where}_acc"][0] for n in names], 0.36,
               yerr=[summary[n][f"{where}_acc"][1] for n in names], label=f"{where} window", capsize=3)
    ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    ax.set_xticks([i + 0.19 for i in range(len(names))], names)
    ax.set_ylabel("recall accuracy")
    ax.set_title(f"key→value recall, attention window {args.context} frames, {args.seeds} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory_experiment.png", dpi=120)
    print(f"wrote {out}/results.json, table.md, memory_experiment.png")


if __name__ == "__main__":
    main()
