"""Kyutai checkpoints in, TTT weights in and out, and which TTT config a checkpoint gets.

The base Moshi state dict loads *strictly* through moshi's `CheckpointInfo`; TTT parameters (keys
containing `TTT_KEY`) are the only additions. The TTT config is decided by `resolve_ttt` alone:
  1. explicit: `--ttt-config` / the training YAML's `model.ttt_config`;
  2. the config stored in the TTT weights file (`--ttt-weights`, or config.json's `ttt_name`);
  3. config.json's `"ttt"` section;
  4. the shipped Moshi default `configs/moshi7b_ttt.yaml` (zero init: exactly Moshi until trained).
The TTT tensors then come from the TTT weights file if there is one, else from the Moshi weights file,
else from initialisation. Errors name the offending key, shape or value.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from moshi.models import loaders
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moshi_ttt.models.lm import TTTLMModel
from moshi_ttt.modules.gating import TTTTarget
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.ttt.config import STATE_FIELDS, TTTModelConfig, load_ttt_config
from moshi_ttt.utils.io import atomic_write

log = logging.getLogger("moshi_ttt.loaders")

DEFAULT_TTT = "moshi7b_ttt"  # shipped config whose `ttt` section applies when nothing else gives one
TTT_METADATA_KEY = "moshi_ttt_config"
TTT_NAME_KEY = "ttt_name"  # config.json: TTT safetensors shipped with the checkpoint (like moshi_name)


class CheckpointError(ValueError):
    """A checkpoint or TTT weights file does not fit the model or its config."""


@dataclass(frozen=True)
class MoshiPrivate:
    """What moshi keeps private and this package needs (copies: changing them changes nothing in moshi).

    lm_kwargs: Moshi 7B's LMModel kwargs, what moshi uses for a checkpoint without config.json.
    mimi_config: Mimi's config, what moshi uses for a checkpoint without a Mimi config.
    is_safetensors: moshi's test of a weights path (safetensors, else a torch pickle)."""

    lm_kwargs: dict
    mimi_config: dict
    is_safetensors: tp.Callable[[str | Path], bool]


def moshi_private() -> MoshiPrivate:
    """The one reader of moshi's private names. Written against moshi 0.2.13 (pinned in pyproject.toml):
    `moshi.models.loaders._lm_kwargs`, `_mimi_config` and `_is_safetensors`, none public in that version."""
    return MoshiPrivate(copy.deepcopy(loaders._lm_kwargs), copy.deepcopy(loaders._mimi_config),
                        loaders._is_safetensors)


def base_lm_kwargs(info: loaders.CheckpointInfo | None = None) -> dict:
    """A copy of the LMModel kwargs of the checkpoint `info` describes: its config.json, or Moshi 7B's when it
    has none (and for `info` None), as moshi's own loader decides."""
    if info is not None and info.lm_config is not None:
        return dict(info.lm_config)
    return moshi_private().lm_kwargs


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "transformer" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def read_ttt_file(path: str | Path) -> tuple[dict[str, torch.Tensor], TTTModelConfig | None]:
    """Tensors and (if present) config of a TTT safetensors file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"TTT weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    cfg = None
    if TTT_METADATA_KEY in meta:
        try:
            cfg = TTTModelConfig.from_dict(json.loads(meta[TTT_METADATA_KEY]))
        except (ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: bad TTT config in metadata: {e}") from e
    return tensors, cfg


def save_ttt(model: TTTLMModel, path: str | Path) -> Path:
    """Writes the TTT-only safetensors (config in metadata) and a readable `<path>.json` beside it."""
    return write_ttt(model.ttt_state_dict(), model.ttt_config, path)


def write_ttt(tensors: dict[str, torch.Tensor], ttt_config: TTTModelConfig, path: str | Path) -> Path:
    """`save_ttt` from TTT tensors already gathered (e.g. consolidated from FSDP shards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = json.dumps(ttt_config.to_dict())
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={TTT_METADATA_KEY: cfg}))
    text = json.dumps(ttt_config.to_dict(), indent=2) + "\n"
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(text))
    return path


def init_ttt_state(model: TTTLMModel, device, dtype) -> dict[str, torch.Tensor]:
    """Freshly initialised TTT tensors for every TTT layer of `model` (source (c))."""
    out = {}
    for i, g in model.ttt_gatings().items():
        fresh = TTTTarget(g.dim, g.cfg, device=device, dtype=dtype)
        for k, v in fresh.state_dict().items():
            out[f"transformer.layers.{i}{TTT_KEY}{k}"] = v
    return out


def check_ttt_tensors(model: TTTLMModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Key and shape check of TTT tensors against the model, with errors naming what is wrong."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if TTT_KEY in k}
    n_layers = len(model.transformer.layers)
    for k in tensors:
        if TTT_KEY not in k:
            raise CheckpointError(f"{source}: unexpected non-TTT key {k!r} in TTT weights")
        layer = _layer_of(k)
        if layer is not None and layer >= n_layers:
            raise CheckpointError(f"{source}: key {k!r} is for layer {layer}, but the model has {n_layers} layers")
        if k not in expected:
            raise CheckpointError(f"{source}: unexpected TTT key {k!r}: the TTT config puts TTT layers at "
                                  f"{model.ttt_layer_indices} (does the config contradict the weights?)")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{source}: missing TTT key(s) {missing[:4]}{' …' if len(missing) > 4 else ''} "
                              f"for TTT layers {model.ttt_layer_indices}")
    for k, v in tensors.items():
        if tuple(v.shape) != expected[k]:
            raise CheckpointError(f"{source}: shape mismatch for {k!r}: file has {tuple(v.shape)}, "
                                  f"the TTT config needs {expected[k]}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: non-finite values in {k!r}")


def require_agreement(a: TTTModelConfig, b: TTTModelConfig, what: str, n_layers: int) -> None:
    diff = []
    if a.layer_indices(n_layers) != b.layer_indices(n_layers):
        diff.append(f"layers {a.layer_indices(n_layers)} vs {b.layer_indices(n_layers)}")
    da, db = a.layer.to_dict(), b.layer.to_dict()
    diff += [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k] and k not in STATE_FIELDS]
    if diff:
        raise CheckpointError(f"the TTT config contradicts {what}: " + "; ".join(diff))


def load_ttt_moshi(info: loaders.CheckpointInfo, ttt: ResolvedTTT | None = None, *,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                   load_weight: bool = True, fuse_lora: bool = False) -> TTTLMModel:
    """Builds the TTT-Moshi described by `info` (moshi's CheckpointInfo) and loads its weights.

    ttt: the resolved TTT config, `resolve_ttt(info, ttt_config, ttt_weights)`; None is `resolve_ttt(info)`
    (the checkpoint's own TTT config, else the shipped default).
    """
    if ttt is None:
        ttt = resolve_ttt(info)
    lm_kwargs, lora = _model_kwargs(info, device)
    cfg, file_tensors, ttt_weights = ttt.config, ttt.file_tensors, ttt.file
    n_layers = lm_kwargs.get("num_layers", 0)
    try:
        cfg.layer_indices(lm_kwargs["num_layers"])
    except ValueError as e:
        raise CheckpointError(str(e)) from None

    weights = info.moshi_weights if load_weight else None
    model = TTTLMModel(ttt=cfg, device=torch.device("meta") if weights is not None else device,
                       dtype=dtype, **lm_kwargs)
    if weights is not None:
        state = _read_moshi_weights(Path(weights), device, dtype)
        repo_tensors = {k: state.pop(k) for k in [k for k in state if TTT_KEY in k]}
        if file_tensors is not None:
            ttt_tensors, source = file_tensors, str(ttt_weights)
        elif repo_tensors:
            ttt_tensors, source = repo_tensors, str(weights)
            if ttt.explicit and ttt.repo_config is not None:
                require_agreement(cfg, ttt.repo_config, "config.json's 'ttt' section", n_layers)
        else:
            ttt_tensors, source = init_ttt_state(model, device, dtype), "init"
        check_ttt_tensors(model, ttt_tensors, source)
        base_expected = {k for k in model.state_dict() if TTT_KEY not in k}
        missing = sorted(base_expected - set(state))
        unexpected = sorted(set(state) - base_expected)
        if missing or unexpected:
            raise CheckpointError(f"{weights}: the Moshi weights do not match the model config: missing keys "
                                  f"{missing[:5]}, unexpected keys {unexpected[:5]}")
        model_state = model.state_dict()
        for k, v in state.items():
            want = model_state[k].shape
            if v.shape != want:
                raise CheckpointError(f"{weights}: shape mismatch for {k!r}: {tuple(v.shape)} vs model {tuple(want)}")
        ttt_tensors = {k: v.to(device=device, dtype=dtype) for k, v in ttt_tensors.items()}
        model.load_state_dict({**state, **ttt_tensors}, strict=True, assign=True)
    elif file_tensors is not None:
        check_ttt_tensors(model, file_tensors, str(ttt_weights))
        model.load_state_dict(file_tensors, strict=False)
    if lora["lora"]:
        if info.lora_weights is None:
            raise CheckpointError("the config says 'lora': true but no LoRA weights were given (--lora-weight or "
                                  "the config's lora_name): moshi's fresh LoRA layers are random, not a no-op")
        model = loaders.get_lora_moshi(model=model, lora_rank=lora["lora_rank"], lora_scaling=lora["lora_scaling"],
                                       lora_weights=info.lora_weights, device=device, dtype=dtype,
                                       fuse_lora=fuse_lora)
    elif info.lora_weights is not None:
        raise CheckpointError(f"LoRA weights {info.lora_weights} given but the config has no 'lora': true")
    return model.eval()


def _model_kwargs(info: loaders.CheckpointInfo, device) -> tuple[dict, dict]:
    """(TTTLMModel kwargs less `ttt`, LoRA settings {lora, lora_rank, lora_scaling}) for the checkpoint.

    moshi 0.2.13's `get_moshi_lm` prepares the kwargs this way and then builds `LMModel` itself (it takes no
    model class), so the preparation is repeated here for our class, through moshi's public helpers:
    conditioners and fuser built, the deprecated `depformer_causal` dropped, `demux_second_stream` renamed,
    the LoRA keys split off (moshi's defaults). config.json's TTT keys are ours and dropped too."""
    kw = base_lm_kwargs(info)
    kw.pop("ttt", None)
    kw.pop(TTT_NAME_KEY, None)
    if "conditioners" in kw:
        kw["condition_provider"] = loaders.get_conditioner_provider(kw["dim"], device, kw)
        del kw["conditioners"]
    if kw.get("fuser", None) is not None:
        kw["fuser"] = loaders.get_condition_fuser(kw)
    kw.pop("depformer_causal", None)
    if "demux_second_stream" in kw:
        kw["demux_second_text_stream"] = kw.pop("demux_second_stream")
    lora = {"lora": kw.pop("lora", False), "lora_rank": kw.pop("lora_rank", 128),
            "lora_scaling": kw.pop("lora_scaling", 2.0)}
    return kw, lora


def _read_moshi_weights(path: Path, device, dtype) -> dict[str, torch.Tensor]:
    """The Moshi weights file's state dict, cast as moshi 0.2.13's `get_moshi_lm` casts it (floating tensors
    to `dtype`, condition_provider.* / fuser.* to float32), which it does only while loading into its own
    `LMModel`. Unlike moshi: TTT tensors keep their stored dtype (checked, then cast by the caller) and a
    torch-pickle checkpoint is cast too."""
    if not path.exists():
        raise CheckpointError(f"Moshi weights not found: {path}")
    try:
        if moshi_private().is_safetensors(path):
            state = load_file(str(path), device=str(device))
        else:
            state = torch.load(path, "cpu")["fsdp_best_state"]["model"]
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read Moshi weights ({e})") from e
    for key, value in state.items():
        if value.dtype.is_floating_point:
            if key.startswith("condition_provider.") or key.startswith("fuser."):
                state[key] = value.float()
            elif TTT_KEY in key:
                state[key] = value
            else:
                state[key] = value.to(dtype)
    return state


def checkpoint_info(hf_repo: str | None, moshi_weight: str | None = None, mimi_weight: str | None = None,
                    tokenizer: str | None = None, config_path: str | None = None,
                    lora_weight: str | None = None) -> loaders.CheckpointInfo:
    """moshi's CheckpointInfo from the usual CLI flags.

    `hf_repo` is a Hugging Face repo id (resolved by huggingface_hub, from its cache when
    HF_HUB_OFFLINE=1) or a local folder in the same layout (config.json naming the files).
    """
    if hf_repo is not None and Path(hf_repo).is_dir():
        folder = Path(hf_repo)
        cfg_file = Path(config_path) if config_path else folder / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{folder}: no config.json (pass --config-path)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from e

        def local(flag: str | None, key: str, default: str | None) -> str | None:
            if flag is not None:
                return flag
            name = raw.get(key, default)
            return None if name is None else str(folder / name)

        info = loaders.CheckpointInfo.from_hf_repo(
            str(folder), moshi_weights=local(moshi_weight, "moshi_name", loaders.MOSHI_NAME),
            mimi_weights=local(mimi_weight, "mimi_name", loaders.MIMI_NAME),
            tokenizer=local(tokenizer, "tokenizer_name", loaders.TEXT_TOKENIZER_NAME),
            config_path=str(cfg_file), mimi_config_path=local(None, "mimi_config_name", None),
            lora_weights=local(lora_weight, "lora_name", None))
        if info.lm_config is not None and TTT_NAME_KEY in info.lm_config:
            info.lm_config[TTT_NAME_KEY] = local(None, TTT_NAME_KEY, None)
        return info
    repo = hf_repo or loaders.DEFAULT_REPO
    if config_path is None:
        # Fetch config.json ourselves: moshi treats a missing one as "legacy Moshi 7B repo", which
        # offline would hide that the repo is simply not in the local cache.
        try:
            config_path = hf_hub_download(repo, "config.json")
        except LocalEntryNotFoundError as e:
            raise CheckpointError(f"{repo}: config.json is not in the local Hugging Face cache and the hub "
                                  f"cannot be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r})") from e
        except (HfHubHTTPError, HFValidationError) as e:
            raise CheckpointError(f"{repo}: cannot get config.json ({e})") from e
    try:
        info = loaders.CheckpointInfo.from_hf_repo(
            repo, moshi_weights=moshi_weight, mimi_weights=mimi_weight,
            tokenizer=tokenizer, config_path=config_path, lora_weights=lora_weight)
        if info.lm_config is not None and TTT_NAME_KEY in info.lm_config:
            info.lm_config[TTT_NAME_KEY] = str(loaders.hf_get(info.lm_config[TTT_NAME_KEY], repo))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})") from e
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        raise CheckpointError(f"{repo}: a checkpoint file is missing ({e})") from e
    return info


# -- which TTT config the model gets ---------------------------------------------------------------


@dataclass
class ResolvedTTT:
    """The TTT config the model gets and where it came from, plus what was read on the way.

    file_tensors / file_config: the TTT weights file's content (None without one); repo_config: config.json's
    "ttt" section (needed to check an explicit config against TTT tensors stored in the Moshi weights)."""

    config: TTTModelConfig
    source: str
    explicit: bool = False
    file: str | None = None
    file_tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    file_config: TTTModelConfig | None = None
    repo_config: TTTModelConfig | None = None


def _num_layers(info: loaders.CheckpointInfo) -> int:
    return int(base_lm_kwargs(info).get("num_layers", 0))


def resolve_ttt(info: loaders.CheckpointInfo, ttt_config: TTTModelConfig | str | Path | None = None,
                ttt_weights: str | Path | None = None) -> ResolvedTTT:
    """The one TTT-config precedence (see the module docstring). `ttt_config` is a config, a file or a shipped
    name. An explicit config must agree with the one stored in the TTT weights file. Logs one line naming the
    TTT layers and the source."""
    lm = info.lm_config if info.lm_config is not None else {}
    if ttt_weights is None and lm.get(TTT_NAME_KEY) is not None:
        ttt_weights = lm[TTT_NAME_KEY]  # resolved to a path by checkpoint_info
    file = None if ttt_weights is None else str(ttt_weights)
    file_tensors, file_config = read_ttt_file(file) if file is not None else (None, None)
    repo_config = None
    if lm.get("ttt") is not None:
        try:
            repo_config = TTTModelConfig.from_dict(lm["ttt"])
        except ValueError as e:
            raise CheckpointError(f"config.json 'ttt' section: {e}") from e
    n_layers = _num_layers(info)
    if ttt_config is not None:
        given = isinstance(ttt_config, TTTModelConfig)
        config = ttt_config if given else load_ttt_config(ttt_config)
        source = "the given TTT config" if given else f"--ttt-config {ttt_config}"
        if file_config is not None:
            require_agreement(config, file_config, f"the TTT weights file {file}", n_layers)
    elif file_config is not None:
        config, source = file_config, f"the TTT weights file {file}"
    elif repo_config is not None:
        config, source = repo_config, "config.json's 'ttt' section"
    else:
        config = load_ttt_config(DEFAULT_TTT)
        source = f"no TTT config given, so the shipped Moshi TTT defaults ({DEFAULT_TTT}, {config.layer.init} init)"
    out = ResolvedTTT(config, source, ttt_config is not None, file, file_tensors, file_config, repo_config)
    try:
        layers = out.config.layer_indices(n_layers)
    except ValueError as e:
        raise CheckpointError(f"{out.source}: {e}") from None
    log.info("TTT layers %s of %d (chunk %d frames): %s", layers, n_layers, out.config.layer.chunk_size, out.source)
    return out
