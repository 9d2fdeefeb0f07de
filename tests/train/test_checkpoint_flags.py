"""One dataclass, `flags.CheckpointFlags`, is both the `infer` / `serve` checkpoint flags and the training
YAML's `model:` section: same names, same values, errors naming the YAML field."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from moshi_ttt.flags import MOSHI_FLAGS, PATH_FLAGS, CheckpointFlags, add_checkpoint_args
from moshi_ttt.train.config import TrainConfig

BASE = {"run_dir": "r", "data": {"train": "t.jsonl", "segment_frames": 48}}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_checkpoint_args(p, demo_help="the demo")
    return p


def test_the_cli_flags_and_the_yaml_model_section_give_the_same_flags():
    assert {a.dest for a in _parser()._actions} - {"help"} == {f.name for f in dataclasses.fields(CheckpointFlags)}
    assert set(MOSHI_FLAGS) == set(PATH_FLAGS) - {"ttt_config", "ttt_weights"}
    values = {name: f"/ckpt/{name}" for name in PATH_FLAGS}
    argv = [a for name, v in values.items() for a in ("--" + name.replace("_", "-"), v)] + ["--demo"]
    from_cli = CheckpointFlags.from_args(_parser().parse_args(argv))
    from_yaml = TrainConfig.from_dict({**BASE, "model": {**values, "demo": True}}).model
    assert type(from_yaml.flags()) is CheckpointFlags
    assert from_cli == from_yaml.flags() == CheckpointFlags(**values, demo=True)
    assert CheckpointFlags.from_args(_parser().parse_args([])) == CheckpointFlags() == \
        TrainConfig.from_dict(BASE).model.flags()


def test_the_written_train_config_reads_back(tmp_path):
    (tmp_path / "ttt.yaml").write_text("ttt: {}\n")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": {"demo": True, "ttt_config": "ttt.yaml"}}))
    cfg = TrainConfig.load(path)
    assert cfg.model.flags() == CheckpointFlags(demo=True, ttt_config=str(tmp_path / "ttt.yaml"))  # rebased
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_model_values_name_the_yaml_field():
    for model, match in [({"hf_repo": 5}, r"invalid train config: model\.hf_repo=5: must be a string \(a path\)"),
                         ({"demo": "yes"}, r"invalid train config: model\.demo='yes': must be true or false"),
                         ({"ttt_weight": "x"}, r"unknown key\(s\) \['ttt_weight'\] in model"),
                         ({"context": 0}, r"invalid train config: model\.context=0: must be >= 1"),
                         ({"context": 2.5}, r"invalid train config: model\.context=2\.5: must be an integer"),
                         ({"init": "zeros"}, r"invalid train config: model\.init='zeros': must be one of")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_dict({**BASE, "model": model})
    with pytest.raises(ValueError, match=r"invalid checkpoint flags: lora_weight=3: must be a string"):
        CheckpointFlags(lora_weight=3)


def test_random_init_needs_trainable_full():
    with pytest.raises(ValueError, match=r"invalid train config: trainable='ttt': must be 'full' with model\.init: "
                                         r"random"):
        TrainConfig.from_dict({**BASE, "model": {"init": "random"}})
    cfg = TrainConfig.from_dict({**BASE, "model": {"init": "random", "context": 40}, "trainable": "full"})
    assert (cfg.model.init, cfg.model.context) == ("random", 40)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
