"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for `moshi-ttt train`: sharding, sharded grad norms and
clipping, and sharded checkpoints through `torch.distributed.checkpoint` (DCP).

Chosen by `parallel` in the training YAML (`choose`): FSDP for trainable `full` and `ttt+wdown` under
`parallel: auto`, whose replicated fp32 masters + AdamW state would not fit one GPU at 7B.

Sharding (`shard`): one FSDP unit per transformer layer of the main transformer, then the root (embeddings,
depformer, output heads). Every parameter becomes a DTensor sharded on dim 0 over the ranks; the forward
all-gathers one layer at a time, the backward reduce-scatters its gradients, and AdamW steps on the local
shards, so parameters, gradients and optimizer state all cost 1/world_size per rank.

Frozen parameters inside sharded units are sharded and gathered like the others and get no gradient (why
the units follow the layers whatever the trainable set: docs/design.md, "FSDP").

Mixed precision: trainable tensors are cast to fp32 before sharding (their shards are the AdamW masters;
`MasterParams` then holds no copies), frozen tensors keep the run's `dtype`. `MixedPrecisionPolicy` gathers
every parameter in `dtype` (bf16 on CUDA by default) for compute and reduce-scatters gradients in
`fsdp.reduce_dtype` (fp32 by default): bf16 params, fp32 reduce; `gradient_checkpointing: true` composes
with it.

Checkpoints (`save_sharded` / `load_sharded`): DCP folder with {"trainable": fqn → fp32 master,
"optim": fqn → AdamW state}, each rank writing its own shards. Loading reshards to whatever the loading job
is: another world size, or a single process with plain tensors (DCP runs without a process group then).
The export is a full state dict consolidated on rank 0 (`full_state_dict`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard import _fully_shard as _fully_shard_impl
from torch.distributed.tensor import DTensor

from moshi_ttt.train.config import TrainConfig
from moshi_ttt.train.dist import DistEnv

FSDP_BY_DEFAULT = ("full", "ttt+wdown")
SHARDED_DIR = "sharded"


def choose(cfg: TrainConfig, world_size: int) -> str:
    """"single", "ddp" or "fsdp" for this run (`parallel: auto` → fsdp for FSDP_BY_DEFAULT trainable sets)."""
    if world_size == 1:
        return "single"
    if cfg.parallel == "auto":
        return "fsdp" if cfg.trainable in FSDP_BY_DEFAULT else "ddp"
    return cfg.parallel


def reduce_dtype(cfg: TrainConfig, dtype: torch.dtype) -> torch.dtype:
    if cfg.fsdp.reduce_dtype is not None:
        return getattr(torch, cfg.fsdp.reduce_dtype)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _trainable_to_fp32(module: nn.Module) -> None:
    """Replaces low-precision trainable parameters of `module` (recursively) by fp32 ones, in place."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if p.requires_grad and p.dtype not in (torch.float32, torch.float64):
                setattr(sub, name, nn.Parameter(p.detach().float(), requires_grad=True))


def _register_fsdp_class(cls: type) -> None:
    """fully_shard swaps the module's class for `type("FSDP" + name, (FSDPModule, cls))`. For moshi's modules
    CPython refuses that `__class__` assignment ("object layout differs"): StreamingModule lists abc.ABC
    before nn.Module, so its layout base differs from FSDPModule's. The same class with `cls` first in the
    MRO has `cls`'s layout; FSDPModule's one nn.Module override (`_apply`, which keeps the sharded
    parameters registered after `.to()`) is carried over explicitly. fully_shard looks the class up in its
    per-class cache first, so registering it there is all it takes (torch 2.9's `cls_to_fsdp_cls`)."""
    cache = getattr(_fully_shard_impl, "cls_to_fsdp_cls", None)
    if not isinstance(cache, dict):
        raise RuntimeError(f"torch {torch.__version__}: fully_shard has no per-class cache (cls_to_fsdp_cls); "
                           "moshi's StreamingModule layers cannot be sharded with this torch version")
    if cls not in cache:
        cache[cls] = type(f"FSDP{cls.__name__}", (cls, FSDPModule), {"_apply": FSDPModule._apply,
                                                                       "__deepcopy__": _no_deepcopy})


def _no_deepcopy(*_args, **_kwargs):
    raise AssertionError("FSDP modules cannot be deep-copied: use the state dict")


def shard(model: nn.Module, dtype: torch.dtype, reduce: torch.dtype, reshard_after_forward: bool) -> None:
    """fully_shard per layer of `model.transformer.layers` (`reshard_after_forward` as given), then the root.
    Call after `requires_grad` is set
    (select_trainable) and before anything keeps references to the parameters (they are replaced)."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce)
    for m in [*model.transformer.layers, model]:
        _register_fsdp_class(type(m))
    for layer in model.transformer.layers:
        _trainable_to_fp32(layer)  # layer by layer: peak memory = the model in `dtype` + one fp32 layer
        fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    _trainable_to_fp32(model)
    # The root stays gathered from its forward to its backward: LMModel returns an LMOutput dataclass, in
    # which FSDP does not find the tensors to hook a re-gather before the backward on.
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered from the shards: a collective, every rank must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_param_bytes(model: nn.Module) -> int:
    return sum(local(p).numel() * p.element_size() for p in model.parameters())


def grad_norms(groups: list[list[torch.Tensor]], env: DistEnv) -> list[float]:
    """Global L2 norm of the gradients of each group of sharded parameters (one all-reduce for all)."""
    sq = torch.zeros(len(groups), dtype=torch.float64)
    for i, ps in enumerate(groups):
        for p in ps:
            if p.grad is not None:
                sq[i] += local(p.grad).detach().double().pow(2).sum().cpu()
    if env.world_size > 1:
        sq = sq.to(env.device)
        env.all_reduce(sq)
    return [math.sqrt(float(x)) for x in sq.cpu()]


@torch.no_grad()
def clip_(params: list[torch.Tensor], max_norm: float, total_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_`'s rule with the global norm already computed from the shards."""
    coef = min(1.0, max_norm / (total_norm + 1e-6))
    for p in params:
        if p.grad is not None:
            local(p.grad).mul_(coef)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated state dict on CPU on rank 0 (empty on the other ranks); every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optim_keys(optimizer: torch.optim.Optimizer, masters: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {n: optimizer.state.get(m, {}) for n, m in masters.items()}


def save_sharded(path, masters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the fp32 masters and their AdamW state to the DCP folder `path`."""
    dcp.save({"trainable": {n: m.detach() for n, m in masters.items()},
              "optim": _optim_keys(optimizer, masters)}, checkpoint_id=str(path))


def load_sharded(path, masters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Loads a `save_sharded` folder into this run's masters (sharded or plain) and AdamW state, resharding
    as needed. Raises ValueError if the checkpoint's trainable tensors differ from this run's."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k[len("trainable."):] for k in meta if k.startswith("trainable.")}
    missing, extra = sorted(set(masters) - saved), sorted(saved - set(masters))
    if missing or extra:
        raise ValueError(f"{path}: trainable parameters do not match this run (missing {missing[:4]}, "
                         f"unexpected {extra[:4]}): was it written with another 'trainable' set?")
    optim: dict[str, dict[str, torch.Tensor]] = {}
    for n, m in masters.items():
        st = {}
        for k in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if f"optim.{n}.{k}" in meta:
                st[k] = torch.zeros((), dtype=torch.float32) if k == "step" else torch.zeros_like(m.detach())
        optim[n] = st
    with torch.no_grad(), warnings.catch_warnings():
        # a single process resuming a sharded checkpoint is intended: DCP warns about it all the same
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load({"trainable": {n: m.detach() for n, m in masters.items()}, "optim": optim},
                 checkpoint_id=str(path), no_dist=not dist.is_initialized())
    for n, m in masters.items():
        if optim[n]:
            optimizer.state[m] = optim[n]
