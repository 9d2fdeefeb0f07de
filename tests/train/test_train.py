"""`moshi-ttt train` end to end on the tiny TTT-Moshi (chunk_size 16) and real speech (espeak-ng):
learning, exported weights, exact resume, and torchrun/DDP (gloo) against a single process.

Segments are 48 frames = 3 TTT chunks, so the target parameters get gradients (a chunk never sees its own update).
In-process runs use one intra-op thread (much faster on a busy 2-core box); so does torchrun.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moshi_ttt.models.loaders import checkpoint_info, load_ttt_moshi, resolve_ttt
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.dist import setup
from moshi_ttt.train.loop import Trainer

STEPS = 30
CKPT_EVERY = 12  # checkpoints at 12, 24, 30
RESUME_AT = 24
DDP_TOL = 1e-5  # max |Δ| of trainable params and relative |Δ| of losses, 2 gloo ranks vs 1 process


def make_cfg(run_dir, repo, data, **over) -> TrainConfig:
    d = {"run_dir": str(run_dir), "model": {"hf_repo": str(repo)},
         "data": {"train": str(data), "segment_frames": 48}, "trainable": "ttt", "batch_size": 2,
         "max_steps": STEPS, "optim": {"lr": 0.01, "warmup_steps": 2}, "progress": False}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return TrainConfig.from_dict(d)


def run_trainer(cfg: TrainConfig) -> tuple[Trainer, dict]:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        env = setup(cfg.device)
        trainer = Trainer(cfg, env)
        return trainer, trainer.run()
    finally:
        torch.set_num_threads(prev)


def run_torchrun(cfg: TrainConfig, cfg_file: Path, nproc: int = 2) -> None:
    """`torchrun --standalone --nproc-per-node NPROC -m moshi_ttt.train CFG_FILE` (gloo on CPU), 1 thread per rank."""
    import yaml

    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    env = dict(os.environ, OMP_NUM_THREADS="1", NO_TORCH_COMPILE="1", HF_HUB_OFFLINE="1")
    # `python -m torch.distributed.run` is torchrun (whose script a venv sharing site-packages may lack)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "moshi_ttt.train", str(cfg_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, train_repo, train_dataset):
    """30 steps, TTT target params only, checkpoints every 12 steps. The global batch is all 4 segments
    (in a different order each step), so the loss of every step is measured on the same data."""
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    trainer, summary = run_trainer(make_cfg(run_dir, train_repo, train_dataset, batch_size=4, optim={"lr": 0.02},
                                            ckpt_every=CKPT_EVERY, keep_checkpoints=3))
    return trainer, summary, run_dir


@pytest.mark.slow
def test_training_learns_through_ttt_target_params(tiny_run, train_repo):
    trainer, summary, run_dir = tiny_run
    assert summary["step"] == STEPS
    m = read_metrics(run_dir)
    assert [r["step"] for r in m] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in m]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, f"loss did not decrease: first 3 {losses[:3]}, last 3 {losses[-3:]}"
    for r in m:
        assert math.isclose(r["loss"], r["text_loss"] + r["audio_loss"], rel_tol=1e-6)
        g = r["ttt_grad_norm"]
        assert math.isfinite(g) and g > 0, f"step {r['step']}: TTT grad norm {g}"
        for layer, gl in r["ttt_grad_norm_by_layer"].items():
            assert math.isfinite(gl) and gl > 0, f"step {r['step']}: TTT layer {layer} grad norm {gl}"
        assert r["grad_norm"] == pytest.approx(g)  # only TTT params train
    assert set(m[-1]["fast_drift"]) == {"0", "2"}
    assert all(v > 0 for v in m[-1]["fast_drift"].values()), m[-1]["fast_drift"]  # TTT is active
    assert m[-1]["ttt_param_drift"] > 0.01

    # the TTT target params changed from their init (conv = 0, W_target = I); nothing else did
    base = load_file(str(train_repo / "model.safetensors"))
    state = trainer.model.state_dict()
    for k, v in state.items():
        if TTT_KEY in k:
            assert (v - base[k]).abs().max() > 1e-3, f"{k} did not change"
        else:
            assert torch.equal(v, base[k]), f"frozen parameter {k} changed"

    # the export loads as `moshi-ttt infer --hf-repo RUN/export --ttt-weights RUN/export/ttt.safetensors` does
    export = Path(summary["export"])
    info = checkpoint_info(str(export))
    loaded = load_ttt_moshi(info, resolve_ttt(info, ttt_weights=export / "ttt.safetensors"), dtype=torch.float32)
    saved = loaded.ttt_state_dict()
    assert set(saved) == {k for k in state if TTT_KEY in k}
    for k, v in saved.items():
        assert torch.equal(v, state[k]), k
    assert loaded.ttt_config.layer.clip_norm is None and loaded.ttt_config.layer.chunk_size == 16
    # ...and `--hf-repo RUN/export` alone finds them too (config.json's ttt_name)
    alone = load_ttt_moshi(checkpoint_info(str(export)), dtype=torch.float32).ttt_state_dict()
    for k, v in saved.items():
        assert torch.equal(alone[k], v), k
    codes = trainer.dataset.batch([0, 3], trainer.mimi, trainer.tokenizer, trainer.ids)
    trainer.model.eval()
    with torch.no_grad():
        a, b = trainer.model(codes), loaded(codes)
    # same weights; float-level noise only (two separately allocated copies of the depformer differ ~1e-6)
    torch.testing.assert_close(b.text_logits[b.text_mask], a.text_logits[a.text_mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(b.logits[b.mask], a.logits[a.mask], rtol=0, atol=1e-5)


def run_infer(export: Path, train_dataset: Path, tmp_path: Path, *flags: str) -> dict:
    """`moshi-ttt infer in.wav out.wav --hf-repo EXPORT FLAGS` on 1 s of the training speech; returns the
    telemetry JSON after checking it saw the 13 frames and the tiny model's TTT layers."""
    import argparse

    import sphn

    from moshi_ttt.apps import infer

    pcm, _ = sphn.read(str(train_dataset.parent / "conv0.wav"), sample_rate=24000)
    sphn.write_wav(str(tmp_path / "in.wav"), pcm[0, 4800:28800], 24000)
    parser = argparse.ArgumentParser()
    infer.add_args(parser)
    args = parser.parse_args([str(tmp_path / "in.wav"), str(tmp_path / "out.wav"), "--hf-repo", str(export),
                              "--device", "cpu", *flags])
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert infer.run(args) == 0
    finally:
        torch.set_num_threads(prev)
    tel = json.loads((tmp_path / "out.ttt.json").read_text())
    assert tel["input_frames"] == 13 and tel["ttt_layers"] == [0, 2]
    return tel


@pytest.mark.slow
def test_export_runs_in_moshi_ttt_infer(tiny_run, train_dataset, tmp_path):
    """`moshi-ttt infer --hf-repo RUN/export --ttt-weights RUN/export/ttt.safetensors` on 1 s of the speech."""
    export = Path(tiny_run[1]["export"])
    run_infer(export, train_dataset, tmp_path, "--ttt-weights", str(export / "ttt.safetensors"))


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tiny_run, tmp_path):
    trainer, _, run_dir = tiny_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "checkpoints" / f"step_{RESUME_AT:07d}"
    assert ckpt.is_dir(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    cfg = dataclasses.replace(trainer.cfg, run_dir=str(resumed))
    t2, summary = run_trainer(cfg)
    assert t2.resumed_from == resumed / "checkpoints" / ckpt.name
    a = [r for r in read_metrics(run_dir) if r["step"] > RESUME_AT]
    b = read_metrics(resumed)
    assert [r["step"] for r in b] == list(range(RESUME_AT + 1, STEPS + 1))
    for x, y in zip(a, b):
        assert x["batch"] == y["batch"]
        for k in ("loss", "text_loss", "audio_loss", "ttt_grad_norm", "lr"):
            assert abs(x[k] - y[k]) <= 1e-6, (x["step"], k, x[k], y[k])
    assert t2.param_digest() == trainer.param_digest()


@pytest.mark.multiprocess
def test_torchrun_two_ranks_match_single_process(train_repo, train_dataset, tmp_path):
    steps = 3
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    run_trainer(make_cfg(single_dir, train_repo, train_dataset, max_steps=steps, log_fast_weights=False))
    run_torchrun(make_cfg(ddp_dir, train_repo, train_dataset, max_steps=steps, log_fast_weights=False),
                 tmp_path / "ddp.yaml")

    final = json.loads((ddp_dir / "final_params.json").read_text())
    assert final["world_size"] == 2 and len(final["sha256_by_rank"]) == 2
    assert final["sha256_by_rank"][0] == final["sha256_by_rank"][1]  # both ranks end bit-identical

    a, b = read_metrics(single_dir), read_metrics(ddp_dir)
    assert [r["batch"] for r in a] == [r["batch"] for r in b]
    for x, y in zip(a, b):
        for k in ("loss", "text_loss", "audio_loss", "ttt_grad_norm"):
            assert abs(x[k] - y[k]) <= DDP_TOL * abs(x[k]), (x["step"], k, x[k], y[k])
    ps = load_file(str(single_dir / "checkpoints" / f"step_{steps:07d}" / "trainable.safetensors"))
    pd = load_file(str(ddp_dir / "checkpoints" / f"step_{steps:07d}" / "trainable.safetensors"))
    assert set(ps) == set(pd)
    for k in ps:
        assert (ps[k] - pd[k]).abs().max() <= DDP_TOL, k


def test_lora_bf16_run_exports_loadable_adapters(train_repo, train_dataset, tmp_path):
    """trainable ttt+lora in bfloat16 (fp32 masters, fp32 TTT accumulation): the export folder loads with
    its LoRA adapters and TTT weights exactly as trained."""
    trainer, summary = run_trainer(make_cfg(tmp_path / "lora", train_repo, train_dataset, max_steps=2,
                                            trainable="ttt+lora", dtype="bfloat16", lora={"rank": 4}))
    m = read_metrics(tmp_path / "lora")
    assert all(math.isfinite(r["loss"]) and r["ttt_grad_norm"] > 0 for r in m)
    assert all(t.dtype == torch.float32 for t in trainer.masters.masters)
    export = Path(summary["export"])
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["lora"] is True and cfg["lora_rank"] == 4 and cfg["lora_name"] == "lora.safetensors"
    info = checkpoint_info(str(export))
    loaded = load_ttt_moshi(info, resolve_ttt(info, ttt_weights=export / "ttt.safetensors"), dtype=torch.bfloat16)
    want = {k: v for k, v in trainer.model.state_dict().items() if ".lora_" in k or TTT_KEY in k}
    got = loaded.state_dict()
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in want.items())  # B trained away from 0
    for k, v in want.items():
        assert torch.equal(got[k], v), k
