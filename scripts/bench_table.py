"""Markdown tables for docs/cost.md from `moshi-ttt bench --json` output.

    moshi-ttt bench --json > docs/bench.json && python scripts/bench_table.py docs/bench.json
"""

from __future__ import annotations

import json
import sys

# (key, label, goal or "", format)
ROWS_7B = [
    ("moshi7b_mlp_ratio_b1", "MLP, `TTTGating` / moshi `ActivationGating`, B = 1 (mean over 2 chunks, folds included)",
     "≤ 1.10", "{:.3f}×"),
    ("moshi7b_mlp_ms_base_b1", "… base MLP step (ms)", "", "{:.1f}"),
    ("moshi7b_mlp_max_step_ratio_b1", "… worst TTT step (a fold step) / base median", "reported", "{:.2f}×"),
    ("moshi7b_mlp_ratio_b4", "MLP, B = 4", "≤ 1.6", "{:.3f}×"),
    ("moshi7b_mlp_ms_base_b4", "… base MLP step, B = 4 (ms)", "", "{:.1f}"),
    ("moshi7b_layer_ratio_b1", "whole transformer layer, KV cache {moshi7b_layer_kv_frames} frames, B = 1", "≤ 1.05",
     "{:.3f}×"),
    ("moshi7b_layer_ms_base_b1", "… base layer step (ms)", "", "{:.1f}"),
    ("moshi7b_state_bytes_per_conversation", "fast state per conversation, 6 TTT layers, C = 256, bf16 model (bytes)",
     "reported", "{:,}"),
    ("moshi7b_mlp_ratio_b1_bf16state", "MLP, B = 1, bf16 fast-weight state (stochastic-rounding folds)", "≤ 1.10",
     "{:.3f}×"),
    ("moshi7b_layer_ratio_b1_bf16state", "whole layer, B = 1, bf16 fast-weight state", "≤ 1.05", "{:.3f}×"),
    ("moshi7b_state_bytes_per_conversation_bf16state", "fast state per conversation, bf16 fast-weight state (bytes)",
     "reported", "{:,}"),
]

BYTES_ROWS = [  # (label, key stem)
    ("base layer", "base_layer"),
    ("TTT layer (this design: per-conversation fast weight replaces W_down, fold once per chunk)", "ttt_layer"),
    ("TTT layer, per-frame fold design (three fp32 passes over the fast state per frame)", "per_frame_fold_layer"),
]

ROWS = [
    ("stream_step_ratio_median", "dim-512 LM: TTTLMGen.step, TTT every 6th layer / LMGen base — median", "≤ 1.08",
     "{:.3f}×"),
    ("stream_step_ratio_p99", "dim-512 LM: … — p99", "≤ 1.5", "{:.3f}×"),
    ("stream_step_ms_base", "dim-512 LM: LMGen.step base (ms, median)", "", "{:.1f}"),
    ("stream_step_ratio_median_every_layer", "dim-512 LM: TTT in every layer / base — median", "", "{:.3f}×"),
    ("stream_step_ratio_p99_every_layer", "dim-512 LM: TTT in every layer / base — p99", "", "{:.3f}×"),
    ("train_step_ratio", "LMModel.forward+backward, T = {train_T}, C = {train_chunk} / base — time", "≤ 1.15",
     "{:.3f}×"),
    ("train_peak_mem_ratio", "… activation memory saved for backward / base", "≤ 1.2", "{:.3f}×"),
    ("stream_vs_parallel_max_abs", "streaming vs parallel logits, whole model, fp32 (max abs)", "", "{:.1e}"),
    ("state_bytes_per_conversation", "fast state per conversation (bytes, 2 TTT layers, C = {stream_chunk})", "",
     "{:,}"),
    ("long_run_state_bytes_growth", "state growth over {long_run_steps} streaming steps (bytes)", "0", "{}"),
    ("long_run_rss_growth_mb", "process RSS growth over the same run (MiB)", "flat", "{:.1f}"),
    ("server_realtime_speed_1", "server realtime speed (audio s / wall s), 1 client in another process (demo)",
     "≥ 1.5", "{:.2f}×"),
    ("server_realtime_speed_4", "server realtime speed (audio s / wall s), 4 clients in another process (demo)",
     "≥ 1.2", "{:.2f}×"),
    ("layer_stream_ratio_median", "layer alone, streaming step / MLP — median (d={layer_d}, h={layer_h}, "
                                  "C={layer_chunk})", "", "{:.2f}×"),
    ("layer_stream_ratio_p99", "layer alone, streaming step / MLP — p99", "", "{:.2f}×"),
    ("layer_train_ratio", "layer alone, forward+backward / MLP, T = {layer_train_T}", "", "{:.2f}×"),
    ("layer_train_act_mem_ratio", "layer alone, activation memory / MLP", "", "{:.2f}×"),
]


def table_7b(res: dict) -> str:
    out = ["| measure (d 4096, h 11264, fp32, chunk {moshi7b_chunk}) | value | goal |".format(**res), "|---|---|---|"]
    for key, label, goal, fmt in ROWS_7B:
        if key in res:
            out.append(f"| {label.format(**res)} | {fmt.format(res[key])} | {goal} |")
    return "\n".join(out)


def table_bytes(res: dict) -> str:
    """Computed bytes per frame (bf16 weights, KV window full, C = 256), not measured."""
    out = ["| per frame, computed | B = 1 | B = 4 |", "|---|---|---|"]
    for label, stem in BYTES_ROWS:
        cells = [f"{res[f'moshi7b_bytes_{stem}_b{b}'] / 1e6:,.0f} MB" for b in (1, 4)]
        if stem != "base_layer":
            cells = [f"{c} ({res[f'moshi7b_bytes_{stem}_ratio_b{b}']:.2f}×)" for c, b in zip(cells, (1, 4))]
        out.append(f"| {label} | {cells[0]} | {cells[1]} |")
    for label, stem in (("whole model, TTT in 6 of 32 layers (this design)", "model_ratio"),
                        ("whole model, per-frame fold design", "per_frame_fold_model_ratio")):
        out.append(f"| {label} | {res[f'moshi7b_bytes_{stem}_b1']:.3f}× | {res[f'moshi7b_bytes_{stem}_b4']:.3f}× |")
    return "\n".join(out)


# keys renamed since a published bench JSON was written: new name → old name (read when the new one is absent)
RENAMED = {f"server_realtime_speed_{n}": f"server_rtf_{n}" for n in (1, 4)}


def table(res: dict) -> str:
    res = {**{new: res[old] for new, old in RENAMED.items() if old in res}, **res}
    out = ["| measure | value | goal |", "|---|---|---|"]
    for key, label, goal, fmt in ROWS:
        if key in res:
            out.append(f"| {label.format(**res)} | {fmt.format(res[key])} | {goal} |")
    out.append(f"\n{res.get('machine', '?')}; quick={res.get('quick')}; {res.get('bench_seconds', 0):.0f} s")
    return "\n".join(out)


if __name__ == "__main__":
    res = json.load(open(sys.argv[1]))
    parts = [table_7b(res), table_bytes(res)] if "moshi7b_mlp_ratio_b1" in res else []
    print("\n\n".join(parts + [table(res)]))
