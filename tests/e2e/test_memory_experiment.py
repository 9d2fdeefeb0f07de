"""The memory experiment end to end, tiny: train → parallel + LMGen-streaming evaluation → cached runs
→ results.json (published schema) → README table and plot; then resumption and cache invalidation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from moshi.models.lm import LMGen

from moshi_ttt.experiments import memory_experiment as mx
from moshi_ttt.experiments import memory_task as mt

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# 48 frames, window 8, chunk 8: 6 TTT chunks, so the streaming path folds several fast-weight updates.
TINY = mx.Settings(task=mt.Task(T=48, window=8, pairs=4), budget=mt.Budget(steps=4, batch=8),
                   dim=32, layers=2, ttt_layer=1, chunk=8, n_eval=12)
VARIANTS = ("base", "ttt", "ttt_mlp_input")


def test_task_places_every_pair_once_at_its_distance():
    task = mt.Task(T=64, window=8, pairs=6)
    codes, ans, dist = mt.make_batch(task, 16, np.random.default_rng(0))
    assert torch.equal(codes[:, 0], codes[:, 1])
    for b in range(16):
        seq = codes[b, 0]
        for i in range(task.pairs):
            q = int(ans[b, i]) - 1
            t = q - int(dist[b, i])
            key, val = int(seq[q]), int(seq[q + 1])
            assert task.key0 <= key < task.val0 and task.val0 <= val < task.fill0
            assert int(seq[t]) == key and int(seq[t + 1]) == val
            assert (seq == key).sum() == 2  # the pair and its query, nowhere else
    assert (dist < task.window).any() and (dist >= task.window).any()


def test_streaming_teacher_forcing_matches_parallel_logits():
    task = TINY.task
    model = mt.build_model(task, TINY.ttt_config("ttt"), dim=32, layers=2, context=task.window,
                           ttt_layer=1, seed=3).eval()
    codes, _, _ = mt.eval_set(task, 3)
    with torch.no_grad():
        par = mt.parallel_text_logits(model, codes)
        stream = mt.streaming_text_logits(model, codes)
    assert stream.shape == par.shape == (3, task.T, task.card)
    torch.testing.assert_close(stream, par, rtol=1e-4, atol=1e-4)

    class CopyingHookLMGen(LMGen):  # hands the hook a copy: the forcing cannot take effect
        def __init__(self, *args, on_text_logits_hook, **kwargs):
            super().__init__(*args, on_text_logits_hook=lambda x: on_text_logits_hook(x.clone()), **kwargs)

    with pytest.raises(RuntimeError, match="teacher forcing"):
        mt.streaming_text_logits(model, codes, CopyingHookLMGen)


def test_tiny_experiment_end_to_end_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{mx.README_START}\nold table\n{mx.README_END}\nafter\n")
    runs = mx.run_all(out, TINY, VARIANTS, seeds=1, jobs=1, progress_every=0)
    res = mx.write_outputs(runs, TINY, out, readme)

    on_disk = json.loads((out / "results.json").read_text())
    mx.check_results(on_disk)
    assert on_disk == res
    assert set(on_disk["variants"]) == set(VARIANTS)
    assert on_disk["window"] == 8 and on_disk["chunk"] == 8 and on_disk["chance"] == 1 / 16
    for v in VARIANTS:
        rec = runs[(v, 0)]
        # Same model, same sequences: the LMGen path gives the parallel logits (fp32 noise only).
        assert rec["max_logit_diff"] < 1e-4, (v, rec["max_logit_diff"])
        assert rec["beyond_acc_streaming"] == rec["beyond_acc"]
        assert rec["inside_acc_streaming"] == rec["inside_acc"]
        assert sum(n for _, n in rec["per_distance"].values()) == TINY.n_eval * TINY.task.pairs
    text = readme.read_text()
    assert "old table" not in text and "| `ttt_mlp_input` |" in text and text.endswith("after\n")
    assert (out / "memory_experiment.png").stat().st_size > 10_000

    # Resumption: every run is cached, nothing is trained again.
    def fail(*args, **kwargs):
        raise AssertionError("a cached run was recomputed")

    monkeypatch.setattr(mx, "_work", fail)
    again = mx.run_all(out, TINY, VARIANTS, seeds=1, jobs=1, progress_every=0)
    assert again == runs
    # ... but a run made with other settings is not reused.
    other = dataclasses.replace(TINY, eta=0.5)
    assert mx.load_run(out, "ttt", 0, other) is None
    with pytest.raises(AssertionError, match="recomputed"):
        mx.run_all(out, other, ("ttt",), seeds=1, jobs=1, progress_every=0)


def test_check_results_rejects_a_wrong_schema():
    good = {"variants": {"base": {"seeds": [{"seed": 0, "inside_acc": 1.0, "beyond_acc": 0.1,
                                             "beyond_acc_streaming": 0.1}]}},
            "chance": 0.0625, "window": 16, "chunk": 16}
    mx.check_results(good)
    bad_key = json.loads(json.dumps(good))
    bad_key["variants"]["base"]["seeds"][0]["extra"] = 1
    bad_name = json.loads(json.dumps(good))
    bad_name["variants"]["ttt_typo"] = bad_name["variants"].pop("base")
    for bad in (bad_key, bad_name, {**good, "args": {}}):
        with pytest.raises(ValueError, match="results"):
            mx.check_results(bad)
