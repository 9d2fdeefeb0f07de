"""What `infer`, `serve` and `train` share: the checkpoint flags (`flags`) → the loaded pieces (TTT-Moshi LM,
Mimi, tokenizer) through `models.loaders`, and the attention window they run with. (The device and dtype:
`utils.device`; the LMGen arguments: `models.generation`; stderr logging: `utils.logs`.)

It is its own layer, below the three apps and above the models, so that none of the apps imports another.
"""

from __future__ import annotations

import logging
import typing as tp
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from moshi.models import loaders

from moshi_ttt.flags import MOSHI_FLAGS, CheckpointFlags
from moshi_ttt.models.loaders import (
    CheckpointError,
    ResolvedTTT,
    base_lm_kwargs,
    checkpoint_info,
    load_ttt_moshi,
    resolve_ttt,
)
from moshi_ttt.models.streams import FRAME_RATE
from moshi_ttt.ttt.config import load_ttt_config
from moshi_ttt.utils.validate import Checks

log = logging.getLogger("moshi_ttt.runtime")

_check = Checks("checkpoint flags")


# -- the checkpoint and its TTT config --------------------------------------------------------------


def open_checkpoint(flags: CheckpointFlags, cache_root: str | Path | None = None,
                    ) -> tuple[loaders.CheckpointInfo, str, CheckpointFlags]:
    """moshi's CheckpointInfo for the flags, a display name, and the flags as they apply to that checkpoint
    (with `demo`: the cached demo checkpoint's folder; an explicit TTT config is baked into it and stays in the
    flags, so that `resolve_ttt` names the flag, not the demo's config.json, as its source).

    moshi warns "no config.json, assuming Moshi 7B" whenever config.json cannot be fetched, also when the
    repo is simply not in the offline cache: its warnings are passed on only once loading succeeded."""
    from moshi_ttt.models.demo import demo_repo

    if flags.demo:
        clash = [f for f in MOSHI_FLAGS if getattr(flags, f)]
        if clash:
            raise ValueError("--demo builds its own checkpoint; drop " + ", ".join("--" + f.replace("_", "-")
                                                                                  for f in clash))
        ttt = load_ttt_config(flags.ttt_config) if flags.ttt_config else None
        repo = demo_repo(ttt, cache_root)
        return checkpoint_info(str(repo)), f"demo (tiny echo TTT-Moshi, {repo})", CheckpointFlags(
            hf_repo=str(repo), ttt_config=flags.ttt_config, ttt_weights=flags.ttt_weights)
    repo = flags.hf_repo
    if repo and Path(repo).is_file():
        raise ValueError(f"--hf-repo {repo}: a file, not a checkpoint folder or repo id (a weights file goes "
                         "to --moshi-weight)")
    if repo and not Path(repo).is_dir() and repo.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"checkpoint folder not found: {repo}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            info = checkpoint_info(repo, flags.moshi_weight, flags.mimi_weight, flags.tokenizer, flags.config_path,
                                   flags.lora_weight)
        except CheckpointError:
            raise
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {repo or '(default repo)'}: {e}") from None
    for w in caught:
        log.warning("%s", " ".join(str(w.message).split()))
    return info, repo or loaders.DEFAULT_REPO, flags


# -- loading ----------------------------------------------------------------------------------------


@dataclass
class Pieces:
    """Everything a run needs from a checkpoint."""

    info: loaders.CheckpointInfo
    name: str
    lm: tp.Any  # TTTLMModel (or moshi's LoRA-wrapped model)
    mimi: tp.Any
    tokenizer: tp.Any
    ttt: ResolvedTTT
    device: torch.device
    dtype: torch.dtype


def load_pieces(info: loaders.CheckpointInfo, ttt: ResolvedTTT, device: torch.device, dtype: torch.dtype,
                name: str = "", fuse_lora: bool = False, lm_overrides: dict | None = None,
                load_weight: bool = True) -> Pieces:
    """Builds the LM (strict base state dict + TTT tensors), Mimi and the tokenizer. `lm_overrides` are
    extra LMModel kwargs (training: gradient_checkpointing); `load_weight` False: a freshly initialised LM of
    the checkpoint's architecture (training from random init; the TTT weights file still loads)."""
    if lm_overrides:
        import dataclasses

        info = dataclasses.replace(info, lm_config={**base_lm_kwargs(info), **lm_overrides})
    lm = load_ttt_moshi(info, ttt=ttt, device=device, dtype=dtype, fuse_lora=fuse_lora, load_weight=load_weight)
    try:
        mimi = info.get_mimi(device=device)
    except Exception as e:  # moshi raises whatever torch/safetensors raise
        raise CheckpointError(f"Mimi weights {info.mimi_weights}: cannot load ({e})") from None
    try:
        tokenizer = info.get_text_tokenizer()
    except Exception as e:
        raise CheckpointError(f"text tokenizer {info.tokenizer}: cannot load ({e})") from None
    return Pieces(info, name, lm, mimi, tokenizer, ttt, device, dtype)


def load(flags: CheckpointFlags, device: torch.device, dtype: torch.dtype, fuse_lora: bool = False,
         cache_root: str | Path | None = None, state_dtype: str | None = None, context: int | None = None) -> Pieces:
    """open_checkpoint → resolve_ttt → load_pieces → apply_context. `state_dtype` (None: the config's) overrides
    the TTT config's streaming-state dtype (`TTTConfig.state_dtype`); `context` (None: the checkpoint's) the
    attention window."""
    info, name, flags = open_checkpoint(flags, cache_root)
    ttt = resolve_ttt(info, flags.ttt_config, flags.ttt_weights)
    if state_dtype is not None:
        cfg = ttt.config
        ttt = replace(ttt, config=replace(cfg, layer=cfg.layer.with_state(state_dtype=state_dtype)))
    pieces = load_pieces(info, ttt, device, dtype, name=name, fuse_lora=fuse_lora)
    apply_context(pieces.lm, context, info, "--context")
    return pieces


# -- the attention window ---------------------------------------------------------------------------

def checkpoint_context(info: loaders.CheckpointInfo) -> int | None:
    """The attention window (frames) in the checkpoint's LM config (moshi's `context`; None: unbounded)."""
    return base_lm_kwargs(info).get("context")


def apply_context(lm: tp.Any, context: int | None, info: loaders.CheckpointInfo, source: str,
                  warn: bool = True) -> int | None:
    """Runs `lm`'s main transformer with an attention window of `context` frames through moshi's own
    `set_attention_context` (the depformer keeps its own); None keeps the checkpoint's. Logs a warning naming
    both windows when `context` differs from the checkpoint's config.json (with `warn`), and returns the window in
    effect.
    Call before streaming starts: the KV cache's capacity is the window."""
    from moshi.modules.transformer import set_attention_context

    configured = checkpoint_context(info)
    if context is None:
        return configured
    _check.number(source, context, lo=1, integer=True)
    if context != configured and warn:
        log.warning("%s %d: the main transformer attends over %d frames (%.1f s), not the %s of the checkpoint's "
                    "config.json (the window it was trained with, for a `moshi-ttt train` export)", source, context,
                    context, context / FRAME_RATE,
                    f"{configured} frames" if configured is not None else "unbounded window")
    set_attention_context(lm.transformer, context)
    lm.context = context
    return context
