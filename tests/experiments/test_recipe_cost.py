"""The Moshi-7B recipe's cost (moshi_ttt/experiments/spoken/cost.py) is computed from the shipped recipe,
moshi_ttt/train/example.yaml, and the published figures (docs/recipe_cost.json) are that computation's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from moshi_ttt.experiments.spoken import cost
from moshi_ttt.ttt.config import load_ttt_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_recipe_is_read_from_the_shipped_example():
    raw = yaml.safe_load(cost.EXAMPLE.read_text())
    r = cost.Recipe.of_config()
    ttt = load_ttt_config(raw["model"]["ttt_config"])
    assert (r.context, r.segment_frames, r.trainable, r.gradient_checkpointing) == (
        raw["model"]["context"], raw["data"]["segment_frames"], raw["trainable"], raw["gradient_checkpointing"])
    assert (r.chunk, r.ttt_layers) == (ttt.layer.chunk_size, len(ttt.layer_indices(32)))
    assert r.segment_frames >= 5 * r.context  # the point of the recipe: most of a segment is beyond the window


def test_the_cost_follows_the_recipe_and_the_published_figures_are_current(tmp_path):
    r = cost.Recipe.of_config()
    base = cost.cost(r)
    longer = cost.cost(dataclasses.replace(r, segment_frames=2 * r.segment_frames))
    assert longer["flops_per_frame"]["attention_dense"] == 2 * base["flops_per_frame"]["attention_dense"]
    full = cost.cost(dataclasses.replace(r, trainable="full"))
    assert full["flops_per_frame"]["passes"] == base["flops_per_frame"]["passes"] + 1
    assert cost.main(["--out", str(tmp_path / "cost.json")]) == 0
    published = json.loads((ROOT / "docs" / "recipe_cost.json").read_text())
    assert json.loads((tmp_path / "cost.json").read_text()) == published
