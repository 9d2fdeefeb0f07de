"""Markdown table for the README from `moshi-ttt bench --json` output.

    moshi-ttt bench --json > docs/bench.json && python scripts/bench_table.py docs/bench.json
"""

from __future__ import annotations

import json
import sys

# (key, label, goal or "", format)
ROWS = [
    ("stream_step_ratio_median", "LMGen.step, TTT every 6th layer / base — median", "≤ 1.08", "{:.3f}×"),
    ("stream_step_ratio_p99", "LMGen.step, TTT every 6th layer / base — p99", "≤ 1.5", "{:.3f}×"),
    ("stream_step_ms_base", "LMGen.step base (ms, median)", "", "{:.1f}"),
    ("stream_step_ratio_median_every_layer", "LMGen.step, TTT in every layer / base — median", "", "{:.3f}×"),
    ("stream_step_ratio_p99_every_layer", "LMGen.step, TTT in every layer / base — p99", "", "{:.3f}×"),
    ("train_step_ratio", "LMModel.forward+backward, T = {train_T}, C = {train_chunk} / base — time", "≤ 1.15",
     "{:.3f}×"),
    ("train_peak_mem_ratio", "… activation memory saved for backward / base", "≤ 1.2", "{:.3f}×"),
    ("stream_vs_parallel_max_abs", "streaming vs parallel logits, whole model, fp32 (max abs)", "", "{:.1e}"),
    ("state_bytes_per_conversation", "fast state per conversation (bytes, 2 TTT layers, C = {stream_chunk})", "",
     "{:,}"),
    ("long_run_state_bytes_growth", "state growth over {long_run_steps} streaming steps (bytes)", "0", "{}"),
    ("long_run_rss_growth_mb", "process RSS growth over the same run (MiB)", "flat", "{:.1f}"),
    ("server_rtf_1", "server real-time factor, 1 client in another process (demo)", "≥ 1.5", "{:.2f}×"),
    ("server_rtf_4", "server real-time factor, 4 clients in another process (demo)", "≥ 1.2", "{:.2f}×"),
    ("layer_stream_ratio_median", "layer alone, streaming step / MLP — median (d={layer_d}, h={layer_h}, "
                                  "C={layer_chunk})", "", "{:.2f}×"),
    ("layer_stream_ratio_p99", "layer alone, streaming step / MLP — p99", "", "{:.2f}×"),
    ("layer_train_ratio", "layer alone, forward+backward / MLP, T = {layer_train_T}", "", "{:.2f}×"),
    ("layer_train_act_mem_ratio", "layer alone, activation memory / MLP", "", "{:.2f}×"),
]


def table(res: dict) -> str:
    out = ["| measure | value | goal |", "|---|---|---|"]
    for key, label, goal, fmt in ROWS:
        if key in res:
            out.append(f"| {label.format(**res)} | {fmt.format(res[key])} | {goal} |")
    out.append(f"\n{res.get('machine', '?')}; quick={res.get('quick')}; {res.get('bench_seconds', 0):.0f} s")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(json.load(open(sys.argv[1]))))
