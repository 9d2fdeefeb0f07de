"""The `moshi7b` section of `moshi-ttt bench`: what a TTT layer costs at Moshi 7B's real shapes.

Measured (fp32, this machine; interleaved base/TTT frames, mean over whole chunks, folds included):
the MLP alone (`TTTGating` vs moshi's `ActivationGating`, same weights) at B = 1 and B = 4, and a
whole transformer layer (moshi's `StreamingTransformerLayer` vs `TTTTransformerLayer`) with its KV
cache filled. Folds run the way `TTTLMGen` runs them: after the step, on the host's `FoldClock`.
Both state dtypes (`_bf16state` keys: a bf16 fast weight, stochastic rounding; in this fp32 model it
is applied through an fp32 copy, so its per-frame step is the fp32 state's and what differs is the fold).
Each measurement runs in a fresh spawned process (same torch thread count; why: docs/design.md).

Computed (not measured): the bytes one frame moves through a layer with bf16 weights — what a
memory-bound GPU decode step costs — for the base layer, the TTT layer, and, for comparison, a per-frame
fold design (the fast state read and written every frame; the figures: docs/cost.md).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import multiprocessing
import statistics
import time
import typing as tp

import torch
import torch.nn.functional as F
from moshi.modules.gating import ActivationGating
from moshi.modules.rope import RotaryEmbedding
from moshi.modules.transformer import StreamingTransformerLayer
from tqdm import tqdm

from moshi_ttt.models.lm import FoldClock
from moshi_ttt.modules.gating import TTTGating
from moshi_ttt.modules.transformer import TTTTransformerLayer
from moshi_ttt.ttt.config import TTTConfig

D, FF, HEADS, CONTEXT, LAYERS = 4096, int(4.125 * 4096), 32, 3000, 32  # Moshi 7B
H = 2 * FF // 3  # 11264: ActivationGating's hidden size


def _timed_frames(base, ttt, clock: FoldClock, x: torch.Tensor, n: int, desc: str) -> tuple[list, list]:
    """n frames alternating base / TTT (+ its fold when a chunk completes); per-frame seconds."""
    tb, tt = [], []
    for t in tqdm(range(n), desc=desc, leave=False, mininterval=2):
        xt = x[:, t % x.shape[1]][:, None]
        s = time.perf_counter()
        base(xt)
        tb.append(time.perf_counter() - s)
        s = time.perf_counter()
        ttt(xt)
        items = clock.step()
        if items:
            ttt.fold(items)
        tt.append(time.perf_counter() - s)
    return tb, tt


class _MLP(torch.nn.Module):
    """TTTGating with its own input as X0 (the target source does not change the cost)."""

    def __init__(self, g: TTTGating):
        super().__init__()
        self.g = g

    def forward(self, x):
        return self.g(x, x)

    def fold(self, items):
        self.g.fold(items)


class _Layer(torch.nn.Module):
    def __init__(self, layer: TTTTransformerLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x, x0=x)

    def fold(self, items):
        self.layer.gating.fold(items)


def bench_mlp(chunk: int, batch: int, chunks: int = 2, d: int = D, ff: int = FF, state_dtype: str = "float32") -> dict:
    torch.manual_seed(0)
    base = ActivationGating(d, ff, F.silu).eval()
    cfg = TTTConfig(chunk_size=chunk, lr=1e-3, init="ntp", state_dtype=state_dtype)
    ttt = TTTGating.from_gating(base, cfg).eval()  # same weights
    x = torch.randn(batch, 4 * chunk, d)
    with torch.no_grad(), ttt.streaming(batch):
        ttt._streaming_state.host_folds = True
        clock = FoldClock(batch, chunk)
        m = _MLP(ttt)
        _timed_frames(base, m, clock, x, chunk, f"7B MLP warm-up B={batch}")  # one whole chunk, one fold
        tb, tt = _timed_frames(base, m, clock, x, chunks * chunk, f"7B MLP B={batch}")
        state_bytes = ttt._streaming_state.bytes
        updates = int(ttt._streaming_state.updates.min())
    med = statistics.median(tb)
    return {"ratio": statistics.fmean(tt) / statistics.fmean(tb), "max_step_ratio": max(tt) / med, "updates": updates,
            "base_ms": 1e3 * statistics.fmean(tb), "ttt_ms": 1e3 * statistics.fmean(tt), "state_bytes": state_bytes}


def bench_layer(chunk: int, filled: int, chunks: int = 2, d: int = D, ff: int = FF, heads: int = HEADS,
                state_dtype: str = "float32") -> dict:
    """B = 1, whole layer, KV cache holding `filled` frames (prefilled once on the base layer, copied)."""
    torch.manual_seed(0)
    kw = dict(d_model=d, num_heads=heads, dim_feedforward=ff, causal=True, context=CONTEXT,
              rope=RotaryEmbedding(10000), norm="rms_norm_f32", gating="silu")
    base = StreamingTransformerLayer(**kw).eval()
    cfg = TTTConfig(chunk_size=chunk, lr=1e-3, init="ntp", state_dtype=state_dtype)
    ttt = TTTTransformerLayer(**kw, ttt_config=cfg).eval()
    ttt.load_state_dict(base.state_dict(), strict=False)
    x = torch.randn(1, 4 * chunk, d)
    with torch.no_grad(), base.streaming(1), ttt.streaming(1):
        base(torch.randn(1, filled, d))
        ttt.self_attn._streaming_state = copy.deepcopy(base.self_attn._streaming_state)
        ttt._streaming_state.offset_cpu = base._streaming_state.offset_cpu
        ttt.gating._streaming_state.host_folds = True
        clock = FoldClock(1, chunk)
        m = _Layer(ttt)
        _timed_frames(base, m, clock, x, chunk, "7B layer warm-up")
        tb, tt = _timed_frames(base, m, clock, x, chunks * chunk, "7B layer")
    return {"ratio": statistics.fmean(tt) / statistics.fmean(tb), "base_ms": 1e3 * statistics.fmean(tb),
            "ttt_ms": 1e3 * statistics.fmean(tt), "kv_frames": filled}


def isolated(fn: tp.Callable, *args, **kwargs):
    """fn(*args, **kwargs) in a fresh spawned process with this process's torch thread count; its result."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=torch.set_num_threads,
                                                initargs=(torch.get_num_threads(),)) as pool:
        return pool.submit(fn, *args, **kwargs).result()


def bytes_per_frame(batch: int, chunk: int = 256, ttt_layers: int = 6) -> dict:
    """Computed bytes moved per frame, bf16 weights (2 B) and fp32 fast state (4 B), KV window full.

    base layer: attention 4d² + MLP 3dh weights once, plus each conversation's KV cache (2·ctx·d).
    TTT layer: W⁽⁰⁾_down is never read; each conversation's bf16 fast weight is (dh), plus the fold
    amortised over the chunk (read + write the fp32 fast weight, write its bf16 copy: 10dh / C).
    per-frame fold design (for comparison): base layer + per conversation three fp32 passes over the fast
    state (apply, then read + write for the rank-1 fold: 12dh) + W_target (2d²)."""
    attn, mlp_in, w_down = 4 * D * D * 2, 2 * D * H * 2, D * H * 2
    kv = batch * 2 * CONTEXT * D * 2
    base = attn + mlp_in + w_down + kv
    ttt = attn + mlp_in + batch * w_down + kv + batch * 10 * D * H // chunk
    old = base + batch * (12 * D * H + 2 * D * D)
    rest = LAYERS - ttt_layers
    return {"base_layer": base, "ttt_layer": ttt, "per_frame_fold_layer": old,
            "ttt_layer_ratio": ttt / base, "per_frame_fold_layer_ratio": old / base,
            "model_ratio": (rest * base + ttt_layers * ttt) / (LAYERS * base),
            "per_frame_fold_model_ratio": (rest * base + ttt_layers * old) / (LAYERS * base)}


def run(quick: bool, d: int = D, ff: int = FF, heads: int = HEADS) -> dict:
    """Quick: C = 64 (the amortised fold FLOPs per frame do not depend on C; its pass over the fast
    weight does, as 1/C), KV 1000 frames; full: C = 256 and a KV cache of 2000 frames. Other shapes
    than Moshi 7B's are for tests only (the computed bytes are always Moshi 7B's)."""
    C = 64 if quick else 256
    res: dict = {"moshi7b_d": d, "moshi7b_h": 2 * ff // 3, "moshi7b_chunk": C}
    b1 = isolated(bench_mlp, C, 1, d=d, ff=ff)
    res.update(moshi7b_mlp_ratio_b1=b1["ratio"], moshi7b_mlp_max_step_ratio_b1=b1["max_step_ratio"],
               moshi7b_mlp_ms_base_b1=b1["base_ms"], moshi7b_mlp_ms_ttt_b1=b1["ttt_ms"],
               moshi7b_mlp_updates_b1=b1["updates"])
    b4 = isolated(bench_mlp, C, 4, d=d, ff=ff)
    res.update(moshi7b_mlp_ratio_b4=b4["ratio"], moshi7b_mlp_ms_base_b4=b4["base_ms"],
               moshi7b_mlp_ms_ttt_b4=b4["ttt_ms"])
    layer = isolated(bench_layer, C, 1000 if quick else 2000, chunks=3, d=d, ff=ff, heads=heads)
    res.update(moshi7b_layer_ratio_b1=layer["ratio"], moshi7b_layer_ms_base_b1=layer["base_ms"],
               moshi7b_layer_ms_ttt_b1=layer["ttt_ms"], moshi7b_layer_kv_frames=layer["kv_frames"])
    b1 = isolated(bench_mlp, C, 1, d=d, ff=ff, state_dtype="bfloat16")
    res.update(moshi7b_mlp_ratio_b1_bf16state=b1["ratio"], moshi7b_mlp_max_step_ratio_b1_bf16state=b1["max_step_ratio"],
               moshi7b_mlp_updates_b1_bf16state=b1["updates"])
    layer = isolated(bench_layer, C, 1000 if quick else 2000, chunks=3, d=d, ff=ff, heads=heads, state_dtype="bfloat16")
    res["moshi7b_layer_ratio_b1_bf16state"] = layer["ratio"]
    # Per-conversation state of Moshi 7B (bf16 weights: fp32 fast weight + bf16 copy + one chunk of Z
    # and c at C = 256), 6 TTT layers; from the state the model really allocates, on the meta device.
    res["moshi7b_state_bytes_per_conversation"] = state_bytes_7b()
    res["moshi7b_state_bytes_per_conversation_bf16state"] = state_bytes_7b("bfloat16")
    for b in (1, 4):
        for k, v in bytes_per_frame(b).items():
            res[f"moshi7b_bytes_{k}_b{b}"] = v
    return res


def state_bytes_7b(state_dtype: str = "float32") -> int:
    """Fast-state bytes per conversation of Moshi 7B with the shipped TTT config (6 layers, C = 256),
    bf16 weights, the given state dtype, counted on the meta device (nothing is allocated)."""
    from moshi_ttt.models.lm import TTTLMModel
    from moshi_ttt.models.loaders import base_lm_kwargs
    from moshi_ttt.ttt.config import load_ttt_config

    ttt = load_ttt_config("moshi7b_ttt")
    ttt = dataclasses.replace(ttt, layer=ttt.layer.with_state(state_dtype=state_dtype))
    m = TTTLMModel(ttt=ttt, device="meta", dtype=torch.bfloat16, **base_lm_kwargs())
    with m.streaming(1):
        return m.ttt_state_bytes()
