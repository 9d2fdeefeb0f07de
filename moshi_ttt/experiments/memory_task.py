"""The key→value recall task and the tiny TTT-Moshi that learns it (used by `memory_experiment.py`).

Sequences of T frames, two streams (moshi's text stream + 1 user audio codebook) carrying the same
symbol per frame. A *pair* is two consecutive frames (key k, value v); each pair is queried exactly
once, later: the key appears again and the model must predict the value on the text stream at the
next frame. Every other frame is a filler symbol. Each key occurs only in its pair and its query, so
the distance key→query is unambiguous. Half of the queries are placed inside the attention window,
half beyond it (up to the sequence length), uniformly in distance.

The audio codebook has moshi's acoustic delay of 1 frame (`delays=[0, 1]`), so each input frame holds
the current symbol (text) and the previous one (audio): the value's frame also carries its key, and
recall inside the window is a one-hop attention lookup (why the task is built so, and what the models
learn: docs/memory-experiment.md). Consequence: attention reaches key→query distances ≤ window, so
distance == window, counted as "beyond" (dist ≥ window), is still answerable by attention.

The loss is the text cross-entropy at the answer frames only (the other frames are unpredictable
noise by construction).

Symbols (same ids on both streams): PAD = 3 (moshi's text padding id), keys, values, fillers.
"""

from __future__ import annotations

import dataclasses
import typing as tp

import numpy as np
import torch
import torch.nn.functional as F
from moshi.models.lm import LMGen, LMModel
from moshi.models.lm_utils import _delay_sequence

from moshi_ttt.models.lm import TTTLMModel, make_lm_gen
from moshi_ttt.ttt.config import TTTConfig, TTTModelConfig

PAD = 3
# The generation loop the server runs (one `step` per frame): TTTLMGen for TTT models (folds on the host
# clock, bitwise the self-folding layer under moshi's LMGen), moshi's LMGen for the base models.
GENERATOR: tp.Callable[..., LMGen] = make_lm_gen


@dataclasses.dataclass(frozen=True)
class Task:
    """T: frames per sequence; window: attention context (frames); pairs: queried pairs per sequence;
    n_keys / n_vals / n_fill: vocabulary sizes (chance = 1 / n_vals)."""

    T: int = 96
    window: int = 16
    pairs: int = 8
    n_keys: int = 16
    n_vals: int = 16
    n_fill: int = 16

    @property
    def key0(self) -> int:
        return 8

    @property
    def val0(self) -> int:
        return self.key0 + self.n_keys

    @property
    def fill0(self) -> int:
        return self.val0 + self.n_vals

    @property
    def card(self) -> int:
        return self.fill0 + self.n_fill

    @property
    def chance(self) -> float:
        return 1.0 / self.n_vals


def make_batch(task: Task, B: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [B, 2, T] (text, audio; the same symbols), ans [B, P] (frame whose text token is the value
    the model must predict), dist [B, P] (frames from the pair's key to the query's key, ≥ 2).

    Half of the distances are uniform in [2, window), half uniform in [window, T - 2]."""
    T, W, P = task.T, task.window, task.pairs
    if P > task.n_keys:
        raise ValueError(f"pairs={P} exceeds n_keys={task.n_keys}: keys must be distinct")
    sym = task.fill0 + rng.integers(0, task.n_fill, (B, T))
    ans = np.zeros((B, P), dtype=np.int64)
    dist = np.zeros((B, P), dtype=np.int64)
    for b in range(B):
        free = np.ones(T, dtype=bool)
        keys = rng.permutation(task.n_keys)[:P]
        vals = rng.integers(0, task.n_vals, P)
        for i in range(P):
            for _ in range(1000):
                d = int(rng.integers(2, W)) if rng.random() < 0.5 else int(rng.integers(W, T - 1))
                t = int(rng.integers(0, T - 1 - d))
                q = t + d
                if free[t] and free[t + 1] and free[q] and free[q + 1]:
                    break
            else:
                raise RuntimeError(f"could not place {P} pairs in {T} frames; lower `pairs`")
            free[[t, t + 1, q, q + 1]] = False
            sym[b, t] = sym[b, q] = task.key0 + keys[i]
            sym[b, t + 1] = sym[b, q + 1] = task.val0 + vals[i]
            ans[b, i], dist[b, i] = q + 1, d
    sym_t = torch.from_numpy(sym)
    return torch.stack([sym_t, sym_t], dim=1), torch.from_numpy(ans), torch.from_numpy(dist)


def lm_kwargs(task: Task, dim: int, layers: int, context: int, audio_delay: int = 1) -> dict:
    """moshi LMModel kwargs: text stream + 1 user audio codebook (delayed by `audio_delay` frames),
    no depformer."""
    return dict(
        dim=dim, num_layers=layers, num_heads=4, hidden_scale=4.125, context=context,
        text_card=task.card, existing_text_padding_id=PAD, n_q=1, dep_q=0, card=task.card,
        causal=True, layer_scale=None, max_period=10000, gating="silu", norm="rms_norm_f32",
        positional_embedding="rope", delays=[0, audio_delay])


def build_model(task: Task, ttt: TTTConfig | None, *, dim: int, layers: int, context: int,
                ttt_layer: int, seed: int) -> LMModel:
    """A randomly initialised base LMModel (ttt None) or TTTLMModel with TTT in layer `ttt_layer`."""
    torch.manual_seed(seed)
    kw = lm_kwargs(task, dim, layers, context)
    if ttt is None:
        return LMModel(**kw)
    return TTTLMModel(ttt=TTTModelConfig(layer=ttt, layers=(ttt_layer,)), **kw)


def model_input(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """Exactly what `LMModel.forward` feeds `forward_text`: the initial token, then the delayed codes
    without their last frame. [B, 2, T]."""
    initial = model._get_initial_token().expand(codes.shape[0], -1, -1)
    delayed = _delay_sequence(model.delays, codes, initial)
    return torch.cat([initial, delayed], dim=2)[:, :, :-1]


def parallel_text_logits(model: LMModel, codes: torch.Tensor) -> torch.Tensor:
    """[B, T, card]: logits[:, t] predicts codes[:, 0, t] (the whole sequence in one forward)."""
    return model.forward_text(model_input(model, codes))[1][:, 0]


def answer_loss(logits: torch.Tensor, codes: torch.Tensor, ans: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the value at the answer frames. logits [B, T, card], ans [B, P]."""
    picked = logits.gather(1, ans[..., None].expand(-1, -1, logits.shape[-1]))  # [B, P, card]
    target = codes[:, 0].gather(1, ans)
    return F.cross_entropy(picked.flatten(0, 1).float(), target.flatten())


def answer_hits(logits: torch.Tensor, codes: torch.Tensor, ans: torch.Tensor) -> torch.Tensor:
    """[B, P] bool: argmax at the answer frame is the value."""
    return logits.argmax(-1).gather(1, ans) == codes[:, 0].gather(1, ans)


# -- training --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Budget:
    """Training budget, identical for every variant: AdamW, linear warm-up, grad-norm clip 1."""

    steps: int = 200
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 30


def train(model: LMModel, task: Task, budget: Budget, seed: int,
          progress: tp.Callable[[int, float], None] | None = None) -> float:
    """Trains `model` in place on fresh batches (data seed 1000 + seed); returns the last loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=0.0)
    rng = np.random.default_rng(1000 + seed)
    loss = torch.tensor(float("nan"))
    for step in range(budget.steps):
        codes, ans, _ = make_batch(task, budget.batch, rng)
        for g in opt.param_groups:
            g["lr"] = budget.lr * min(1.0, (step + 1) / budget.warmup)
        loss = answer_loss(parallel_text_logits(model, codes), codes, ans)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step, loss.item())
    model.eval()
    return loss.item()


# -- the streaming path ----------------------------------------------------------------------------

def streaming_text_logits(model: LMModel, codes: torch.Tensor,
                          gen_cls: tp.Callable[..., LMGen] | None = None,
                          before: tp.Callable[[], None] | None = None,
                          after: tp.Callable[[], None] | None = None) -> torch.Tensor:
    """Teacher-forced text logits through moshi's `LMGen`, one frame per `step`, as the server runs it.
    [B, T, card], aligned like `parallel_text_logits`. One conversation: a fresh streaming state (KV cache,
    fast weights W⁽⁰⁾); `before` / `after` run inside it, before the first step and after the last (to put
    a memory into the fresh state, to take one out).

    The user stream (audio codebook) is what `LMGen.step` consumes: step s gets frame s − 1 of the
    codes (the frame `LMModel.forward` places at input position s; step 0's input is never read, the
    initial token stands there). The text stream is the model's own: LMGen samples it and feeds it
    back. Teacher forcing uses LMGen's `on_text_logits_hook`: it records the logits, then overwrites
    them in place with a one-hot of the ground-truth token, so greedy sampling (use_sampling=False)
    picks exactly that token. The tokens `step` returns are checked against the ground truth, so a
    change in LMGen that broke the forcing would raise instead of silently evaluating free-running
    generation.
    """
    if model.training:
        raise ValueError("streaming_text_logits needs an eval-mode model (LMGen refuses training mode)")
    B, _, T = codes.shape
    recorded: list[torch.Tensor] = []
    target = {"tok": codes[:, 0, 0]}

    def force(text_logits: torch.Tensor) -> None:  # [B, 1, 1, card]
        recorded.append(text_logits[:, 0, 0].clone())
        forced = torch.full_like(text_logits, float("-inf"))
        forced.scatter_(-1, target["tok"].view(B, 1, 1, 1), 0.0)
        text_logits.copy_(forced)

    gen = (gen_cls or GENERATOR)(model, use_sampling=False, on_text_logits_hook=force)
    lag = max(model.delays)  # LMGen returns the text token of step s at step s + max delay
    with gen.streaming(B):
        if before is not None:
            before()
        for s in range(T):
            target["tok"] = codes[:, 0, s]
            out = gen.step(codes[:, 1:, max(s - 1, 0)][..., None])
            if out is not None and not torch.equal(out[:, 0, 0], codes[:, 0, s - lag]):
                raise RuntimeError(f"LMGen did not take the forced text token at step {s - lag}: "
                                   "teacher forcing through on_text_logits_hook no longer works")
        if after is not None:
            after()
    return torch.stack(recorded, dim=1)


# -- evaluation ------------------------------------------------------------------------------------

def eval_set(task: Task, n: int, seed: int = 12345) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed evaluation sequences (same for every variant and seed): codes, ans, dist."""
    return make_batch(task, n, np.random.default_rng(seed))


@torch.no_grad()
def evaluate(model: LMModel, task: Task, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
             batch: int = 64, streaming: bool = True,
             gen_cls: tp.Callable[..., LMGen] | None = None) -> dict:
    """Accuracy at the answer frames, by the parallel forward and (if `streaming`) through LMGen.

    Returns {"hits": [N, P] bool, "dist": [N, P], "hits_streaming": [N, P] bool | None,
    "max_logit_diff": float | None}."""
    codes, ans, dist = data
    model.eval()
    hits, hits_s, diffs = [], [], []
    for i in range(0, codes.shape[0], batch):
        c, a = codes[i:i + batch], ans[i:i + batch]
        lp = parallel_text_logits(model, c)
        hits.append(answer_hits(lp, c, a))
        if streaming:
            ls = streaming_text_logits(model, c, gen_cls)
            hits_s.append(answer_hits(ls, c, a))
            diffs.append(float((ls - lp).abs().max()))
    return {"hits": torch.cat(hits), "dist": dist,
            "hits_streaming": torch.cat(hits_s) if streaming else None,
            "max_logit_diff": max(diffs) if streaming else None}
