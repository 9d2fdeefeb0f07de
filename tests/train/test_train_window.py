"""Teaching beyond the window: the training-time attention window (`model.context`) trains, is exported and is
what `infer` / `serve` load; the segment ≤ window warning; training from random init (`model.init: random`,
`trainable: full`, a model without TTT layers too); the code cache across runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from moshi.modules.transformer import StreamingMultiheadAttention
from safetensors.torch import load_file

from moshi_ttt import runtime
from moshi_ttt.models import demo
from moshi_ttt.train.code_cache import CodeCache
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.data import Dataset, TokenIds
from moshi_ttt.train.dist import setup
from moshi_ttt.train.loop import Trainer, warn_inside_window


def _cfg(run_dir, repo, data, **over) -> TrainConfig:
    d = {"run_dir": str(run_dir), "model": {"hf_repo": str(repo)}, "data": {"train": str(data), "segment_frames": 48,
                                                                          "code_cache": None},
         "trainable": "ttt", "batch_size": 2, "max_steps": 2, "optim": {"lr": 0.01}, "progress": False}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return TrainConfig.from_dict(d)


def _trainer(cfg: TrainConfig) -> Trainer:
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Trainer(cfg, setup(cfg.device))
    finally:
        torch.set_num_threads(prev)


def _windows(lm) -> set:
    return {m.context for m in lm.transformer.modules() if isinstance(m, StreamingMultiheadAttention)}


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_segments_inside_the_window_warn_with_both_numbers(caplog):
    with caplog.at_level(logging.WARNING, logger="moshi_ttt"):
        assert warn_inside_window(750, "data.segment_frames", 3000, "the checkpoint's context")
        assert warn_inside_window(48, "data.segment_frames", 48, "model.context")
        assert warn_inside_window(48, "data.segment_frames", None, "model.context")
        assert not warn_inside_window(49, "data.segment_frames", 48, "model.context")
    msgs = _warnings(caplog, "cannot learn to remember beyond the window")
    assert len(msgs) == 3, msgs
    assert "data.segment_frames=750 frames" in msgs[0] and "the checkpoint's context=3000 frames" in msgs[0]
    assert "data.segment_frames=48 frames" in msgs[1] and "model.context=48 frames" in msgs[1]
    assert "unbounded" in msgs[2]


@pytest.fixture(scope="module")
def window_run(tmp_path_factory, train_repo, train_dataset):
    run_dir = tmp_path_factory.mktemp("window") / "run"
    trainer = _trainer(_cfg(run_dir, train_repo, train_dataset, model={"context": 24}))
    return trainer, trainer.run()


def test_the_training_window_is_applied_exported_and_loaded(window_run, train_repo, caplog):
    trainer, summary = window_run
    assert _windows(trainer.model) == {24} and trainer.model.context == 24  # tiny.yaml's own window is 64
    # the training forward masks beyond the window: the first 24 frames see the same past, later ones do not
    codes = trainer.dataset.batch([0], trainer.mimi, trainer.tokenizer, trainer.ids)
    with torch.no_grad():
        windowed = trainer.model(codes).text_logits
        runtime.apply_context(trainer.model, 64, trainer.info, "test", warn=False)
        wide = trainer.model(codes).text_logits
        runtime.apply_context(trainer.model, 24, trainer.info, "test", warn=False)
    assert torch.equal(windowed[..., :24, :], wide[..., :24, :])
    assert (windowed[..., 24:, :] - wide[..., 24:, :]).abs().max() > 1e-4

    export = Path(summary["export"])
    assert json.loads((export / "config.json").read_text())["context"] == 24
    assert json.loads((train_repo / "config.json").read_text())["context"] == 64
    flags = runtime.CheckpointFlags(hf_repo=str(export))
    with caplog.at_level(logging.WARNING, logger="moshi_ttt"):
        pieces = runtime.load(flags, torch.device("cpu"), torch.float32)
        assert _windows(pieces.lm) == {24} and not _warnings(caplog, "--context")  # the export's own window
        pieces = runtime.load(flags, torch.device("cpu"), torch.float32, context=40)
    assert _windows(pieces.lm) == {40}
    msgs = _warnings(caplog, "--context 40")
    assert len(msgs) == 1 and "not the 24 frames of the checkpoint's config.json" in msgs[0], msgs
    with pytest.raises(ValueError, match=r"--context=0: must be >= 1"):
        runtime.load(flags, torch.device("cpu"), torch.float32, context=0)


def test_the_trainer_warns_when_segments_fit_the_window(train_repo, train_dataset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="moshi_ttt"):
        _trainer(_cfg(tmp_path / "r", train_repo, train_dataset))  # tiny's window: 64 frames ≥ 48
    msgs = _warnings(caplog, "cannot learn to remember beyond the window")
    assert len(msgs) == 1 and "data.segment_frames=48 frames" in msgs[0], msgs
    assert "the checkpoint's context=64 frames" in msgs[0]


def test_random_init_trains_a_demo_sized_model_without_ttt_from_a_config(train_dataset, tmp_path, caplog):
    """model: {demo: true, init: random} with a TTT config of no layers: the demo's architecture and codec, fresh
    weights (not the shipped echo LM's), every weight trains, the export loads alone with its window."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"ttt": {"layers": [], "layer": {"chunk_size": 16}}}))
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "run_dir": "run", "model": {"demo": True, "init": "random", "ttt_config": "base.yaml", "context": 16},
        "data": {"train": str(train_dataset), "segment_frames": 32, "code_cache": None}, "trainable": "full",
        "batch_size": 4, "max_steps": 12, "optim": {"lr": 3e-3, "warmup_steps": 2}, "progress": False, "seed": 3}))
    cfg = TrainConfig.load(cfg_file)
    with caplog.at_level(logging.WARNING, logger="moshi_ttt"):
        trainer = _trainer(cfg)
    assert not _warnings(caplog, "cannot learn to remember")  # no TTT layer: nothing to warn about
    shipped = demo.float_state(load_file(str(demo.DEMO_WEIGHTS[1])))
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    same = [k for k, v in start.items() if k in shipped and v.shape == shipped[k].shape
            and v.numel() > 1 and torch.equal(v, shipped[k].to(v.dtype))]
    assert not same, f"random init took shipped weights: {same[:4]}"
    assert trainer.model.ttt_layer_indices == [] and _windows(trainer.model) == {16}
    assert len(trainer.trainable) == len(list(trainer.model.parameters()))
    summary = trainer.run()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    moved = [k for k, v in trainer.model.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert len(moved) > 0.9 * len(start)

    export = Path(summary["export"])
    raw = json.loads((export / "config.json").read_text())
    assert raw["context"] == 16 and raw["moshi_name"] == "model.safetensors" and raw["n_q"] == 8
    pieces = runtime.load(runtime.CheckpointFlags(hf_repo=str(export)), torch.device("cpu"), torch.float32)
    assert _windows(pieces.lm) == {16} and pieces.lm.ttt_layer_indices == []
    for k, v in pieces.lm.state_dict().items():
        assert torch.equal(v, trainer.model.state_dict()[k]), k
    # no TTT weights file, so TTT layers can be added to it (zero init: exactly this model until trained)
    assert "ttt_name" not in raw and not (export / "ttt.safetensors").exists()
    with_ttt = runtime.load(runtime.CheckpointFlags(hf_repo=str(export), ttt_config="demo_ttt"), torch.device("cpu"),
                            torch.float32)
    assert with_ttt.lm.ttt_layer_indices == [0, 2]


def test_the_code_cache_encodes_each_recording_once(train_repo, train_dataset, tmp_path, caplog):
    pieces = runtime.load(runtime.CheckpointFlags(hf_repo=str(train_repo)), torch.device("cpu"), torch.float32)
    ids = TokenIds.of(pieces.lm)
    info = pieces.info

    def cache() -> CodeCache:
        codec = CodeCache.codec_id_of(info.mimi_weights, info.mimi_config, pieces.mimi.num_codebooks,
                                      info.tokenizer, ids, 12.5)
        return CodeCache(tmp_path / "codes", codec)

    def all_codes(segment_frames: int, c: CodeCache | None) -> torch.Tensor:
        ds = Dataset(train_dataset, segment_frames, 17, "SPEAKER_MAIN", code_cache=c)
        return ds.batch(range(len(ds)), pieces.mimi, pieces.tokenizer, ids)

    plain = all_codes(48, None)
    first, second = cache(), cache()
    assert torch.equal(all_codes(48, first), plain) and (first.hits, first.misses) == (0, 2)
    assert torch.equal(all_codes(48, second), plain) and (second.hits, second.misses) == (2, 0)
    other = cache()
    assert all_codes(40, other).shape[-1] == 40 and (other.hits, other.misses) == (0, 2)  # other segmenting: a miss
    entry = next(iter(sorted((tmp_path / "codes").rglob("*.safetensors"))))
    entry.write_bytes(b"not safetensors")
    damaged = cache()
    with caplog.at_level(logging.WARNING, logger="moshi_ttt"):
        assert torch.equal(all_codes(48, damaged), plain)
        all_codes(40, damaged)
    assert (damaged.hits, damaged.misses) == (3, 1)
    assert len(_warnings(caplog, "is unreadable")) == 1


@pytest.mark.slow  # two infer runs, ~4 s each
def test_infer_runs_the_export_with_its_window_or_the_logged_override(window_run, speech, tmp_path):
    import subprocess
    import sys

    export = window_run[1]["export"]
    seen = []
    for extra in ([], ["--context", "40"]):
        out = tmp_path / f"out{len(seen)}.wav"
        proc = subprocess.run([sys.executable, "-m", "moshi_ttt", "infer", str(speech.wav("infer")), str(out),
                               "--hf-repo", export, *extra], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen.append((json.loads(out.with_suffix(".ttt.json").read_text())["context"], proc.stderr))
    assert seen[0][0] == 24 and "--context" not in seen[0][1]
    assert seen[1][0] == 40 and "--context 40: the main transformer attends over 40 frames" in seen[1][1]
    assert "not the 24 frames of the checkpoint's config.json" in seen[1][1]


@pytest.mark.slow  # two server start-ups, ~3 s each
def test_serve_runs_the_export_with_its_window_or_the_logged_override(window_run, caplog):
    from moshi_ttt.server.serve import BackgroundServer

    from support.observe import health

    export = window_run[1]["export"]
    seen = []
    for extra in ([], ["--context", "40"]):
        with caplog.at_level(logging.WARNING, logger="moshi_ttt"):
            srv = BackgroundServer(["--hf-repo", export, "--port", "0", "--max-conversations", "1", *extra])
        try:
            seen.append(health(srv)["context"])
        finally:
            srv.stop()
    assert seen == [24, 40]
    msgs = _warnings(caplog, "--context 40")
    assert len(msgs) == 1 and "not the 24 frames of the checkpoint's config.json" in msgs[0], msgs
