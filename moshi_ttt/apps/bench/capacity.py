"""The `capacity` section of `moshi-ttt bench`: conversations per GPU for Moshi 7B, computed (not measured).

Per row: the LM weights (bf16, counted on the meta device; TTT rows include the TTT slow weights), and
per conversation the main + depformer KV caches (`gpu.kv_bytes_per_conversation`) and the TTT fast state
(`moshi7b.state_bytes_7b`, from the state the model allocates). Conversations = ⌊(GPU bytes − weights) /
bytes per conversation⌋: an upper bound (no Mimi, activations, CUDA graphs or allocator reserve). The
short-window row needs a model trained with that window. `python -m moshi_ttt.apps.bench.capacity` prints
the markdown table of docs/capacity.md.
"""

from __future__ import annotations

import dataclasses

import torch

GPUS = {"80 GB": 80 * 10**9, "141 GB": 141 * 10**9}
SHORT_WINDOW = 750  # frames: 1 min at 12.5 Hz


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    context: int
    state_dtype: str | None  # None: base Moshi (no TTT)


ROWS = (Row("base Moshi", 3000, None), Row("TTT, fp32 state", 3000, "float32"),
        Row("TTT, bf16 state", 3000, "bfloat16"),
        Row(f"TTT, bf16 state, window {SHORT_WINDOW}", SHORT_WINDOW, "bfloat16"))


def weight_bytes(ttt: bool) -> int:
    """Moshi 7B LM weights in bf16 (with the TTT slow weights of `moshi7b_ttt` if `ttt`), on the meta device."""
    from moshi.models.lm import LMModel

    from moshi_ttt.models.lm import TTTLMModel
    from moshi_ttt.models.loaders import base_lm_kwargs
    from moshi_ttt.ttt.config import load_ttt_config

    kw = base_lm_kwargs()
    m = (TTTLMModel(ttt=load_ttt_config("moshi7b_ttt"), device="meta", dtype=torch.bfloat16, **kw) if ttt
         else LMModel(device="meta", dtype=torch.bfloat16, **kw))
    return sum(p.numel() * p.element_size() for p in m.state_dict().values())


def run() -> dict:
    """`capacity_<row>_{weights,kv,state,per_conversation}_bytes` and `capacity_<row>_conversations_<gpu>`."""
    from moshi_ttt.apps.bench.gpu import kv_bytes_per_conversation
    from moshi_ttt.apps.bench.moshi7b import state_bytes_7b
    from moshi_ttt.models.loaders import base_lm_kwargs

    kw = base_lm_kwargs()
    weights = {False: weight_bytes(False), True: weight_bytes(True)}
    res: dict = {"capacity_short_window": SHORT_WINDOW}
    for i, row in enumerate(ROWS):
        kv = kv_bytes_per_conversation({**kw, "context": row.context}, torch.bfloat16)
        state = 0 if row.state_dtype is None else state_bytes_7b(row.state_dtype)
        w = weights[row.state_dtype is not None]
        key = f"capacity_row{i}"
        res.update({f"{key}_name": row.name, f"{key}_weights_bytes": w, f"{key}_kv_bytes": kv,
                    f"{key}_state_bytes": state, f"{key}_per_conversation_bytes": kv + state})
        for gpu, total in GPUS.items():
            res[f"{key}_conversations_{gpu.split()[0]}gb"] = (total - w) // (kv + state)
    return res


def markdown(res: dict) -> str:
    gb = 1e9
    lines = ["| computed (not measured) | attention window (frames) | weights (GB) | KV cache / conversation (GB) | "
             "TTT fast state / conversation (GB) | per conversation (GB) | conversations, 80 GB | "
             "conversations, 141 GB |", "|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(ROWS):
        k = f"capacity_row{i}"
        lines.append(f"| {res[k + '_name']} | {row.context} | {res[k + '_weights_bytes'] / gb:.2f} | "
                     f"{res[k + '_kv_bytes'] / gb:.3f} | {res[k + '_state_bytes'] / gb:.3f} | "
                     f"{res[k + '_per_conversation_bytes'] / gb:.3f} | {res[k + '_conversations_80gb']} | "
                     f"{res[k + '_conversations_141gb']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(run()))
