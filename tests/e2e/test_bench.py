"""`moshi-ttt bench --quick --json`: one JSON object with the documented keys, measured in one run.

Timing values are machine-dependent and are not asserted (benchmarks, not timed unit tests); what is
asserted can fail for real: exactness of streaming vs parallel, flat state, the demo server keeping up.
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # the bench runs for minutes

REQUIRED = ["stream_step_ratio_median", "stream_step_ratio_p99", "train_step_ratio", "train_peak_mem_ratio",
            "stream_vs_parallel_max_abs", "state_bytes_per_conversation", "server_realtime_speed_1",
            "server_realtime_speed_4", "server_rtf_1", "server_rtf_4"]
REQUIRED_7B = ["moshi7b_mlp_ratio_b1", "moshi7b_mlp_ratio_b4", "moshi7b_mlp_max_step_ratio_b1",
               "moshi7b_layer_ratio_b1", "moshi7b_state_bytes_per_conversation", "moshi7b_mlp_ratio_b1_bf16state",
               "moshi7b_layer_ratio_b1_bf16state", "moshi7b_state_bytes_per_conversation_bf16state"]


def test_bench_quick_json(tmp_path):
    env = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1", MOSHI_TTT_CACHE=str(tmp_path / "cache"))
    # The moshi7b section (minutes at d 4096 on 2 cores, GBs of weights) is checked below at small shapes.
    out = subprocess.run([sys.executable, "-m", "moshi_ttt", "bench", "--quick", "--json",
                          "--sections", "layer,model,server"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stdout  # exactly one JSON object on stdout
    res = json.loads(lines[0])
    assert isinstance(res["machine"], str) and res["machine"]
    for k in REQUIRED:
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]) and res[k] > 0, (k, res.get(k))
    # the whole model computes the same function streaming and in parallel, with TTT visibly active
    assert res["stream_vs_parallel_max_abs"] < 1e-4 and res["stream_vs_parallel_drift"] > 0
    # per-conversation state is allocated once: no growth over a long streaming run
    assert res["long_run_state_bytes_growth"] == 0
    # realtime speed = audio s / wall s = frame / mean step; server_rtf_n is its published alias
    for n in (1, 4):
        assert res[f"server_rtf_{n}"] == res[f"server_realtime_speed_{n}"]
        assert res[f"server_realtime_speed_{n}"] == pytest.approx(80 / res[f"server_step_ms_{n}"])


def test_moshi7b_section_keys_and_computed_bytes():
    """The moshi7b section at a small width (same code path: folds on the host clock, KV cache copied),
    and its computed Moshi 7B figures."""
    from moshi_ttt.apps.bench.moshi7b import run

    res = run(quick=True, d=64, ff=int(4.125 * 64), heads=4)
    for k in REQUIRED_7B:
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]) and res[k] > 0, (k, res.get(k))
    assert res["moshi7b_mlp_updates_b1"] == 3  # warm-up chunk + the 2 timed chunks: every fold really ran
    assert res["moshi7b_mlp_updates_b1_bf16state"] == 3
    # computed GPU bytes at 7B: a TTT layer moves the base layer's bytes at B = 1 (+ the fold amortised
    # over the chunk); the per-frame-fold design it replaced moved more than twice as much
    assert 1 < res["moshi7b_bytes_ttt_layer_ratio_b1"] < 1.01
    assert res["moshi7b_bytes_per_frame_fold_layer_ratio_b1"] > 2
    # 7B state per conversation, 6 layers: fp32 fast weight + bf16 copy dominate (≥ 6 · 6 · d · h bytes)
    assert res["moshi7b_state_bytes_per_conversation"] >= 6 * 6 * 4096 * 11264
    # ... and the bf16 state drops exactly the fp32 master (4 · d · h bytes per layer)
    assert (res["moshi7b_state_bytes_per_conversation"] - res["moshi7b_state_bytes_per_conversation_bf16state"]
            == 6 * 4 * 4096 * 11264)


def test_capacity_section_is_computed_from_the_allocated_state():
    from moshi_ttt.apps.bench.capacity import markdown, run

    res = run()
    kv = 32 * 2 * 3000 * 4096 * 2  # main transformer KV cache per conversation, bf16 (+ the depformer's)
    assert kv < res["capacity_row0_kv_bytes"] < kv * 1.01 and res["capacity_row0_state_bytes"] == 0
    assert res["capacity_row1_state_bytes"] - res["capacity_row2_state_bytes"] == 6 * 4 * 4096 * 11264
    assert res["capacity_row0_kv_bytes"] - res["capacity_row3_kv_bytes"] == 32 * 2 * (3000 - 750) * 4096 * 2
    for gpu in ("80gb", "141gb"):  # bf16 state: more conversations than fp32, fewer than base
        n = [res[f"capacity_row{i}_conversations_{gpu}"] for i in range(4)]
        assert n[1] < n[2] < n[0] < n[3], n
    assert markdown(res).count("\n") == 5
