"""Training signal of the parallel path: the TTT target params (conv, W_target) learn only from
sequences spanning ≥ 2 chunks, and the gradients are those of the naive reference."""

import pytest
import torch

from moshi_ttt.ttt.naive import naive_ttt_mlp

from _layers import LAYER_CHUNK as C
from _layers import LAYER_DIM as D
from _layers import make_ttt_layer

pytestmark = pytest.mark.usefixtures("torch_single_thread")



def _backward(g, T, dtype, seed=7):
    torch.manual_seed(seed)
    x = torch.randn(2, T, D, dtype=dtype)
    x0 = torch.randn(2, T, D, dtype=dtype)
    out = g(x, x0)
    (out * torch.randn_like(out)).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("init", ["ntp", "random", "zero"])
def test_target_params_get_gradient_across_chunks(init, dtype):
    g = make_ttt_layer(dtype=dtype, init="zero" if init == "zero" else "ntp", perturb=init == "random")
    g.train()
    _backward(g, 2 * C + 3, dtype)
    conv, wt = g.ttt.conv.weight.grad, g.ttt.w_target.grad
    assert conv is not None and torch.isfinite(conv).all() and conv.abs().max() > 1e-4
    assert wt is not None and torch.isfinite(wt).all()
    if init != "zero":  # zero conv ⇒ V̂ = 0 ⇒ ∂/∂W_target = 0; the conv is what starts learning
        assert wt.abs().max() > 1e-4
    for p in g.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("T", [3, C])
@pytest.mark.parametrize("init", ["ntp", "random", "zero"])
def test_no_target_gradient_within_one_chunk(init, T):
    g = make_ttt_layer(dtype=torch.float32, init="zero" if init == "zero" else "ntp", perturb=init == "random")
    _backward(g, T, torch.float32)
    for p in (g.ttt.conv.weight, g.ttt.w_target):
        assert p.grad is None or not p.grad.any()
    assert g.linear_in.weight.grad.abs().max() > 0  # the backward did run


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("target", ["x0", "mlp_input"])
def test_parallel_gradients_equal_reference_gradients(target, clip):
    """∂loss/∂(every parameter, x, x0) of the parallel path = autograd through the naive per-chunk loop."""
    g = make_ttt_layer(dtype=torch.float64, target=target, clip_norm=clip)
    T = 3 * C + 5
    x = torch.randn(2, T, D, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(2, T, D, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, T, D, dtype=torch.float64)
    params = [g.linear_in.weight, g.linear_out.weight, g.ttt.conv.weight, g.ttt.w_target]

    grads = torch.autograd.grad((g(x, x0) * r).sum(), params + [x, x0], allow_unused=True)
    z = g.activations(x)
    src = x if target == "mlp_input" else x0
    ref, _ = naive_ttt_mlp(z, src, g.linear_out.weight, g.ttt.conv.weight, g.ttt.w_target, g.cfg)
    want = torch.autograd.grad((ref * r).sum(), params + [x, x0], allow_unused=True)
    names = ["linear_in", "linear_out", "conv", "w_target", "x", "x0"]
    for name, a, b in zip(names, grads, want):
        if target == "mlp_input" and name == "x0":
            assert a is None and b is None
            continue
        assert a is not None and b is not None, name
        assert b.abs().max() > 1e-6, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def test_zero_init_with_clip_gives_finite_gradients():
    """With the conv zero-initialised every ΔW is 0; the clip norm √(‖ΔW‖²) is then differentiated at 0."""
    g = make_ttt_layer(dtype=torch.float32, init="zero", perturb=False, clip_norm=1e3)
    _backward(g, 2 * C + 3, torch.float32)
    for name, p in g.named_parameters():
        assert torch.isfinite(p.grad).all(), name
