"""Which parameters train, LoRA adapters, and fp32 master copies for low-precision parameters."""

from __future__ import annotations

import math

import torch
from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora
from torch import nn

from moshi_ttt.models.lm import TTTLMModel
from moshi_ttt.modules.transformer import TTT_KEY


def add_lora(model: TTTLMModel, rank: int, scaling: float) -> None:
    """moshi's `replace_all_linear_with_lora` on every nn.Linear, initialised as moshi-finetune does:
    A Kaiming-uniform, B zero — so the model is unchanged at step 0. (moshi's `LoRALinear` itself leaves
    both A and B at nn.Linear's default random init: B is zeroed here explicitly.)"""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the checkpoint is already a LoRA model ('lora': true in its config): trainable: "
                         "ttt+lora would stack a second adapter; fuse it first or use trainable: ttt")
    replace_all_linear_with_lora(model, rank, scaling)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(m.lora_B.weight)


def _wdown_names(model: TTTLMModel) -> set[str]:
    out = set()
    for i in model.ttt_layer_indices:
        prefix = f"transformer.layers.{i}.gating.linear_out."
        out |= {n for n, _ in model.named_parameters() if n.startswith(prefix) and "lora_" not in n}
    return out


def select_trainable(model: TTTLMModel, trainable: str) -> list[str]:
    """Sets requires_grad per the trainable set and returns the trainable parameter names (model order)."""
    wdown = _wdown_names(model) if trainable == "ttt+wdown" else set()
    names = []
    for n, p in model.named_parameters():
        if trainable == "full":
            on = True
        else:
            on = TTT_KEY in n or (trainable == "ttt+lora" and ".lora_" in n) or n in wdown
        p.requires_grad_(on)
        if on:
            names.append(n)
    if trainable != "full" and not any(TTT_KEY in n for n in names):
        raise ValueError("the model has no TTT target parameters to train (no TTT layer, or the TTT config "
                         "disables both use_conv and use_target_proj)")
    return names


class MasterParams:
    """fp32 master copies of low-precision trainable parameters (the optimizer steps on these).

    For fp32/fp64 parameters the master *is* the parameter (no copy). After `backward()` call
    `grads_to_master()`; after `optimizer.step()` call `master_to_params()`.
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.masters: list[torch.Tensor] = []
        for p in self.params:
            if p.dtype in (torch.float32, torch.float64):
                self.masters.append(p)
            else:
                self.masters.append(nn.Parameter(p.detach().float().clone()))

    @property
    def copies(self) -> bool:
        return any(m is not p for m, p in zip(self.masters, self.params))

    def grads_to_master(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def master_to_params(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)

    def named_masters(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.masters))

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        missing = sorted(set(self.names) - set(tensors))
        extra = sorted(set(tensors) - set(self.names))
        if missing or extra:
            raise ValueError(f"{source}: trainable parameters do not match this run (missing {missing[:4]}, "
                             f"unexpected {extra[:4]}): was it written with another 'trainable' set?")
        for n, m in zip(self.names, self.masters):
            t = tensors[n]
            if t.shape != m.shape:
                raise ValueError(f"{source}: shape mismatch for {n}: {tuple(t.shape)} vs {tuple(m.shape)}")
            m.copy_(t.to(m.dtype))
        self.master_to_params()
