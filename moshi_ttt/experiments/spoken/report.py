"""The spoken-memory experiment's results, regenerated from its run records (OUT/runs/*.json, one per variant and
seed, written by `experiment.py`): OUT/results.json, the plot OUT/recall_by_distance.png and the markdown tables
of docs/spoken-memory.md and the README (between `<!-- spoken-memory:start -->` / `end` markers), and the probes
table (OUT/probes/*.json, between `<!-- spoken-probes:start -->` / `end` in docs/spoken-memory.md).

    python -m moshi_ttt.experiments.spoken.report --out docs/spoken_memory [--doc docs/spoken-memory.md] \
        [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

from moshi_ttt.experiments.spoken.spec import CHANCE
from moshi_ttt.experiments.spoken.variants import VARIANTS

ORDER = ("pretrained", *VARIANTS)
LABELS = {"pretrained": "stage-1 model as is (window W, no TTT)", **{k: v.label or k for k, v in VARIANTS.items()}}
START, END = "<!-- spoken-memory:start -->", "<!-- spoken-memory:end -->"
PROBES_START, PROBES_END = "<!-- spoken-probes:start -->", "<!-- spoken-probes:end -->"
SEEDS_START, SEEDS_END = "<!-- spoken-seeds:start -->", "<!-- spoken-seeds:end -->"


def load_runs(out: Path) -> list[dict]:
    """Every run record of OUT/runs, in (variant order, seed) order."""
    recs = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    return sorted(recs, key=lambda r: (ORDER.index(r["variant"]) if r["variant"] in ORDER else 99, r["seed"]))


def load_cross(out: Path) -> list[dict]:
    """Every across-conversations record of OUT/cross (experiment.run_cross), in (variant, seed) order."""
    recs = [json.loads(p.read_text()) for p in sorted((out / "cross").glob("*.json"))]
    return sorted(recs, key=lambda r: (r["variant"], r["seed"]))


def cross_results(recs: list[dict]) -> dict:
    """Per variant: recall of part B with part A's memory and fresh, mean ± std over seeds (all, and beyond W)."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["variant"] for r in recs):
        mine = [r for r in recs if r["variant"] == name]
        out[name] = {"seeds": [r["seed"] for r in mine], "facts": mine[0]["facts"], "questions": mine[0]["memory"]["n"],
                     **{k: {"all": _stats([r[k]["recall"] for r in mine]),
                            "beyond": _stats([r[k]["beyond"]["recall"] for r in mine])} for k in ("memory", "fresh")}}
    return out


def _stats(xs: list[float | None]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.mean(xs), "std": statistics.pstdev(xs), "n": len(xs), "values": xs}


def results(recs: list[dict]) -> dict:
    """results.json: per variant and eval set (facts per conversation), recall mean ± std (population) over
    seeds, overall / inside W / beyond W / per distance bin, with the per-seed values and timings."""
    variants: dict[str, dict] = {}
    for r in recs:
        v = variants.setdefault(r["variant"], {"window": r["window"], "seeds": [], "evals": {},
                                               "train_seconds": [], "eval_seconds": []})
        v["seeds"].append(r["seed"])
        v["train_seconds"].append(r["train_seconds"])
        v["eval_seconds"].append(r["eval_seconds"])
    for name, v in variants.items():
        mine = [r for r in recs if r["variant"] == name]
        for facts in mine[0]["evals"]:
            ev = [r["evals"][facts] for r in mine]
            v["evals"][facts] = {
                "all": _stats([e["recall"] for e in ev]), "inside": _stats([e["inside"]["recall"] for e in ev]),
                "beyond": _stats([e["beyond"]["recall"] for e in ev]), "questions": ev[0]["n"],
                "bins": [{"lo": b["lo"], "hi": b["hi"], "n": b["n"],
                          **_stats([e["bins"][i]["recall"] for e in ev])} for i, b in enumerate(ev[0]["bins"])]}
    evals = recs[0]["evals"] if recs else {}
    main = "4" if "4" in evals else min(evals, key=int, default=None)
    return {"chance": CHANCE, "window_s": evals[main]["window_s"] if main else None, "main_facts": main,
            "variants": variants}


def _ms(s: dict) -> str:
    return "–" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"


def render_table(res: dict) -> str:
    """Markdown: the main eval set (4 facts) per variant (all / inside / beyond / by bin), then a row per eval set
    (2, 4, 8 facts per conversation)."""
    vs = res["variants"]
    names = [n for n in ORDER if n in vs]
    if not names:
        return "_No runs yet._"
    main = res["main_facts"]
    first = vs[names[0]]["evals"][main]
    heads = [f"{b['lo']:.1f}–{b['hi']:.1f} s" if b["hi"] is not None else f"≥ {b['lo']:.1f} s" for b in first["bins"]]
    lines = ["| model | seeds | all | inside W | beyond W | " + " | ".join(heads) + " |",
             "|---|---|---|---|---|" + "---|" * len(heads)]
    for n in names:
        e = vs[n]["evals"][main]
        lines.append(f"| {LABELS.get(n, n)} | {len(vs[n]['seeds'])} | {_ms(e['all'])} | {_ms(e['inside'])} | "
                     f"{_ms(e['beyond'])} | " + " | ".join(_ms(b) for b in e["bins"]) + " |")
    lines += ["", f"Recall on held-out voices and fillers, {main} facts per conversation ({first['questions']} "
              f"questions); W = {res['window_s']} s; chance = {res['chance']:.3f}; mean ± std (population) over "
              "seeds; bins by distance from the fact's end to the question's end.", "",
              "| model | facts per conversation | all | inside W | beyond W |", "|---|---|---|---|---|"]
    for n in names:
        for facts in sorted(vs[n]["evals"], key=int):
            e = vs[n]["evals"][facts]
            lines.append(f"| {LABELS.get(n, n)} | {facts} | {_ms(e['all'])} | {_ms(e['inside'])} | "
                         f"{_ms(e['beyond'])} |")
    cross = res.get("cross") or {}
    if cross:
        lines += ["", "| model, across conversations | seeds | B with A's memory | B fresh (no memory) |",
                  "|---|---|---|---|"]
        for n, c in cross.items():
            lines.append(f"| {LABELS.get(n, n)} | {len(c['seeds'])} | {_ms(c['memory']['all'])} | "
                         f"{_ms(c['fresh']['all'])} |")
        c = next(iter(cross.values()))
        lines += ["", f"Each conversation of the {c['facts']}-facts set cut after its last fact: A (every fact) "
                  "runs with `infer --save-memory`, B (the questions still due, "
                  f"{c['questions']} questions) as a new conversation with a fresh KV cache, with `--memory` "
                  "(A's) or without."]
    return "\n".join(lines)


def render_seeds(res: dict) -> str:
    """Markdown: the main eval set's recall per variant and per seed (all / inside W / beyond W)."""
    vs, main = res["variants"], res["main_facts"]
    lines = ["| model | seed | all | inside W | beyond W |", "|---|---|---|---|---|"]
    for n in [n for n in ORDER if n in vs]:
        e = vs[n]["evals"][main]
        cols = [e[k].get("values") or [None] * len(vs[n]["seeds"]) for k in ("all", "inside", "beyond")]
        for i, seed in enumerate(vs[n]["seeds"]):
            cells = " | ".join("–" if c[i] is None else f"{c[i]:.3f}" for c in cols)
            lines.append(f"| {LABELS.get(n, n)} | {seed} | {cells} |")
    return "\n".join(lines)


def update_between_markers(path: Path, text: str, start: str = START, end: str = END) -> None:
    doc = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(doc):
        raise ValueError(f"{path}: markers {start} / {end} not found")
    path.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", doc))


def load_probes(out: Path) -> list[dict]:
    """Every probe record of OUT/probes (experiment.run_probes): the stage-1 model first, then the runs."""
    recs = [json.loads(p.read_text()) for p in sorted((out / "probes").glob("*.json"))]
    return sorted(recs, key=lambda r: (r["run"] != "stage1", r["set"] != "stage2_train", r["run"]))


def render_probes(recs: list[dict]) -> str:
    """Two tables: what the stage-1 model's sources and keys hold (linear probes, across voices), and the oracle
    read-out with each model's own keys, per layer."""
    base = next((r for r in recs if r["run"] == "stage1" and r["set"] == "stage2_train"), None)
    lines = []
    if base is not None:
        layers = sorted(base["key_question"], key=lambda k: int(k[1:]))
        lines += ["| probe (stage-1 model, fitted on 8 training voices, tested on the other 4) | x0 | "
                  + " | ".join(f"layer {k[1:]}" for k in layers) + " | chance |",
                  "|---|---|" + "---|" * len(layers) + "---|"]
        val = base["value"]
        lines.append("| value: the number, from the source's 5-frame window at the fact's end (`x0` / `mlp_input`) | "
                     f"{val['x0']['across']:.3f} | "
                     + " | ".join(f"{val['mlp_input' + k[1:]]['across']:.3f}" for k in layers)
                     + f" | {base['chance']['number']:.3f} |")
        for key, where in (("key_fact", "at the fact's end"), ("key_question", "at the question's end")):
            lines.append(f"| key: the colour, from Z {where} | – | "
                         + " | ".join(f"{base[key][k]['across']:.3f}" for k in layers)
                         + f" | {base['chance']['colour']:.3f} |")
        lines.append("")
    layers = sorted({k for r in recs for k in r["read"]}, key=lambda k: int(k[1:]))
    lines += ["| oracle read-out with the model's own keys | set | questions | "
              + " | ".join(f"layer {k[1:]}" for k in layers) + " | a random fact |",
              "|---|---|---|" + "---|" * len(layers) + "---|"]
    for r in recs:
        n = next(iter(r["read"].values()))["questions"]
        name = "pretrained" if r["run"] == "stage1" else r["run"].rsplit("_seed", 1)[0]
        lines.append(f"| {LABELS.get(name, r['run'])} ({r['run']}) | {r['set']} | {n} | "
                     + " | ".join(f"{r['read'][k]['recall']:.3f}" if k in r["read"] else "–" for k in layers)
                     + f" | {r['read_chance']:.3f} |")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Recall against distance (bin midpoints, the main eval set), one line per variant, ± std shaded; W marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    for n in [n for n in ORDER if n in res["variants"]]:
        bins = res["variants"][n]["evals"][res["main_facts"]]["bins"]
        last = max(b["lo"] for b in bins)
        xs = [(b["lo"] + (b["hi"] if b["hi"] is not None else last * 1.15)) / 2 for b in bins]
        ys = [b["mean"] if b["mean"] is not None else math.nan for b in bins]
        sd = [b["std"] if b["std"] is not None else math.nan for b in bins]
        ax.plot(xs, ys, marker="o", label=LABELS.get(n, n).replace("*", ""))
        ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.15)
    if res["window_s"]:
        ax.axvline(res["window_s"], color="k", ls="--", lw=1)
        ax.text(res["window_s"], 1.02, " W", va="bottom")
    ax.axhline(res["chance"], color="gray", ls=":", lw=1)
    ax.set_xlabel("distance from the fact to the question (s)")
    ax.set_ylabel("recall")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, doc: Path | None = None, readme: Path | None = None, stages: dict | None = None) -> dict:
    """results.json (+ `stages`: seconds of the one-off stages), the plot, and the tables into `doc` / `readme`."""
    if stages is None and (out / "results.json").exists():  # regenerating from the runs keeps the stage times
        stages = json.loads((out / "results.json").read_text()).get("stage_seconds")
    res = {**results(load_runs(out)), "cross": cross_results(load_cross(out)), "stage_seconds": stages or {}}
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    if res["variants"]:
        plot(res, out / "recall_by_distance.png")
    table = render_table(res)
    for path in (doc, readme):
        if path is not None:
            update_between_markers(path, table)
    if doc is not None and res["variants"] and SEEDS_START in doc.read_text():
        update_between_markers(doc, render_seeds(res), SEEDS_START, SEEDS_END)
    probes = load_probes(out) if (out / "probes").exists() else []
    if doc is not None and probes:
        update_between_markers(doc, render_probes(probes), PROBES_START, PROBES_END)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.experiments.spoken.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/spoken_memory")
    p.add_argument("--doc", default=None, help="a markdown file with the markers to fill (docs/spoken-memory.md)")
    p.add_argument("--readme", default=None, help="another one (README.md)")
    a = p.parse_args(argv)
    write(Path(a.out), Path(a.doc) if a.doc else None, Path(a.readme) if a.readme else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
