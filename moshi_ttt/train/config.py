"""Training configuration: validated dataclasses read from one YAML file.

Every invalid value raises `ValueError` naming the field (as `section.key`) and the value. Layout:

    run_dir: runs/tiny              # checkpoints/, metrics.jsonl, export/ (relative: to the YAML's folder)
    model:   {hf_repo, moshi_weight, mimi_weight, tokenizer, config_path, lora_weight, ttt_config, ttt_weights,
              demo,                 # flags.CheckpointFlags: the same names and meaning as `infer`'s flags
              context, init}        # training only (ModelSection)
    data:    {train, segment_frames | duration_sec, main_speaker, min_segment_frames, shuffle, code_cache}
    optim:   {lr, weight_decay, betas, eps, warmup_steps, schedule, min_lr_ratio}
    lora:    {rank, scaling}        # used by trainable: ttt+lora
    fsdp:    {reduce_dtype, reshard_after_forward}   # used when parallel resolves to fsdp
    parallel, trainable, batch_size, max_steps, max_grad_norm, text_padding_weight, first_codebook_weight_multiplier,
    ttt_clip_norm, dtype, device, gradient_checkpointing, seed, log_every, ckpt_every, keep_checkpoints,
    resume, progress, log_fast_weights
"""

from __future__ import annotations

import dataclasses
import math
import typing as tp
from pathlib import Path

from moshi_ttt.flags import PATH_FLAGS, CheckpointFlags
from moshi_ttt.ttt.config import read_config_file
from moshi_ttt.utils.validate import Checks

TRAINABLE_SETS = ("ttt", "ttt+lora", "ttt+wdown", "full")
SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "bfloat16", "float64")
PARALLEL_MODES = ("auto", "ddp", "fsdp")
INITS = ("checkpoint", "random")


_check = Checks("train config")
_bad, _num = _check.error, _check.number


@dataclasses.dataclass(frozen=True)
class DataSection:
    """moshi-finetune's data format: a .jsonl of {"path", "duration"} (paths relative to the .jsonl).

    Each file is cut into consecutive segments of `segment_frames` Mimi frames (12.5 Hz); every segment
    is one document (fast weights start from W⁽⁰⁾). A last, shorter piece is kept (padded with
    moshi's zero token, masked out of the loss) if it has at least `min_segment_frames` real frames
    (default: chunk_size + 1, the least that gives the target parameters a gradient).

    code_cache: where the codec codes of each recording are kept across runs (train/code_cache.py): "auto" (the
    default: `codes/` in moshi-ttt's cache, $MOSHI_TTT_CACHE or ~/.cache/moshi_ttt), a folder, or null (encode
    in every run, as moshi-finetune does).
    """

    train: str | None = None
    segment_frames: int | None = None
    duration_sec: float | None = None
    main_speaker: str = "SPEAKER_MAIN"
    min_segment_frames: int | None = None
    shuffle: bool = True
    code_cache: str | None = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.train, str) or not self.train:
            raise _bad("data.train", self.train, "must be the path of a .jsonl manifest")
        if (self.segment_frames is None) == (self.duration_sec is None):
            raise _bad("data.segment_frames", self.segment_frames,
                       "give exactly one of data.segment_frames (Mimi frames) and data.duration_sec (seconds)")
        _num("data.segment_frames", self.segment_frames, lo=1, integer=True, optional=True)
        _num("data.duration_sec", self.duration_sec, lo=0, lo_open=True, optional=True)
        _num("data.min_segment_frames", self.min_segment_frames, lo=1, integer=True, optional=True)
        if not isinstance(self.main_speaker, str) or not self.main_speaker:
            raise _bad("data.main_speaker", self.main_speaker, "must be a non-empty speaker label")
        _check.flag("data.shuffle", self.shuffle)
        _check.path("data.code_cache", self.code_cache)

    def frames(self, frame_rate: float) -> int:
        """Segment length in Mimi frames."""
        if self.segment_frames is not None:
            return self.segment_frames
        return math.ceil(self.duration_sec * frame_rate)


@dataclasses.dataclass(frozen=True)
class ModelSection(CheckpointFlags):
    """The checkpoint flags (`flags.CheckpointFlags`) and what only training sets:

    context: the attention window of the main transformer while training, in frames (moshi's attention
        `context`, applied with `set_attention_context`); null = the checkpoint's. It is written into the
        export's config.json, so `serve` and `infer` of the export run with the window the model learnt with.
    init: "checkpoint" (the default: the checkpoint's weights) or "random" (a fresh model of the checkpoint's
        architecture, seeded by `seed`; its Mimi and tokenizer still come from the checkpoint). Needs
        trainable: full.
    """

    context: int | None = None
    init: str = "checkpoint"

    def __post_init__(self) -> None:
        super().__post_init__()
        _num("model.context", self.context, lo=1, integer=True, optional=True)
        _check.choice("model.init", self.init, INITS)

    def flags(self) -> CheckpointFlags:
        """The checkpoint flags alone (what `runtime.open_checkpoint` takes)."""
        return CheckpointFlags(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CheckpointFlags)})


@dataclasses.dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup then cosine decay to lr·min_lr_ratio (or constant)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _num("optim.lr", self.lr, lo=0, lo_open=True)
        _num("optim.weight_decay", self.weight_decay, lo=0)
        _num("optim.eps", self.eps, lo=0, lo_open=True)
        _num("optim.warmup_steps", self.warmup_steps, lo=0, integer=True)
        _num("optim.min_lr_ratio", self.min_lr_ratio, lo=0)
        if self.min_lr_ratio > 1:
            raise _bad("optim.min_lr_ratio", self.min_lr_ratio, "must be <= 1")
        b = self.betas
        if not isinstance(b, tuple) or len(b) != 2 or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                          or not 0 <= x < 1 for x in b):
            raise _bad("optim.betas", b, "must be two numbers in [0, 1)")
        _check.choice("optim.schedule", self.schedule, SCHEDULES)


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 16
    scaling: float = 2.0

    def __post_init__(self) -> None:
        _num("lora.rank", self.rank, lo=1, integer=True)
        _num("lora.scaling", self.scaling)


@dataclasses.dataclass(frozen=True)
class FsdpSection:
    """FSDP2 mixed precision and resharding (see fsdp.py). The all-gathered parameters that compute runs
    with have the run's `dtype`; the sharded parameters of trainable tensors are fp32 (the AdamW masters).

    reduce_dtype: dtype of the gradient reduce-scatter; null = float32 (float64 for float64 runs).
    reshard_after_forward: free each layer's gathered parameters after its forward (re-gathered in
        backward): less memory, one more all-gather per layer and step.
    """

    reduce_dtype: str | None = None
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        _check.choice("fsdp.reduce_dtype", self.reduce_dtype, DTYPES, optional=True)
        _check.flag("fsdp.reshard_after_forward", self.reshard_after_forward)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. See the module docstring for the YAML layout.

    trainable: "ttt" (TTT target params only: conv, W_target), "ttt+lora" (+ moshi LoRA adapters on every
        Linear, B zero-initialised), "ttt+wdown" (+ W_down = linear_out of the TTT layers), "full".
    parallel: how a torchrun job (WORLD_SIZE > 1) splits the work: "ddp" (replicas, gradients all-reduced),
        "fsdp" (FSDP2: parameters, gradients and AdamW state sharded over the ranks), or "auto" (the
        default: fsdp for trainable full and ttt+wdown, whose replicated AdamW state would not fit one GPU at
        7B, ddp otherwise). A single process ignores it.
    batch_size: the *global* batch (split evenly over the ranks of a torchrun job).
    ttt_clip_norm: Frobenius clip τ of each ΔW during training; null (the default) = off. The checkpoint's
        own clip setting is overridden by this value while training.
    dtype: parameter dtype (default float32 on CPU, bfloat16 on CUDA). Trainable parameters keep fp32
        master copies for AdamW; the TTT term is always accumulated in fp32 (fp64 for float64).
    resume: "auto" (latest checkpoint in run_dir/checkpoints if any), "never", or a checkpoint folder.
    ckpt_every: steps between resumable checkpoints (0 = only at the end). keep_checkpoints: how many.
    log_fast_weights: also log per-layer fast-weight drift ‖W_end − W⁽⁰⁾‖ and ‖ΔW_last‖ (costs one extra
        linear_in matmul per TTT layer per step).
    """

    run_dir: str
    data: DataSection
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    fsdp: FsdpSection = dataclasses.field(default_factory=FsdpSection)
    parallel: str = "auto"
    trainable: str = "ttt"
    batch_size: int = 1
    max_steps: int = 100
    max_grad_norm: float | None = 1.0
    text_padding_weight: float = 0.5
    first_codebook_weight_multiplier: float = 1.0
    ttt_clip_norm: float | None = None
    dtype: str | None = None
    device: str | None = None
    gradient_checkpointing: bool = False
    seed: int = 0
    log_every: int = 1
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    resume: str = "auto"
    progress: bool = True
    log_fast_weights: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.run_dir, str) or not self.run_dir:
            raise _bad("run_dir", self.run_dir, "must be a folder path")
        _check.choice("trainable", self.trainable, TRAINABLE_SETS)
        if self.model.init == "random" and self.trainable != "full":
            raise _bad("trainable", self.trainable, "must be 'full' with model.init: random (a random base model "
                       "whose weights do not train learns nothing)")
        _check.choice("parallel", self.parallel, PARALLEL_MODES)
        _num("batch_size", self.batch_size, lo=1, integer=True)
        _num("max_steps", self.max_steps, lo=1, integer=True)
        _num("max_grad_norm", self.max_grad_norm, lo=0, lo_open=True, optional=True)
        _num("text_padding_weight", self.text_padding_weight, lo=0)
        _num("first_codebook_weight_multiplier", self.first_codebook_weight_multiplier, lo=0)
        _num("ttt_clip_norm", self.ttt_clip_norm, lo=0, lo_open=True, optional=True)
        _check.choice("dtype", self.dtype, DTYPES, optional=True)
        _check.path("device", self.device)
        _num("seed", self.seed, integer=True)
        _num("log_every", self.log_every, lo=1, integer=True)
        _num("ckpt_every", self.ckpt_every, lo=0, integer=True)
        _num("keep_checkpoints", self.keep_checkpoints, lo=1, integer=True)
        if not isinstance(self.resume, str) or not self.resume:
            raise _bad("resume", self.resume, "must be 'auto', 'never' or a checkpoint folder")
        for name in ("gradient_checkpointing", "progress", "log_fast_weights"):
            _check.flag(name, getattr(self, name))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    @classmethod
    def from_dict(cls, d: tp.Mapping[str, tp.Any], base_dir: str | Path | None = None) -> TrainConfig:
        """Builds and validates; relative paths (run_dir, data.train, model.*) are taken relative to
        `base_dir` (the YAML file's folder) when given."""
        if not isinstance(d, tp.Mapping):
            raise ValueError(f"invalid train config: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        sections = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "lora": LoraSection,
                    "fsdp": FsdpSection}
        built = {}
        for name, sec_cls in sections.items():
            raw = d.pop(name, None)
            if raw is None:
                if name == "data":
                    raise _bad("data", None, "the 'data' section is required (data.train, data.segment_frames)")
                continue
            built[name] = _check.build(sec_cls, raw, name)
        if "run_dir" not in d:
            raise _bad("run_dir", None, "is required")
        cfg = _check.build(cls, d, "top level", **built)
        if base_dir is not None:
            cfg = cfg.resolve_paths(Path(base_dir))
        return cfg

    def resolve_paths(self, base: Path) -> TrainConfig:
        def rel(p: str | None) -> str | None:
            return p if p is None or Path(p).is_absolute() else str(base / p)

        # model.* may also be HF repo ids / shipped config names: only rebased when the file exists.
        def rel_if_exists(p: str | None) -> str | None:
            if p is None or Path(p).is_absolute():
                return p
            cand = base / p
            return str(cand) if cand.exists() else p

        model = dataclasses.replace(self.model, **{f: rel_if_exists(getattr(self.model, f)) for f in PATH_FLAGS})
        resume = self.resume if self.resume in ("auto", "never") else rel(self.resume)
        cache = self.data.code_cache if self.data.code_cache in (None, "auto") else rel(self.data.code_cache)
        return dataclasses.replace(self, run_dir=rel(self.run_dir), data=dataclasses.replace(
            self.data, train=rel(self.data.train), code_cache=cache), model=model, resume=resume)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"train config not found: {path}")
        data = read_config_file(path)
        try:
            return cls.from_dict(data, base_dir=path.resolve().parent)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

