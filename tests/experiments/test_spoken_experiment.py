"""The spoken-memory experiment's plumbing at tiny sizes (moshi_ttt/experiments/spoken/experiment.py): stage 1
trains from random init with its window and no TTT, the stage-2 variants train from it (TTT added for `ttt`),
every model is evaluated through `moshi-ttt infer`, runs are cached, and the report regenerates from the records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from moshi_ttt import runtime
from moshi_ttt.experiments.spoken import bundle, report
from moshi_ttt.experiments.spoken import experiment as ex
from moshi_ttt.experiments.spoken.spec import ConversationSpec
from moshi_ttt.ttt.config import config_path, load_lm_and_ttt


def _tiny_settings(tmp: Path) -> ex.Settings:
    lm, _ = load_lm_and_ttt("spoken_memory")
    lm.update(dim=32, num_layers=2, num_heads=2, context=40, depformer_dim=16, depformer_dim_feedforward=32,
              depformer_num_heads=1)
    arch = tmp / "tiny_arch.yaml"
    arch.write_text(yaml.safe_dump({"lm": lm, "ttt": {"layers": [], "layer": {"chunk_size": 12}}}))
    short = ConversationSpec(facts=1, duration_s=8.0, min_distance_s=1.5, max_distance_s=3.0)
    long = ConversationSpec(facts=2, duration_s=12.0, min_distance_s=1.5, max_distance_s=7.0)
    train = ex.TrainSettings(steps=2, batch=2, lr=1e-3, warmup=1, segment_frames=200, min_segment_frames=60)
    return dataclasses.replace(
        ex.Settings(), window=40, architecture=str(arch), eval_batch=2,
        stage1_train=ex.DataSettings(2, 1, short), stage1_eval=ex.DataSettings(2, 2, short), stage1=train,
        listen_n=1, listen=train,
        stage2_train=ex.DataSettings(2, 3, long), stage2_eval=((2, ex.DataSettings(2, 4, long)),), stage2=train,
        variants=(("floor", ex.Variant("full", ttt=False, seeds=1)), ("ttt", ex.Variant("ttt", ttt=True, seeds=1))),
        cross=(("ttt", 1),), stage2_val=ex.DataSettings(3, 5, long), probed=("stage1", "floor_seed0"),
        probe_fit_voices=1)


@pytest.mark.slow  # 3 tiny trainings and 4 infer runs, ~40 s
def test_the_experiment_runs_end_to_end_at_tiny_sizes(tmp_path, monkeypatch):
    monkeypatch.setenv("MOSHI_TTT_CACHE", str(tmp_path / "cache"))
    s = _tiny_settings(tmp_path)
    work, out = tmp_path / "work", tmp_path / "out"

    base = ex.stage1(work, s)
    listen = json.loads((work / "runs" / "listen" / "done.json").read_text())["config"]
    assert listen["model"]["init"] == "random" and listen["data"]["train"].endswith("stage1_listen/train.jsonl")
    task = json.loads((work / "runs" / "stage1" / "done.json").read_text())["config"]
    assert task["model"] == {"hf_repo": str(work / "runs" / "listen" / "export"), "context": 40}  # from listening
    raw = json.loads((base / "config.json").read_text())
    assert raw["context"] == 40 and raw["ttt"]["layers"] == [] and raw["moshi_name"] == "model.safetensors"
    pre = ex.run_pretrained(work, out, s)
    assert set(pre["evals"]) == {"2"} and pre["stage1_eval"]["n"] == 2  # one question per stage-1 conversation
    recs = {name: ex.run_variant(work, out, s, name, v, 0) for name, v in s.variants}
    ttt_export = json.loads((work / "runs" / "ttt_seed0" / "export" / "config.json").read_text())
    assert ttt_export["ttt"]["layers"] is None and ttt_export["ttt"]["every"] == 3  # spoken_memory_ttt: layer 0
    assert recs["ttt"]["config"]["model"]["ttt_config"] == str(config_path("spoken_memory_ttt"))
    assert recs["ttt"]["config"]["trainable"] == "ttt" and recs["floor"]["config"]["trainable"] == "full"
    assert recs["floor"]["config"]["model"]["hf_repo"] == "$WORK/runs/stage1/export"
    for rec in recs.values():
        e = rec["evals"]["2"]
        assert e["n"] == 4 and len(e["questions"]) == 4  # 2 conversations × 2 facts, each asked once
        assert sum(e[o] for o in ("right", "wrong", "late", "missing")) == 4
    stamp = (work / "runs" / "ttt_seed0" / "done.json").stat().st_mtime_ns
    assert ex.run_variant(work, out, s, "ttt", dict(s.variants)["ttt"], 0) == recs["ttt"]  # cached: no retraining
    assert (work / "runs" / "ttt_seed0" / "done.json").stat().st_mtime_ns == stamp

    cross = ex.run_cross(work, out, s, "ttt", 0)
    assert cross["memory"]["n"] == cross["fresh"]["n"] >= 1  # B's questions, scored with and without A's memory
    res_dir = work / "evals" / "cross_ttt_seed0"
    saved = {p.stem: p for p in (res_dir / "memories").glob("*.safetensors")}
    assert saved and set(saved) == {p.stem for p in (work / "data" / "cross2" / "b").glob("*.wav")}
    items = json.loads((res_dir / "b_memory" / "batch_0.ttt.json").read_text())["memory"]["items"]
    a_ends = json.loads((res_dir / "a" / "batch_0.ttt.json").read_text())["memory"]["items"]
    assert [i["loaded"]["frames"] for i in items] == [e["end"]["frames"] for e in a_ends]  # B resumes A's memory
    assert "memory" not in json.loads((res_dir / "b_fresh" / "batch_0.ttt.json").read_text())
    assert ex.run_cross(work, out, s, "ttt", 0) == cross  # cached

    _check_bundle(work / "runs" / "ttt_seed0" / "export", tmp_path)

    probes = ex.run_probes(work, out, s)  # the stage-1 model on the training set, then on the validation set
    assert [(p["run"], p["set"]) for p in probes] == [("stage1", "stage2_train"), ("stage1", "stage2_val"),
                                                        ("floor_seed0", "stage2_val")]
    for p in probes:  # one oracle read-out per layer (2), over every question whose fact is in range
        assert set(p["read"]) == {"z0", "z1"} and 0 <= p["read"]["z0"]["recall"] <= 1
        assert p["read"]["z0"]["questions"] == p["read"]["z1"]["questions"] >= 1
        assert p["config"]["model"]["hf_repo"].startswith("$WORK/")
    assert ex.run_probes(work, out, s) == probes  # cached

    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{report.START}\nold\n{report.END}\nafter\n"
                   f"{report.PROBES_START}\nold\n{report.PROBES_END}\n{report.SEEDS_START}\nold\n{report.SEEDS_END}\n")
    res = report.write(out, doc, None, {"stage 1 training": 1.0})
    assert set(res["variants"]) == {"pretrained", "floor", "ttt"}
    assert res["variants"]["ttt"]["evals"]["2"]["all"]["values"] == [recs["ttt"]["evals"]["2"]["recall"]]
    text = doc.read_text()
    assert text.startswith("before\n") and "old" not in text
    assert "oracle read-out with the model's own keys" in text and "| floor: no TTT, window W (floor_seed0) |" in text
    assert "**TTT, window W**" in text and "floor: no TTT, window W" in text and "B with A's memory" in text
    ttt = recs["ttt"]["evals"][res["main_facts"]]
    assert f"| **TTT, window W** | 0 | {ttt['recall']:.3f} |" in text  # the per-seed table
    assert res["cross"]["ttt"]["memory"]["all"]["values"] == [cross["memory"]["recall"]]
    assert (out / "recall_by_distance.png").stat().st_size > 1000
    again = report.write(out, None, None)  # regenerated from the records alone: same results, stage times kept
    assert again == res


def _check_bundle(export: Path, tmp: Path) -> None:
    """The export as one self-contained folder (bundle.py): moved elsewhere, it loads as the export does, with
    the base weights rounded to bfloat16 and the TTT weights and codec exact; the conversation reads back."""
    bundle.bundle_export(export, tmp / "bundle")
    conv = sorted((tmp / "work" / "data" / "stage2_eval2" / "eval").glob("*.wav"))[0]
    bundle.bundle_conversation(conv, tmp / "bundle")
    moved = (tmp / "bundle").rename(tmp / "moved")
    raw = json.loads((moved / "config.json").read_text())
    names = [raw[k] for k in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "ttt_name")]
    assert all("/" not in n and (moved / n).is_file() for n in names), names
    cpu = torch.device("cpu")
    a = runtime.load(runtime.CheckpointFlags(hf_repo=str(export)), cpu, torch.float32)
    b = runtime.load(runtime.CheckpointFlags(hf_repo=str(moved)), cpu, torch.float32)
    sa, sb = a.lm.state_dict(), b.lm.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        want = v if "ttt" in k or not v.is_floating_point() else v.to(torch.bfloat16).to(v.dtype)
        assert torch.equal(sb[k], want), k
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)  # the base weights were rounded indeed
    for k, v in a.mimi.state_dict().items():
        assert torch.equal(b.mimi.state_dict()[k], v), k
    pcm, record = bundle.read_conversation(moved)
    assert record == json.loads(conv.with_suffix(".json").read_text())
    assert abs(len(pcm) / 24000 - record["spoken_memory"]["duration"]) < 0.1
    first = min(q["q_end"] for q in record["spoken_memory"]["questions"])
    bundle.bundle_conversation(conv, tmp / "cut", until_s=first + 3.1)  # the first answer is due by then
    pcm, cut = bundle.read_conversation(tmp / "cut")
    assert [q["q_end"] for q in cut["spoken_memory"]["questions"]] == [first]
    assert abs(len(pcm) / 24000 - (first + 3.1)) < 0.1
    assert cut["spoken_memory"]["duration"] == pytest.approx(first + 3.1)
    with pytest.raises(ValueError, match="no question is due"):
        bundle.bundle_conversation(conv, tmp / "none", until_s=first)
