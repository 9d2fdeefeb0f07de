"""The per-frame streaming step compiles as one graph (the CUDA-graph safety proof that CPU can give)."""

import time

import pytest
import torch

from moshi_ttt.ttt.config import TTTConfig
from moshi_ttt.ttt.stream import TTTState

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.slow]  # torch.compile start-up: ~17 s


@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16-model-bf16-state"])
def test_stream_step_compiles_fullgraph_and_matches_eager(dtype, state_dtype):
    """`torch.compile(TTTState.step, fullgraph=True)` must capture the whole per-frame step as a single graph.

    Why this proves the step is CUDA-graph safe: on CUDA, moshi's LMGen records `forward_text` once
    and from then on only replays the recorded kernels, so any Python-side logic that depends on
    tensor values (an `if` on a counter, `.item()`, `.tolist()`, `bool(tensor)`, host reads that sync)
    runs only at capture time and is frozen afterwards. Dynamo cannot trace exactly those things:
    each is a graph break, and with `fullgraph=True` a graph break is an error instead of a silent
    fallback. A step that compiles with fullgraph=True (and dynamic=False, so no shape-dependent
    re-specialisation) is therefore a pure function of its tensor inputs and the in-place state
    tensors, with exec masks and non-finite frames expressed as tensor ops — what a CUDA graph can
    replay. The fold runs between steps on the host's schedule (here: the items whose chunk the
    step completed, as `TTTLMGen` does), outside the compiled step. We check that the 10 steps (two
    chunk boundaries, an exec-masked item, a non-finite frame) reuse that one graph (no value-dependent
    guards ⇒ no recompiles) and match eager. The bf16 case is a bf16 model with a bf16 fast weight (one
    tensor, applied as is; folds with stochastic rounding).

    The default Inductor backend takes ≈15 s to compile here (≈40 s with a cold cache).
    """
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    B, d, h, C = 2, 8, 12, 4
    cfg = TTTConfig(chunk_size=C, lr=0.1, kernel_size=3, future_frames=1, init="ntp", clip_norm=0.5)
    conv = torch.randn(d, 1, 3)
    wt = torch.eye(d) + 0.1 * torch.randn(d, d)
    w0 = torch.randn(d, h).to(dtype)
    eager, comp = (TTTState(B, C, w0, torch.float32, wt, conv, cfg.past_frames, state_dtype=state_dtype,
                            stochastic=True) for _ in range(2))
    assert eager.w.dtype == state_dtype and (eager.w_apply is eager.w) == (dtype == state_dtype)
    step = torch.compile(TTTState.step, fullgraph=True, dynamic=False)

    t0 = time.perf_counter()
    n_steps = 2 * C + 2
    for i in range(n_steps):
        z, src = torch.randn(B, 1, h).to(dtype), torch.randn(B, 1, d).to(dtype)
        if i == 5:
            src[1, 0, 2] = float("nan")  # item 1's chunk 1 gets skipped
        mask = torch.tensor([True, i != 2])  # item 1 exec-masked once: its chunk ends a step later
        eager.set_exec_mask(mask)
        comp.set_exec_mask(mask)
        want = eager.step(z, src)
        got = step(comp, z, src)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        done = eager.due()
        assert comp.due() == done
        eager.fold(done, cfg)
        comp.fold(done, cfg)
        for k, v in eager.tensors().items():
            # equal_nan: a chunk's buffers hold its frames as they came (the bad frame too) until its fold
            torch.testing.assert_close(comp.tensors()[k], v, rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, f"{frames} graphs compiled for TTTState.step (recompiles / graph splits)"
    # The run crossed a boundary for both items, clipped at least once and skipped item 1's bad chunk.
    assert eager.updates.tolist() == [2, 1] and eager.skipped.tolist() == [0, 1]
    assert int(eager.clips[0]) >= 1
    print(f"compile + {n_steps} steps: {time.perf_counter() - t0:.1f}s")
