"""The training loop: one process or one rank of a `torchrun` job (DDP or FSDP2, see fsdp.py).

Per step: the rank's slice of the global batch (BatchOrder) → codes [b, 17, T] → `model(codes)` (the
parallel TTT path: every segment starts from W⁽⁰⁾) → moshi-finetune loss normalised over the global
batch → backward (DDP all-reduce / FSDP reduce-scatter) → fp32 master grads → clip → AdamW → schedule → one JSONL line.

metrics.jsonl, one object per step (rank 0; values are global over ranks):
  step (optimizer steps done), loss = text_loss + audio_loss, lr (used by this step),
  grad_norm (all trainable params) and ttt_grad_norm (TTT target params; both before clipping),
  ttt_grad_norm_by_layer, ttt_param_drift(_by_layer) = ‖θ_TTT − θ_TTT at the run's start‖,
  fast_drift / last_delta per TTT layer (see telemetry.py), batch (global segment indices), frames, step_time.

final_params.json (rank 0, end of run): parallel (single | ddp | fsdp), world_size, sha256_by_rank (digest of
the full trainable fp32 weights as each rank sees them), param_bytes_by_rank (parameter bytes each rank holds:
the whole model under DDP, its shards under FSDP) and param_bytes_total (the unsharded model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import yaml

from moshi_ttt import runtime
from moshi_ttt.models.lm import TTTLMModel
from moshi_ttt.models.loaders import base_lm_kwargs
from moshi_ttt.models.streams import FRAME_RATE
from moshi_ttt.modules.transformer import TTT_KEY
from moshi_ttt.train import checkpointing as ckpt
from moshi_ttt.train import fsdp
from moshi_ttt.train.code_cache import CodeCache
from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.data import BatchOrder, Dataset, TokenIds
from moshi_ttt.train.dist import DistEnv, setup
from moshi_ttt.train.loss import global_loss, loss_parts
from moshi_ttt.train.params import MasterParams, add_lora, select_trainable
from moshi_ttt.train.telemetry import FastWeightProbe, grad_norm, ttt_layer_params
from moshi_ttt.utils.device import pick_dtype

log = logging.getLogger("moshi_ttt.train")


def check_segment(segment_frames: int, chunk: int, what: str = "data.segment_frames") -> None:
    """Refuses segments that fit in one TTT chunk: their target parameters would get no gradient."""
    if segment_frames <= chunk:
        raise ValueError(
            f"{what}={segment_frames} frames is not longer than one TTT chunk (chunk_size={chunk}): a segment "
            f"that fits in a single chunk never applies a fast-weight update (chunk i only uses the deltas of "
            f"chunks < i), so the TTT target parameters (conv, W_target) would get no gradient. Use segments of "
            f"more than {chunk} frames (at least 2 chunks), or a smaller ttt.layer.chunk_size.")


def warn_inside_window(segment_frames: int, segment_name: str, context: int | None, context_name: str) -> bool:
    """Warns (and returns True) when a segment fits in the attention window: training on such segments gives TTT
    nothing to remember that attention cannot reach. A warning, not a refusal: TTT can still learn what helps
    inside the window (the paper's in-context gains), and short segments are how smoke runs are made."""
    if context is not None and segment_frames > context:
        return False
    window = (f"{context_name}={context} frames" if context is not None
              else f"the attention window ({context_name}: null, unbounded)")
    log.warning("%s=%d frames is not longer than %s: every frame of a segment is inside the attention window, so "
                "TTT cannot learn to remember beyond the window. To teach memory beyond it, train on segments "
                "several times longer than model.context (docs/training.md)", segment_name, segment_frames, window)
    return True


def code_cache(setting: str | None, pieces: runtime.Pieces, ids: TokenIds, frame_rate: float) -> CodeCache | None:
    """data.code_cache → the cache of this run's codec and tokenizer (None: off)."""
    if setting is None:
        return None
    from moshi_ttt.models.demo import cache_dir

    root = cache_dir() / "codes" if setting == "auto" else Path(setting)
    info = pieces.info
    return CodeCache(root, CodeCache.codec_id_of(info.mimi_weights, info.mimi_config, pieces.mimi.num_codebooks,
                                                 info.tokenizer, ids, frame_rate))


def lr_lambda(cfg: TrainConfig):
    o = cfg.optim

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.max_steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _set_clip(model: TTTLMModel, clip: float | None) -> None:
    """Training uses its own ΔW clip (off by default), whatever the checkpoint's TTT config says."""
    layer = dataclasses.replace(model.ttt_config.layer, clip_norm=clip)
    model.ttt_config = dataclasses.replace(model.ttt_config, layer=layer)
    for g in model.ttt_gatings().values():
        g.cfg = layer
        g.ttt.cfg = layer


class Trainer:
    """Builds everything from a TrainConfig; `run()` trains to max_steps and exports."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.run_dir = Path(cfg.run_dir)
        dev = env.device
        self.dtype = pick_dtype(dev, cfg.dtype)
        torch.manual_seed(cfg.seed)

        info, name, flags = runtime.open_checkpoint(cfg.model.flags())
        ttt = runtime.resolve_ttt(info, flags.ttt_config, flags.ttt_weights)
        ttt_cfg = ttt.config
        frame_rate = float((info.mimi_config or {}).get("frame_rate", FRAME_RATE))
        chunk = ttt_cfg.layer.chunk_size
        has_ttt = bool(ttt_cfg.layer_indices(int(base_lm_kwargs(info).get("num_layers", 0))))
        self.segment_frames = cfg.data.frames(frame_rate)
        segment_name = ("data.segment_frames" if cfg.data.segment_frames is not None
                        else f"data.duration_sec={cfg.data.duration_sec} s ⇒ segment_frames")
        if has_ttt:
            check_segment(self.segment_frames, chunk, segment_name)
        min_frames = cfg.data.min_segment_frames or (chunk + 1 if has_ttt else 1)
        if cfg.data.min_segment_frames is not None and has_ttt:
            check_segment(min_frames, chunk, "data.min_segment_frames")
        self.context = cfg.model.context if cfg.model.context is not None else runtime.checkpoint_context(info)
        if has_ttt:
            warn_inside_window(self.segment_frames, segment_name, self.context,
                               "model.context" if cfg.model.context is not None else "the checkpoint's context")
        # Validates every data file before the (possibly long) model load.
        self.dataset = Dataset(cfg.data.train, self.segment_frames, min_frames, cfg.data.main_speaker, frame_rate)
        self.order = BatchOrder(len(self.dataset), cfg.batch_size, cfg.seed, cfg.data.shuffle)
        self.order.local_batch(0, env.rank, env.world_size)  # batch_size divisible by the world size

        pieces = runtime.load_pieces(info, ttt, dev, self.dtype, name=name,
                                     lm_overrides={"gradient_checkpointing": cfg.gradient_checkpointing},
                                     load_weight=cfg.model.init == "checkpoint")
        runtime.apply_context(pieces.lm, cfg.model.context, info, "model.context", warn=False)
        self.dataset.code_cache = code_cache(cfg.data.code_cache, pieces, TokenIds.of(pieces.lm), frame_rate)
        self.info, model = pieces.info, pieces.lm
        _set_clip(model, cfg.ttt_clip_norm)
        if cfg.trainable == "ttt+lora":
            add_lora(model, cfg.lora.rank, cfg.lora.scaling)
        model.train()
        self.model = model
        self.ids = TokenIds.of(model)
        self.trainable = select_trainable(model, cfg.trainable)
        self.parallel = fsdp.choose(cfg, env.world_size)
        named = dict(model.named_parameters())
        # drift is measured from the TTT parameters the run started with (kept across resumes)
        ttt_start = {n: named[n].detach().clone().double() for n in named if TTT_KEY in n and n in self.trainable}
        if self.parallel == "fsdp":  # replaces the parameters: everything below refers to the sharded ones
            fsdp.shard(model, self.dtype, fsdp.reduce_dtype(cfg, self.dtype), cfg.fsdp.reshard_after_forward)
            named = dict(model.named_parameters())
        self.param_bytes_total = sum(p.numel() * p.element_size() for p in model.parameters())  # unsharded
        self.masters = MasterParams([(n, named[n]) for n in self.trainable])
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.masters.masters, lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.ttt_by_layer = ttt_layer_params(model)
        self.ttt_names = [n for n in self.trainable if TTT_KEY in n]
        self.step = 0
        self.resumed_from: Path | None = None
        self._init_ttt_snapshot: dict[str, torch.Tensor] | None = None
        self._resume()
        self.ttt_init = self._init_ttt_snapshot or ttt_start
        self.ddp = None
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.mimi, self.tokenizer = pieces.mimi, pieces.tokenizer
        self.probe = FastWeightProbe(model) if cfg.log_fast_weights else None

    # -- resume -----------------------------------------------------------------------------------

    def _resume(self) -> None:
        cfg = self.cfg
        if cfg.resume == "never":
            return
        if cfg.resume == "auto":
            found = ckpt.list_checkpoints(self.run_dir)
            if not found:
                return
            path = found[-1]
        else:
            path = Path(cfg.resume)
        tensors, state = ckpt.load_checkpoint(path)
        data = state["data"]
        want = {**self.order.state_dict(), "fingerprint": self.dataset.fingerprint()}
        diff = {k: (data.get(k), v) for k, v in want.items() if data.get(k) != v}
        if diff:
            raise ValueError(f"cannot resume from {path}: its data order differs from this config "
                             f"(checkpoint vs config: {diff})")
        if state.get("trainable") != cfg.trainable:
            raise ValueError(f"cannot resume from {path}: trained with trainable={state.get('trainable')!r}, "
                             f"this config has {cfg.trainable!r}")
        if tensors is None:  # sharded (FSDP) checkpoint: any world size, or a single process
            fsdp.load_sharded(path / fsdp.SHARDED_DIR, self.masters.named_masters(), self.optimizer)
            self.masters.master_to_params()
            for group, saved in zip(self.optimizer.param_groups, state["param_groups"], strict=True):
                group.update(saved)
        elif self.parallel == "fsdp":
            raise ValueError(f"cannot resume from {path} with parallel: fsdp: it was written by a single-process "
                             "or DDP run (trainable.safetensors); resume it with parallel: ddp or in one process")
        else:
            self.masters.load(tensors, str(path / "trainable.safetensors"))
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self._init_ttt_snapshot = {k: v.double() for k, v in state["ttt_init"].items()}
        rngs = state.get("rng", [])
        if self.env.rank < len(rngs):
            ckpt.set_rng_state(rngs[self.env.rank])
        self.resumed_from = path

    def _checkpoint(self) -> None:
        rngs = self.env.gather_objects(ckpt.rng_state())
        state = {"scheduler": self.scheduler.state_dict(),
                 "data": {**self.order.state_dict(), "fingerprint": self.dataset.fingerprint()},
                 "rng": rngs, "trainable": self.cfg.trainable, "world_size": self.env.world_size,
                 "parallel": self.parallel, "ttt_init": self.ttt_init, "config": self.cfg.to_dict()}
        if self.parallel == "fsdp":
            ttt = {n: fsdp.full(p).detach().cpu() for n, p in self.model.named_parameters() if TTT_KEY in n}
            state["param_groups"] = [{k: v for k, v in g.items() if k != "params"}
                                     for g in self.optimizer.param_groups]
            ckpt.save_sharded_checkpoint(self.run_dir, self.step, self.env, self.masters.named_masters(),
                                         self.optimizer, ttt, self.model.ttt_config, state, self.cfg.keep_checkpoints)
            return
        if self.env.is_main:
            state["optimizer"] = self.optimizer.state_dict()
            ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.masters.named_masters(), state,
                                 self.cfg.keep_checkpoints)
        self.env.barrier()

    # -- one step ---------------------------------------------------------------------------------

    def train_step(self) -> dict:
        cfg, env, model = self.cfg, self.env, self.model
        t0 = time.perf_counter()
        indices = self.order.local_batch(self.step, env.rank, env.world_size)
        codes = self.dataset.batch(indices, self.mimi, self.tokenizer, self.ids).to(env.device)
        lr = self.scheduler.get_last_lr()[0]
        out = (self.ddp or model)(codes)
        parts = loss_parts(out, codes, model.audio_offset, model.dep_q,
                           {model.text_padding_token_id, model.end_of_text_padding_id},
                           cfg.text_padding_weight, cfg.first_codebook_weight_multiplier)
        loss, text, audio = global_loss(parts, env.all_reduce if env.world_size > 1 else None)
        # DDP averages gradients over ranks; each rank's loss is its share of the global loss, so scale by
        # the world size to get the gradient of the global loss (= the single-process gradient).
        (loss * env.world_size).backward()
        self.masters.grads_to_master()
        named = self.masters.named_masters()
        groups = [[named[n] for n in self.ttt_names], self.masters.masters]
        groups += [[named[n] for n, _ in ps if n in named] for ps in self.ttt_by_layer.values()]
        if self.parallel == "fsdp":  # sharded gradients: norms from the local shards, one all-reduce
            ttt_norm, total, *layer_norms = fsdp.grad_norms(groups, env)
            if cfg.max_grad_norm is not None:
                fsdp.clip_(self.masters.masters, cfg.max_grad_norm, total)
        else:
            ttt_norm, total, *layer_norms = [grad_norm(g) for g in groups]
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.masters.masters, cfg.max_grad_norm)
        by_layer = {str(i): v for i, v in zip(self.ttt_by_layer, layer_norms, strict=True)}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.masters.master_to_params()
        self.step += 1

        stats = torch.stack([loss.detach(), text.detach(), audio.detach()]).double()
        env.all_reduce(stats)
        rec = {"step": self.step, "loss": stats[0].item(), "text_loss": stats[1].item(),
               "audio_loss": stats[2].item(), "lr": lr, "grad_norm": total, "ttt_grad_norm": ttt_norm,
               "ttt_grad_norm_by_layer": by_layer}
        drift_by_layer = {}
        for i, ps in self.ttt_by_layer.items():
            sq = sum(float((fsdp.full(p).detach().double() - self.ttt_init[n]).pow(2).sum())
                     for n, p in ps if n in self.ttt_init)
            drift_by_layer[str(i)] = math.sqrt(sq)
        rec["ttt_param_drift"] = math.sqrt(sum(v * v for v in drift_by_layer.values()))
        rec["ttt_param_drift_by_layer"] = drift_by_layer
        if self.probe is not None:
            vals = self.probe.pop()
            keys = sorted(vals)
            t = torch.tensor([[vals[k]["fast_drift"], vals[k]["last_delta"]] for k in keys], dtype=torch.float64)
            env.all_reduce(t)
            t /= env.world_size
            rec["fast_drift"] = {str(k): t[j, 0].item() for j, k in enumerate(keys)}
            rec["last_delta"] = {str(k): t[j, 1].item() for j, k in enumerate(keys)}
        rec["batch"] = self.order.global_batch(self.step - 1)
        rec["frames"] = int(codes.shape[0] * codes.shape[-1] * env.world_size)
        rec["step_time"] = time.perf_counter() - t0
        return rec

    def param_digest(self) -> str:
        """sha256 of the trainable parameters' bytes (fp32 masters, model order; all-gathered under FSDP):
        equal on all ranks iff the replicas hold bit-identical trainable weights."""
        h = hashlib.sha256()
        for n, m in self.masters.named_masters().items():
            h.update(n.encode())
            h.update(fsdp.full(m).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, env = self.cfg, self.env
        metrics_path = self.run_dir / "metrics.jsonl"
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            _truncate_metrics(metrics_path, self.step)
        env.barrier()
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                   disable=not (cfg.progress and env.is_main), dynamic_ncols=True)
        last: dict = {}
        try:
            while self.step < cfg.max_steps:
                rec = self.train_step()
                last = rec
                if env.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", ttt_grad=f"{rec['ttt_grad_norm']:.2e}")
                if not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"step {self.step}: non-finite loss {rec['loss']}")
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.max_steps:
                    self._checkpoint()
        finally:
            bar.close()
        digests = env.gather_objects(self.param_digest())
        held = env.gather_objects(fsdp.local_param_bytes(self.model))
        if env.is_main:
            (self.run_dir / "final_params.json").write_text(json.dumps(
                {"step": self.step, "parallel": self.parallel, "world_size": env.world_size,
                 "sha256_by_rank": digests, "param_bytes_by_rank": held,
                 "param_bytes_total": self.param_bytes_total}, indent=1) + "\n")
        if len(set(digests)) != 1:
            raise RuntimeError(f"data-parallel replicas diverged: trainable-parameter digests per rank {digests}")
        export_cfg = None
        state = None
        if self.parallel == "fsdp":  # consolidated on rank 0, in the run's dtype (the sharded masters are fp32)
            state = {k: v.to(self.dtype) if v.is_floating_point() else v
                     for k, v in fsdp.full_state_dict(self.model).items()}
        if env.is_main:
            lora = dataclasses.asdict(cfg.lora) if cfg.trainable == "ttt+lora" else None
            export_cfg = ckpt.export(self.run_dir / "export", self.model, self.info, cfg.trainable, lora, state,
                                     context=self.context)
        env.barrier()
        return {"step": self.step, "rank": env.rank, "last": last, "export": str(self.run_dir / "export"),
                "export_config": str(export_cfg) if export_cfg else None, "metrics": str(metrics_path)}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keeps the lines of steps <= `step` (the resumed step); a fresh run (step 0) starts a new file."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(x + "\n" for x in keep))


def train(cfg: TrainConfig) -> dict:
    """Runs training as this process (single process, or a rank under torchrun). Returns a summary."""
    env = setup(cfg.device)
    try:
        trainer = Trainer(cfg, env)
        return trainer.run()
    finally:
        env.close()
