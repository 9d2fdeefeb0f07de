"""The spoken-memory experiment through the server: one held-out conversation, streamed in real time over the
websocket to `moshi-ttt serve` running the experiment's TTT model (TTT at window W, seed 0, bundled in the
package: `models.demo.SPOKEN_MEMORY_MODEL`), gets the answers `moshi-ttt infer` gives to the same audio, a
question asked beyond the attention window included, in its 0x02 text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sphn

from moshi_ttt.experiments.spoken.bundle import read_conversation
from moshi_ttt.experiments.spoken.evaluate import as_served, infer_folder, websocket_timed_text
from moshi_ttt.experiments.spoken.score import score_conversation
from moshi_ttt.models.demo import SPOKEN_MEMORY_MODEL
from moshi_ttt.models.streams import FRAME_RATE, SAMPLE_RATE

from support.launcher import ServeProcess

GREEDY = ["--temp", "0", "--temp-text", "0"]
TAIL_S = 1.0  # the silence websocket_timed_text sends after the conversation


@pytest.mark.slow  # a real-time conversation through the server, and one infer run
def test_served_conversation_gets_infers_answers_beyond_the_window(tmp_path):
    pcm, record = read_conversation(SPOKEN_MEMORY_MODEL)
    window_s = json.loads((SPOKEN_MEMORY_MODEL / "config.json").read_text())["context"] / FRAME_RATE

    inputs = tmp_path / "in"
    inputs.mkdir()
    heard = as_served(np.concatenate([pcm, np.zeros(round(TAIL_S * SAMPLE_RATE), np.float32)]))
    sphn.write_wav(str(inputs / "conv.wav"), heard, sample_rate=SAMPLE_RATE)
    infer_folder(inputs, tmp_path / "out", ["--hf-repo", str(SPOKEN_MEMORY_MODEL), *GREEDY])
    by_infer = score_conversation(record, tmp_path / "out" / "conv.text.json")

    args = ["--hf-repo", str(SPOKEN_MEMORY_MODEL), *GREEDY, "--max-conversations", "1"]
    with ServeProcess(tmp_path, args, demo=False) as srv:
        timed = websocket_timed_text(srv.url, pcm, tail_s=TAIL_S)
    assert not timed["errors"], (timed["errors"], srv.log_tail())
    by_server = score_conversation(record, timed)

    beyond = [r for r in by_infer if r.distance >= window_s]
    assert any(r.outcome == "right" for r in beyond), by_infer  # the bundled conversation's reason to be here
    for r_infer, r_server in zip(by_infer, by_server, strict=True):
        assert (r_server.outcome, r_server.word) == (r_infer.outcome, r_infer.word), (r_infer, timed["words"])
