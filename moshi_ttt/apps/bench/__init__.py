"""`moshi-ttt bench`: what TTT costs, as TTT/base ratios measured in one run (interleaved repeats).

Sections: Moshi 7B shapes (`bench_moshi7b`: the MLP and a whole layer at d 4096, h 11264, and the
computed bytes per frame), the layer alone at d 512 (streaming step and parallel forward+backward vs
moshi's ActivationGating), the whole dim-512 Moshi-shaped LM (TTTLMGen.step latency,
LMModel.forward+backward, activation memory), per-conversation state bytes and flat memory over a
long streaming run, streaming-vs-parallel error; the `server` section lives with the server
(`moshi_ttt.apps.bench.server`). `gpu` (CUDA only, not in the default list; `moshi_ttt.apps.bench.gpu`):
Moshi 7B under moshi's CUDA graphs — a graphs-vs-eager check first, then base vs TTT step, frame,
fold and memory by batch size. `capacity` (not in the default list; `moshi_ttt.apps.bench.capacity`):
computed conversations per GPU for Moshi 7B.
CPU figures are noisy on shared machines; medians of interleaved repeats are what is compared, and
`--repeats N` runs the sections N times: each measured float is then the median over the N runs, with its
min/max in `spread` (`aggregate`). Every result records when it ran (`when`, UTC), on what (`machine`) and
under what load (`loadavg`: the 1/5/15-minute load averages before and after); `--out FILE` writes it as the
JSON file the docs are generated from (`moshi_ttt.docs_gen`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
import typing as tp

import torch
import torch.nn.functional as F
from moshi.models.lm import LMGen, LMModel
from moshi.modules.gating import ActivationGating

from moshi_ttt.models.lm import TTTLMGen, build_ttt_lm
from moshi_ttt.modules.gating import TTTGating
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.ttt.config import TTTConfig, TTTModelConfig
from moshi_ttt.utils import provenance


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small repeat counts (minutes: the moshi7b section is most of it)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="run the sections N times: each figure is the median of the N runs, its min/max in 'spread'")
    p.add_argument("--out", metavar="FILE", help="also write the JSON object to FILE (e.g. docs/bench_quick.json)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--sections", default="moshi7b,layer,model,server",
                   help="comma list of: moshi7b, layer, model, server, gpu (CUDA only), capacity (computed "
                        "conversations per GPU, Moshi 7B)")
    p.add_argument("--profile", action="store_true",
                   help="server section: also sample where a demo step goes (ms per step by stage)")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _interleaved(fns: dict[str, tp.Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def _saved_bytes(fn: tp.Callable[[], torch.Tensor]) -> int:
    """Bytes of tensors autograd saves for backward (the activation memory of a training step)."""
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


# -- layer ------------------------------------------------------------------------------------------

def bench_layer(quick: bool) -> dict:
    d, ff, C = 512, 2112, 64  # ActivationGating hidden = 2·2112/3 = 1408
    torch.manual_seed(0)
    base = ActivationGating(d, ff, F.silu)
    ttt = TTTGating.from_gating(ActivationGating(d, ff, F.silu), TTTConfig(chunk_size=C, lr=1e-3, init="ntp"))
    ttt.linear_in.load_state_dict(base.linear_in.state_dict())
    ttt.linear_out.load_state_dict(base.linear_out.state_dict())
    base.eval()
    ttt.eval()
    steps = 2 * C if quick else 8 * C
    x = torch.randn(1, steps, d)
    res: dict[str, float] = {"layer_d": d, "layer_h": ttt.hidden, "layer_chunk": C}
    with torch.no_grad(), ttt.streaming(1):
        i = [0]

        def s_ttt():
            t = i[0] % steps
            ttt(x[:, t:t + 1], x[:, t:t + 1])
            i[0] += 1

        def s_base():
            base(x[:, :1])
        _interleaved({"ttt": s_ttt, "base": s_base}, C)  # warm-up
        tm = _interleaved({"ttt": s_ttt, "base": s_base}, steps)
    res["layer_stream_ms_base"] = 1e3 * statistics.median(tm["base"])
    res["layer_stream_ms_ttt"] = 1e3 * statistics.median(tm["ttt"])
    res["layer_stream_ratio_median"] = statistics.median(tm["ttt"]) / statistics.median(tm["base"])
    res["layer_stream_ratio_p99"] = _pct(tm["ttt"], 0.99) / _pct(tm["base"], 0.99)

    T = 4 * C if quick else 1250
    xt = torch.randn(1, T, d)
    base.train()
    ttt.train()

    def fb(mod, *a):
        def run():
            mod.zero_grad(set_to_none=True)
            mod(*a).square().mean().backward()
        return run
    _interleaved({"ttt": fb(ttt, xt, xt), "base": fb(base, xt)}, 1)
    tm = _interleaved({"ttt": fb(ttt, xt, xt), "base": fb(base, xt)}, 3 if quick else 7)
    res["layer_train_T"] = T
    res["layer_train_ratio"] = statistics.median(tm["ttt"]) / statistics.median(tm["base"])
    res["layer_train_act_mem_ratio"] = _saved_bytes(lambda: ttt(xt, xt)) / _saved_bytes(lambda: base(xt))
    return res


# -- whole model ------------------------------------------------------------------------------------

MOSHI_SHAPED = dict(
    dim=512, text_card=32000, existing_text_padding_id=3, n_q=16, dep_q=8, card=2048, num_heads=8,
    num_layers=12, hidden_scale=4.125, causal=True, layer_scale=None, context=3000, max_period=10000,
    gating="silu", norm="rms_norm_f32", positional_embedding="rope", depformer_dim=256,
    depformer_dim_feedforward=int(4.125 * 256), depformer_num_heads=8, depformer_num_layers=2,
    depformer_layer_scale=None, depformer_multi_linear=True, depformer_context=8, depformer_max_period=10000,
    depformer_gating="silu", depformer_pos_emb="none", depformer_weights_per_step=True,
    delays=[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1])


def _models(layer_cfg: TTTConfig, every: int, dtype=torch.float32) -> tuple[LMModel, LMModel]:
    torch.manual_seed(0)
    ttt = build_ttt_lm(MOSHI_SHAPED, TTTModelConfig(layer=layer_cfg, every=every), dtype=dtype)
    base = LMModel(**MOSHI_SHAPED, dtype=dtype).eval()
    base.load_state_dict({k: v for k, v in ttt.state_dict().items() if TTT_KEY not in k}, strict=True)
    return ttt, base


def bench_model(quick: bool) -> dict:
    res: dict[str, float] = {}
    C = 256
    steps = 48 if quick else 600  # the every-6th-layer p99 needs chunk-boundary steps in the sample
    cfg = TTTConfig(chunk_size=C if not quick else 32, lr=1e-3, init="ntp")
    for every, tag in ((6, ""), (1, "_every_layer")):
        ttt, base = _models(cfg, every)
        gens = {"ttt": TTTLMGen(ttt, temp=0.8), "base": LMGen(base, temp=0.8)}
        user = torch.randint(0, 2048, (1, 8, 1))
        with torch.no_grad(), gens["ttt"].streaming(1), gens["base"].streaming(1):
            fns = {k: (lambda g=g, u=user: g.step(u)) for k, g in gens.items()}
            _interleaved(fns, 8)
            tm = _interleaved(fns, steps)
            if every == 6:
                res["state_bytes_per_conversation"] = ttt.ttt_state_bytes()
                res["stream_chunk"] = cfg.chunk_size
        res[f"stream_step_ms_base{tag}"] = 1e3 * statistics.median(tm["base"])
        res[f"stream_step_ms_ttt{tag}"] = 1e3 * statistics.median(tm["ttt"])
        res[f"stream_step_ratio_median{tag}"] = statistics.median(tm["ttt"]) / statistics.median(tm["base"])
        res[f"stream_step_ratio_p99{tag}"] = _pct(tm["ttt"], 0.99) / _pct(tm["base"], 0.99)

    # Training step: LMModel.forward + backward at T frames, chunk C.
    T = 300 if quick else 1250
    ttt, base = _models(dataclasses.replace(cfg, chunk_size=64 if quick else 256), 6)
    ttt.train()
    base.train()
    codes = torch.randint(0, 2048, (1, 17, T))
    codes[:, 0] = torch.randint(0, 32000, (1, T))

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            out = m(codes)
            loss = out.text_logits.nan_to_num().float().square().mean() + out.logits.nan_to_num().square().mean()
            loss.backward()
        return run
    step(ttt)()
    step(base)()
    tm = _interleaved({"ttt": step(ttt), "base": step(base)}, 2 if quick else 3)
    res["train_T"] = T
    res["train_chunk"] = ttt.ttt_config.layer.chunk_size
    res["train_step_s_base"] = statistics.median(tm["base"])
    res["train_step_s_ttt"] = statistics.median(tm["ttt"])
    res["train_step_ratio"] = res["train_step_s_ttt"] / res["train_step_s_base"]
    res["train_peak_mem_ratio"] = _saved_bytes(lambda: ttt(codes)) / _saved_bytes(lambda: base(codes))

    # Exactness of the whole model: streaming forward_text vs one parallel forward_text (float32).
    ttt.eval()
    small = dataclasses.replace(cfg, chunk_size=16, lr=0.05)
    ttt, _ = _models(small, 6)
    Ts = 64
    seq = torch.randint(0, 2048, (1, 17, Ts))
    seq[:, 0] = torch.randint(0, 32000, (1, Ts))
    with torch.no_grad():
        full = ttt.forward_text(seq)[1]
        with ttt.streaming(1):
            steps_out = torch.cat([ttt.forward_text(seq[:, :, t:t + 1])[1] for t in range(Ts)], dim=2)
            drift = max(float(t["drift"].max()) for t in ttt.ttt_telemetry().values())
    res["stream_vs_parallel_max_abs"] = float((full - steps_out).abs().max())
    res["stream_vs_parallel_drift"] = drift

    # Flat memory: state bytes and process RSS before/after a long streaming run.
    ttt, _ = _models(dataclasses.replace(cfg, chunk_size=16), 6)
    gen = TTTLMGen(ttt)
    n = 100 if quick else 2000
    with torch.no_grad(), gen.streaming(1):
        for _ in range(20):
            gen.step(torch.randint(0, 2048, (1, 8, 1)))
        b0, r0 = ttt.ttt_state_bytes(), _rss()
        for _ in range(n):
            gen.step(torch.randint(0, 2048, (1, 8, 1)))
        b1, r1 = ttt.ttt_state_bytes(), _rss()
    res["long_run_steps"] = n
    res["long_run_state_bytes_growth"] = b1 - b0
    res["long_run_rss_growth_mb"] = (r1 - r0) / 2**20
    return res


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def machine() -> str:
    return f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, " \
           f"{platform.processor() or platform.platform()}"


def aggregate(runs: list[dict[str, tp.Any]]) -> dict[str, tp.Any]:
    """One result from N ≥ 1 runs of the same sections: each float the median over the runs, with
    `spread[key] = [min, max]`; any other value the runs agree on as is, one they do not (an int count, the
    `--profile` table) as the last run's, with every run's in `per_run[key]`."""
    if not runs:
        raise ValueError("aggregate: no runs")
    out: dict[str, tp.Any] = {}
    spread: dict[str, list[float]] = {}
    for key in runs[0]:
        values = [r.get(key) for r in runs]
        if all(isinstance(v, float) for v in values):
            out[key] = statistics.median(values)
            spread[key] = [min(values), max(values)]
        else:
            out[key] = values[-1]
            if any(v != values[0] for v in values):
                out.setdefault("per_run", {})[key] = values
    out["repeats"] = len(runs)
    out["spread"] = spread
    return out


def _sections(args: argparse.Namespace, sections: list[str]) -> dict[str, tp.Any]:
    res: dict[str, tp.Any] = {}
    if "moshi7b" in sections:
        from moshi_ttt.apps.bench.moshi7b import run as bench_moshi7b
        res.update(bench_moshi7b(args.quick))
    if "layer" in sections:
        res.update(bench_layer(args.quick))
    if "model" in sections:
        res.update(bench_model(args.quick))
    if "server" in sections:
        from moshi_ttt.apps.bench.server import bench_server

        res.update(bench_server(args.quick, profile=args.profile))
    if "capacity" in sections:
        from moshi_ttt.apps.bench.capacity import run as bench_capacity

        res.update(bench_capacity())
    if "gpu" in sections:
        from moshi_ttt.apps.bench import gpu

        res.update(gpu.run(args.quick, log=lambda line: print(line, file=sys.stderr, flush=True)))
    return res


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"moshi7b", "layer", "model", "server", "gpu", "capacity"}
    if unknown:
        raise SystemExit(f"moshi-ttt bench: unknown section(s) {sorted(unknown)}")
    if args.repeats < 1:
        raise SystemExit(f"moshi-ttt bench: --repeats {args.repeats}: must be ≥ 1")
    if "gpu" in sections:
        from moshi_ttt.apps.bench import gpu

        gpu.require_cuda()  # refused before any other section runs
    start = {**provenance.started(), "machine": machine()}  # the bench's machine names its torch threads
    t0 = time.perf_counter()
    res: dict[str, tp.Any] = {"quick": bool(args.quick), "sections": sections}
    res.update(aggregate([_sections(args, sections) for _ in range(args.repeats)]))
    res["bench_seconds"] = time.perf_counter() - t0
    res = provenance.finished(res, start)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    if args.json:
        print(json.dumps(res))
    else:
        table = res.pop("server_profile_table", None)
        res.pop("server_profile", None)
        width = max(len(k) for k in res)
        for k, v in res.items():
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
        if table:
            print(table)
    return 0
