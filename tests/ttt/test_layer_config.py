"""TTTConfig validation: every invalid value raises ValueError naming the field and the value."""

import math

import pytest

from moshi_ttt.ttt.config import TTTConfig

BAD = [
    ("chunk_size", 0, {}),
    ("chunk_size", -4, {}),
    ("kernel_size", 0, {}),
    ("kernel_size", -1, {}),
    ("future_frames", 5, {"kernel_size": 5}),
    ("future_frames", 7, {"kernel_size": 5}),
    ("future_frames", 1, {"kernel_size": 1}),
    ("lr", math.nan, {}),
    ("lr", math.inf, {}),
    ("lr", -math.inf, {}),
    ("clip_norm", 0.0, {}),
    ("clip_norm", -1e-5, {}),
    ("init", "xavier", {}),
    ("target", "hidden", {}),
]


@pytest.mark.parametrize("field,value,others", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_invalid_value_raises_naming_field_and_value(field, value, others):
    with pytest.raises(ValueError) as e:
        TTTConfig(**{**others, field: value})
    msg = str(e.value)
    assert field in msg
    assert repr(value) in msg or str(value) in msg


def test_valid_edge_values_are_accepted_and_round_trip():
    edges = [
        TTTConfig(chunk_size=1, kernel_size=1, future_frames=0, init="zero"),
        TTTConfig(chunk_size=8, kernel_size=8, future_frames=7, lr=0.0, clip_norm=1e-12, target="mlp_input"),
    ]
    for cfg in edges:
        assert TTTConfig.from_dict(cfg.to_dict()) == cfg
