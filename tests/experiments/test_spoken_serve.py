"""The spoken-memory experiment through the server: one held-out conversation, streamed in real time over the
websocket to `moshi-ttt serve` running the trained TTT model (TTT at window W, seed 0, bundled in the package),
is answered beyond the attention window in the 0x02 text, as `moshi-ttt infer` answers it."""

from __future__ import annotations

import json

import pytest
import sphn

from moshi_ttt.experiments.spoken.bundle import read_conversation
from moshi_ttt.experiments.spoken.evaluate import infer_folder, websocket_timed_text
from moshi_ttt.experiments.spoken.score import questions_of, score_conversation
from moshi_ttt.models.demo import SPOKEN_MEMORY_MODEL
from moshi_ttt.models.streams import FRAME_RATE, SAMPLE_RATE

from support.launcher import ServeProcess

GREEDY = ["--temp", "0", "--temp-text", "0"]


@pytest.mark.slow  # a real-time conversation (~50 s) through the server, and one infer run
def test_served_conversation_is_answered_beyond_the_window_as_infer_answers_it(tmp_path):
    pcm, record = read_conversation(SPOKEN_MEMORY_MODEL)
    window_s = json.loads((SPOKEN_MEMORY_MODEL / "config.json").read_text())["context"] / FRAME_RATE
    beyond = [q for q in questions_of(record) if q.distance >= window_s]
    assert beyond, "the bundled conversation asks nothing beyond the window"

    inputs = tmp_path / "in"
    inputs.mkdir()
    sphn.write_wav(str(inputs / "conv.wav"), pcm, sample_rate=SAMPLE_RATE)
    infer_folder(inputs, tmp_path / "out", ["--hf-repo", str(SPOKEN_MEMORY_MODEL), *GREEDY])
    by_infer = score_conversation(record, tmp_path / "out" / "conv.text.json")

    args = ["--hf-repo", str(SPOKEN_MEMORY_MODEL), *GREEDY, "--max-conversations", "1"]
    with ServeProcess(tmp_path, args, demo=False) as srv:
        timed = websocket_timed_text(srv.url, pcm)
    by_server = score_conversation(record, timed)

    key = [(r.colour, r.q_end) for r in by_infer]
    assert key == [(r.colour, r.q_end) for r in by_server]
    for r_infer, r_server in zip(by_infer, by_server, strict=True):
        if r_infer.distance < window_s:
            continue
        assert r_infer.outcome == "right", (r_infer, timed["words"])
        assert (r_server.outcome, r_server.word) == ("right", r_infer.word), (r_server, timed["words"])
