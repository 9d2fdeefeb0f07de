"""The model side of `moshi-ttt serve`, built from its `ServeConfig`: Mimi + the TTT LM + the tokenizer in an
`Engine`. Runs in the model worker process (`worker`), or in the web process itself
with `--workers 0`."""

from __future__ import annotations

import logging
import os
import random
import time
import typing as tp
from dataclasses import dataclass

from ..core.config import ServeConfig
from ..metrics import Metrics
from .engine import Engine, EngineConfig

log = logging.getLogger("moshi_ttt.server")


@dataclass
class Loaded:
    engine: Engine
    metrics: tp.Any  # Metrics, or the worker's relay of them
    info: dict


def torch_threads_restorer() -> tp.Callable[[], None]:
    """A function that puts torch's process-wide CPU thread count, which the engine sets, back to what it is now."""
    import torch

    n = torch.get_num_threads()
    return lambda: torch.set_num_threads(n)


def load(cfg: ServeConfig, metrics: tp.Any = None) -> Loaded:
    """Loads the model `cfg` describes and starts the engine (blocking; seconds). `metrics`: what the engine
    records into (default a new `Metrics`)."""
    import numpy as np
    import torch

    from moshi_ttt import runtime
    from moshi_ttt.models.generation import condition_tensors, lm_gen_kwargs
    from moshi_ttt.utils.device import pick_device, pick_dtype

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % (2 ** 32))
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    dtype = pick_dtype(device, half=cfg.half)
    if cfg.half and device.type != "cuda":
        log.info("--half is ignored on CPU (float32)")
    t = time.perf_counter()
    pieces = runtime.load(cfg.checkpoint, device, dtype, fuse_lora=cfg.fuse_lora, cache_root=cfg.cache_dir,
                          state_dtype=cfg.ttt_state_dtype, context=cfg.context)
    lm, mimi, tokenizer, model_name = pieces.lm, pieces.mimi, pieces.tokenizer, pieces.name
    log.info("loaded %s on %s/%s in %.1f s (TTT layers %s)", model_name, device, str(dtype).replace("torch.", ""),
             time.perf_counter() - t, lm.ttt_layer_indices)
    gen = lm_gen_kwargs(pieces.info, temp=cfg.temp, temp_text=cfg.temp_text, top_k=cfg.top_k,
                        top_k_text=cfg.top_k_text)
    n = cfg.max_conversations
    conditions = condition_tensors(pieces.info, lm, n, cfg.cfg_coef, gen)
    threads = cfg.threads
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 2) - 1) if device.type == "cpu" else 1
    if metrics is None:
        metrics = Metrics(max_conversations=n, frame_seconds=1 / mimi.frame_rate)
    metrics.set_ttt_layers(lm.ttt_layer_indices)
    engine = Engine(mimi, lm, tokenizer,
                    EngineConfig(max_conversations=n, threads=threads, batch_wait=cfg.batch_wait_ms / 1000,
                                 telemetry_interval=cfg.telemetry_interval, step_delay=cfg.step_delay_ms / 1000,
                                 fail_step=cfg.fail_step),
                    metrics=metrics, lm_gen_kwargs=gen, cfg_coef=cfg.cfg_coef,
                    condition_tensors=conditions or None, device=device)
    if cfg.memory_store:
        from ..memory.slot_memory import SlotMemory

        why = (f"--cfg-coef {cfg.cfg_coef} (a memory holds one row: needs 1)" if cfg.cfg_coef != 1.0 else
               "a model without TTT layers (a memory is its fast weights)" if not lm.ttt_layer_indices else None)
        if why is not None and not cfg.memory_store_default:
            raise ValueError(f"--memory-store: conversation memory is not possible with {why}")
        if why is None:
            engine.memory = SlotMemory(lm, cfg.memory_format)
        else:
            log.info("conversation memory off: %s", why)
    engine.start()
    model_info = {
        "model": model_name, "demo": cfg.checkpoint.demo, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "max_conversations": n, "sample_rate": int(mimi.sample_rate), "frame_rate": float(mimi.frame_rate),
        "ttt_layers": list(lm.ttt_layer_indices), "ttt": lm.ttt_config.to_dict(), "context": lm.context,
        "ttt_state_bytes_per_conversation": lm.ttt_state_bytes(),  # the engine's live states (streaming since start)
        "generation": {k: v for k, v in gen.items()}, "cfg_coef": cfg.cfg_coef,
    }
    return Loaded(engine, metrics, model_info)
