"""`moshi-ttt bench --sections gpu` without a GPU: refused clearly; its code paths at tiny shapes on CPU through
the same functions (`gpu.build`, `gpu.measure`, `gpu_check.check`); `scripts/gpu_check.sh --dry-run`.

On CPU two things are skipped, and only those: moshi captures no CUDA graph (its `CUDAGraphed` is disabled
off CUDA, so the check's "graphs" run is eager too, and agrees exactly), and the timings and
`max_memory_allocated` figures are neither meaningful nor asserted (the latter are None on CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moshi_ttt.apps.bench import MOSHI_SHAPED, gpu
from moshi_ttt.apps.bench.gpu_check import check
from moshi_ttt.models.demo import tiny_mimi_config
from moshi_ttt.models.lm import TTTLMModel
from moshi_ttt.ttt.config import TTTConfig, TTTModelConfig

pytestmark = pytest.mark.usefixtures("torch_single_thread")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CHUNK = 8
TINY = gpu.Shapes(
    dict(MOSHI_SHAPED, dim=32, num_heads=2, num_layers=2, context=64, text_card=64, depformer_dim=16,
         depformer_dim_feedforward=66, depformer_num_heads=2, depformer_num_layers=1),
    TTTModelConfig(layer=TTTConfig(chunk_size=CHUNK, lr=1e-3, init="zero"), every=1),  # zero init: as 7B's
    tiny_mimi_config(), torch.float32)


@pytest.fixture(scope="module")
def models():
    return gpu.build(TINY, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refused_without_cuda_before_any_section_runs():
    env = dict(os.environ, NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "moshi_ttt", "bench", "--quick", "--json", "--sections", "layer,gpu"],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0 and out.stdout == "", out.stdout  # the layer section never ran
    assert "--sections gpu needs a CUDA GPU: torch.cuda.is_available() is False" in out.stderr, out.stderr
    assert "scripts/gpu_check.sh" in out.stderr


def test_section_code_paths_at_tiny_shapes(models):
    """The check (plain and CFG) then the bench at B = 1, 2, exactly as the CLI runs them on CUDA."""
    res = gpu.measure(models, TINY, torch.device("cpu"), batches=(1, 2), steps=6, frames=3, rounds=1,
                      log=lambda line: None)
    for tag in ("", "_cfg"):
        assert res[f"gpu_check{tag}_ok"] and res[f"gpu_check{tag}_failures"] == []
        assert res[f"gpu_check{tag}_graphs"] is False  # CPU: moshi captured nothing
        assert res[f"gpu_check{tag}_tokens_identical"] and res[f"gpu_check{tag}_fast_weights_max_rel"] == 0.0
        assert res[f"gpu_check{tag}_folds_compared"] >= 3 and res[f"gpu_check{tag}_drift_max"] > 0
        chunks = res[f"gpu_check{tag}_completed_chunks"]
        assert min(chunks[i] for i in (0, 2, 3)) >= 3 and chunks[1] >= 1  # conversation 1 was reset mid-run
        rows = chunks * (2 if tag else 1)  # CFG twins fold with their conversation
        assert all(u == rows for u in res[f"gpu_check{tag}_updates_graphs"].values())
    for B in (1, 2):
        for name in ("base", "ttt"):
            for kind in ("lm", "frame"):
                assert res[f"gpu_{kind}_ms_median_{name}_b{B}"] > 0
            assert res[f"gpu_peak_bytes_{name}_b{B}"] is None  # memory figures need CUDA
        assert res[f"gpu_updates_ok_b{B}"]  # the bench's own TTT window folded every conversation
        assert f"gpu_fold_ms_per_conversation_b{B}" in res and f"gpu_lm_ratio_median_b{B}" in res
    assert not any(k.startswith("gpu_error") for k in res), res
    assert res["gpu_kv_bytes_per_conversation_computed"] == 4 * (2 * 2 * 64 * 32 + 1 * 2 * 8 * 16)
    assert res["gpu_bytes_per_conversation_ttt_computed"] > res["gpu_kv_bytes_per_conversation_computed"]
    json.dumps(res)  # what gpu_check.sh writes


def _twin_with(models, edit) -> TTTLMModel:
    sd = {k: v.clone() for k, v in models.ttt.state_dict().items()}
    edit(sd)
    twin = TTTLMModel(ttt=TINY.ttt, device="meta", **TINY.lm_kwargs)
    twin.load_state_dict(sd, strict=True, assign=True)
    return twin.eval()


def test_check_reports_planted_mismatches(models):
    def perturb_target(sd):
        k = next(k for k in sd if k.endswith("ttt.w_target"))
        sd[k] += 0.05 * torch.randn_like(sd[k])

    rep = check(models.ttt, _twin_with(models, perturb_target), batch=4, chunks=3)
    assert not rep["ok"] and rep["fast_weights_max_rel"] > 1e-3
    assert any("fast weights differ" in f for f in rep["failures"]), rep["failures"]
    rep = check(models.ttt, models.twin, batch=4, chunks=3, twin_seed=1)  # the two runs sample differently
    assert not rep["ok"] and rep["first_divergence_step"] >= 0
    assert any("fold steps compared before tokens diverged" in f for f in rep["failures"]), rep["failures"]


def _dry_run(tmp_path, *args, python=sys.executable):
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "o" / "b.json"), *args],
                         env=dict(os.environ, PYTHON=str(python)), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "o").exists()  # a dry run writes nothing
    return [ln for ln in out.stdout.splitlines() if ln.startswith("+ ")]


def test_gpu_check_dry_run_shows_each_step(tmp_path):
    steps = _dry_run(tmp_path)
    assert "import torch; print(torch.__version__, torch.version.cuda" in steps[-2]
    assert f"-m moshi_ttt bench --sections gpu --json --quick > {tmp_path}/o/b.json" in steps[-1], steps
    assert f"{tmp_path}/o/b.log" in steps[-1]
    assert "--quick" not in _dry_run(tmp_path, "--full")[-1]
    # a machine with nothing installed: torch, moshi without its torch pin, then moshi-ttt without deps
    bare = tmp_path / "bare-python"
    bare.write_text("#!/bin/sh\nexit 1\n")
    bare.chmod(0o755)
    steps = _dry_run(tmp_path, python=bare)
    assert [s.split(" ", 2)[2] for s in steps[:5]] == [
        "-m pip install torch", "-m pip install --no-deps moshi==0.2.13",
        "-m pip install <moshi's requirements except torch, from its metadata>", "-m pip install --no-deps -e .",
        "-m pip install <pyproject.toml dependencies except moshi>"], steps
