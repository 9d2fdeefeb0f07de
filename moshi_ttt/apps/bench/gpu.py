"""The `gpu` section of `moshi-ttt bench`: Moshi 7B with random bf16 weights on one CUDA GPU, base vs TTT.

Models (`build`): the LM from moshi's own 7B kwargs (32 layers, depformer at 8 codebooks), TTT per
`configs/moshi7b_ttt.yaml` with non-zero slow weights (the shipped zero-init conv would make every fold
a no-op), moshi's `LMModel` holding the very same weight tensors, and Mimi from moshi's loader defaults.

Order: the graphs-vs-eager check (`gpu_check`, plain and CFG) first — a failure stops the section — then
interleaved rounds over B (base block, TTT block, for every B) of:
* LM step: moshi's `LMGen` vs `TTTLMGen`, CUDA graphs as moshi sets them; host wall time per step, each
  step ending with a device sync (what serve's `.cpu()` does). The TTT window spans its first chunk
  boundary, so its p99 is the fold step;
* the fold: that step minus the window's median, for all B conversations, per conversation, and
  amortised over the C frames of a chunk;
* the frame: Mimi encode + LM step + Mimi decode through serve's own batched step (`Engine.compute`);
  B conversations run in real time on this GPU when the median frame is ≤ `FRAME_MS`;
* memory: `torch.cuda.max_memory_allocated` per LM block; bytes per added conversation = its slope over
  B, next to the computed KV cache and fast-state bytes.
On CPU the section is refused (`require_cuda`); the test runs `measure` at tiny shapes on CPU, where
moshi captures no graph and the timings are not asserted.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import typing as tp

import torch
from moshi.models import loaders
from moshi.models.lm import LMGen, LMModel

from moshi_ttt.apps.bench import _pct
from moshi_ttt.apps.bench.gpu_check import check
from moshi_ttt.models.lm import TTTLMGen, TTTLMModel, build_ttt_lm
from moshi_ttt.models.loaders import base_lm_kwargs
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.server.step.engine import Engine, EngineConfig
from moshi_ttt.ttt.config import TTTModelConfig, load_ttt_config

FRAME_MS = 80.0
QUICK = dict(batches=(1, 4, 16, 32), steps=32, frames=24, rounds=1)
FULL = dict(batches=(1, 2, 4, 8, 16, 24, 32), steps=96, frames=64, rounds=3)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What to build: moshi `LMModel` kwargs, the TTT config, Mimi's config (None: moshi's default)."""

    lm_kwargs: dict
    ttt: TTTModelConfig
    mimi_config: dict | None = None
    dtype: torch.dtype = torch.bfloat16


def moshi7b() -> Shapes:
    return Shapes(base_lm_kwargs(), load_ttt_config("moshi7b_ttt"))


@dataclasses.dataclass
class Models:
    ttt: TTTLMModel
    twin: TTTLMModel  # the same tensors as `ttt`: the check's second run
    base: LMModel  # the same tensors as `ttt` without the TTT slow weights
    mimi: tp.Any


def require_cuda() -> torch.device:
    """The CUDA device, or SystemExit naming what is missing."""
    if not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None else
               f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: no GPU, no driver, "
               f"or CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r} hides it")
        raise SystemExit(f"moshi-ttt bench --sections gpu needs a CUDA GPU: torch.cuda.is_available() is False; "
                         f"{why}. Run scripts/gpu_check.sh on a GPU machine.")
    if os.environ.get("NO_CUDA_GRAPH", "").lower() not in {"", "0", "no", "n"}:
        raise SystemExit(f"moshi-ttt bench --sections gpu measures moshi's CUDA graphs, but NO_CUDA_GRAPH="
                         f"{os.environ['NO_CUDA_GRAPH']!r} turns them off: unset it")
    return torch.device("cuda")


def build(shapes: Shapes, device: torch.device, seed: int = 0) -> Models:
    """Random weights (seeded); TTT slow weights set to a perturbed next-frame target so folds move W."""
    torch.manual_seed(seed)
    ttt = build_ttt_lm(shapes.lm_kwargs, shapes.ttt, device=device, dtype=shapes.dtype)
    with torch.no_grad():
        for g in ttt.ttt_gatings().values():
            if g.ttt.conv is not None:
                w = g.ttt.conv.weight
                w.normal_(0, 0.1)[:, 0, g.cfg.past_frames + 1] += 1
            if g.ttt.w_target is not None:
                eye = torch.eye(g.dim, device=device, dtype=g.ttt.w_target.dtype)
                g.ttt.w_target.copy_(eye + 0.01 * torch.randn_like(eye))
    sd = ttt.state_dict()
    twin = TTTLMModel(ttt=shapes.ttt, device="meta", dtype=shapes.dtype, **shapes.lm_kwargs)
    twin.load_state_dict(sd, strict=True, assign=True)
    base = LMModel(device="meta", dtype=shapes.dtype, **shapes.lm_kwargs)
    base.load_state_dict({k: v for k, v in sd.items() if TTT_KEY not in k}, strict=True, assign=True)
    mimi = loaders.get_mimi(None, shapes.mimi_config, device=device)
    return Models(ttt, twin.eval(), base.eval(), mimi)


def kv_bytes_per_conversation(lm_kwargs: dict, dtype: torch.dtype) -> int:
    """Computed: moshi's ring KV caches hold `context` frames of K and V per layer (main + depformer)."""
    size = torch.empty((), dtype=dtype).element_size()
    main = lm_kwargs["num_layers"] * 2 * lm_kwargs["context"] * lm_kwargs["dim"]
    dep = lm_kwargs["depformer_num_layers"] * 2 * lm_kwargs["depformer_context"] * lm_kwargs["depformer_dim"]
    return (main + dep) * size


# -- timing ------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: tp.Callable[[], tp.Any], n: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(1e3 * (time.perf_counter() - t))
    return out


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def lm_block(gen: LMGen, B: int, steps: int, device: torch.device, warm: int = 4) -> dict:
    """`steps` timed LM steps after `warm` (≥ 2: moshi captures its graphs on the 2nd call). A TTTLMGen
    window is placed over the first chunk boundary, whose step is the fold step. moshi's ring KV cache
    attends over its whole capacity every step, so the longer TTT warm-up does not change a step's cost."""
    lm = gen.lm_model
    user = torch.randint(0, lm.card, (B, lm.n_q - lm.dep_q, 1), device=device)
    ttt = isinstance(gen, TTTLMGen)
    C = lm.ttt_config.layer.chunk_size if ttt else 0
    if ttt:
        warm = max(warm, C - 1 - steps // 2)
    _peak_reset(device)
    with torch.inference_mode(), gen.streaming(B):
        for _ in range(warm):
            gen.step(user)
        times = _timed(lambda: gen.step(user), steps, device)
        res: dict = {"median": statistics.median(times), "p99": _pct(times, 0.99), "peak": _peak(device)}
        if ttt:
            fold_at = C - 1 - warm
            rest = times[:fold_at] + times[fold_at + 1:]
            fold = times[fold_at] - statistics.median(rest) if 0 <= fold_at < steps else float("nan")
            updates = {i: d["updates"].tolist() for i, d in lm.ttt_telemetry().items()}
            done = (warm + steps) // C
            res.update(fold_ms=fold, updates_ok=all(u == [done] * B for u in updates.values()),
                       state_bytes=lm.ttt_state_bytes())
    return res


def frame_block(mimi, lm: LMModel, B: int, steps: int, device: torch.device, warm: int = 4) -> dict:
    """Mimi encode + LM step + Mimi decode of B conversations per step, as serve's engine batches them."""
    eng = Engine(mimi, lm, None, EngineConfig(max_conversations=B, warmup_steps=0, telemetry_interval=0),
                 device=device)
    everyone, first = torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)
    pcm = 0.1 * torch.randn(B, 1, eng.frame_size)
    with torch.inference_mode(), mimi.streaming(B), eng.lm_gen.streaming(B):
        for _ in range(warm):
            eng.compute(everyone, pcm, first)
        times = _timed(lambda: eng.compute(everyone, pcm, first), steps, device)
    return {"median": statistics.median(times), "p99": _pct(times, 0.99)}


def _guarded(fn: tp.Callable[..., dict], *args) -> dict:
    """fn(*args), or {"error": ...} when the device runs out of memory (the sweep goes on)."""
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(e).splitlines()[0]}"}


def _fits(B: int, per_conversation: int, device: torch.device) -> str | None:
    """None, or why B conversations' computed state cannot fit in the free device memory."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    need = B * per_conversation
    if need > 0.9 * free:
        return (f"does not fit: needs {need / 2**30:.1f} GiB for B = {B}, "
                f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
    return None


def measure(models: Models, shapes: Shapes, device: torch.device, batches: tp.Sequence[int], steps: int,
            frames: int, rounds: int, check_batch: int = 4, check_chunks: int = 3, log=print) -> dict:
    """The section on `device` (the CLI passes CUDA only): the check, then the bench. Flat `gpu_*` keys."""
    res: dict[str, tp.Any] = {}
    for tag, coef in (("", 1.0), ("_cfg", 2.0)):
        t = time.perf_counter()
        rep = check(models.ttt, models.twin, batch=check_batch, chunks=check_chunks, cfg_coef=coef)
        log(f"gpu check (cfg_coef {coef}): {len(rep['failures'])} failures, {time.perf_counter() - t:.0f} s")
        res.update({f"gpu_check{tag}_{k}": v for k, v in rep.items()})
        if rep["failures"]:
            raise SystemExit("moshi-ttt bench --sections gpu: the check under CUDA graphs FAILED "
                             f"(cfg_coef {coef}):\n  " + "\n  ".join(rep["failures"]))
    C = models.ttt.ttt_config.layer.chunk_size
    kv = kv_bytes_per_conversation(shapes.lm_kwargs, shapes.dtype)
    with torch.inference_mode(), models.ttt.streaming(1):
        state = models.ttt.ttt_state_bytes()
    per_conv = {"base": kv, "ttt": kv + state}
    res.update(gpu_chunk=C, gpu_batches=list(batches), gpu_kv_bytes_per_conversation_computed=kv,
               gpu_state_bytes_per_conversation=state, gpu_bytes_per_conversation_ttt_computed=kv + state)
    make = {"base": lambda: LMGen(models.base, support_out_of_sync=True),
            "ttt": lambda: TTTLMGen(models.ttt, support_out_of_sync=True)}
    lms = {"base": models.base, "ttt": models.ttt}
    raw: dict[tuple[str, str, int], list] = {}
    for r in range(rounds):
        for B in batches:
            for name in ("base", "ttt"):
                why = _fits(B, per_conv[name], device)
                if why:
                    res[f"gpu_error_{name}_b{B}"] = why
                    continue
                t = time.perf_counter()
                lm = _guarded(lm_block, make[name](), B, steps, device)
                fr = _guarded(frame_block, models.mimi, lms[name], B, frames, device)
                for kind, d in (("lm", lm), ("frame", fr)):
                    if "error" in d:
                        res[f"gpu_error_{name}_b{B}"] = d["error"]
                    else:
                        raw.setdefault((kind, name, B), []).append(d)
                log(f"round {r + 1}/{rounds} B = {B} {name}: LM {lm.get('median', float('nan')):.1f} ms, "
                    f"frame {fr.get('median', float('nan')):.1f} ms ({time.perf_counter() - t:.0f} s)")
    med = statistics.median
    for (kind, name, B), ds in raw.items():
        res[f"gpu_{kind}_ms_median_{name}_b{B}"] = med(d["median"] for d in ds)
        res[f"gpu_{kind}_ms_p99_{name}_b{B}"] = med(d["p99"] for d in ds)
        if kind == "lm":
            res[f"gpu_peak_bytes_{name}_b{B}"] = ds[-1]["peak"]
        if kind == "lm" and name == "ttt":
            fold = med(d["fold_ms"] for d in ds)
            res.update({f"gpu_fold_ms_b{B}": fold, f"gpu_fold_ms_per_conversation_b{B}": fold / B,
                        f"gpu_fold_ms_per_frame_b{B}": fold / C,
                        f"gpu_fold_share_of_step_b{B}": fold / C / res[f"gpu_lm_ms_median_ttt_b{B}"],
                        f"gpu_updates_ok_b{B}": all(d["updates_ok"] for d in ds)})
    for kind in ("lm", "frame"):
        for B in batches:
            a, b = (res.get(f"gpu_{kind}_ms_median_{n}_b{B}") for n in ("ttt", "base"))
            if a is not None and b is not None:
                res[f"gpu_{kind}_ratio_median_b{B}"] = a / b
    for name in ("base", "ttt"):
        ok = [B for B in batches if res.get(f"gpu_frame_ms_median_{name}_b{B}", float("inf")) <= FRAME_MS]
        res[f"gpu_realtime_conversations_{name}"] = max(ok, default=0)
        peaks = [(B, res[f"gpu_peak_bytes_{name}_b{B}"]) for B in batches
                 if res.get(f"gpu_peak_bytes_{name}_b{B}") is not None]
        if len(peaks) >= 2:
            (b0, p0), (b1, p1) = peaks[0], peaks[-1]
            res[f"gpu_bytes_per_conversation_{name}_measured"] = (p1 - p0) / (b1 - b0)
    return res


def run(quick: bool, log=print) -> dict:
    """`moshi-ttt bench --sections gpu`: refuses without CUDA; Moshi 7B shapes, quick or full sizes."""
    device = require_cuda()
    shapes = moshi7b()
    sizes = QUICK if quick else FULL
    t = time.perf_counter()
    models = build(shapes, device)
    res: dict[str, tp.Any] = {
        "gpu_device": torch.cuda.get_device_name(device), "gpu_torch": torch.__version__,
        "gpu_cuda": torch.version.cuda, "gpu_cuda_graphs": True,
        "gpu_torch_compile": not os.environ.get("NO_TORCH_COMPILE"),  # moshi: any value turns it off
        "gpu_build_seconds": time.perf_counter() - t}
    log(f"gpu: built Moshi 7B + TTT + Mimi in {res['gpu_build_seconds']:.0f} s on {res['gpu_device']}")
    res.update(measure(models, shapes, device, **sizes, log=log))
    return res
