"""`make docs`: the figures of README.md and docs/*.md, generated from the JSON files the measuring commands
wrote, and the check that the docs name only paths, `moshi-ttt` flags and `moshi_ttt.*` names that exist.

    python -m moshi_ttt.docs_gen [--root DIR] [--check]

Two kinds of generated text, each named in `BLOCKS` / `FIGURES` with the one JSON file it comes from:
* blocks (tables), between `<!-- NAME:start -->` and `<!-- NAME:end -->` on lines of their own;
* figures inside prose, as spans `<!--fig:NAME-->TEXT<!--/fig-->`.
The experiments' blocks (memory-table, cross-table, spoken-memory, spoken-seeds, spoken-probes) are rendered
here by their own modules' `render_*` from their results files, so a stale one is caught too; `make docs` also
runs the spoken report, which rewrites its results and plot from the run records. `--check` exits 1 naming every
stale block or span and every dead path, flag or module (`problems`); without it the docs are rewritten
(`write`).
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import re
import statistics
import sys
import typing as tp
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/*.md")

BLOCK_RE = re.compile(r"^<!-- ([a-z0-9-]+):start -->\n(.*?)^<!-- \1:end -->$", re.S | re.M)
SPAN_RE = re.compile(r"<!--fig:([a-z0-9_.-]+)-->(.*?)<!--/fig-->", re.S)

GiB = 2**30


@dataclass(frozen=True)
class Gen:
    source: str  # the JSON file under the root it is generated from
    render: tp.Callable[[tp.Any], str]


# -- sources -----------------------------------------------------------------------------------------


def _load(root: Path, source: str) -> tp.Any:
    path = root / source
    if not path.is_file():
        raise FileNotFoundError(f"docs_gen: {source} missing (written by the command that measures it)")
    return json.loads(path.read_text())


def measured(d: dict) -> str:
    """When, where and under what load a bench file was measured, and over how many repeats."""
    when = d.get("when", "(date not recorded)")
    load = d.get("loadavg")
    load = (f"1-minute load {load['before'][0]:.2f} → {load['after'][0]:.2f}" if load else "load not recorded")
    runs = d.get("repeats", 1)
    return f"{when} on {d['machine']}, {load}, {runs} run{'s' if runs > 1 else ''}"


def ratio(d: dict, key: str, fmt: str = "{:.3f}×") -> str:
    """A median with its spread over the repeats (`bench --repeats`), e.g. `1.065× (1.05–1.08)`."""
    text = fmt.format(d[key])
    lo_hi = d.get("spread", {}).get(key)
    if lo_hi and lo_hi[0] != lo_hi[1]:
        num = fmt.replace("×", "")
        text += f" ({num.format(lo_hi[0])}–{num.format(lo_hi[1])})"
    return text


def num(x: float, digits: int = 2) -> str:
    """`x` with `digits` decimals (more for a value that would round to 0), and a typographic minus."""
    while digits < 4 and x != 0 and abs(x) < 10 ** -digits:
        digits += 1
    return f"{x:.{digits}f}".replace("-", "−")


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.pstdev(xs):.3f}"


def recall(res: dict, variant: str, key: str = "beyond_acc") -> str:
    """Mean ± std over seeds of the symbolic memory experiment (docs/memory_experiment/results.json)."""
    return _mean_std([s[key] for s in res["variants"][variant]["seeds"]])


def _minsec(s: float) -> str:
    m, s = divmod(round(s), 60)
    return f"{m} min {s} s" if m else f"{s} s"


# -- blocks ------------------------------------------------------------------------------------------

def _rows(text: str) -> list[tuple[str, str, str, str]]:
    """Table rows (key, label, goal, format), written one a line as `key | goal | format | label` (an indented
    line continues the label)."""
    rows: list[list[str]] = []
    for line in text.strip().splitlines():
        if line.startswith(" "):
            rows[-1][3] += " " + line.strip()
        else:
            rows.append([cell.strip() for cell in line.split(" | ", 3)])
    return [(key, label, goal, fmt) for key, goal, fmt, label in rows]


ROWS_7B = _rows("""
moshi7b_mlp_ratio_b1 | ≤ 1.10 | {:.3f}× | MLP, `TTTGating` / moshi `ActivationGating`, B = 1 (mean over 2
    chunks, folds included)
moshi7b_mlp_ms_base_b1 |  | {:.1f} | … base MLP step (ms)
moshi7b_mlp_max_step_ratio_b1 | reported | {:.2f}× | … worst TTT step (a fold step) / base median
moshi7b_mlp_ratio_b4 | ≤ 1.6 | {:.3f}× | MLP, B = 4
moshi7b_mlp_ms_base_b4 |  | {:.1f} | … base MLP step, B = 4 (ms)
moshi7b_layer_ratio_b1 | ≤ 1.05 | {:.3f}× | whole transformer layer, KV cache {moshi7b_layer_kv_frames} frames, B = 1
moshi7b_layer_ms_base_b1 |  | {:.1f} | … base layer step (ms)
moshi7b_state_bytes_per_conversation | reported | {:,} | fast state per conversation, 6 TTT layers, C = 256,
    bf16 model (bytes)
moshi7b_mlp_ratio_b1_bf16state | ≤ 1.10 | {:.3f}× | MLP, B = 1, bf16 fast-weight state (stochastic-rounding folds)
moshi7b_layer_ratio_b1_bf16state | ≤ 1.05 | {:.3f}× | whole layer, B = 1, bf16 fast-weight state
moshi7b_state_bytes_per_conversation_bf16state | reported | {:,} | fast state per conversation, bf16
    fast-weight state (bytes)
""")

BYTES_ROWS = [  # (label, key stem)
    ("base layer", "base_layer"),
    ("TTT layer (this design: per-conversation fast weight replaces W_down, fold once per chunk)", "ttt_layer"),
    ("TTT layer, per-frame fold design (three fp32 passes over the fast state per frame)", "per_frame_fold_layer"),
]

ROWS_512 = _rows("""
stream_step_ratio_median | ≤ 1.08 | {:.3f}× | dim-512 LM: TTTLMGen.step, TTT every 6th layer / LMGen base — median
stream_step_ratio_p99 | ≤ 1.5 | {:.3f}× | dim-512 LM: … — p99
stream_step_ms_base |  | {:.1f} | dim-512 LM: LMGen.step base (ms, median)
stream_step_ratio_median_every_layer |  | {:.3f}× | dim-512 LM: TTT in every layer / base — median
stream_step_ratio_p99_every_layer |  | {:.3f}× | dim-512 LM: TTT in every layer / base — p99
train_step_ratio | ≤ 1.15 | {:.3f}× | LMModel.forward+backward, T = {train_T}, C = {train_chunk} / base — time
train_peak_mem_ratio | ≤ 1.2 | {:.3f}× | … activation memory saved for backward / base
stream_vs_parallel_max_abs |  | {:.1e} | streaming vs parallel logits, whole model, fp32 (max abs)
state_bytes_per_conversation |  | {:,} | fast state per conversation (bytes, 2 TTT layers, C = {stream_chunk})
long_run_state_bytes_growth | 0 | {} | state growth over {long_run_steps} streaming steps (bytes)
long_run_rss_growth_mb | flat | {:.1f} | process RSS growth over the same run (MiB)
server_realtime_speed_1 | ≥ 1.5 | {:.2f}× | server realtime speed (audio s / wall s), 1 client in another
    process (demo)
server_realtime_speed_4 | ≥ 1.2 | {:.2f}× | server realtime speed (audio s / wall s), 4 clients in another
    process (demo)
layer_stream_ratio_median |  | {:.2f}× | layer alone, streaming step / MLP — median (d={layer_d},
    h={layer_h}, C={layer_chunk})
layer_stream_ratio_p99 |  | {:.2f}× | layer alone, streaming step / MLP — p99
layer_train_ratio |  | {:.2f}× | layer alone, forward+backward / MLP, T = {layer_train_T}
layer_train_act_mem_ratio |  | {:.2f}× | layer alone, activation memory / MLP
""")


def _measure_table(d: dict, rows: list, head: str) -> str:
    out = [head, "|---|---|---|"]
    for key, label, goal, fmt in rows:
        if key in d:
            value = ratio(d, key, fmt) if isinstance(d[key], float) else fmt.format(d[key])
            out.append(f"| {label.format(**d)} | {value} | {goal} |")
    out += ["", f"Measured {measured(d)}; a range is min–max over the runs."]
    return "\n".join(out)


def table_7b(d: dict) -> str:
    return _measure_table(d, ROWS_7B, f"| measure (d 4096, h 11264, fp32, chunk {d['moshi7b_chunk']}) | value | goal |")


def table_512(d: dict) -> str:
    return _measure_table(d, ROWS_512, "| measure | value | goal |")


def table_bytes(d: dict) -> str:
    """Computed bytes per frame (bf16 weights, KV window full, C = 256), not measured."""
    out = ["| per frame, computed | B = 1 | B = 4 |", "|---|---|---|"]
    for label, stem in BYTES_ROWS:
        cells = [f"{d[f'moshi7b_bytes_{stem}_b{b}'] / 1e6:,.0f} MB" for b in (1, 4)]
        if stem != "base_layer":
            cells = [f"{c} ({d[f'moshi7b_bytes_{stem}_ratio_b{b}']:.2f}×)" for c, b in zip(cells, (1, 4))]
        out.append(f"| {label} | {cells[0]} | {cells[1]} |")
    for label, stem in (("whole model, TTT in 6 of 32 layers (this design)", "model_ratio"),
                        ("whole model, per-frame fold design", "per_frame_fold_model_ratio")):
        out.append(f"| {label} | {d[f'moshi7b_bytes_{stem}_b1']:.3f}× | {d[f'moshi7b_bytes_{stem}_b4']:.3f}× |")
    return "\n".join(out)


def key_figures(src: dict) -> str:
    q, mem = src["docs/bench_quick.json"], src["docs/memory_experiment/results.json"]
    chance = mem["chance"]
    rows = [
        ("Moshi 7B shapes, MLP, `TTTGating` / moshi `ActivationGating`, B = 1, fp32, chunk "
         f"{q['moshi7b_chunk']}, folds included ([cost](docs/cost.md#per-frame-moshi-ttt-bench))",
         f"{ratio(q, 'moshi7b_mlp_ratio_b1')} (goal ≤ 1.10)"),
        (f"Moshi 7B shapes, whole transformer layer, KV cache {q['moshi7b_layer_kv_frames']} frames, B = 1",
         f"{ratio(q, 'moshi7b_layer_ratio_b1')} (goal ≤ 1.05)"),
        ("Moshi 7B on a GPU, bytes per frame, whole model with TTT in 6 of 32 layers (computed)",
         f"{q['moshi7b_bytes_model_ratio_b1']:.3f}× at B = 1, {q['moshi7b_bytes_model_ratio_b4']:.3f}× at B = 4"),
        ("Moshi 7B, added parameters, asserted by a test ([cost](docs/cost.md#moshi-7b-with-configsmoshi7b_tttyaml))",
         "100,786,176 (1.31 % of 7.69 B)"),
        ("Moshi 7B, fast state per conversation, fp32 / bf16 state (it does not grow with the conversation; "
         "[capacity](docs/capacity.md))",
         f"{q['moshi7b_state_bytes_per_conversation'] / 1e9:.3f} GB / "
         f"{q['moshi7b_state_bytes_per_conversation_bf16state'] / 1e9:.3f} GB"),
        ("demo server, realtime speed (audio s / wall s) with 1 / 4 clients "
         "([serving](docs/serving.md#serving-performance))",
         f"{ratio(q, 'server_realtime_speed_1', '{:.2f}×')} / {ratio(q, 'server_realtime_speed_4', '{:.2f}×')}"),
        ("key→value recall beyond the attention window, 5 seeds ([memory experiment](docs/memory-experiment.md))",
         f"TTT {recall(mem, 'ttt')}; no TTT {recall(mem, 'base')} (chance {chance:g}); full window "
         f"{recall(mem, 'base_full_window')}"),
    ]
    out = ["| | |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows), "",
           f"Bench figures: [`docs/bench_quick.json`](docs/bench_quick.json), measured {measured(q)}; a range "
           "is min–max over the runs."]
    return "\n".join(out)


def capacity_table(d: dict) -> str:
    from moshi_ttt.apps.bench import capacity

    return capacity.markdown(d)


def demo_codec_table(d: dict) -> str:
    def row(name: str, r: dict, sound: str) -> str:
        return (f"| {name} | {num(r['mel_correlation'])} / {num(r['mel_correlation_min'])} | "
                f"{num(r['si_snr_db'], 1)} dB | {sound} |")
    q4, rnd = d["trained"]["q4"], d["random_v4"]["q4"]
    env = q4["listening"]["envelope_correlation"]
    return "\n".join([
        "| demo codec | mel correlation (mean / min) | SI-SNR | what it sounds like (objective proxies) |",
        "|---|---|---|---|",
        row("random (before, DEMO_VERSION 4)", rnd, "the same 25 Hz buzz whatever the input"),
        row("trained (shipped, 4 codebooks)", q4,
            f"the input's rhythm (envelope r = {env:.2f}) and spectral shape, unvoiced: a whisper"),
        "", f"{q4['utterances']} held-out utterances; [`docs/demo_codec.json`](docs/demo_codec.json)."])


def bf16_state_table(d: dict) -> str:
    rows = [("MLP, B = 1 (mean over 2 chunks, folds included)", "moshi7b_mlp_ratio_b1", "{:.3f}", "≤ 1.10"),
            ("… worst step (the fold step) / base median", "moshi7b_mlp_max_step_ratio_b1", "{:.1f}×", "reported"),
            (f"whole layer, B = 1, KV {d['moshi7b_layer_kv_frames']} frames", "moshi7b_layer_ratio_b1", "{:.3f}",
             "≤ 1.05")]
    out = ["| ratio TTT / base | fp32 state | bf16 state (stochastic) | bound |", "|---|---|---|---|",
           *(f"| {label} | {ratio(d, key, fmt)} | {ratio(d, key + '_bf16state', fmt)} | {bound} |"
             for label, key, fmt, bound in rows),
           f"| fast state per conversation (bytes, 7B, C = 256) | {d['moshi7b_state_bytes_per_conversation']:,} | "
           f"{d['moshi7b_state_bytes_per_conversation_bf16state']:,} | — |",
           "", f"Measured {measured(d)}."]
    return "\n".join(out)


def step_gap_table(d: dict) -> str:
    rows = [("others plain", d["baseline"]), ("others saving and resuming", d["with_memory"])]
    cells = ("gap_ms_max", "gap_ms_p99", "gap_ms_median")
    return "\n".join(["| | longest gap between the running conversation's reply frames | p99 | median |",
                      "|---|---|---|---|",
                      *(f"| {name} | " + " | ".join(f"{r[c]:.1f} ms" for c in cells) + " |" for name, r in rows)])


def profile_table(d: dict) -> str:
    return d["server_profile_table"] + f"\n\nMeasured {measured(d)}, `--profile` (`--workers 0`)."


def _experiment_block(module: str, fn: str = "render_table") -> tp.Callable[[tp.Any], str]:
    def render(res: tp.Any) -> str:
        import importlib

        return getattr(importlib.import_module(module), fn)(res)
    return render


def _spoken_probes(_: tp.Any, root: Path | None = None) -> str:
    from moshi_ttt.experiments.spoken import report

    return report.render_probes(report.load_probes((root or ROOT) / "docs/spoken_memory"))


# name → (source JSON, renderer); a renderer given the whole `src` mapping names its sources in `MULTI`.
BLOCKS: dict[str, Gen] = {
    "key-figures": Gen("docs/bench_quick.json, docs/memory_experiment/results.json", key_figures),
    "cost-7b": Gen("docs/bench_quick.json", table_7b),
    "cost-bytes": Gen("docs/bench_quick.json", table_bytes),
    "cost-512": Gen("docs/bench_quick.json", table_512),
    "capacity-table": Gen("docs/capacity.json", capacity_table),
    "capacity-bf16-speed": Gen("docs/bench_quick.json", bf16_state_table),
    "demo-codec": Gen("docs/demo_codec.json", demo_codec_table),
    "serve-profile": Gen("docs/bench_profile.json", profile_table),
    "memory-step-gap": Gen("docs/memory_step_gap.json", step_gap_table),
    "memory-table": Gen("docs/memory_experiment/results.json",
                        _experiment_block("moshi_ttt.experiments.memory_experiment")),
    "cross-table": Gen("docs/memory_experiment/cross_results.json",
                       _experiment_block("moshi_ttt.experiments.memory_cross")),
    "spoken-memory": Gen("docs/spoken_memory/results.json",
                         _experiment_block("moshi_ttt.experiments.spoken.report")),
    "spoken-probes": Gen("docs/spoken_memory/results.json", _spoken_probes),
    "spoken-seeds": Gen("docs/spoken_memory/results.json",
                        _experiment_block("moshi_ttt.experiments.spoken.report", "render_seeds")),
}
MULTI = {"key-figures": tuple(BLOCKS["key-figures"].source.split(", "))}

Q, F7, MEM, CAP = ("docs/bench_quick.json", "docs/bench_full_moshi7b.json", "docs/memory_experiment/results.json",
                   "docs/capacity.json")
FIGURES: dict[str, Gen] = {
    # the quick bench (docs/cost.md, docs/serving.md, docs/demo.md)
    "quick.when": Gen(Q, measured),
    "quick.seconds": Gen(Q, lambda d: _minsec(d["bench_seconds"])),
    "quick.mlp_b1": Gen(Q, lambda d: ratio(d, "moshi7b_mlp_ratio_b1")),
    "quick.mlp_b4": Gen(Q, lambda d: ratio(d, "moshi7b_mlp_ratio_b4")),
    "quick.layer_b1": Gen(Q, lambda d: ratio(d, "moshi7b_layer_ratio_b1")),
    "quick.train": Gen(Q, lambda d: ratio(d, "train_step_ratio")),
    "quick.layer_alone": Gen(Q, lambda d: ratio(d, "layer_stream_ratio_median", "{:.2f}×")),
    "quick.speed_1": Gen(Q, lambda d: ratio(d, "server_realtime_speed_1", "{:.2f}×")),
    "quick.speed_4": Gen(Q, lambda d: ratio(d, "server_realtime_speed_4", "{:.2f}×")),
    "quick.step_ms_1": Gen(Q, lambda d: f"{d['server_step_ms_1']:.1f} ms"),
    "quick.step_ms_4": Gen(Q, lambda d: f"{d['server_step_ms_4']:.1f} ms"),
    "quick.transport": Gen(Q, lambda d: f"in {d['server_transport_in_ms']:.3f} ms, out "
                                        f"{d['server_transport_out_ms']:.3f} ms"),
    "quick.state_bytes": Gen(Q, lambda d: f"{d['moshi7b_state_bytes_per_conversation']:,} bytes "
                                          f"({d['moshi7b_state_bytes_per_conversation'] / GiB:.2f} GiB)"),
    "quick.state_gb": Gen(Q, lambda d: f"{d['moshi7b_state_bytes_per_conversation'] / 1e9:.3f} GB"),
    "quick.state_bf16_gb": Gen(Q, lambda d: f"{d['moshi7b_state_bytes_per_conversation_bf16state'] / 1e9:.3f} GB"),
    # fp32 state = w fp32 + its bf16 copy + buffers, bf16 state = w bf16 + the same buffers: the copy is half the gap
    "quick.bf16_copy_gib": Gen(Q, lambda d: f"{(d['moshi7b_state_bytes_per_conversation'] - d['moshi7b_state_bytes_per_conversation_bf16state']) / 2 / GiB:.2f} GiB"),  # noqa: E501
    "quick.mlp_ms_b1": Gen(Q, lambda d: f"{d['moshi7b_mlp_ms_base_b1']:.0f} ms"),
    # the older quick run kept for its server profile (docs/cost.md compares it)
    "profile.train": Gen("docs/bench_profile.json", lambda d: ratio(d, "train_step_ratio")),
    "profile.mlp_b4": Gen("docs/bench_profile.json", lambda d: ratio(d, "moshi7b_mlp_ratio_b4")),
    "profile.layer_alone": Gen("docs/bench_profile.json", lambda d: ratio(d, "layer_stream_ratio_median", "{:.2f}×")),
    "profile.mlp_ms_b1": Gen("docs/bench_profile.json", lambda d: f"{d['moshi7b_mlp_ms_base_b1']:.0f} ms"),
    # the full 7B section (docs/cost.md)
    "full7b.mlp_b1": Gen(F7, lambda d: ratio(d, "moshi7b_mlp_ratio_b1")),
    "full7b.mlp_b4": Gen(F7, lambda d: ratio(d, "moshi7b_mlp_ratio_b4")),
    "full7b.layer_b1": Gen(F7, lambda d: ratio(d, "moshi7b_layer_ratio_b1")),
    "full7b.worst": Gen(F7, lambda d: f"{d['moshi7b_mlp_max_step_ratio_b1']:.1f}×"),
    "full7b.kv": Gen(F7, lambda d: f"{d['moshi7b_layer_kv_frames']}"),
    "full7b.seconds": Gen(F7, lambda d: _minsec(d["bench_seconds"])),
    # the symbolic memory experiment
    "mem.ttt": Gen(MEM, lambda d: recall(d, "ttt")),
    "mem.bf16": Gen(MEM, lambda d: recall(d, "ttt_bf16state")),
    "mem.rtn": Gen(MEM, lambda d: recall(d, "ttt_bf16state_rtn")),
    "mem.base": Gen(MEM, lambda d: recall(d, "base")),
    "mem.ttt_w8": Gen(MEM, lambda d: recall(d, "ttt_w8")),
    "mem.ttt_w32_inside": Gen(MEM, lambda d: recall(d, "ttt_w32", "inside_acc")),
    "cross.resumed": Gen("docs/memory_experiment/cross_results.json",
                         lambda d: _mean_std([r["acc"] for r in d["arms"]["ttt_exact"]["seeds"]])),
    "cross.heard": Gen("docs/memory_experiment/cross_results.json",
                       lambda d: _mean_std([r["acc_value_heard"] for r in d["arms"]["ttt_exact"]["seeds"]])),
    # capacity (computed)
    "cap.fp32_80": Gen(CAP, lambda d: f"{d['capacity_row1_conversations_80gb']}"),
    "cap.base_80": Gen(CAP, lambda d: f"{d['capacity_row0_conversations_80gb']}"),
    "cap.bf16_80": Gen(CAP, lambda d: f"{d['capacity_row2_conversations_80gb']}"),
    "cap.fp32_state_gb": Gen(CAP, lambda d: f"{d['capacity_row1_state_bytes'] / 1e9:.3f} GB"),
    "cap.bf16_state_gb": Gen(CAP, lambda d: f"{d['capacity_row2_state_bytes'] / 1e9:.3f} GB"),
    "cap.base_141": Gen(CAP, lambda d: f"{d['capacity_row0_conversations_141gb']}"),
    "cap.fp32_141": Gen(CAP, lambda d: f"{d['capacity_row1_conversations_141gb']}"),
    "cap.base_conv_bytes": Gen(CAP, lambda d: f"{d['capacity_row0_per_conversation_bytes']:,}"),
    "cap.fp32_conv_bytes": Gen(CAP, lambda d: f"{d['capacity_row1_per_conversation_bytes']:,}"),
    # the demo (docs/demo_lm.json: held-out utterances, `infer` of the shipped checkpoint)
    "demo.echo": Gen("docs/demo_lm.json", lambda d: f"{d['held_out_infer']['echo']:.2f}"),
    "demo.unrelated": Gen("docs/demo_lm.json", lambda d: f"{d['held_out_infer']['unrelated']:.2f}"),
    "demo.utterances": Gen("docs/demo_lm.json", lambda d: f"{d['held_out_infer']['utterances']}"),
    # the memory save/restore gap (scripts/memory_step_gap.py)
    "gap.pause": Gen("docs/memory_step_gap.json", lambda d: f"{d['memory_step_pause_ms_mean']:.2f} ms"),
    "gap.pauses": Gen("docs/memory_step_gap.json", lambda d: f"{d['memory_step_pauses']}"),
    "gap.save": Gen("docs/memory_step_gap.json", lambda d: f"{d['memory_save_ms_mean']:.1f} ms"),
    "gap.restore": Gen("docs/memory_step_gap.json", lambda d: f"{d['memory_restore_ms_mean']:.1f} ms"),
    # the test suite (moshi_ttt.testing.suite_record, written by `make test` / `make test-fast`)
    "suite.full": Gen("docs/test_suite.json", lambda d: _suite(d)),
    "suite.fast": Gen("docs/test_suite_fast.json", lambda d: _suite(d)),
}


def _suite(d: dict) -> str:
    count = "" if d.get("passed") is None else f"{d['passed']} tests passed, "
    return f"{count}{_minsec(d['seconds'])} of pytest ({d['when'][:10]}, {d['machine']})"


# -- generating --------------------------------------------------------------------------------------


def doc_files(root: Path) -> list[Path]:
    return sorted(p for pattern in DOCS for p in root.glob(pattern))


class Sources:
    """The JSON files, each read once."""

    def __init__(self, root: Path):
        self.root = root

    @functools.cache  # noqa: B019 (one instance per generation)
    def get(self, source: str) -> tp.Any:
        return _load(self.root, source)


def _render_block(name: str, src: Sources) -> str:
    gen = BLOCKS[name]
    if name in MULTI:
        return gen.render({s: src.get(s) for s in MULTI[name]})
    if gen.render is _spoken_probes:
        return _spoken_probes(None, src.root)
    return gen.render(src.get(gen.source))


def render(text: str, src: Sources, where: str = "") -> str:
    """`text` with every block and span regenerated; KeyError naming the doc and the name for an unknown one."""
    def block(m: re.Match) -> str:
        name = m.group(1)
        if name not in BLOCKS:
            raise KeyError(f"{where}: block '{name}' is not in moshi_ttt.docs_gen.BLOCKS")
        return f"<!-- {name}:start -->\n{_render_block(name, src).rstrip()}\n<!-- {name}:end -->"

    def span(m: re.Match) -> str:
        name = m.group(1)
        if name not in FIGURES:
            raise KeyError(f"{where}: figure '{name}' is not in moshi_ttt.docs_gen.FIGURES")
        return f"<!--fig:{name}-->{FIGURES[name].render(src.get(FIGURES[name].source))}<!--/fig-->"
    return SPAN_RE.sub(span, BLOCK_RE.sub(block, text))


def generate(root: Path = ROOT) -> dict[Path, str]:
    """Every doc whose generated text differs from its sources → its regenerated text."""
    src = Sources(root)
    out = {}
    for path in doc_files(root):
        text = path.read_text()
        new = render(text, src, str(path.relative_to(root)))
        if new != text:
            out[path] = new
    return out


def stale(root: Path = ROOT) -> list[str]:
    """'doc: name' for every block or span whose text differs from what its source generates."""
    found = []
    src = Sources(root)
    for path in doc_files(root):
        rel = path.relative_to(root)
        for m in BLOCK_RE.finditer(path.read_text()):
            if render(m.group(0), src, str(rel)) != m.group(0):
                found.append(f"{rel}: block {m.group(1)} differs from {BLOCKS[m.group(1)].source}")
        for m in SPAN_RE.finditer(path.read_text()):
            if render(m.group(0), src, str(rel)) != m.group(0):
                found.append(f"{rel}: figure {m.group(1)} reads '{m.group(2)}', {FIGURES[m.group(1)].source} "
                             f"gives '{render(m.group(0), src, str(rel))[len(m.group(1)) + 10:-9]}'")
    return found


def write(root: Path = ROOT) -> list[Path]:
    changed = generate(root)
    for path, text in changed.items():
        path.write_text(text)
    return sorted(changed)


# -- what the docs name ------------------------------------------------------------------------------

# Files the commands write that are not committed (a doc may name them as outputs).
OUTPUTS = {"docs/bench_gpu.json", "docs/bench_gpu.log"}
# Flags a doc names on their own (`--flag` in code) that belong to no `moshi-ttt` command: where each is defined
# (a file that must contain it), or None for another tool's.
FOREIGN_FLAGS = {
    "--no-deps": None,  # pip
    "--eval-only": "scripts/train_demo_lm.py",
    "--eta": "moshi_ttt/experiments/memory_experiment.py",
    "--steps": "moshi_ttt/experiments/memory_experiment.py",
    "--ttt-layer": "moshi_ttt/experiments/memory_experiment.py",
    "--variants": "moshi_ttt/experiments/spoken/experiment.py",
}
TOP = ("docs", "configs", "moshi_ttt", "server", "scripts", "tests", "deploy", ".ci")
PATH_RE = re.compile(r"(?<![\w/.$~{-])((?:\.\./)?(?:" + "|".join(re.escape(t) for t in TOP)
                     + r")/[\w./*-]*|Makefile|pyproject\.toml)")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
MODULE_RE = re.compile(r"(?<![\w.])moshi_ttt(?:\.\w+)+")
CODE_RE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND_RE = re.compile(r"moshi-ttt (bench|infer|memory|serve|train)\b([^`\n|;&]*)")
LONE_FLAG_RE = re.compile(r"`(--[a-z][a-z0-9-]*)[^`]*`")


def _module_file(root: Path, parts: list[str]) -> Path | None:
    """The source file of `moshi_ttt.<parts>` in the tree (server/ is moshi_ttt.server, configs/ its configs)."""
    base = {"server": root / "server", "configs": root / "configs"}.get(parts[0], root / "moshi_ttt" / parts[0])
    path = base.joinpath(*parts[1:])
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def _names(tree: ast.AST) -> set[str]:
    names = set()
    for node in getattr(tree, "body", []):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def module_exists(root: Path, dotted: str) -> bool:
    """`moshi_ttt.a.b` is a module of the tree, or `moshi_ttt.a.b.name[.attr]` a name defined in one."""
    parts = dotted.split(".")[1:]
    for n in range(len(parts), 0, -1):
        path = _module_file(root, parts[:n])
        if path is None:
            continue
        rest = parts[n:]
        if not rest:
            return True
        tree = ast.parse(path.read_text())
        for name in rest:
            if name not in _names(tree):
                return False
            tree = next((node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name), None)
            if tree is None:
                return True  # an attribute of a function or value: the name exists
        return True
    return not parts


@functools.cache
def command_flags() -> dict[str, set[str]]:
    """Every option string of each `moshi-ttt` subcommand (subcommands of its own included)."""
    import importlib

    from moshi_ttt.apps.commands import COMMANDS

    def collect(p: argparse.ArgumentParser) -> set[str]:
        flags = set()
        for a in p._actions:
            flags |= {s for s in a.option_strings if s.startswith("--")}
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    flags |= collect(sub)
        return flags

    out = {}
    for name, (modname, _) in COMMANDS.items():
        p = argparse.ArgumentParser(prog=f"moshi-ttt {name}")
        importlib.import_module(modname).add_args(p)
        out[name] = collect(p)
    return out


def dead_references(root: Path = ROOT) -> list[str]:
    """'doc: what' for every path, `moshi-ttt` flag or `moshi_ttt.*` module or name a doc names that does not
    exist. Paths: markdown links (relative to the doc) and repository paths (docs/…, moshi_ttt/…, …) anywhere;
    flags: inside `moshi-ttt SUBCOMMAND …` in code, and a code span that starts with one (a flag of some
    command, or one of `FOREIGN_FLAGS`); modules: every `moshi_ttt.x.y` word."""
    found = []
    flags = command_flags()
    any_command = set().union(*flags.values())
    for path in doc_files(root):
        rel = path.relative_to(root)
        text = path.read_text()
        for target in LINK_RE.findall(text):
            target = target.split("#")[0]
            if not target or re.match(r"[a-z]+:", target):
                continue
            if not (path.parent / target).exists():
                found.append(f"{rel}: link to {target}, which does not exist")
        for p in PATH_RE.findall(text):
            p = p.rstrip(".,:;)")
            base = path.parent if p.startswith("../") else root
            if p in OUTPUTS or "*" in p and any(base.glob(p)) or (base / p).exists():
                continue
            found.append(f"{rel}: path {p}, which does not exist")
        for m in sorted(set(MODULE_RE.findall(text))):
            if not module_exists(root, m):
                found.append(f"{rel}: {m}, which is no module or name of the package")
        for code in CODE_RE.findall(text):
            for sub, args in COMMAND_RE.findall(code):
                for flag in FLAG_RE.findall(args):
                    if flag not in flags[sub]:
                        found.append(f"{rel}: moshi-ttt {sub} {flag}, which is no flag of moshi-ttt {sub}")
        for flag in LONE_FLAG_RE.findall(text):
            if flag in any_command:
                continue
            owner = FOREIGN_FLAGS.get(flag, "")
            if owner == "" or owner and f'"{flag}"' not in (root / owner).read_text():
                found.append(f"{rel}: {flag}, which is no flag of moshi-ttt" + (f" nor of {owner}" if owner else ""))
    return found


def problems(root: Path = ROOT) -> list[str]:
    return stale(root) + dead_references(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moshi_ttt.docs_gen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this checkout)")
    p.add_argument("--check", action="store_true", help="change nothing: list stale figures and dead references")
    a = p.parse_args(argv)
    if a.check:
        found = problems(a.root)
        print("\n".join(found) or "docs: every generated figure is current and every reference exists")
        return 1 if found else 0
    for path in write(a.root):
        print(f"regenerated {path.relative_to(a.root)}")
    dead = dead_references(a.root)
    print("\n".join(dead), file=sys.stderr)
    return 1 if dead else 0


if __name__ == "__main__":
    sys.exit(main())
