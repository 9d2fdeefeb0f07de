"""What moshi's `LMGen` is built with for a checkpoint: its sampling arguments (`lm_gen_kwargs`) and the
classifier-free guidance condition tensors (`condition_tensors`)."""

from __future__ import annotations

import inspect
import typing as tp

from moshi.models import loaders

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


def condition_tensors(info: loaders.CheckpointInfo, lm: tp.Any, batch_size: int, cfg_coef: float, gen: dict) -> dict:
    """moshi's condition tensors of checkpoint `info`'s model `lm` for `batch_size` conversations; refuses CFG on
    an unconditioned model."""
    from moshi.run_inference import get_condition_tensors

    if cfg_coef != 1.0 and lm.fuser is None and not (gen.get("cfg_is_masked_until") or gen.get("cfg_is_no_text")):
        raise ValueError(f"--cfg-coef {cfg_coef}: this model has no condition fuser (CFG needs a conditioned "
                         "model); use --cfg-coef 1")
    return get_condition_tensors(info.model_type, lm, batch_size, cfg_coef)
