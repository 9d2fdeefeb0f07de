"""Probes of what an In-Place TTT fold can write and read in a trained model, across voices.

A fold stores η·V̂ᵀZ, V̂ = Conv1D(src)·W_target with a K-frame depthwise conv, so the value written at frame t
is a linear function of src over frames t − past … t + future; src is the token embeddings X0 (`target: x0`)
or the layer's normalised MLP input (`target: mlp_input`). For the fact "the red box holds seven", the number
has to be in that value and the colour in the key Z (the gated activations, [h]) at the fact and at the
question. These probes ask how linearly decodable each is, fitted on some training voices and tested on
others (never the eval set):

    value  number (9 classes) from src's K-frame window around frame a + δ, a = the frame of the fact's end
    key    colour (8 classes) from Z at a + δ (the fact) and at the question's last frame

Per source and δ: accuracy on held-out conversations of the fitting voices ("within") and on the other
voices ("across"); δ and the L2 strength are chosen on "within". Multinomial logistic regression (LBFGS),
features standardised on the fitting set. And, with nothing fitted, the oracle read-out (`oracle_read`): the
share of questions a fold would answer with perfect values and the model's own keys.

    python -m moshi_ttt.experiments.spoken.probe --export RUN/export --manifest SET/train.jsonl --out probe.json \
        [--device cuda --layers 0 6 12 18 24 30]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import typing as tp
from pathlib import Path

import torch

from moshi_ttt.models.streams import FRAME_RATE

L2 = (1e-4, 1e-3, 1e-2, 1e-1)
OFFSETS = (-4, -2, 0, 2)  # δ, frames from the fact's end frame


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, steps: int = 100) -> tp.Callable:
    """Multinomial logistic regression on x [N, F] (float64), labels y [N] in [0, classes); returns predict(x)."""
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda z: (((z - mu) / sd) @ w + b).argmax(-1)


def probe(feats: torch.Tensor, y: torch.Tensor, classes: int, fit: torch.Tensor, within: torch.Tensor,
          across: torch.Tensor) -> dict:
    """feats [N, F]; boolean masks: fit on `fit`, choose L2 on `within`, report both `within` and `across`."""
    if not fit.any():
        raise ValueError("probe: no example to fit on")

    def acc(pred, mask: torch.Tensor) -> float | None:
        return float((pred(feats[mask]) == y[mask]).double().mean()) if mask.any() else None

    best = None
    for l2 in L2:
        pred = fit_probe(feats[fit], y[fit], classes, l2)
        acc_w = acc(pred, within)
        if best is None or (acc_w or 0.0) > (best[0] or 0.0):
            best = (acc_w, l2, acc(pred, across))
    return {"within": best[0], "across": best[2], "l2": best[1]}


def gated(gating, x: torch.Tensor) -> torch.Tensor:
    """Z [B, T, h] = act(x·W_gate) ⊙ (x·W_up) of moshi's `ActivationGating` for its input x [B, T, d] (moshi
    computes it inside one kernel, so no hook sees it; `linear_in` may carry a LoRA adapter)."""
    u = gating.linear_in(x)
    u = u.view(*x.shape[:-1], 2, -1)
    return gating.activation(u[..., 0, :]) * u[..., 1, :]


READ_FRAMES = (-6, 3)  # frames a − 6 … a + 2 around a fact's end frame a: its number word, with the conv's reach


def oracle_read(out: dict, grab: dict, j: int, sm: dict, start: int, T: int) -> None:
    """The best any trained target can read with the base's own keys: a fold's read-out at question frame q is
    Σ_t (Z_t·Z_q) V̂_t, so with V̂_t = the one-hot of fact f's number at the frames of f's number word and 0
    elsewhere, the answer is the number whose facts have the largest Σ_t Z_t·Z_q. Appends, per layer, whether
    that is the right number (`read`), and the chance of a uniformly drawn fact of the conversation being right."""
    from moshi_ttt.experiments.spoken.spec import NUMBERS

    lo, hi = READ_FRAMES
    facts = [(int(u["end"] * FRAME_RATE) - start, u["number"]) for u in sm["utterances"] if u["kind"] == "fact"]
    facts = [(a, n) for a, n in facts if a + lo >= 0 and a + hi <= T]
    for q in sm["questions"]:
        qa = int(q["q_end"] * FRAME_RATE) - start
        if qa >= T or not any(n == q["answer"] for _, n in facts):
            continue
        out["read_chance"].append(sum(n == q["answer"] for _, n in facts) / len(facts))
        for name, t in grab.items():
            if not name.startswith("z"):
                continue
            z = t[j]
            score = {n: 0.0 for n in NUMBERS}
            for a, n in facts:
                score[n] += float((z[a + lo:a + hi] @ z[qa]).sum())
            out["read"].setdefault(name, []).append(max(score, key=score.get) == q["answer"])


def collect(pieces, manifest: Path, segment_frames: int, min_segment_frames: int, offsets: tp.Sequence[int],
            k_past: int, k_future: int, batch: int = 8, only: tp.Sequence[int] | None = None) -> dict:
    """Teacher-forced features of every fact and question of `manifest`'s conversations (codes from the
    trainer's code cache when these segments were encoded before); `only`: these layers (default every one)."""
    from moshi_ttt.experiments.spoken.spec import COLOURS, NUMBERS
    from moshi_ttt.train.data import Dataset, TokenIds
    from moshi_ttt.train.loop import code_cache

    lm, mimi, tokenizer = pieces.lm, pieces.mimi, pieces.tokenizer
    ids = TokenIds.of(lm)
    ds = Dataset(manifest, segment_frames, min_segment_frames, "SPEAKER_MAIN",
                 code_cache=code_cache("auto", pieces, ids, FRAME_RATE))
    device = next(lm.parameters()).device
    layers = {i: layer for i, layer in enumerate(lm.transformer.layers) if only is None or i in only}
    if only is not None and set(only) - set(layers):
        raise ValueError(f"layers {sorted(set(only) - set(layers))}: the model has {len(lm.transformer.layers)}")
    grab: dict[str, torch.Tensor] = {}
    hooks = [lm.transformer.register_forward_pre_hook(lambda m, a: grab.__setitem__("x0", a[0]))]
    for i, layer in layers.items():
        hooks.append(layer.norm2.register_forward_hook(lambda m, a, o, i=i: grab.__setitem__(f"mlp_input{i}", o)))
    out: dict[str, tp.Any] = {"voice": [], "number": [], "colour": [], "value": {}, "key_fact": {},
                              "key_question": {}, "read": {}, "read_chance": []}
    try:
        with torch.no_grad():
            for k in range(0, len(ds), batch):
                idx = list(range(k, min(k + batch, len(ds))))
                lm(ds.batch(idx, mimi, tokenizer, ids).to(device))
                for i, layer in layers.items():
                    grab[f"z{i}"] = gated(layer.gating, grab[f"mlp_input{i}"])
                for name in grab:
                    grab[name] = grab[name].double().cpu()
                for j, i in enumerate(idx):
                    seg = ds.segments[i]
                    path = ds.recordings[seg.recording].path
                    sm = json.loads(path.with_suffix(".json").read_text())["spoken_memory"]
                    q_end = {q["colour"]: q["q_end"] for q in sm["questions"]}
                    T = seg.real_frames
                    oracle_read(out, grab, j, sm, seg.start_frame, T)
                    for u in sm["utterances"]:
                        if u["kind"] != "fact":
                            continue
                        a = int(u["end"] * FRAME_RATE) - seg.start_frame
                        qa = int(q_end[u["colour"]] * FRAME_RATE) - seg.start_frame
                        if a + min(offsets) - k_past < 0 or a + max(offsets) + k_future >= T or qa >= T:
                            continue
                        out["voice"].append(sm["user_voice"])
                        out["number"].append(NUMBERS.index(u["number"]))
                        out["colour"].append(COLOURS.index(u["colour"]))
                        for name, t in grab.items():
                            t = t[j]
                            if name.startswith("z"):
                                for d in offsets:
                                    out["key_fact"].setdefault((name, d), []).append(t[a + d].clone())
                                out["key_question"].setdefault(name, []).append(t[qa].clone())
                            else:
                                for d in offsets:
                                    w = t[a + d - k_past:a + d + k_future + 1].reshape(-1).clone()
                                    out["value"].setdefault((name, d), []).append(w)
    finally:
        for h in hooks:
            h.remove()
    return out


def run(export: Path, manifest: Path, offsets: tp.Sequence[int], fit_voices: int, seed: int,
        segment_frames: int = 640, min_segment_frames: int = 320, kernel: tuple[int, int] = (2, 2),
        device: str = "cpu", layers: tp.Sequence[int] | None = None) -> dict:
    """Every probe of the model at `export` (a --hf-repo folder) on `manifest`; voices split `fit_voices` / the
    rest by `seed`. On CUDA the model runs in bfloat16 (features in float64 on the CPU); `layers` limits the
    layers probed (a 7B model: its TTT layers)."""
    from moshi_ttt import runtime
    from moshi_ttt.experiments.spoken.spec import COLOURS, NUMBERS

    dev = torch.device(device)
    pieces = runtime.load(runtime.CheckpointFlags(hf_repo=str(export)), dev,
                          torch.float32 if dev.type == "cpu" else torch.bfloat16)
    pieces.lm.eval()
    c = collect(pieces, manifest, segment_frames, min_segment_frames, offsets, *kernel, only=layers)
    voices = sorted(set(c["voice"]))
    if not 0 < fit_voices < len(voices):
        raise ValueError(f"fit_voices={fit_voices}: must be in [1, {len(voices) - 1}] ({len(voices)} voices)")
    rng = random.Random(seed)
    fit_v = set(rng.sample(voices, fit_voices))
    n = len(c["voice"])
    in_fit = torch.tensor([v in fit_v for v in c["voice"]])
    held = torch.tensor([rng.random() < 0.2 for _ in range(n)])  # held-out facts of the fitting voices
    fit, within, across = in_fit & ~held, in_fit & held, ~in_fit
    number, colour = torch.tensor(c["number"]), torch.tensor(c["colour"])
    res: dict[str, tp.Any] = {
        "export": str(export), "manifest": str(manifest), "seed": seed, "facts": n, "fit_voices": sorted(fit_v),
        "other_voices": sorted(set(voices) - fit_v), "counts": {"fit": int(fit.sum()), "within": int(within.sum()),
                                                                  "across": int(across.sum())},
        "offsets": list(offsets), "kernel_past_future": list(kernel), "chance": {"number": 1 / len(NUMBERS),
                                                                                  "colour": 1 / len(COLOURS)},
        "value": {}, "key_fact": {}, "key_question": {}}

    def best(table: dict, y: torch.Tensor, classes: int) -> tp.Iterator[tuple[str, dict]]:
        sources = sorted({k[0] for k in table})
        for s in sources:
            per = {d: probe(torch.stack(table[(s, d)]), y, classes, fit, within, across) for d in offsets}
            d = max(per, key=lambda d: per[d]["within"] or 0.0)
            yield s, {**per[d], "offset": d, "by_offset": {str(k): v for k, v in per.items()}}

    for s, r in best(c["value"], number, len(NUMBERS)):
        res["value"][s] = r
        print(f"value number ← {s:12s} within {r['within']} across {r['across']} (δ {r['offset']})", file=sys.stderr)
    for s, r in best(c["key_fact"], colour, len(COLOURS)):
        res["key_fact"][s] = r
        print(f"key colour ← {s} at the fact: within {r['within']} across {r['across']}", file=sys.stderr)
    res["read_chance"] = sum(c["read_chance"]) / max(len(c["read_chance"]), 1)
    for s, hits in sorted(c["read"].items()):
        res.setdefault("read", {})[s] = r = {"questions": len(hits), "recall": sum(hits) / len(hits)}
        print(f"oracle read with {s}'s keys: {r['recall']:.3f} of {r['questions']} (a random fact: "
              f"{res['read_chance']:.3f})", file=sys.stderr)
    for s, xs in sorted(c["key_question"].items()):
        res["key_question"][s] = r = probe(torch.stack(xs), colour, len(COLOURS), fit, within, across)
        print(f"key colour ← {s} at the question: within {r['within']} across {r['across']}", file=sys.stderr)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.experiments.spoken.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="a --hf-repo folder (the stage-1 stand-in)")
    p.add_argument("--manifest", required=True, help="a training-voice set (never the eval set)")
    p.add_argument("--out", required=True, help="the JSON written")
    p.add_argument("--offsets", type=int, nargs="+", default=list(OFFSETS), help="δ, frames from the fact's end")
    p.add_argument("--fit-voices", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="probe these layers only (default all)")
    a = p.parse_args(argv)
    try:
        res = run(Path(a.export), Path(a.manifest), a.offsets, a.fit_voices, a.seed, device=a.device,
                  layers=a.layers)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
