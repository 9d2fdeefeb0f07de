"""`parallel: fsdp` (FSDP2 `fully_shard`, gloo on CPU) on the tiny TTT-Moshi, for trainable `full` and
`ttt+wdown`: two torchrun ranks train like one process, each holds half of the parameter bytes, one process
resumes from the sharded checkpoint, and the consolidated export runs in `moshi-ttt infer`.

fp32 everywhere, so the comparison with the single process is exact up to summation order.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import make_cfg, read_metrics, run_infer, run_torchrun, run_trainer

from moshi_ttt.modules.transformer import TTT_KEY

STEPS = 5  # FSDP steps; the single process and the resumed run go on to STEPS + EXTRA
EXTRA = 2
TOL = 1e-5  # relative, losses and gradient norms


def _cfg(run_dir, repo, data, trainable: str, max_steps: int, **over):
    # constant lr after warm-up: the schedule does not depend on max_steps, so 5 + 2 steps = 7 steps
    return make_cfg(run_dir, repo, data, trainable=trainable, max_steps=max_steps, parallel="fsdp",
                    optim={"lr": 1e-3, "warmup_steps": 2, "schedule": "constant"}, log_fast_weights=False, **over)


def _close(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and [r["batch"] for r in a] == [r["batch"] for r in b]
    for x, y in zip(a, b):
        for k in ("loss", "text_loss", "audio_loss", "grad_norm", "ttt_grad_norm", "ttt_param_drift"):
            assert abs(x[k] - y[k]) <= TOL * abs(x[k]), (x["step"], k, x[k], y[k])


@pytest.mark.multiprocess
@pytest.mark.parametrize("trainable,checkpointing", [("full", False), ("ttt+wdown", True)])
def test_fsdp_two_ranks_match_one_process_and_resume_on_one(trainable, checkpointing, train_repo, train_dataset,
                                                           tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run_trainer(_cfg(single, train_repo, train_dataset, trainable, STEPS + EXTRA, ckpt_every=STEPS))
    # fsdp.reshard_after_forward false for ttt+wdown: the other mode of the gather/free schedule
    run_torchrun(_cfg(sharded, train_repo, train_dataset, trainable, STEPS, gradient_checkpointing=checkpointing,
                      fsdp={"reshard_after_forward": not checkpointing}), tmp_path / "fsdp.yaml")

    a, b = read_metrics(single), read_metrics(sharded)
    assert len(b) == STEPS
    _close(a[:STEPS], b)
    assert all(r["grad_norm"] > r["ttt_grad_norm"] > 0 for r in b)  # more than the TTT tensors train

    final = json.loads((sharded / "final_params.json").read_text())
    assert final["parallel"] == "fsdp" and final["world_size"] == 2
    assert final["sha256_by_rank"][0] == final["sha256_by_rank"][1]
    held, total = final["param_bytes_by_rank"], final["param_bytes_total"]
    assert total == json.loads((single / "final_params.json").read_text())["param_bytes_by_rank"][0]
    for rank_bytes in held:  # dim-0 shards: half each, up to the rounding of odd first dimensions
        assert abs(rank_bytes / total - 0.5) < 0.01, (held, total)
    assert total <= sum(held) < 1.01 * total

    ckpt = sharded / "checkpoints" / f"step_{STEPS:07d}"
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2, sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert not (ckpt / "trainable.safetensors").exists()

    # the consolidated export: every weight, trained ones equal to the single process at the same step
    export = sharded / "export"
    weights = load_file(str(export / "model.safetensors"))
    ref = load_file(str(single / "checkpoints" / f"step_{STEPS:07d}" / "trainable.safetensors"))
    base = load_file(str(train_repo / "model.safetensors"))
    assert set(weights) == set(base)
    assert set(ref) < set(base) if trainable == "ttt+wdown" else set(ref) == set(base)
    for k, v in weights.items():
        if k in ref:  # 5 AdamW steps of lr 1e-3 move a weight by up to 5e-3; Adam's normalisation turns the
            # summation-order noise of near-zero gradients into ~1e-5 differences: 2% of the update is allowed
            assert (v - ref[k]).abs().max() <= 1e-4, k
        else:
            assert torch.equal(v, base[k]), f"frozen {k} changed"
    assert all(not torch.equal(weights[k], base[k]) for k in ref if TTT_KEY in k)
    run_infer(export, train_dataset, tmp_path)  # `--hf-repo RUN/export` alone

    # resume on ONE process from the 2-rank sharded checkpoint: the next steps are the single process's
    t, _ = run_trainer(_cfg(sharded, train_repo, train_dataset, trainable, STEPS + EXTRA))
    assert t.parallel == "single" and t.resumed_from == ckpt
    resumed = read_metrics(sharded)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + EXTRA + 1))
    _close(a[STEPS:], resumed[STEPS:])


def test_parallel_key_is_validated(tmp_path):
    from moshi_ttt.train.config import TrainConfig

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("run_dir: r\ndata: {train: t.jsonl, segment_frames: 48}\nparallel: zero3\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid train config: parallel='zero3': must be one of "
                                         r"\('auto', 'ddp', 'fsdp'\)"):
        TrainConfig.load(cfg)
    cfg.write_text("run_dir: r\ndata: {train: t.jsonl, segment_frames: 48}\nfsdp: {reduce_dtype: fp8}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: invalid train config: fsdp.reduce_dtype='fp8'"):
        TrainConfig.load(cfg)


def test_parallel_auto_picks_fsdp_for_the_large_trainable_sets():
    import dataclasses

    from moshi_ttt.train.config import TrainConfig
    from moshi_ttt.train.fsdp import choose

    for trainable, want in [("ttt", "ddp"), ("ttt+lora", "ddp"), ("ttt+wdown", "fsdp"), ("full", "fsdp")]:
        cfg = TrainConfig.from_dict({"run_dir": "r", "data": {"train": "t.jsonl", "segment_frames": 48},
                                     "trainable": trainable})
        assert cfg.parallel == "auto" and choose(cfg, 2) == want and choose(cfg, 1) == "single"
        for explicit in ("ddp", "fsdp"):
            assert choose(dataclasses.replace(cfg, parallel=explicit), 4) == explicit
            assert choose(dataclasses.replace(cfg, parallel=explicit), 1) == "single"
