"""Resumable checkpoints and the exported weights that `moshi-ttt infer` / `serve` load.

Checkpoint folder `run_dir/checkpoints/step_0000010/` (written to a temporary folder, then renamed):
  trainable.safetensors   fp32 master copies of the trainable parameters, by model name
  state.pt                step, optimizer, scheduler, data order (+ dataset fingerprint), RNG per rank
  ttt.safetensors(.json)  TTT-only weights at this step (`checkpoint.save_ttt`)
FSDP runs write `sharded/` (a torch.distributed.checkpoint folder: the fp32 masters and their AdamW state,
one shard file per rank, see fsdp.py) instead of trainable.safetensors and the optimizer entry of state.pt;
any world size, or a single process, resumes from it.

Export folder `run_dir/export/` — a Kyutai-layout folder usable as `--hf-repo`:
  config.json             the base checkpoint's config with absolute paths to the base files, the
                          trained "ttt" section, "context" = the attention window trained with and, for
                          LoRA runs, "lora": true / rank / scaling
  ttt.safetensors(.json)  TTT-only weights + config (`--ttt-weights`); none for a model without TTT layers
  lora.safetensors        LoRA adapters (trainable: ttt+lora), named by config.json's lora_name
  model.safetensors       all weights incl. TTT (trainable: ttt+wdown / full, whose base weights change)
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moshi_ttt.models.lm import TTTLMModel
from moshi_ttt.models.loaders import TTT_NAME_KEY, base_lm_kwargs, save_ttt, write_ttt
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.train import fsdp
from moshi_ttt.train.dist import DistEnv
from moshi_ttt.ttt.config import TTTModelConfig

CKPT_PREFIX = "step_"


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX)
             and p.name[len(CKPT_PREFIX):].isdigit() and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def save_checkpoint(run_dir: Path, step: int, model: TTTLMModel, masters: dict[str, torch.Tensor],
                    state: dict, keep: int) -> Path:
    """Rank 0 only. `state` holds everything but the parameters (optimizer, scheduler, rngs, data...)."""
    final, tmp = _begin(run_dir, step)
    save_file({k: v.detach().contiguous().cpu() for k, v in masters.items()}, str(tmp / "trainable.safetensors"))
    torch.save({**state, "step": step}, tmp / "state.pt")
    save_ttt(model, tmp / "ttt.safetensors")
    return _publish(run_dir, tmp, final, keep)


def save_sharded_checkpoint(run_dir: Path, step: int, env: DistEnv, masters: dict[str, torch.Tensor],
                            optimizer: torch.optim.Optimizer, ttt: dict[str, torch.Tensor],
                            ttt_config: TTTModelConfig, state: dict, keep: int) -> None:
    """Every rank (FSDP): DCP shards of masters + AdamW state; rank 0 adds state.pt (without the optimizer)
    and the TTT weights `ttt` (already gathered)."""
    final = tmp = None
    if env.is_main:
        final, tmp = _begin(run_dir, step)
    tmp = Path(env.gather_objects(str(tmp))[0])
    fsdp.save_sharded(tmp / fsdp.SHARDED_DIR, masters, optimizer)
    env.barrier()
    if env.is_main:
        torch.save({**state, "step": step}, tmp / "state.pt")
        write_ttt(ttt, ttt_config, tmp / "ttt.safetensors")
        _publish(run_dir, tmp, final, keep)
    env.barrier()


def _begin(run_dir: Path, step: int) -> tuple[Path, Path]:
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:07d}"
    tmp = root / f".tmp_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return final, tmp


def _publish(run_dir: Path, tmp: Path, final: Path, keep: int) -> Path:
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """(trainable masters, state); masters None for a sharded (FSDP) checkpoint: see `fsdp.load_sharded`."""
    path = Path(path)
    sharded = (path / fsdp.SHARDED_DIR).is_dir()
    if not (path / "state.pt").exists() or not (sharded or (path / "trainable.safetensors").exists()):
        raise FileNotFoundError(f"not a training checkpoint (needs state.pt and trainable.safetensors or "
                                f"{fsdp.SHARDED_DIR}/): {path}")
    tensors = None if sharded else load_file(str(path / "trainable.safetensors"))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    return tensors, state


def export(out: Path, model: TTTLMModel, info, trainable: str, lora: dict | None,
           state: dict[str, torch.Tensor] | None = None, context: int | None = None) -> Path:
    """Writes the export folder (see module docstring); returns its config.json. `state`: the full state dict
    when `model` is sharded (FSDP, consolidated on rank 0); default `model.state_dict()`. `context`: the
    attention window the model trained with, written as config.json's `context`."""
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = model.state_dict()
    ttt = {k: v for k, v in state.items() if TTT_KEY in k}
    if ttt:  # a model without TTT layers has no TTT weights file: TTT can be added to it later (`ttt_config`)
        write_ttt(ttt, model.ttt_config, out / "ttt.safetensors")
    raw = dict(info.raw_config) if info.raw_config is not None else {}
    if not raw:  # legacy repo without config.json: moshi's defaults
        raw = base_lm_kwargs()
    raw.pop("lora_name", None)
    raw["mimi_name"] = str(Path(info.mimi_weights).resolve())
    raw["tokenizer_name"] = str(Path(info.tokenizer).resolve())
    raw.pop("mimi_config_name", None)
    if info.mimi_config is not None:
        (out / "mimi_config.json").write_text(json.dumps(info.mimi_config, indent=1))
        raw["mimi_config_name"] = "mimi_config.json"
    if trainable in ("ttt+wdown", "full"):
        # every weight, the trained TTT tensors included: `--hf-repo RUN/export` alone loads the trained model
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"))
        raw["moshi_name"] = "model.safetensors"
    else:
        raw["moshi_name"] = str(Path(info.moshi_weights).resolve())
    if lora is not None:
        adapters = {k: v.detach().contiguous().cpu() for k, v in state.items() if ".lora_" in k}
        save_file(adapters, str(out / "lora.safetensors"))
        raw.update(lora=True, lora_rank=lora["rank"], lora_scaling=lora["scaling"], lora_name="lora.safetensors")
    raw["context"] = context
    raw["ttt"] = model.ttt_config.to_dict()
    raw.pop(TTT_NAME_KEY, None)
    if ttt:
        raw[TTT_NAME_KEY] = "ttt.safetensors"  # `--hf-repo RUN/export` alone loads the trained TTT weights
    raw.pop("gradient_checkpointing", None)
    cfg = out / "config.json"
    cfg.write_text(json.dumps(raw, indent=1) + "\n")
    return cfg
