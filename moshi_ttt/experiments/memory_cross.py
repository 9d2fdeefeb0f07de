"""Does the memory carry over to another conversation? The cross-conversation protocol of the memory experiment.

Conversation A (`t_a` frames) holds the task's key→value pairs among fillers. It ends, and each item's memory
goes through the real save path: `lm_memory.capture` (the last partial chunk folded) → `memory_format.dumps` in
a format → `MemoryStore.save` (sealed, in a local store) → `load` → `memory_format.loads` → `lm_memory.resume`
into a fresh streaming state (fresh KV cache, W⁽⁰⁾). Conversation B (`t_b` frames) holds only the queries,
each key once, among fillers. Accuracy: the text argmax at the answer frames through LMGen, teacher-forced
(`memory_task.streaming_text_logits`).

Arms, per seed, on the models the single-conversation experiment trains (same settings, same seed, retrained:
that experiment caches records, not weights): `base` (nothing to carry), `ttt_fresh` (TTT, B without resume),
`ttt_<format>` (B resumed from A's memory stored as <format>, each of FORMATS); next to them the model's
single-conversation accuracy beyond the attention window (LMGen streaming). Runs are cached in
OUT/cross_runs/; OUT/cross_results.json, OUT/cross.png and the table of docs/memory-experiment.md follow.

    python -m moshi_ttt.experiments.memory_cross --out docs/memory_experiment
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch

from moshi_ttt.experiments.memory_experiment import Settings, load_run, update_readme
from moshi_ttt.experiments.memory_task import (
    Task,
    answer_hits,
    build_model,
    eval_set,
    evaluate,
    streaming_text_logits,
    train,
)
from moshi_ttt.memory.seal import Token
from moshi_ttt.memory.store import MemoryStore
from moshi_ttt.models import lm_memory as mem
from moshi_ttt.models import memory_format as mf
from moshi_ttt.utils.io import atomic_write

FORMATS = ("exact", "bf16", "rank:2", "rank:8", "rank:32")
ARMS = ("base", "ttt_fresh", *(f"ttt_{f}" for f in FORMATS))
README_START = "<!-- cross-table:start -->"
README_END = "<!-- cross-table:end -->"


@dataclasses.dataclass(frozen=True)
class Cross:
    """t_a / t_b: frames of conversations A (pairs) and B (queries); n_eval: item pairs (A, B); seed: their
    data seed."""

    t_a: int = 48
    t_b: int = 48
    n_eval: int = 256
    seed: int = 54321


def _slots(T: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n non-overlapping 2-frame slots in T frames, uniformly: their first frames, sorted."""
    return np.sort(rng.choice(T - n, n, replace=False)) + np.arange(n)


def make_cross_batch(task: Task, B: int, t_a: int, t_b: int, rng: np.random.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """a [B, 2, t_a] (the pairs: key frame, value frame), b [B, 2, t_b] (each pair's key again, then its value),
    ans [B, P] (frame of b whose text token is the value), dist [B, P] (frames from the key in a to its query
    in b, counted over both conversations: t_a − t + q). Both streams carry the same symbols, as in
    `memory_task.make_batch`."""
    P = task.pairs
    if P > task.n_keys or 2 * P > min(t_a, t_b):
        raise ValueError(f"pairs={P} needs n_keys >= {P} and t_a, t_b >= {2 * P}; got n_keys={task.n_keys}, "
                         f"t_a={t_a}, t_b={t_b}")
    a = task.fill0 + rng.integers(0, task.n_fill, (B, t_a))
    b = task.fill0 + rng.integers(0, task.n_fill, (B, t_b))
    ans, dist = np.zeros((B, P), dtype=np.int64), np.zeros((B, P), dtype=np.int64)
    for i in range(B):
        keys, vals = task.key0 + rng.permutation(task.n_keys)[:P], task.val0 + rng.integers(0, task.n_vals, P)
        ta, tb = _slots(t_a, P, rng), rng.permutation(_slots(t_b, P, rng))
        a[i, ta], a[i, ta + 1] = keys, vals
        b[i, tb], b[i, tb + 1] = keys, vals
        ans[i], dist[i] = tb + 1, t_a - ta + tb
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    return torch.stack([a_t, a_t], 1), torch.stack([b_t, b_t], 1), torch.from_numpy(ans), torch.from_numpy(dist)


def conversation_memories(model: torch.nn.Module, a: torch.Tensor, fp: str) -> list[mem.Memory]:
    """Streams conversation A (every item) and captures each item's memory at its end (factor log on, so an
    `exact` memory of a short conversation is stored as factors, as the server does)."""
    out: list[mem.Memory] = []
    streaming_text_logits(model, a, before=lambda: mem.keep_factors(model),
                          after=lambda: out.extend(mem.capture(model, i, fp) for i in range(a.shape[0])))
    return out


def restorer(model: torch.nn.Module, memories: tp.Sequence[mem.Memory], fmt: str, fp: str,
             store: MemoryStore, sizes: list[int] | None = None) -> tp.Callable[[], None]:
    """The `before` hook of conversation B: each item's memory through dumps(fmt) → seal and save → load →
    loads → resume into the item (then deleted from the store). `sizes` gets each stored memory's bytes."""
    def restore() -> None:
        for i, memory in enumerate(memories):
            token = Token.new()
            store.save(token, fp, mf.dumps(memory, fmt), {"frames": memory.frames, "compression": fmt},
                       owner="local", expect=None)
            if sizes is not None:
                sizes.append(store.show(token.id)["bytes"])
            mem.resume(model, i, mf.loads(store.load(token, fp)), fp)
            store.delete(token)
    return restore


def _counts(hits: torch.Tensor, by: torch.Tensor) -> dict[str, list[int]]:
    return {str(k): [int(hits[by == k].sum()), int((by == k).sum())] for k in torch.unique(by).tolist()}


def _acc(hits: torch.Tensor, dist: torch.Tensor, key_frame: torch.Tensor, t_a: int) -> dict:
    """acc; acc_value_heard: over the pairs whose value frame conversation A fed to the model (all but a value on
    A's last frame: step s feeds frame s − 1, and the step after A's last does not exist); hits by distance and
    by the key's frame in A."""
    heard = key_frame + 1 < t_a - 1
    return {"acc": float(hits.float().mean()), "acc_value_heard": float(hits[heard].float().mean()),
            "per_distance": _counts(hits, dist), "per_key_frame": _counts(hits, key_frame)}


@torch.no_grad()
def run_one(variant: str, seed: int, settings: Settings, cross: Cross, batch: int = 64) -> dict:
    """Trains `variant` ("base" or "ttt") as the single-conversation experiment does, then evaluates it within
    one conversation (beyond the window) and across two (every arm of the variant)."""
    torch.set_num_threads(1)
    t0 = time.time()
    s = settings
    model = build_model(s.task, s.ttt_config(variant), dim=s.dim, layers=s.layers, context=s.context(variant),
                        ttt_layer=s.ttt_layer, seed=seed)
    with torch.enable_grad():
        train(model, s.task, s.budget, seed)
    t_train = time.time() - t0
    single = evaluate(model, s.task, eval_set(s.task, s.n_eval), streaming=True)
    beyond = single["dist"] >= s.task.window
    a, b, ans, dist = make_cross_batch(s.task, cross.n_eval, cross.t_a, cross.t_b,
                                       np.random.default_rng(cross.seed))
    arms = ("base",) if variant == "base" else ARMS[1:]
    hits: dict[str, list[torch.Tensor]] = {arm: [] for arm in arms}
    sizes: dict[str, list[int]] = {f: [] for f in FORMATS} if variant != "base" else {}
    fp = mem.fingerprint(model) if variant != "base" else ""
    with tempfile.TemporaryDirectory() as tmp:
        store = MemoryStore(tmp)
        for i in range(0, cross.n_eval, batch):
            sl = slice(i, i + batch)
            memories = conversation_memories(model, a[sl], fp) if variant != "base" else []
            for arm in arms:
                fmt = arm[len("ttt_"):] if arm.startswith("ttt_") and arm != "ttt_fresh" else None
                before = None if fmt is None else restorer(model, memories, fmt, fp, store, sizes[fmt])
                logits = streaming_text_logits(model, b[sl], before=before)
                hits[arm].append(answer_hits(logits, b[sl], ans[sl]))
    return {
        "variant": variant, "seed": seed, "settings": s.to_dict(), "cross": dataclasses.asdict(cross),
        "arms": {arm: _acc(torch.cat(h), dist, cross.t_a - dist + ans - 1, cross.t_a) for arm, h in hits.items()},
        "single_beyond_acc_streaming": float(single["hits_streaming"][beyond].float().mean()),
        "stored_bytes": {f: statistics.mean(v) for f, v in sizes.items()},
        "train_seconds": t_train, "seconds": time.time() - t0,
    }


def _run_path(out: Path, variant: str, seed: int) -> Path:
    return out / "cross_runs" / f"{variant}_seed{seed}.json"


def run_all(out: Path, settings: Settings, cross: Cross, seeds: int) -> dict[tuple[str, int], dict]:
    """Every (variant, seed) run, from OUT/cross_runs/ when its settings are equal."""
    (out / "cross_runs").mkdir(parents=True, exist_ok=True)
    runs = {}
    want = json.loads(json.dumps({"settings": settings.to_dict(), "cross": dataclasses.asdict(cross)}))
    for seed in range(seeds):
        for v in ("base", "ttt"):
            p = _run_path(out, v, seed)
            rec = json.loads(p.read_text()) if p.exists() else None
            if rec is None or {k: rec.get(k) for k in want} != want or "acc_value_heard" not in rec["arms"][
                    "base" if v == "base" else "ttt_fresh"]:  # made by an older version of this script
                rec = run_one(v, seed, settings, cross)
                atomic_write(p, lambda tmp, rec=rec: tmp.write_text(json.dumps(rec, indent=1)))
            single, mine = load_run(out, v, seed, settings), rec["single_beyond_acc_streaming"]
            theirs = None if single is None else single["beyond_acc_streaming"]
            same = "" if theirs is None else "; runs/: the same" if theirs == mine else f"; runs/: {theirs:.3f}"
            print(f"{v:<5} seed {seed}: " + "  ".join(f"{k} {r['acc']:.3f}" for k, r in rec["arms"].items())
                  + f"  single beyond {rec['single_beyond_acc_streaming']:.3f}{same} ({rec['seconds']:.0f} s)",
                  flush=True)
            runs[(v, seed)] = rec
    return runs


# -- results, table, plot --------------------------------------------------------------------------

def results_json(runs: dict[tuple[str, int], dict], settings: Settings, cross: Cross) -> dict:
    """{"arms": {ARM: {"seeds": [{seed, acc, acc_value_heard}]}},
    "single_beyond": {"base"|"ttt": {"seeds": [{seed, acc}]}},
    "stored_bytes": {FORMAT: mean bytes of a sealed memory}, "chance", "window", "chunk", "t_a", "t_b"}."""
    arms: dict[str, dict] = {}
    single: dict[str, dict] = {}
    for (v, seed), rec in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        for arm, r in rec["arms"].items():
            arms.setdefault(arm, {"seeds": []})["seeds"].append(
                {"seed": seed, "acc": r["acc"], "acc_value_heard": r["acc_value_heard"]})
        single.setdefault(v, {"seeds": []})["seeds"].append({"seed": seed, "acc": rec["single_beyond_acc_streaming"]})
    ttt = [rec for (v, _), rec in runs.items() if v == "ttt"]
    stored = {f: statistics.mean(r["stored_bytes"][f] for r in ttt) for f in FORMATS} if ttt else {}
    return {"arms": {a: arms[a] for a in ARMS if a in arms}, "single_beyond": single, "stored_bytes": stored,
            "chance": settings.task.chance, "window": settings.task.window, "chunk": settings.chunk,
            "t_a": cross.t_a, "t_b": cross.t_b}


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"


def _label(arm: str) -> tuple[str, str]:
    if arm == "base":
        return "`base`", "none (no TTT)"
    if arm == "ttt_fresh":
        return "`ttt`", "none (B starts from W⁽⁰⁾)"
    return "`ttt`", f"A's memory, `{arm[4:]}`"


def render_table(res: dict) -> str:
    lines = ["| model | conversation B starts with | recall in B (queries only) | recall in B, values A's model "
             "heard | one conversation, beyond the window | sealed memory (bytes) | seeds |",
             "|---|---|---|---|---|---|---|"]
    for arm, v in res["arms"].items():
        model, carried = _label(arm)
        single = res["single_beyond"]["base" if arm == "base" else "ttt"]["seeds"]
        size = f"{res['stored_bytes'][arm[4:]]:,.0f}" if arm[4:] in res["stored_bytes"] else "—"
        lines.append(f"| {model} | {carried} | {_ms([s['acc'] for s in v['seeds']])} | "
                     f"{_ms([s['acc_value_heard'] for s in v['seeds']])} | {_ms([s['acc'] for s in single])} | "
                     f"{size} | {len(v['seeds'])} |")
    lines += ["", f"Conversation A: {res['t_a']} frames holding the pairs; B: {res['t_b']} frames holding only the "
              f"queries, with a fresh KV cache. \"Values A's model heard\": all pairs but those whose value is A's "
              f"last frame, which no step of A feeds to the model. Chance = {res['chance']:.4f}; attention window "
              f"{res['window']} frames; TTT chunk {res['chunk']} frames; mean ± std (population) over seeds; LMGen "
              "streaming."]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """One bar per arm (mean over seeds, ± std), beside the single-conversation beyond-window bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*res["arms"], "one conversation: base", "one conversation: ttt"]
    vals = [[s["acc"] for s in v["seeds"]] for v in res["arms"].values()]
    vals += [[s["acc"] for s in res["single_beyond"][k]["seeds"]] for k in ("base", "ttt") if k in res["single_beyond"]]
    names = names[:len(vals)]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    colors = ["tab:gray" if n.endswith("base") else "tab:orange" if n.startswith("one") else "tab:blue"
              for n in names]
    ax.bar(range(len(vals)), [statistics.mean(v) for v in vals], yerr=[statistics.pstdev(v) for v in vals],
           color=colors, capsize=3)
    for x, v in enumerate(vals):
        ax.plot([x] * len(v), v, "k.", ms=3)
    ax.axhline(res["chance"], color="gray", ls="--", lw=1)
    ax.text(len(vals) - 0.5, res["chance"] + 0.02, "chance", fontsize=8, ha="right")
    labels = [n.replace("ttt_", "B resumed: ").replace("B resumed: fresh", "ttt, B not resumed")
              .replace(": ttt", ": ttt, beyond window").replace(": base", ": base, beyond window") for n in names]
    ax.set_xticks(range(len(vals)), labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall accuracy")
    ax.set_title(f"recall in a second conversation ({res['t_b']} frames, fresh KV cache) of pairs heard in the "
                 f"first ({res['t_a']} frames); dots: seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(runs: dict[tuple[str, int], dict], settings: Settings, cross: Cross, out: Path,
                  readmes: tp.Sequence[Path] = ()) -> dict:
    """cross_results.json and cross.png in `out`; the table between the markers of each of `readmes`."""
    res = results_json(runs, settings, cross)
    (out / "cross_results.json").write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out / "cross.png")
    for readme in readmes:
        update_readme(readme, render_table(res), README_START, README_END)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/memory_experiment")
    p.add_argument("--readme", nargs="*", default=["docs/memory-experiment.md", "README.md"],
                   help="markdown pages whose table between the cross-table markers is replaced (none: no page)")
    p.add_argument("--seeds", type=int, default=5)
    d = Cross()
    p.add_argument("--t-a", type=int, default=d.t_a)
    p.add_argument("--t-b", type=int, default=d.t_b)
    p.add_argument("--n-eval", type=int, default=d.n_eval)
    a = p.parse_args(argv)
    settings, cross = Settings(), Cross(t_a=a.t_a, t_b=a.t_b, n_eval=a.n_eval)
    out = Path(a.out)
    t0 = time.time()
    runs = run_all(out, settings, cross, a.seeds)
    res = write_outputs(runs, settings, cross, out, [Path(r) for r in a.readme])
    print(render_table(res))
    print(f"wrote {out}/cross_results.json, cross.png ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
