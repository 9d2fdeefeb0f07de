"""Kyutai checkpoints in, TTT weights in and out (moshi_ttt/checkpoint.py).

Every checkpoint here is a fake Hugging Face repo folder built by the test from random tiny models
(`assets.make_local_repo`: config.json in Kyutai's schema with a "ttt" key, model.safetensors,
a Mimi checkpoint + config, a SentencePiece tokenizer). Loading happens with HF_HUB_OFFLINE=1, from a
local folder and from a huggingface_hub cache by repo id. Weights must round-trip bitwise, and every
broken input must raise `CheckpointError` naming the key, shape or value at fault.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from moshi.models import loaders
from safetensors.torch import load_file, save_file

from moshi_ttt.models import demo as assets
from moshi_ttt.models.lm import build_ttt_lm
from moshi_ttt.models.loaders import (
    TTT_METADATA_KEY,
    CheckpointError,
    checkpoint_info,
    load_ttt_moshi,
    resolve_ttt,
    save_ttt,
)
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.ttt.config import TTTModelConfig, load_lm_and_ttt, load_ttt_config

ROOT = Path(__file__).resolve().parents[2]
REPO_ID = "kyutai-test/tiny-ttt"
SEED = 0


# -- helpers ---------------------------------------------------------------------------------------

def _load(folder: Path, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("dtype", torch.float32)
    info = checkpoint_info(str(folder))
    ttt = resolve_ttt(info, kw.pop("ttt_config", None), kw.pop("ttt_weights", None))
    return load_ttt_moshi(info, ttt, **kw)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _randomize_ttt(folder: Path, seed: int = 1) -> None:
    """Replaces the (zero-init) TTT tensors of folder/model.safetensors by random values, so that
    round-trips compare non-trivial TTT weights."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    g = torch.Generator().manual_seed(seed)
    for k in [k for k in state if TTT_KEY in k]:
        state[k] = torch.randn(state[k].shape, generator=g, dtype=state[k].dtype)
    save_file(state, str(path))


def _edit_weights(folder: Path, fn) -> Path:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))
    return path


def _edit_config(folder: Path, fn) -> None:
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def _write_ttt(path: Path, tensors: dict[str, torch.Tensor], cfg: dict | None) -> Path:
    meta = None if cfg is None else {TTT_METADATA_KEY: json.dumps(cfg)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def _raises(match_all: list[str], fn, *args, **kw) -> str:
    with pytest.raises(CheckpointError) as ei:
        fn(*args, **kw)
    msg = str(ei.value)
    for s in match_all:
        assert s in msg, f"{s!r} not named in the error: {msg}"
    return msg


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """The tiny checkpoint folder with random (non-zero) TTT tensors in model.safetensors."""
    folder = assets.make_local_repo(tmp_path_factory.mktemp("repo"), seed=SEED)
    _randomize_ttt(folder)
    return folder


@pytest.fixture
def repo_copy(repo, tmp_path) -> Path:
    """A private copy of `repo`, free to break."""
    return Path(shutil.copytree(repo, tmp_path / "repo"))


@pytest.fixture(scope="module")
def loaded(repo):
    return _load(repo)


@pytest.fixture
def ttt_file(loaded, tmp_path) -> Path:
    """A TTT weights file written by save_ttt (config in its metadata)."""
    return save_ttt(loaded, tmp_path / "ttt.safetensors")


def _ttt_file_parts(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        cfg = json.loads(f.metadata()[TTT_METADATA_KEY])
    return load_file(str(path)), cfg


# -- loading a well-formed checkpoint ----------------------------------------------------------------

def test_repo_layout_is_kyutais(repo):
    raw = json.loads((repo / "config.json").read_text())
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "ttt", "dim", "num_layers", "n_q", "dep_q"):
        assert key in raw, key
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name"):
        assert (repo / raw[key]).is_file(), raw[key]
    TTTModelConfig.from_dict(raw["ttt"])


def test_local_folder_loads_bitwise(repo, loaded):
    """The loaded model holds exactly the file's tensors, and those are exactly the model that was
    built for the repo (same seed ⇒ same random weights)."""
    file_state = load_file(str(repo / "model.safetensors"))
    assert any(TTT_KEY in k for k in file_state)
    _assert_same(dict(loaded.state_dict()), file_state)
    assert not loaded.training

    lm_kwargs, ttt = load_lm_and_ttt("tiny")
    torch.manual_seed(SEED)
    built = build_ttt_lm(lm_kwargs, ttt).state_dict()
    base = {k: v for k, v in loaded.state_dict().items() if TTT_KEY not in k}
    _assert_same(base, {k: v for k, v in built.items() if TTT_KEY not in k})
    assert loaded.ttt_layer_indices == [0, 2]
    assert loaded.ttt_config == TTTModelConfig.from_dict(json.loads((repo / "config.json").read_text())["ttt"])


def test_base_part_loads_strictly_into_plain_moshi(repo, loaded):
    """The non-TTT part of the loaded model is exactly a moshi LMModel state dict (strict load)."""
    info = checkpoint_info(str(repo))
    lm_kwargs = {k: v for k, v in info.lm_config.items() if k != "ttt"}
    plain = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, device="cpu", dtype=torch.float32)
    base = {k: v for k, v in loaded.state_dict().items() if TTT_KEY not in k}
    result = plain.load_state_dict(base, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    _assert_same(dict(plain.state_dict()), base)


def test_hf_repo_id_from_offline_cache(repo, tmp_path):
    """A repo id resolves from a huggingface_hub cache with HF_HUB_OFFLINE=1 and no reachable hub."""
    cache = tmp_path / "hf-cache"
    snap = assets.install_in_hf_cache(repo, REPO_ID, cache)
    script = textwrap.dedent(f"""
        import torch
        from safetensors.torch import load_file
        from moshi_ttt.models.loaders import checkpoint_info, load_ttt_moshi
        info = checkpoint_info({REPO_ID!r})
        assert str(info.moshi_weights).startswith({str(cache)!r}), info.moshi_weights
        model = load_ttt_moshi(info, device="cpu", dtype=torch.float32)
        ref = load_file({str(repo / "model.safetensors")!r})
        sd = model.state_dict()
        assert sorted(sd) == sorted(ref)
        bad = [k for k in ref if sd[k].dtype != ref[k].dtype or not torch.equal(sd[k], ref[k])]
        assert not bad, bad
        assert model.ttt_layer_indices == [0, 2]
        mimi = info.get_mimi("cpu")
        tok = info.get_text_tokenizer()
        print("OK", len(sd), mimi.sample_rate, tok.vocab_size())
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"),
               HF_ENDPOINT="http://127.0.0.1:9", NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK"), proc.stdout
    assert snap.is_dir()


def test_source_c_init_when_weights_lack_ttt(tmp_path):
    """config.json has "ttt" but model.safetensors has no TTT tensors ⇒ zero init: conv = 0, W_target = I,
    and the base weights are still loaded bitwise."""
    folder = assets.make_local_repo(tmp_path / "repo", seed=SEED, ttt_in_weights=False)
    file_state = load_file(str(folder / "model.safetensors"))
    assert not any(TTT_KEY in k for k in file_state)
    model = _load(folder)
    ttt = model.ttt_state_dict()
    assert sorted(ttt) == sorted(f"transformer.layers.{i}.gating.ttt.{n}" for i in (0, 2)
                                 for n in ("conv.weight", "w_target"))
    for k, v in ttt.items():
        if k.endswith("conv.weight"):
            assert torch.count_nonzero(v) == 0, k
        else:
            assert torch.equal(v, torch.eye(v.shape[0])), k
    _assert_same({k: v for k, v in model.state_dict().items() if TTT_KEY not in k}, file_state)


# -- TTT weights out and back in ---------------------------------------------------------------------------

def test_save_load_ttt_roundtrip_bitwise(tmp_path, repo):
    """save_ttt → load_ttt_moshi(ttt_weights=...) restores the TTT tensors bitwise (and their config),
    on top of a checkpoint whose own TTT tensors differ."""
    model = _load(repo)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.ttt_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    path = save_ttt(model, tmp_path / "out" / "ttt.safetensors")
    assert path.with_suffix(".json").is_file()
    saved = load_file(str(path))
    assert all(TTT_KEY in k for k in saved)
    _assert_same(saved, model.ttt_state_dict())

    again = _load(repo, ttt_weights=path)
    _assert_same(dict(again.state_dict()), dict(model.state_dict()))
    assert again.ttt_config == model.ttt_config
    # and the repo's own TTT tensors were really replaced
    repo_ttt = {k: v for k, v in load_file(str(repo / "model.safetensors")).items() if TTT_KEY in k}
    assert any(not torch.equal(repo_ttt[k], v) for k, v in again.ttt_state_dict().items())


def test_save_load_roundtrip_bf16(tmp_path, repo):
    model = _load(repo, dtype=torch.bfloat16)
    path = save_ttt(model, tmp_path / "ttt_bf16.safetensors")
    again = _load(repo, dtype=torch.bfloat16, ttt_weights=path)
    _assert_same(dict(again.state_dict()), dict(model.state_dict()))


def test_ttt_file_config_is_used(tmp_path, repo):
    """A TTT file's config wins over config.json when no explicit config is given (different chunk_size:
    same tensor shapes, so only the config says which applies)."""
    lm_kwargs, ttt = load_lm_and_ttt("tiny")
    ttt8 = dataclasses.replace(ttt, layer=dataclasses.replace(ttt.layer, chunk_size=8))
    torch.manual_seed(3)
    src = build_ttt_lm(lm_kwargs, ttt8)
    path = save_ttt(src, tmp_path / "ttt8.safetensors")
    model = _load(repo, ttt_weights=path)
    assert model.ttt_config.layer.chunk_size == 8
    _assert_same(model.ttt_state_dict(), src.ttt_state_dict())
    # an explicit config that agrees is accepted
    _load(repo, ttt_weights=path, ttt_config=ttt8)


# -- broken checkpoints: each error names the problem ----------------------------------------------------

BASE_KEY = "transformer.layers.1.gating.linear_in.weight"


def test_missing_base_key(repo_copy):
    _edit_weights(repo_copy, lambda s: s.pop(BASE_KEY))
    _raises(["missing", BASE_KEY], _load, repo_copy)


def test_unexpected_base_key(repo_copy):
    extra = "transformer.layers.1.bogus.weight"
    _edit_weights(repo_copy, lambda s: s.__setitem__(extra, torch.zeros(3)))
    _raises(["unexpected", extra], _load, repo_copy)


def test_base_shape_mismatch(repo_copy):
    key = "text_emb.weight"

    def shrink(s):
        s[key] = s[key][:-1].clone()
    _edit_weights(repo_copy, shrink)
    _raises([key, "(64, 64)", "(65, 64)"], _load, repo_copy)


def test_ttt_file_missing_key(ttt_file, repo, tmp_path):
    tensors, cfg = _ttt_file_parts(ttt_file)
    key = "transformer.layers.2.gating.ttt.w_target"
    del tensors[key]
    path = _write_ttt(tmp_path / "missing.safetensors", tensors, cfg)
    _raises(["missing", key, str(path)], _load, repo, ttt_weights=path)


@pytest.mark.parametrize("key, words", [
    ("transformer.layers.1.gating.ttt.conv.weight", ["unexpected TTT key", "[0, 2]"]),
    ("text_emb.weight", ["unexpected non-TTT key"]),
])
def test_ttt_file_unexpected_key(ttt_file, repo, tmp_path, key, words):
    tensors, cfg = _ttt_file_parts(ttt_file)
    tensors[key] = tensors["transformer.layers.0.gating.ttt.conv.weight"].clone()
    path = _write_ttt(tmp_path / "unexpected.safetensors", tensors, cfg)
    _raises([key, *words], _load, repo, ttt_weights=path)


def test_ttt_file_shape_mismatch_kernel_3_vs_5(ttt_file, repo, tmp_path):
    """Conv taps of a kernel_size-3 layer against the checkpoint's kernel_size-5 config."""
    tensors, _ = _ttt_file_parts(ttt_file)
    key = "transformer.layers.0.gating.ttt.conv.weight"
    for k in [k for k in tensors if k.endswith("conv.weight")]:
        tensors[k] = tensors[k][:, :, 1:4].clone()
    path = _write_ttt(tmp_path / "k3.safetensors", tensors, None)
    _raises(["shape mismatch", key, "(64, 1, 3)", "(64, 1, 5)"], _load, repo, ttt_weights=path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_ttt_file_non_finite(ttt_file, repo, tmp_path, bad):
    tensors, cfg = _ttt_file_parts(ttt_file)
    key = "transformer.layers.2.gating.ttt.w_target"
    tensors[key][3, 5] = bad
    path = _write_ttt(tmp_path / "nonfinite.safetensors", tensors, cfg)
    _raises(["non-finite", key], _load, repo, ttt_weights=path)


def test_repo_ttt_tensors_non_finite(repo_copy):
    key = "transformer.layers.0.gating.ttt.conv.weight"

    def poison(s):
        s[key][0, 0, 2] = float("nan")
    _edit_weights(repo_copy, poison)
    _raises(["non-finite", key], _load, repo_copy)


def test_ttt_layer_index_out_of_range_in_config(repo_copy):
    _edit_config(repo_copy, lambda raw: raw["ttt"].update(layers=[99]))
    _raises(["layers", "99", "4 layers"], _load, repo_copy)


def test_ttt_layer_index_out_of_range_in_file(ttt_file, repo, tmp_path):
    tensors, cfg = _ttt_file_parts(ttt_file)
    key = "transformer.layers.99.gating.ttt.w_target"
    tensors[key] = tensors["transformer.layers.0.gating.ttt.w_target"].clone()
    path = _write_ttt(tmp_path / "l99.safetensors", tensors, cfg)
    _raises([key, "layer 99", "4 layers"], _load, repo, ttt_weights=path)


def test_bad_ttt_value_in_config_json(repo_copy):
    _edit_config(repo_copy, lambda raw: raw["ttt"]["layer"].update(chunk_size=-1))
    _raises(["config.json", "chunk_size", "-1"], _load, repo_copy)


def test_explicit_config_contradicts_ttt_file(ttt_file, repo):
    _, cfg = _ttt_file_parts(ttt_file)
    explicit = TTTModelConfig.from_dict(cfg)
    explicit = dataclasses.replace(explicit, layer=dataclasses.replace(explicit.layer, chunk_size=8))
    _raises(["contradicts", "chunk_size", "8", "16", str(ttt_file)], _load, repo, ttt_weights=ttt_file,
            ttt_config=explicit)


def test_explicit_config_contradicts_config_json(repo):
    explicit = TTTModelConfig.from_dict(json.loads((repo / "config.json").read_text())["ttt"])
    explicit = dataclasses.replace(explicit, layer=dataclasses.replace(explicit.layer, lr=0.5))
    _raises(["contradicts", "config.json", "lr"], _load, repo, ttt_config=explicit)
    moved = dataclasses.replace(explicit, layers=(1, 3), layer=dataclasses.replace(explicit.layer, lr=0.001))
    _raises(["contradicts", "layers", "[1, 3]"], _load, repo, ttt_config=moved)


def test_explicit_config_may_differ_from_the_trained_one_in_state_fields_only(ttt_file, repo):
    """state_dtype / state_rounding / rounding_seed say how the streaming state is stored, not what was trained."""
    _, cfg = _ttt_file_parts(ttt_file)
    explicit = TTTModelConfig.from_dict(cfg)
    layer = explicit.layer.with_state(state_dtype="bfloat16", state_rounding="nearest", rounding_seed=9)
    lm = _load(repo, ttt_weights=ttt_file, ttt_config=dataclasses.replace(explicit, layer=layer))
    g = next(iter(lm.ttt_gatings().values()))
    assert g.cfg.state_dtype == "bfloat16" and g.cfg.rounding_seed == 9
    with lm.streaming(1):
        assert g._streaming_state.w.dtype == torch.bfloat16 and not g._streaming_state.stochastic


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_moshi_safetensors(repo_copy, how):
    path = repo_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00not a safetensors file" * 8,
                      "empty": b""}[how])
    _raises([str(path), "cannot read Moshi weights"], _load, repo_copy)


def test_corrupt_ttt_safetensors(ttt_file, repo):
    data = ttt_file.read_bytes()
    ttt_file.write_bytes(data[: len(data) - 100])
    _raises([str(ttt_file), "not a readable safetensors"], _load, repo, ttt_weights=ttt_file)


def test_missing_ttt_file(repo, tmp_path):
    path = tmp_path / "nope.safetensors"
    _raises([str(path), "not found"], _load, repo, ttt_weights=path)


def test_missing_moshi_weights(repo_copy):
    path = repo_copy / "model.safetensors"
    path.unlink()
    _raises([str(path), "not found"], _load, repo_copy)


def test_config_json_invalid_json(repo_copy):
    cfg = repo_copy / "config.json"
    cfg.write_text(cfg.read_text()[:-20])
    _raises([str(cfg), "invalid JSON"], checkpoint_info, str(repo_copy))


def test_folder_without_config_json(repo_copy):
    (repo_copy / "config.json").unlink()
    _raises(["config.json", str(repo_copy)], checkpoint_info, str(repo_copy))


def _plain_kyutai(folder: Path) -> Path:
    """`folder` turned into a checkpoint in Kyutai's own layout: no "ttt" in config.json, no TTT tensors."""
    _edit_config(folder, lambda raw: raw.pop("ttt"))
    _edit_weights(folder, lambda s: [s.pop(k) for k in [k for k in s if TTT_KEY in k]])
    return folder


def test_plain_kyutai_checkpoint_gets_the_shipped_moshi_ttt_defaults(repo_copy, caplog):
    """No TTT config anywhere ⇒ configs/moshi7b_ttt.yaml's TTT section (every 6th layer from 0: layer 0 of the
    4-layer tiny LM; zero init), one log line naming the layers, and outputs bitwise plain moshi's."""
    import logging

    _plain_kyutai(repo_copy)
    with caplog.at_level(logging.INFO, logger="moshi_ttt"):
        model = _load(repo_copy)
    default = load_ttt_config("moshi7b_ttt")
    assert model.ttt_config == default and default.layer.init == "zero"
    assert model.ttt_layer_indices == [0]
    lines = [r.getMessage() for r in caplog.records if "TTT layers" in r.getMessage()]
    assert len(lines) == 1 and "TTT layers [0] of 4" in lines[0] and "moshi7b_ttt" in lines[0], lines

    info = checkpoint_info(str(repo_copy))
    plain = loaders.get_moshi_lm(info.moshi_weights, lm_kwargs=dict(info.lm_config), device="cpu",
                                 dtype=torch.float32)
    codes = torch.randint(0, 32, (1, model.num_codebooks, 20))
    with torch.no_grad():  # NaN marks the positions moshi masks, in both
        torch.testing.assert_close(model(codes).logits, plain(codes).logits, rtol=0, atol=0, equal_nan=True)
    # ... and an explicit config still wins (initialised TTT tensors)
    model = _load(repo_copy, ttt_config=load_lm_and_ttt("tiny")[1])
    assert model.ttt_layer_indices == [0, 2]


def test_demo_without_its_trained_weights_is_refused_not_random(tmp_path, monkeypatch):
    """A package missing the demo's weights must not serve a random (buzzing) demo: the error names the file."""
    gone = tmp_path / "gone" / "echo_lm.safetensors"
    monkeypatch.setattr(assets, "DEMO_WEIGHTS", (assets.DEMO_WEIGHTS[0], gone))
    with pytest.raises(FileNotFoundError, match="echo_lm.safetensors"):
        assets.demo_repo(cache_root=tmp_path)
    assert not any(tmp_path.glob("demo-*"))


def test_demo_checkpoint_is_tiny_with_four_codebooks_per_side(tmp_path):
    """`--demo` is configs/tiny.yaml with `assets.DEMO_LM_OVERRIDES` only (4 Moshi + 4 user codebooks, Moshi's
    delays) and the TTT section it was trained with, and it streams through Mimi and moshi's LMGen with 4
    codebooks: Mimi uses as many as the LM generates, and a step produces a text token and 4 audio tokens per
    conversation."""
    from moshi_ttt import runtime
    from moshi_ttt.models.generation import lm_gen_kwargs
    from moshi_ttt.models.lm import make_lm_gen

    repo = assets.demo_repo(cache_root=tmp_path)
    raw = json.loads((repo / "config.json").read_text())
    tiny_lm, tiny_ttt = load_lm_and_ttt("tiny")
    over = assets.DEMO_LM_OVERRIDES
    assert {k: raw[k] for k in tiny_lm} == {**tiny_lm, **over}
    assert (raw["n_q"], raw["dep_q"]) == (8, 4) and len(raw["delays"]) == raw["n_q"] + 1
    assert raw["delays"][0] == raw["delays"][1] == raw["delays"][1 + raw["dep_q"]] == 0  # text, semantic
    # the TTT section the echo LM was trained with (demo_ttt: η 0.01, ntp init), not tiny's (η 0.001, zero init)
    assert TTTModelConfig.from_dict(raw["ttt"]) == load_ttt_config(assets.DEMO_TTT_CONFIG) != tiny_ttt

    pieces = runtime.load(runtime.CheckpointFlags(demo=True), torch.device("cpu"), torch.float32, cache_root=tmp_path)
    assert pieces.mimi.num_codebooks == pieces.lm.dep_q == 4 and pieces.lm.ttt_layer_indices == [0, 2]
    gen = make_lm_gen(pieces.lm, **lm_gen_kwargs(pieces.info))
    pcm = 0.1 * torch.randn(2, 1, 1920, generator=torch.Generator().manual_seed(0))
    outs = []
    with torch.no_grad(), pieces.mimi.streaming(2), gen.streaming(2):
        for _ in range(4):
            codes = pieces.mimi.encode(pcm)
            assert codes.shape == (2, 4, 1)
            out = gen.step(codes)
            if out is not None:
                outs.append(out)
    assert outs and all(o.shape == (2, 1 + 4, 1) for o in outs)
    audio = outs[-1][:, 1:]
    assert ((audio >= 0) & (audio < raw["card"])).all()
    assert pieces.mimi.decode(audio).shape == (2, 1, 1920)
