"""`moshi_ttt.models.streams` holds moshi's own values: its loader's constants, a built Mimi's rate and frame,
an LM's text padding ids; and `moshi_private` hands out copies of moshi's private defaults."""

from __future__ import annotations

from moshi.models import loaders

from moshi_ttt.models.demo import tiny_mimi_config
from moshi_ttt.models.lm import build_ttt_lm
from moshi_ttt.models.loaders import base_lm_kwargs, moshi_private
from moshi_ttt.models.streams import FRAME, FRAME_RATE, SAMPLE_RATE, TEXT_PADDING_IDS
from moshi_ttt.ttt.config import load_lm_and_ttt


def test_audio_constants_are_mimis():
    assert (SAMPLE_RATE, FRAME_RATE, FRAME) == (loaders.SAMPLE_RATE, loaders.FRAME_RATE, 1920)
    default = moshi_private().mimi_config
    assert (default["sample_rate"], default["frame_rate"]) == (SAMPLE_RATE, FRAME_RATE)
    mimi = loaders.get_mimi(None, mimi_config=tiny_mimi_config())  # moshi's Mimi, narrower
    assert (mimi.sample_rate, mimi.frame_rate, mimi.frame_size) == (SAMPLE_RATE, FRAME_RATE, FRAME)


def test_text_padding_ids_are_the_lms():
    lm_kwargs, ttt = load_lm_and_ttt("tiny")
    lm = build_ttt_lm(lm_kwargs, ttt)
    assert sorted(TEXT_PADDING_IDS) == sorted({lm.end_of_text_padding_id, lm.text_padding_token_id})
    assert base_lm_kwargs()["existing_text_padding_id"] in TEXT_PADDING_IDS  # Moshi 7B's padding id


def test_moshi_private_gives_copies():
    private = moshi_private()
    private.lm_kwargs["num_layers"] = -1
    private.mimi_config["seanet"]["n_filters"] = -1
    assert loaders._lm_kwargs["num_layers"] == base_lm_kwargs()["num_layers"] == 32
    assert loaders._mimi_config["seanet"]["n_filters"] == moshi_private().mimi_config["seanet"]["n_filters"] == 64
