"""Does In-Place TTT remember beyond the attention window? A key→value recall experiment.

A tiny Moshi-architecture LM (moshi's `LMModel` / this project's `TTTLMModel`, RoPE, causal attention
limited to `context` frames) is trained from scratch on the task of `memory_task.py`: key→value pairs
among filler frames, each queried once at a distance that is inside the attention window for half of
the queries and beyond it for the other half.

Variants (identical budget, same data, same seeds):
    base              attention window = `window` frames (the floor)
    base_full_window  the same model with a window covering the whole sequence (the ceiling)
    ttt               TTT in the last layer, `ntp` init (conv picks frame t+1, W_target = I)
    ttt_noconv        ... without the conv (V̂ = X0 · W_target)
    ttt_noproj        ... without W_target (fixed to I)
    ttt_mlp_input     ... with the layer's own MLP input as the target source instead of X0
    ttt_bf16state     `ttt` trained identically, streamed with a bf16 fast-weight state (stochastic rounding;
                      the parallel forward does not depend on the state dtype)
    ttt_bf16state_rtn ... with round-to-nearest folds
    base_wN, ttt_wN   the window sweep: `base` and `ttt` with an attention window of N frames (the task's
                      window too: half of the queries inside N, half beyond), N in SWEEP_WINDOWS

Each (variant, seed) run is trained, then evaluated on a fixed set twice: by the parallel forward
and frame by frame through moshi's `LMGen` (teacher-forced, see `memory_task.streaming_text_logits`).
Runs are cached in OUT/runs/ (resumable: a finished run is skipped unless its settings changed);
then OUT/results.json, OUT/memory_experiment.png and the table of docs/memory-experiment.md are written.

    python -m moshi_ttt.experiments.memory_experiment --out docs/memory_experiment --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moshi_ttt.experiments.memory_task import Budget, Task, build_model, eval_set, evaluate, train
from moshi_ttt.ttt.config import TTTConfig
from moshi_ttt.utils.io import atomic_write

SWEEP_WINDOWS = (8, 32)
SWEEP = {f"{kind}_w{w}": (kind, w) for w in SWEEP_WINDOWS for kind in ("base", "ttt")}
VARIANTS = ("base", "base_full_window", "ttt", "ttt_noconv", "ttt_noproj", "ttt_mlp_input", "ttt_bf16state",
            "ttt_bf16state_rtn", *SWEEP)
TTT_ABLATIONS = {"ttt": {}, "ttt_noconv": {"use_conv": False}, "ttt_noproj": {"use_target_proj": False},
                 "ttt_mlp_input": {"target": "mlp_input"}, "ttt_bf16state": {"state_dtype": "bfloat16"},
                 "ttt_bf16state_rtn": {"state_dtype": "bfloat16", "state_rounding": "nearest"}}
README_START = "<!-- memory-table:start -->"
README_END = "<!-- memory-table:end -->"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run depends on (a cached run is reused only if its settings are equal)."""

    task: Task = Task()
    budget: Budget = Budget()
    dim: int = 64
    layers: int = 2
    ttt_layer: int = 1
    chunk: int = 16
    eta: float = 0.3
    n_eval: int = 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def ttt_config(self, variant: str) -> TTTConfig | None:
        variant = SWEEP.get(variant, (variant,))[0]
        if variant not in TTT_ABLATIONS:
            return None
        return TTTConfig(chunk_size=self.chunk, lr=self.eta, init="ntp", **TTT_ABLATIONS[variant])

    def context(self, variant: str) -> int:
        return self.task.T if variant == "base_full_window" else self.for_variant(variant).task.window

    def for_variant(self, variant: str) -> Settings:
        """The settings a variant's run is made with: these, or for a sweep variant these at its window."""
        if variant not in SWEEP:
            return self
        return dataclasses.replace(self, task=dataclasses.replace(self.task, window=SWEEP[variant][1]))


def run_one(variant: str, seed: int, settings: Settings, progress_every: int = 0) -> dict:
    """Trains and evaluates one (variant, seed); returns the run record (JSON-serialisable)."""
    torch.set_num_threads(1)
    s = settings.for_variant(variant)
    t0 = time.time()
    model = build_model(s.task, s.ttt_config(variant), dim=s.dim, layers=s.layers,
                        context=s.context(variant), ttt_layer=s.ttt_layer, seed=seed)

    def progress(step: int, loss: float) -> None:
        if progress_every and (step + 1) % progress_every == 0:
            print(f"  {variant} seed {seed}: step {step + 1}/{s.budget.steps} loss {loss:.3f}", flush=True)

    loss = train(model, s.task, s.budget, seed, progress)
    t_train = time.time() - t0
    ev = evaluate(model, s.task, eval_set(s.task, s.n_eval), streaming=True)
    W = s.task.window
    inside, beyond = ev["dist"] < W, ev["dist"] >= W

    def acc(hits: torch.Tensor, sel: torch.Tensor) -> float:
        return float(hits[sel].float().mean())

    per_dist = {}
    for d in torch.unique(ev["dist"]).tolist():
        sel = ev["dist"] == d
        per_dist[str(d)] = [int(ev["hits"][sel].sum()), int(sel.sum())]
    return {
        "variant": variant, "seed": seed, "settings": s.to_dict(),
        "inside_acc": acc(ev["hits"], inside), "beyond_acc": acc(ev["hits"], beyond),
        "inside_acc_streaming": acc(ev["hits_streaming"], inside),
        "beyond_acc_streaming": acc(ev["hits_streaming"], beyond),
        "max_logit_diff": ev["max_logit_diff"], "final_loss": loss,
        "per_distance": per_dist, "train_seconds": t_train, "seconds": time.time() - t0,
    }


def _run_path(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / f"{variant}_seed{seed}.json"


def load_run(out: Path, variant: str, seed: int, settings: Settings) -> dict | None:
    """The cached run if it exists and was made with these settings, else None."""
    p = _run_path(out, variant, seed)
    if not p.exists():
        return None
    rec = json.loads(p.read_text())
    want = settings.for_variant(variant).to_dict()
    return rec if rec.get("settings") == json.loads(json.dumps(want)) else None


def _work(variant: str, seed: int, settings: Settings, out: str, progress_every: int) -> dict:
    rec = run_one(variant, seed, settings, progress_every)
    p = _run_path(Path(out), variant, seed)
    atomic_write(p, lambda tmp: tmp.write_text(json.dumps(rec, indent=1)))  # an interrupted run leaves no half record
    return rec


def run_all(out: Path, settings: Settings, variants: tuple[str, ...], seeds: int, jobs: int = 1,
            progress_every: int = 100, cached_only: bool = False) -> dict[tuple[str, int], dict]:
    """Every (variant, seed) run, from the cache when possible; `jobs` worker processes. `cached_only`:
    the cached runs only (what an interrupted experiment finished), nothing is trained."""
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], dict] = {}
    todo = []
    for seed in range(seeds):  # seed-major: an interrupted experiment has whole seeds of every variant
        for v in variants:
            rec = load_run(out, v, seed, settings)
            if rec is None:
                todo.append((v, seed))
            else:
                runs[(v, seed)] = rec
    if cached_only:
        print(f"{len(runs)} run(s) cached in {out / 'runs'}; not run: {todo}")
        return runs
    bar = tqdm(total=len(variants) * seeds, initial=len(runs), desc="runs", unit="run", file=sys.stdout)
    if runs:
        bar.write(f"{len(runs)} run(s) cached in {out / 'runs'}, {len(todo)} to do")

    def done(rec: dict) -> None:
        runs[(rec["variant"], rec["seed"])] = rec
        bar.write(f"{rec['variant']:<16} seed {rec['seed']}: inside {rec['inside_acc']:.3f}  beyond "
                  f"{rec['beyond_acc']:.3f}  beyond (LMGen) {rec['beyond_acc_streaming']:.3f}  "
                  f"({rec['seconds']:.0f} s)")
        bar.update(1)

    if jobs <= 1:
        for v, seed in todo:
            done(_work(v, seed, settings, str(out), progress_every))
    else:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_work, v, seed, settings, str(out), progress_every) for v, seed in todo]
            for f in cf.as_completed(futures):
                done(f.result())
    bar.close()
    return runs



# -- results, table, plot ----------------------------------------------------------------------------

def results_json(runs: dict[tuple[str, int], dict], settings: Settings) -> dict:
    """The published schema: {"variants": {NAME: {"seeds": [{seed, inside_acc, beyond_acc,
    beyond_acc_streaming}]} (+ "window" for a sweep variant)}, "chance", "window", "chunk"}."""
    variants: dict[str, dict] = {}
    for (v, seed), rec in sorted(runs.items(), key=lambda kv: (VARIANTS.index(kv[0][0]), kv[0][1])):
        entry = variants.setdefault(v, {"seeds": []} if v not in SWEEP else {"window": SWEEP[v][1], "seeds": []})
        entry["seeds"].append(
            {"seed": seed, "inside_acc": rec["inside_acc"], "beyond_acc": rec["beyond_acc"],
             "beyond_acc_streaming": rec["beyond_acc_streaming"]})
    return {"variants": variants, "chance": settings.task.chance, "window": settings.task.window,
            "chunk": settings.chunk}


def check_results(res: dict) -> None:
    """Raises ValueError unless `res` has exactly the published schema."""
    if set(res) != {"variants", "chance", "window", "chunk"}:
        raise ValueError(f"results keys {sorted(res)} != ['chance', 'chunk', 'variants', 'window']")
    if not isinstance(res["chance"], float) or not all(isinstance(res[k], int) for k in ("window", "chunk")):
        raise ValueError("results: chance must be a float, window and chunk ints")
    for name, v in res["variants"].items():
        if name not in VARIANTS:
            raise ValueError(f"results: unknown variant {name!r}")
        keys = {"seeds", "window"} if name in SWEEP else {"seeds"}
        if set(v) != keys or not v["seeds"]:
            raise ValueError(f"results: variant {name!r} must have exactly the keys {sorted(keys)} "
                             f"(seeds: a non-empty list), got {sorted(v)}")
        if name in SWEEP and v["window"] != SWEEP[name][1]:
            raise ValueError(f"results: sweep variant {name!r} has window {v['window']!r}, not {SWEEP[name][1]}")
        for s in v["seeds"]:
            if set(s) != {"seed", "inside_acc", "beyond_acc", "beyond_acc_streaming"}:
                raise ValueError(f"results: variant {name!r} seed entry has keys {sorted(s)}")
            if not isinstance(s["seed"], int) or not all(
                    isinstance(s[k], float) and 0.0 <= s[k] <= 1.0
                    for k in ("inside_acc", "beyond_acc", "beyond_acc_streaming")):
                raise ValueError(f"results: variant {name!r} seed entry {s} has a bad value")


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"


def render_table(res: dict) -> str:
    """The README tables (markdown) from a results.json dict: mean ± std over seeds; the window sweep
    (when it ran) in a second table."""
    lines = ["| model | inside window | beyond window | beyond window, LMGen streaming | "
             "max \\|Δ\\| parallel vs streaming (over seeds) | seeds |", "|---|---|---|---|---|---|"]
    for name in VARIANTS:
        if name not in res["variants"] or name in SWEEP:
            continue
        seeds = res["variants"][name]["seeds"]
        col = {k: [s[k] for s in seeds] for k in ("inside_acc", "beyond_acc", "beyond_acc_streaming")}
        gap = max(abs(s["beyond_acc"] - s["beyond_acc_streaming"]) for s in seeds)
        lines.append(f"| `{name}` | {_ms(col['inside_acc'])} | {_ms(col['beyond_acc'])} | "
                     f"{_ms(col['beyond_acc_streaming'])} | {gap:.3f} | {len(seeds)} |")
    lines.append("")
    lines.append(f"Chance = {res['chance']:.4f}; attention window {res['window']} frames; TTT chunk "
                 f"{res['chunk']} frames; mean ± std (population) over seeds.")
    sweep = [(w, kind, name) for w in sorted({res["window"], *SWEEP_WINDOWS}) for kind in ("base", "ttt")
             for name in ([kind] if w == res["window"] else [f"{kind}_w{w}"]) if name in res["variants"]]
    if any(name in SWEEP for _, _, name in sweep):
        lines += ["", "Window sweep (the task's window = the model's: half of the queries inside it, half beyond):",
                  "", "| attention window | model | inside window | beyond window | beyond window, LMGen "
                  "streaming | seeds |", "|---|---|---|---|---|---|"]
        for w, kind, name in sweep:
            seeds = res["variants"][name]["seeds"]
            col = {k: [s[k] for s in seeds] for k in ("inside_acc", "beyond_acc", "beyond_acc_streaming")}
            lines.append(f"| {w} | `{kind}` | {_ms(col['inside_acc'])} | {_ms(col['beyond_acc'])} | "
                         f"{_ms(col['beyond_acc_streaming'])} | {len(seeds)} |")
    return "\n".join(lines)


def update_readme(readme: Path, table: str, start: str = README_START, end: str = README_END) -> None:
    """Replaces the text between the markers `start` and `end` (the memory-table ones) of `readme` with `table`."""
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{readme}: markers {start} / {end} not found")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{table}\n{end}", text))


def plot(runs: dict[tuple[str, int], dict], settings: Settings, path: Path, bin_width: int = 4) -> None:
    """Accuracy vs key→query distance (mean over seeds of per-bin accuracy, shaded ± std).

    Bins end at the window so none mixes reachable and unreachable distances: with the 1-frame audio
    delay the key's partner frame is one frame later, so attention reaches distances ≤ window."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, W, C = settings.task.T, settings.task.window, settings.chunk
    first = W % bin_width + 1
    edges = list(range(first, T - 1, bin_width))
    fig, ax = plt.subplots(figsize=(10, 4))
    for v in VARIANTS:
        recs = [r for (name, _), r in sorted(runs.items()) if name == v]
        if not recs or v in SWEEP:  # the plot is at the experiment's window
            continue
        curves = []
        for r in recs:
            curve = []
            for lo in edges:
                h = sum(r["per_distance"].get(str(d), [0, 0])[0] for d in range(lo, lo + bin_width))
                n = sum(r["per_distance"].get(str(d), [0, 0])[1] for d in range(lo, lo + bin_width))
                curve.append(h / n if n else float("nan"))
            curves.append(curve)
        arr = np.array(curves)  # [seeds, bins]; NaN where a bin has no query
        with warnings.catch_warnings():  # an all-NaN bin (tiny runs only) stays NaN: not plotted
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(arr, 0), np.nanstd(arr, 0)
        x = [lo + (bin_width - 1) / 2 for lo in edges]
        style = "--" if v.startswith("base") else "-"
        (line,) = ax.plot(x, mean, style, marker=".", label=f"{v} ({len(recs)} seeds)")
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    ax.axvline(W + 0.5, color="black", lw=1.2)
    for k in range(1, (T - 1) // C + 1):
        ax.axvline(k * C, color="gray", lw=0.6, ls=":")
    ax.axhline(settings.task.chance, color="gray", ls="--", lw=1)
    ax.text(T - 2, settings.task.chance + 0.02, "chance", fontsize=8, ha="right")
    ax.set_xlabel(f"distance key → query (frames).  Solid line: attention window ({W} frames); "
                  f"dotted: multiples of the TTT chunk ({C} frames)", fontsize=9)
    ax.set_ylabel("recall accuracy (parallel forward)")
    ax.set_xlim(0, T)
    ax.set_ylim(-0.02, 1.05)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"key→value recall by distance: mean ± std over seeds ({bin_width}-frame bins)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(runs: dict[tuple[str, int], dict], settings: Settings, out: Path,
                  readme: Path | None) -> dict:
    res = results_json(runs, settings)
    check_results(res)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    table = render_table(res)
    (out / "table.md").write_text(table + "\n")
    plot(runs, settings, out / "memory_experiment.png")
    if readme is not None:
        update_readme(readme, table)
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/memory_experiment")
    p.add_argument("--readme", default="docs/memory-experiment.md",
                   help="markdown page whose table between the markers is replaced ('' = none)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (1 thread each)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    d = Settings()
    p.add_argument("--steps", type=int, default=d.budget.steps)
    p.add_argument("--batch", type=int, default=d.budget.batch)
    p.add_argument("--lr", type=float, default=d.budget.lr)
    p.add_argument("--T", type=int, default=d.task.T)
    p.add_argument("--window", type=int, default=d.task.window)
    p.add_argument("--pairs", type=int, default=d.task.pairs)
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--ttt-layer", type=int, default=None, help="layer holding TTT (default: the last)")
    p.add_argument("--chunk", type=int, default=d.chunk)
    p.add_argument("--eta", type=float, default=d.eta)
    p.add_argument("--n-eval", type=int, default=d.n_eval)
    p.add_argument("--progress-every", type=int, default=100, help="print the loss every N steps (0 = never)")
    p.add_argument("--cached-only", action="store_true", help="write the outputs from the cached runs, train none")
    a = p.parse_args(argv)
    variants = tuple(a.variants.split(","))
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; known: {list(VARIANTS)}")
    settings = Settings(task=Task(T=a.T, window=a.window, pairs=a.pairs),
                        budget=dataclasses.replace(d.budget, steps=a.steps, batch=a.batch, lr=a.lr),
                        dim=a.dim, layers=a.layers,
                        ttt_layer=a.layers - 1 if a.ttt_layer is None else a.ttt_layer, chunk=a.chunk, eta=a.eta,
                        n_eval=a.n_eval)
    out = Path(a.out)
    t0 = time.time()
    runs = run_all(out, settings, variants, a.seeds, a.jobs, a.progress_every, a.cached_only)
    res = write_outputs(runs, settings, out, Path(a.readme) if a.readme else None)
    print(render_table(res))
    print(f"wrote {out}/results.json, table.md, memory_experiment.png"
          + (f" and the table in {a.readme}" if a.readme else "") + f" ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
