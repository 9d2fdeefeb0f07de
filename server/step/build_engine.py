"""The model side of `moshi-ttt serve`, built from the command-line flags: Mimi + the TTT LM + the
tokenizer in an `Engine`. Runs in the model worker process (`worker`), or in the web process itself
with `--workers 0`."""

from __future__ import annotations

import logging
import os
import random
import time
import typing as tp
from dataclasses import dataclass

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


def load(args, metrics: tp.Any = None) -> Loaded:
    """Loads the model described by the flags and starts the engine (blocking; seconds). `metrics`: what
    the engine records into (default a new `Metrics`)."""
    import numpy as np
    import torch

    from moshi_ttt import runtime
    from moshi_ttt.models.generation import condition_tensors, lm_gen_kwargs
    from moshi_ttt.utils.device import pick_device, pick_dtype

    random.seed(args.seed)
    np.random.seed(args.seed % (2 ** 32))
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    dtype = pick_dtype(device, half=args.half)
    if args.half and device.type != "cuda":
        log.info("--half is ignored on CPU (float32)")
    t = time.perf_counter()
    pieces = runtime.load(runtime.CheckpointFlags.from_args(args), device, dtype, fuse_lora=args.fuse_lora,
                          cache_root=args.cache_dir, state_dtype=getattr(args, "ttt_state_dtype", None),
                          context=getattr(args, "context", None))
    lm, mimi, tokenizer, model_name = pieces.lm, pieces.mimi, pieces.tokenizer, pieces.name
    log.info("loaded %s on %s/%s in %.1f s (TTT layers %s)", model_name, device, str(dtype).replace("torch.", ""),
             time.perf_counter() - t, lm.ttt_layer_indices)
    gen = lm_gen_kwargs(pieces.info, temp=args.temp, temp_text=args.temp_text, top_k=args.top_k,
                        top_k_text=args.top_k_text)
    n = args.max_conversations
    conditions = condition_tensors(pieces.info, lm, n, args.cfg_coef, gen)
    threads = args.threads
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 2) - 1) if device.type == "cpu" else 1
    if metrics is None:
        metrics = Metrics(max_conversations=n, frame_seconds=1 / mimi.frame_rate)
    metrics.set_ttt_layers(lm.ttt_layer_indices)
    engine = Engine(mimi, lm, tokenizer,
                    EngineConfig(max_conversations=n, threads=threads, batch_wait=args.batch_wait_ms / 1000,
                                 telemetry_interval=args.telemetry_interval,
                                 step_delay=getattr(args, "step_delay_ms", 0.0) / 1000,
                                 fail_step=getattr(args, "fail_step", 0)),
                    metrics=metrics, lm_gen_kwargs=gen, cfg_coef=args.cfg_coef,
                    condition_tensors=conditions or None, device=device)
    if getattr(args, "memory_store", None):
        from ..memory.slot_memory import SlotMemory

        why = (f"--cfg-coef {args.cfg_coef} (a memory holds one row: needs 1)" if args.cfg_coef != 1.0 else
               "a model without TTT layers (a memory is its fast weights)" if not lm.ttt_layer_indices else None)
        if why is not None and not getattr(args, "memory_store_default", False):
            raise ValueError(f"--memory-store: conversation memory is not possible with {why}")
        if why is None:
            engine.memory = SlotMemory(lm, args.memory_format)
        else:
            log.info("conversation memory off: %s", why)
    engine.start()
    model_info = {
        "model": model_name, "demo": bool(args.demo), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "max_conversations": n, "sample_rate": int(mimi.sample_rate), "frame_rate": float(mimi.frame_rate),
        "ttt_layers": list(lm.ttt_layer_indices), "ttt": lm.ttt_config.to_dict(), "context": lm.context,
        "ttt_state_bytes_per_conversation": lm.ttt_state_bytes(),  # the engine's live states (streaming since start)
        "generation": {k: v for k, v in gen.items()}, "cfg_coef": args.cfg_coef,
    }
    return Loaded(engine, metrics, model_info)
