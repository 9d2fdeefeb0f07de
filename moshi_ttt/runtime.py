"""What `infer`, `serve` and `train` share: the checkpoint flags, the device/dtype policy, and flags →
the loaded pieces (TTT-Moshi LM, Mimi, tokenizer, LMGen kwargs) through `models.loaders`.

It is its own layer, below the three apps and above the models, so that none of the apps imports another.
"""

from __future__ import annotations

import inspect
import logging
import sys
import typing as tp
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from moshi.models import loaders

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


def _flag(help: str, moshi: bool = True) -> tp.Any:
    """A path-valued flag; `moshi`: one of moshi's own checkpoint flags (refused with `demo`)."""
    return field(default=None, metadata={"help": help, "moshi": moshi})


@dataclass(frozen=True)
class CheckpointFlags:
    """Where the model comes from: moshi's checkpoint flags, the TTT ones, and `demo` (the tiny echo
    checkpoint built and cached by `models.demo.demo_repo`; excludes moshi's flags). The one owner of these
    names: `add_checkpoint_args` makes the `infer` / `serve` flags from the fields (`--hf-repo` ...) and the
    training YAML's `model:` section is this dataclass (`hf_repo:` ...)."""

    hf_repo: str | None = _flag("Hugging Face repo id or local folder in Kyutai's layout (default: moshi's "
                                "default repo)")
    moshi_weight: str | None = _flag("local Moshi weights (overrides the repo's)")
    mimi_weight: str | None = _flag("local Mimi weights (overrides the repo's)")
    tokenizer: str | None = _flag("local SentencePiece text tokenizer (overrides the repo's)")
    config_path: str | None = _flag("config.json to use instead of the repo's")
    lora_weight: str | None = _flag("LoRA weights (the config must have 'lora': true)")
    ttt_config: str | None = _flag("TTT config: a YAML/JSON file (a 'ttt' section or the TTT mapping itself) or "
                                   "a shipped config name (tiny, demo_ttt, moshi7b_ttt); must agree with the "
                                   "config stored with the TTT weights", moshi=False)
    ttt_weights: str | None = _flag("TTT safetensors written by `moshi-ttt train` / checkpoint.save_ttt",
                                    moshi=False)
    demo: bool = False

    def __post_init__(self) -> None:
        for name in PATH_FLAGS:
            _check.path(name, getattr(self, name))
        _check.flag("demo", self.demo)

    @classmethod
    def from_args(cls, args: tp.Any) -> CheckpointFlags:
        """From an argparse namespace (or any object) with these attribute names; missing ones are None."""
        return cls(**{f: getattr(args, f, None) for f in PATH_FLAGS}, demo=bool(getattr(args, "demo", False)))


PATH_FLAGS = tuple(f.name for f in fields(CheckpointFlags) if f.name != "demo")
MOSHI_FLAGS = tuple(f.name for f in fields(CheckpointFlags) if f.metadata.get("moshi"))


def add_checkpoint_args(g, demo_help: str) -> None:
    """The `CheckpointFlags` as command-line flags (`--hf-repo` ...; `--demo` with the command's `demo_help`),
    on an argparse parser or group. `CheckpointFlags.from_args` reads them back."""
    for f in fields(CheckpointFlags):
        name = "--" + f.name.replace("_", "-")
        if f.name == "demo":
            g.add_argument(name, action="store_true", help=demo_help)
        else:
            g.add_argument(name, help=f.metadata["help"])


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (tests capture and restore it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def log_to_stderr(prog: str) -> None:
    """moshi_ttt's info lines (which TTT layers run, checkpoint warnings) as `PROG: level: message` on stderr,
    for the commands that have no logging set-up of their own (infer, train)."""
    logger = logging.getLogger("moshi_ttt")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"{prog}: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# -- device and dtype -------------------------------------------------------------------------------


def pick_device(name: str | None = None) -> torch.device:
    """`name`, else cuda when available, else cpu. Asking for cuda on a machine without it is an error."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return device


def pick_dtype(device: torch.device, name: str | None = None, half: bool = False) -> torch.dtype:
    """The LM dtype: `name` ("float32", "bfloat16", "float16") if given, else bfloat16 on CUDA (float16
    with `half`) and float32 on CPU (CPU kernels for bf16 matmuls are slow and moshi's are untested)."""
    if name:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype {name!r}: expected float32, bfloat16 or float16")
        return dtype
    if device.type == "cuda":
        return torch.float16 if half else torch.bfloat16
    return torch.float32


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

CONTEXT_HELP = ("attention window of the main transformer in frames (12.5 per second): the KV cache holds this "
                "many frames. Default: the checkpoint's config.json `context`, which `moshi-ttt train` sets to the "
                "window it trained with")


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


# -- generation -------------------------------------------------------------------------------------

_SAMPLING = ("temp", "temp_text", "top_k", "top_k_text")


def lm_gen_kwargs(info: loaders.CheckpointInfo, **overrides: float | int | None) -> dict:
    """LMGen kwargs: LMGen's own sampling defaults, then the checkpoint's `lm_gen_config`, then the non-None
    `overrides` (temp, temp_text, top_k, top_k_text). Both temperatures ≤ 0 ⇒ greedy (use_sampling False)."""
    from moshi.models import LMGen

    params = inspect.signature(LMGen.__init__).parameters
    gen = {k: params[k].default for k in _SAMPLING}
    gen.update(info.lm_gen_config or {})
    unknown = sorted(set(overrides) - set(_SAMPLING))
    if unknown:
        raise TypeError(f"lm_gen_kwargs: unknown override(s) {unknown}")
    gen.update({k: v for k, v in overrides.items() if v is not None})
    if gen["temp"] <= 0 and gen["temp_text"] <= 0:
        gen["use_sampling"] = False
    return gen


def condition_tensors(pieces: Pieces, batch_size: int, cfg_coef: float, gen: dict) -> dict:
    """moshi's condition tensors for `batch_size` conversations; refuses CFG on an unconditioned model."""
    from moshi.run_inference import get_condition_tensors

    lm = pieces.lm
    if cfg_coef != 1.0 and lm.fuser is None and not (gen.get("cfg_is_masked_until") or gen.get("cfg_is_no_text")):
        raise ValueError(f"--cfg-coef {cfg_coef}: this model has no condition fuser (CFG needs a conditioned "
                         "model); use --cfg-coef 1")
    return get_condition_tensors(pieces.info.model_type, lm, batch_size, cfg_coef)


# -- the memory store flags (`moshi-ttt memory`, `serve`) ------------------------------------------------------

def add_store_args(parser, default_dir: str | None = None, required: bool | None = None) -> None:
    """--memory-store, --memory-ttl (days), --memory-max-bytes: shared by the commands that use a memory store.
    `required` (default: when there is no `default_dir`)."""
    parser.add_argument("--memory-store", default=default_dir,
                        required=default_dir is None if required is None else required,
                        help="where the encrypted conversation memories are: a directory, or s3://bucket/prefix "
                             "(credentials and endpoint from the AWS environment variables, e.g. AWS_ENDPOINT_URL)")
    parser.add_argument("--memory-ttl", type=float, default=30.0,
                        help="days a memory lives after its last save (default 30)")
    parser.add_argument("--memory-max-bytes", type=int, default=None,
                        help="bound on the store's bytes; the least recently used memories are evicted first")


def store_of(args: tp.Any):
    """`memory_store.open_store` of the flags of `add_store_args` (days → seconds)."""
    from moshi_ttt.models.memory_store import DAY, open_store

    return open_store(args.memory_store, ttl=args.memory_ttl * DAY, max_bytes=args.memory_max_bytes)
