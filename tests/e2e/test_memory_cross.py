"""The cross-conversation protocol of the memory experiment, tiny: its data, the save path between the two
conversations (the fast weights conversation B starts from are the ones A's memory saved), and a run end to
end to cross_results.json, the table and the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moshi_ttt.experiments import memory_cross as mc
from moshi_ttt.experiments import memory_experiment as mx
from moshi_ttt.experiments import memory_task as mt
from moshi_ttt.memory.store import MemoryStore
from moshi_ttt.models import lm_memory as mem

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY = mx.Settings(task=mt.Task(T=48, window=8, pairs=4), budget=mt.Budget(steps=3, batch=8),
                   dim=32, layers=2, ttt_layer=1, chunk=8, n_eval=8)
CROSS = mc.Cross(t_a=20, t_b=16, n_eval=6)  # A: two chunks and a partial one of 4 frames (folded at its end)


def test_cross_batch_holds_each_pair_in_a_and_its_query_in_b():
    task = mt.Task(pairs=6)
    a, b, ans, dist = mc.make_cross_batch(task, 10, 30, 20, np.random.default_rng(0))
    assert a.shape == (10, 2, 30) and b.shape == (10, 2, 20) and torch.equal(a[:, 0], a[:, 1])
    for i in range(10):
        for p in range(task.pairs):
            q = int(ans[i, p]) - 1
            key, val = int(b[i, 0, q]), int(b[i, 0, q + 1])
            assert task.key0 <= key < task.val0 and task.val0 <= val < task.fill0
            (t,) = torch.nonzero(a[i, 0] == key)[:, 0].tolist()  # once in A, once in B
            assert int(a[i, 0, t + 1]) == val and (b[i, 0] == key).sum() == 1
            assert int(dist[i, p]) == 30 - t + q
        assert int(((b[i, 0] >= task.key0) & (b[i, 0] < task.val0)).sum()) == task.pairs  # B: the queries only


@pytest.mark.parametrize("fmt", ["exact", "bf16", "rank:2"])
def test_conversation_b_starts_from_the_fast_weights_a_saved(tmp_path, fmt):
    task = TINY.task
    model = mt.build_model(task, TINY.ttt_config("ttt"), dim=32, layers=2, context=task.window, ttt_layer=1,
                           seed=1).eval()
    a, b, _, _ = mc.make_cross_batch(task, 3, CROSS.t_a, CROSS.t_b, np.random.default_rng(1))
    fp = mem.fingerprint(model)
    with torch.no_grad():
        memories = mc.conversation_memories(model, a, fp)
    assert [m.frames for m in memories] == [CROSS.t_a] * 3  # every frame of A, the partial chunk included
    sizes, seen = [], []

    def check() -> None:
        mc.restorer(model, memories, fmt, fp, MemoryStore(tmp_path), sizes)()
        for item, m in enumerate(memories):  # W⁽⁰⁾ + the delta A saved, dense, fp32
            for i, g in model.ttt_gatings().items():
                st, delta = g.ttt_state(), m.layers[i].delta
                seen.append(float((st.w[item] - (st.w0 + delta)).abs().max() / delta.abs().max()))
                assert int(st.pos[item]) == 0 and float(delta.abs().max()) > 0

    with torch.no_grad():
        mt.streaming_text_logits(model, b, before=check)
    # exact: factors vs dense, fp32 summation order; bf16: 8 mantissa bits; rank 2 of a 20-frame delta: lossy
    bound = {"exact": 1e-5, "bf16": 2 ** -7}.get(fmt)
    assert len(seen) == 3 * len(model.ttt_gatings()) and len(sizes) == 3 and list(tmp_path.glob("*.mem")) == []
    if bound is None:
        assert max(seen) > 1e-3, seen  # a truncated SVD does change the weights
    else:
        assert max(seen) < bound, (fmt, max(seen))


def test_tiny_cross_experiment_end_to_end(tmp_path):
    readme = tmp_path / "page.md"
    readme.write_text(f"x\n{mc.README_START}\nold\n{mc.README_END}\ny\n")
    runs = mc.run_all(tmp_path, TINY, CROSS, seeds=1)
    res = mc.write_outputs(runs, TINY, CROSS, tmp_path, [readme])
    assert json.loads((tmp_path / "cross_results.json").read_text()) == res
    assert list(res["arms"]) == list(mc.ARMS) and set(res["single_beyond"]) == {"base", "ttt"}
    n = CROSS.n_eval * TINY.task.pairs
    for rec in runs.values():
        for r in rec["arms"].values():
            assert sum(c for _, c in r["per_distance"].values()) == sum(c for _, c in r["per_key_frame"].values()) == n
            assert max(int(t) for t in r["per_key_frame"]) <= CROSS.t_a - 2  # the key frame in A, its value after it
            unheard = r["per_key_frame"].get(str(CROSS.t_a - 2), [0, 0])  # a value on A's last frame
            heard = (r["acc"] * n - unheard[0]) / (n - unheard[1])
            assert r["acc_value_heard"] == pytest.approx(heard)
    sizes = res["stored_bytes"]
    assert sizes["rank:2"] < sizes["bf16"] < sizes["exact"]  # d 32, h 132: 20 frames of factors > bf16 dense
    text = readme.read_text()
    assert "\nold\n" not in text and "A's memory, `rank:32`" in text and (tmp_path / "cross.png").stat().st_size > 0
    again = mc.run_all(tmp_path, TINY, CROSS, seeds=1)  # cached: the same records, nothing retrained
    assert again == runs
