"""Checkpoint flags → the loaded pieces (TTT-Moshi LM, Mimi, tokenizer, LMGen kwargs), the device/dtype
policy, and which TTT config wins. `moshi-ttt infer`, `serve` and `train` all load through here.

TTT-config precedence, written only in `resolve_ttt`:
  1. explicit: `--ttt-config` / the training YAML's `model.ttt_config`;
  2. the config stored in the TTT weights file (`--ttt-weights`, or config.json's `ttt_name`);
  3. config.json's `"ttt"` section;
  4. the shipped Moshi default, `configs/moshi7b_ttt.yaml` (every 6th layer from 0, zero init: exactly
     Moshi until trained), so a plain Kyutai checkpoint runs as "Moshi with TTT layers".
The TTT weights file is read once, here; `checkpoint.load_ttt_moshi` gets its tensors from the result.
"""

from __future__ import annotations

import inspect
import logging
import sys
import typing as tp
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from moshi.models import loaders

from .checkpoint import TTT_NAME_KEY, CheckpointError, checkpoint_info, load_ttt_moshi, read_ttt_file, require_agreement
from .config import TTTModelConfig
from .config_files import load_ttt_config

log = logging.getLogger("moshi_ttt.runtime")

DEFAULT_TTT = "moshi7b_ttt"  # shipped config whose `ttt` section applies when nothing else gives one
_CHECKPOINT_FLAGS = ("hf_repo", "moshi_weight", "mimi_weight", "tokenizer", "config_path", "lora_weight")


@dataclass(frozen=True)
class CheckpointFlags:
    """Where the model comes from: moshi's checkpoint flags, the TTT ones, and `demo` (the tiny random
    checkpoint built and cached by `assets.demo_repo`; excludes the other checkpoint flags)."""

    hf_repo: str | None = None
    moshi_weight: str | None = None
    mimi_weight: str | None = None
    tokenizer: str | None = None
    config_path: str | None = None
    lora_weight: str | None = None
    ttt_config: str | None = None
    ttt_weights: str | None = None
    demo: bool = False

    @classmethod
    def from_args(cls, args: tp.Any) -> CheckpointFlags:
        """From an argparse namespace (or any object) with these attribute names; missing ones are None."""
        return cls(**{f: getattr(args, f, None) for f in cls.__dataclass_fields__ if f != "demo"},
                     demo=bool(getattr(args, "demo", False)))


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
    (with `demo`, an explicit TTT config is baked into the cached demo checkpoint and dropped from them).

    moshi warns "no config.json, assuming Moshi 7B" whenever config.json cannot be fetched, also when the
    repo is simply not in the offline cache: its warnings are passed on only once loading succeeded."""
    from .assets import demo_repo

    if flags.demo:
        clash = [f for f in _CHECKPOINT_FLAGS if getattr(flags, f)]
        if clash:
            raise ValueError("--demo builds its own checkpoint; drop " + ", ".join("--" + f.replace("_", "-")
                                                                                  for f in clash))
        ttt = load_ttt_config(flags.ttt_config) if flags.ttt_config else None
        repo = demo_repo(ttt, cache_root)
        return checkpoint_info(str(repo)), f"demo (tiny random TTT-Moshi, {repo})", CheckpointFlags(
            hf_repo=str(repo), ttt_weights=flags.ttt_weights)
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
    return int((info.lm_config if info.lm_config is not None else loaders._lm_kwargs).get("num_layers", 0))


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
                name: str = "", fuse_lora: bool = False, lm_overrides: dict | None = None) -> Pieces:
    """Builds the LM (strict base state dict + TTT tensors), Mimi and the tokenizer. `lm_overrides` are
    extra LMModel kwargs (training: gradient_checkpointing)."""
    if lm_overrides:
        import dataclasses

        lm_config = dict(info.lm_config if info.lm_config is not None else loaders._lm_kwargs)
        info = dataclasses.replace(info, lm_config={**lm_config, **lm_overrides})
    lm = load_ttt_moshi(info, ttt=ttt, device=device, dtype=dtype, fuse_lora=fuse_lora)
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
         cache_root: str | Path | None = None) -> Pieces:
    """open_checkpoint → resolve_ttt → load_pieces."""
    info, name, flags = open_checkpoint(flags, cache_root)
    ttt = resolve_ttt(info, flags.ttt_config, flags.ttt_weights)
    return load_pieces(info, ttt, device, dtype, name=name, fuse_lora=fuse_lora)


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
