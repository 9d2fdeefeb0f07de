"""Does a bf16 fast weight lose small TTT updates? Round-to-nearest vs stochastic rounding, measured.

Three `TTTState`s of a bf16 layer see the same frames: the fp32 state (the reference), a bf16 state
folding with round-to-nearest and one with stochastic rounding. The per-fold update size is set by
η so that ρ = rms(ηΔW) / rms(W⁽⁰⁾) takes each listed value. Printed per ρ after `folds` folds:
kept = ⟨Δ, Δ_ref⟩ / ‖Δ_ref‖² (1: the accumulated update is kept, 0: lost), err = ‖W − W_ref‖ / ‖Δ_ref‖
and the relative error of the layer output ‖z(W − W_ref)ᵀ‖ / ‖z W_refᵀ‖. A markdown table for
docs/capacity.md.

    python scripts/bf16_rounding.py [--d 256 --h 704 --chunk 16 --folds 16]
"""

from __future__ import annotations

import argparse

import torch

from moshi_ttt.ttt.config import TTTConfig
from moshi_ttt.ttt.stream import TTTState

RHOS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)


def measure(rho: float, d: int, h: int, C: int, folds: int, seed: int = 0) -> dict[str, tuple[float, ...]]:
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(d, h, generator=g) / h ** 0.5).to(torch.bfloat16)
    frames = [(torch.randn(1, 1, h, generator=g), torch.randn(1, 1, d, generator=g)) for _ in range(C * folds)]
    dw1 = sum(s[0, 0, :, None] * z[0, 0, None, :] for z, s in frames[:C])  # V̂ᵀZ of chunk 0 (identity target)
    lr = rho * float(w0.float().pow(2).mean().sqrt() / dw1.pow(2).mean().sqrt())
    cfg = TTTConfig(chunk_size=C, lr=lr, kernel_size=1, future_frames=0, init="ntp", use_conv=False,
                    use_target_proj=False)
    states = {"fp32": TTTState(1, C, w0, torch.float32),
              "nearest": TTTState(1, C, w0, torch.float32, state_dtype=torch.bfloat16),
              "stochastic": TTTState(1, C, w0, torch.float32, state_dtype=torch.bfloat16, stochastic=True)}
    for z, s in frames:
        for st in states.values():
            st.step(z.to(torch.bfloat16), s.to(torch.bfloat16))
            st.fold(st.due(), cfg)
    ref = states["fp32"]
    d_ref = ref.delta()[0]
    zt = torch.randn(64, h, generator=g)
    out_ref = zt @ ref.w[0].T
    res = {}
    for name in ("nearest", "stochastic"):
        st = states[name]
        dlt = st.delta()[0]
        kept = float((dlt * d_ref).sum() / d_ref.pow(2).sum())
        err = float((st.w[0].float() - ref.w[0]).norm() / d_ref.norm())
        out = float((zt @ (st.w[0].float() - ref.w[0]).T).norm() / out_ref.norm())
        res[name] = (kept, err, out)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--h", type=int, default=704)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--folds", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"d={a.d}, h={a.h}, C={a.chunk}, {a.folds} folds; W⁽⁰⁾ ~ N(0, 1/h) in bf16\n")
    print("| ρ = rms(ηΔW)/rms(W⁽⁰⁾) per fold | nearest: kept | nearest: ‖W−W_fp32‖/‖Δ‖ | nearest: output rel. err "
          "| stochastic: kept | stochastic: ‖W−W_fp32‖/‖Δ‖ | stochastic: output rel. err |")
    print("|---|---|---|---|---|---|---|")
    for rho in RHOS:
        r = measure(rho, a.d, a.h, a.chunk, a.folds)
        cells = " | ".join(f"{k:.3f} | {e:.3f} | {o:.2e}" for k, e, o in (r["nearest"], r["stochastic"]))
        print(f"| {rho:g} | {cells} |")


if __name__ == "__main__":
    main()
