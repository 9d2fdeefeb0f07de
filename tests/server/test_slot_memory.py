"""The model worker's memory (`server/memory/slot_memory.py`): the factor log is on in every `--memory-format`,
bounded by that format's own size."""

from __future__ import annotations

import pytest
import torch
from moshi_ttt.server.memory.slot_memory import SlotMemory

from moshi_ttt.models.lm import TTTLMGen, build_ttt_lm
from moshi_ttt.ttt.config import load_lm_and_ttt

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.mark.parametrize("fmt, values", [("exact", lambda d, h: d * h), ("bf16", lambda d, h: d * h // 2),
                                         ("rank:8", lambda d, h: 8 * (d + h) // 2)])
def test_every_format_keeps_a_factor_log_bounded_by_its_own_size(fmt, values):
    lm_kwargs, ttt = load_lm_and_ttt("tiny")
    torch.manual_seed(0)
    lm = build_ttt_lm(lm_kwargs, ttt)
    slots = SlotMemory(lm, fmt)
    try:
        with TTTLMGen(lm, use_sampling=False).streaming(2):
            slots.streaming_started()
            states = [g.ttt_state() for g in lm.ttt_gatings().values()]
            assert states
            for st in states:
                d, h = st.w.shape[1:]
                assert st.factors == [[], []]
                assert st.factor_limit == values(d, h)
    finally:
        slots.close()
