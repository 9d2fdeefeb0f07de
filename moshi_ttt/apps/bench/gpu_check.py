"""TTTLMGen under moshi's CUDA graphs against the same run with the graphs off: the check `--sections gpu`
runs first (a failure stops the section).

Two TTT models sharing every weight (`gpu.build`: `twin`) stream the same conversations in lockstep:
run A exactly as moshi sets it (on CUDA, `LMGen` replays `forward_text` and the depformer as CUDA graphs),
run B inside moshi's `no_cuda_graph()` (its `CUDAGraphed` calls the function directly: the
`NO_CUDA_GRAPH=1` path). Each run has its own RNG state from the same seed, so both draw the same numbers.
Schedule: random exec masks (p = `EXEC_P`), one mid-run reset of conversation 1, ≥ `chunks` chunks of C.

Criteria (all must hold):
* sampled tokens identical at every step; or, if bf16 kernels differ between capture and eager, the text
  logits within `LOGIT_RTOL` (max |a − b| / max |b| per step) up to the first divergent step;
* at every step before a divergence where chunks complete, every fast-weight delta W − W⁽⁰⁾ within
  `FAST_RTOL` (max |Δa − Δb| / max |Δb|, per layer), at ≥ `chunks` such steps;
* `updates` of every conversation (and CFG twin) equals its completed chunks in both runs — counted
  here from the masks and the reset, independently of TTTLMGen's FoldClock;
* the fast weights moved (max drift > 0): the comparison is not vacuous.
On CPU moshi never captures (its `CUDAGraphed` is disabled off CUDA), so A and B are both eager there.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from moshi.utils.compile import no_cuda_graph

from moshi_ttt.models.lm import TTTLMGen, TTTLMModel

LOGIT_RTOL = 1e-2  # bf16: 2⁻⁸ ≈ 4e-3 per rounding, a few roundings deep
FAST_RTOL = 1e-3
EXEC_P = 0.9


class _Rng:
    """One run's global RNG state (the device's generator: sampling draws from it), swapped in per step."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        torch.manual_seed(seed)
        self.state = self._get()

    def _get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    @contextlib.contextmanager
    def active(self):
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(self.state, self.device)
        else:
            torch.set_rng_state(self.state)
        try:
            yield
        finally:
            self.state = self._get()


def schedule(batch: int, chunk: int, chunks: int, seed: int) -> tuple[torch.Tensor, int]:
    """Exec masks [steps, batch] (bool, host) and the step at which conversation 1 is reset (mid-chunk)."""
    steps = math.ceil(1.05 * chunks * chunk / EXEC_P) + 2
    masks = torch.rand(steps, batch, generator=torch.Generator().manual_seed(seed)) < EXEC_P
    return masks, chunk + chunk // 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b| (inf-norm reductions: no |b| temporary next to 7B fast weights)."""
    den = float(torch.linalg.vector_norm(b, float("inf")))
    return float(torch.linalg.vector_norm(a - b, float("inf"))) / (den if den > 0 else 1.0)


def check(ttt: TTTLMModel, twin: TTTLMModel, *, batch: int = 4, chunks: int = 3, cfg_coef: float = 1.0,
          seed: int = 0, twin_seed: int | None = None) -> dict:
    """The comparison described in the module doc. `ttt` and `twin` must hold the same weights (`twin`
    slow weights differing, or `twin_seed` ≠ `seed`, are planted mismatches for tests). Returns the
    figures and `failures` (empty: passed)."""
    device = ttt.device
    C = ttt.ttt_config.layer.chunk_size
    masks, reset_at = schedule(batch, C, chunks, seed)
    cfg_kw = dict(cfg_coef=cfg_coef, cfg_is_no_text=True) if cfg_coef != 1 else {}
    logits: dict[str, torch.Tensor] = {}
    gens = {name: TTTLMGen(m, support_out_of_sync=True, **cfg_kw,
                           on_text_logits_hook=lambda x, k=name: logits.__setitem__(k, x))
            for name, m in (("a", ttt), ("b", twin))}
    rngs = {"a": _Rng(device, seed), "b": _Rng(device, seed if twin_seed is None else twin_seed)}
    modes = {"a": contextlib.nullcontext, "b": no_cuda_graph}
    user_gen = torch.Generator().manual_seed(seed + 1)
    frames = np.zeros(batch, dtype=np.int64)  # executed frames since the conversation's last reset
    diverged, logit_rel, fast_rel, folds_compared = -1, 0.0, 0.0, 0
    reset_mask = torch.arange(batch, device=device) == 1
    with torch.inference_mode(), gens["a"].streaming(batch), gens["b"].streaming(batch):
        for t, mask in enumerate(masks):
            if t == reset_at:
                frames[1] = 0
            user = torch.randint(0, ttt.card, (batch, ttt.n_q - ttt.dep_q, 1), generator=user_gen).to(device)
            out = {}
            for name, g in gens.items():
                with modes[name]():  # B: every moshi CUDAGraphed (step, exec mask, reset) runs eagerly
                    if t == reset_at:
                        g.reset_streaming(reset_mask)
                    g.set_exec_mask(mask)
                    with rngs[name].active():
                        out[name] = g.step(user)
            frames += mask.numpy()
            folded = bool((mask.numpy() & (frames % C == 0) & (frames > 0)).any())
            if diverged >= 0:
                continue
            logit_rel = max(logit_rel, _rel(logits["a"].float(), logits["b"].float()))
            if not torch.equal(out["a"], out["b"]):
                diverged = t
            elif folded:
                folds_compared += 1
                ga, gb = ttt.ttt_gatings(), twin.ttt_gatings()
                for i in ga:
                    fast_rel = max(fast_rel, _rel(ga[i].fast_weight_delta(), gb[i].fast_weight_delta()))
        expected = (frames // C).tolist()
        rows = expected * (2 if cfg_coef != 1 else 1)  # CFG: twin rows b + B fold with row b
        tele = {name: m.ttt_telemetry() for name, m in (("a", ttt), ("b", twin))}
    updates = {name: {i: d["updates"].tolist() for i, d in t_.items()} for name, t_ in tele.items()}
    drift = max(float(d["drift"].max()) for d in tele["a"].values())
    failures = []
    if diverged >= 0 and logit_rel > LOGIT_RTOL:
        failures.append(f"tokens differ from step {diverged} and the text logits differ by {logit_rel:.3g} "
                        f"relative (> {LOGIT_RTOL}): the graphed step does not compute the eager step")
    if fast_rel > FAST_RTOL:
        failures.append(f"fast weights differ by {fast_rel:.3g} relative (> {FAST_RTOL}) between graphs and eager")
    if folds_compared < chunks:
        failures.append(f"only {folds_compared} fold steps compared before tokens diverged at step {diverged} "
                        f"(need {chunks})")
    for name, per_layer in updates.items():
        for i, u in per_layer.items():
            if u != rows:
                failures.append(f"run {name} ({'graphs' if name == 'a' else 'eager'}), layer {i}: updates {u} "
                                f"!= completed chunks {rows}: a fold did not happen")
    if not drift > 0:
        failures.append(f"the fast weights never moved (max drift {drift}): the comparison is vacuous")
    return {"graphs": device.type == "cuda", "batch": batch, "chunk": C, "steps": len(masks),
            "reset_step": reset_at, "cfg_coef": cfg_coef, "tokens_identical": diverged < 0,
            "first_divergence_step": diverged, "logits_max_rel": logit_rel, "fast_weights_max_rel": fast_rel,
            "folds_compared": folds_compared, "completed_chunks": expected, "updates_graphs": updates["a"],
            "drift_max": drift, "ok": not failures, "failures": failures}
