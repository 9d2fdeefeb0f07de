"""Structure of TTT-Moshi: Moshi 7B shapes and memory on the meta device, import hygiene (moshi is
never patched), and layer placement (never in the depformer, out-of-range indices rejected)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingTransformerLayer

from moshi_ttt.models.lm import TTTLMModel, build_ttt_lm
from moshi_ttt.models.loaders import base_lm_kwargs
from moshi_ttt.modules.gating import TTTGating
from moshi_ttt.modules.transformer import TTT_KEY, TTTTransformerLayer
from moshi_ttt.ttt.config import TTTModelConfig, config_path, load_lm_and_ttt

# -- 5. Moshi 7B on the meta device ----------------------------------------------------------------

D7B, LAYERS7B = 4096, 32
H7B = 2 * int(4.125 * D7B) // 3  # moshi's ActivationGating: hidden = 2·dim_feedforward/3 = 11264


def test_moshi7b_meta_shapes_params_and_state_bytes():
    ttt = TTTModelConfig.load(config_path("moshi7b_ttt"))
    kw = base_lm_kwargs()
    assert (kw["dim"], kw["num_layers"]) == (D7B, LAYERS7B)
    m = TTTLMModel(ttt=ttt, device="meta", dtype=torch.bfloat16, **kw)
    base = LMModel(device="meta", dtype=torch.bfloat16, **kw)

    assert m.ttt_layer_indices == [0, 6, 12, 18, 24, 30]
    for i, layer in enumerate(m.transformer.layers):
        if i in m.ttt_layer_indices:
            assert type(layer) is TTTTransformerLayer and isinstance(layer.gating, TTTGating)
            assert (layer.gating.dim, layer.gating.hidden) == (D7B, H7B)
        else:
            assert type(layer) is StreamingTransformerLayer

    # Parameters: conv [d, 1, K] + W_target [d, d] per TTT layer, nothing else added or changed.
    K = ttt.layer.kernel_size
    expected_added = len(m.ttt_layer_indices) * (D7B * K + D7B * D7B)
    assert expected_added == 6 * (4096 * 5 + 4096 ** 2)
    sd, base_sd = m.state_dict(), base.state_dict()
    ttt_keys = {k for k in sd if TTT_KEY in k}
    assert sum(sd[k].numel() for k in ttt_keys) == expected_added
    assert ttt_keys == set(m.ttt_state_dict())
    assert ttt_keys == {f"transformer.layers.{i}.gating.ttt.{n}" for i in m.ttt_layer_indices
                        for n in ("conv.weight", "w_target")}
    assert {k for k in sd if TTT_KEY not in k} == set(base_sd)
    for k, v in base_sd.items():
        assert sd[k].shape == v.shape and sd[k].dtype == v.dtype, k
    n_base = sum(v.numel() for v in base_sd.values())
    assert sum(v.numel() for v in sd.values()) - n_base == expected_added

    # Per-conversation fast state (stream.TTTState) of a bf16 model, per TTT layer: the fast weight
    #   w [d, h] fp32 + its bf16 copy w_apply [d, h] + z_buf [C + 1, h] + s_buf [C + 1, d] (fp32; one
    #   chunk plus a scratch row) + pos, updates, clips, skipped, lost (int64) + last_norm (fp32).
    C = ttt.layer.chunk_size
    per_layer = (4 + 2) * D7B * H7B + 4 * (C + 1) * (H7B + D7B) + 5 * 8 + 4
    expected_bytes = len(m.ttt_layer_indices) * per_layer
    with m.streaming(1):
        state = m.ttt_gatings()[0]._streaming_state
        assert state.w.dtype == torch.float32 and state.w.device.type == "meta"
        assert state.w_apply.dtype == torch.bfloat16
        assert m.ttt_state_bytes() == expected_bytes
    with m.streaming(3):  # per conversation, whatever the batch
        assert m.ttt_state_bytes() == expected_bytes

    print(f"\nMoshi 7B + TTT (layers {m.ttt_layer_indices}, C={C}):"
          f"\n  added parameters: {expected_added:,} ({100 * expected_added / n_base:.2f}% of {n_base:,};"
          f" {2 * expected_added / 2**20:.1f} MiB in bf16)"
          f"\n  fast-state bytes per conversation: {expected_bytes:,} ({expected_bytes / 2**30:.3f} GiB)")


def test_moshi7b_meta_state_bytes_bf16_state():
    """`state_dtype: bfloat16` at 7B shapes: the fast weight is one bf16 [d, h] tensor per layer and
    conversation (no fp32 master, no copy), the rest of the state as with fp32."""
    base_cfg = TTTModelConfig.load(config_path("moshi7b_ttt"))
    C = base_cfg.layer.chunk_size
    rest = 4 * (C + 1) * (H7B + D7B) + 5 * 8 + 4
    for state_dtype, w_bytes in (("float32", 4 + 2), ("bfloat16", 2)):
        ttt = dataclasses.replace(base_cfg, layer=dataclasses.replace(base_cfg.layer, state_dtype=state_dtype))
        m = TTTLMModel(ttt=ttt, device="meta", dtype=torch.bfloat16, **base_lm_kwargs())
        expected = 6 * (w_bytes * D7B * H7B + rest)
        with m.streaming(2):
            st = m.ttt_gatings()[0]._streaming_state
            assert st.w.device.type == "meta"
            assert (st.w.dtype, st.w_apply is st.w) == ((torch.bfloat16, True) if state_dtype == "bfloat16"
                                                        else (torch.float32, False))
            assert m.ttt_state_bytes() == expected, state_dtype
    assert expected == 6 * (2 * 4096 * 11264 + 4 * 257 * (11264 + 4096) + 44) == 648_388_872  # 0.60 GiB


# -- 6. import hygiene -----------------------------------------------------------------------------

HYGIENE_SCRIPT = textwrap.dedent("""
    import torch
    import moshi.models.lm as lm
    import moshi.modules.gating as gating
    import moshi.modules.transformer as tr
    from moshi.modules.streaming import StreamingModule

    def snapshot():
        return {
            "StreamingTransformer": tr.StreamingTransformer,
            "StreamingTransformer.forward": tr.StreamingTransformer.forward,
            "StreamingTransformerLayer": tr.StreamingTransformerLayer,
            "StreamingTransformerLayer.forward": tr.StreamingTransformerLayer.forward,
            "StreamingTransformerLayer._ff_block": tr.StreamingTransformerLayer._ff_block,
            "StreamingTransformerLayer.__init__": tr.StreamingTransformerLayer.__init__,
            "StreamingMultiheadAttention.forward": tr.StreamingMultiheadAttention.forward,
            "LMModel": lm.LMModel,
            "LMModel.__init__": lm.LMModel.__init__,
            "LMModel.forward": lm.LMModel.forward,
            "LMModel.forward_text": lm.LMModel.forward_text,
            "LMGen._step": lm.LMGen._step,
            "ActivationGating": gating.ActivationGating,
            "ActivationGating.forward": gating.ActivationGating.forward,
            "make_gating": gating.make_gating,
            "gating_forward_kernel": gating.gating_forward_kernel,
            "StreamingModule.reset_streaming": StreamingModule.reset_streaming,
        }

    before = snapshot()
    import moshi_ttt.models.lm, moshi_ttt.modules.gating, moshi_ttt.ttt.stream, moshi_ttt.ttt.chunk  # noqa: E401,F401
    import moshi_ttt.ttt.config, moshi_ttt.models.loaders  # noqa: E401,F401
    after = snapshot()
    changed = [k for k in before if before[k] is not after[k]]
    assert not changed, f"importing moshi_ttt changed {changed}"

    lm_kwargs, _ = moshi_ttt.ttt.config.load_lm_and_ttt("tiny")
    plain = lm.LMModel(**lm_kwargs)
    assert type(plain.transformer) is tr.StreamingTransformer
    bad = [n for n, mod in plain.named_modules() if type(mod).__module__.startswith("moshi_ttt")]
    assert not bad, f"plain LMModel got TTT modules: {bad}"
    assert all(type(layer) is tr.StreamingTransformerLayer for layer in plain.transformer.layers)
    assert all(type(layer.gating) is gating.ActivationGating for layer in plain.transformer.layers)
    assert not [k for k in plain.state_dict() if ".ttt." in k]
    print("HYGIENE-OK")
""")


def test_import_does_not_patch_moshi():
    res = subprocess.run([sys.executable, "-c", HYGIENE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "HYGIENE-OK" in res.stdout


# -- 7. placement ----------------------------------------------------------------------------------

def test_depformer_never_gets_ttt_even_with_every_layer_listed():
    lm_kwargs, ttt = load_lm_and_ttt("tiny")
    n = lm_kwargs["num_layers"]
    cfg = dataclasses.replace(ttt, layers=tuple(range(n)))
    m = build_ttt_lm(lm_kwargs, cfg)
    assert m.ttt_layer_indices == list(range(n))
    assert all(isinstance(layer.gating, TTTGating) for layer in m.transformer.layers)
    assert m.depformer is not None and len(m.depformer.layers) == lm_kwargs["depformer_num_layers"]
    dep = [name for name, mod in m.named_modules() if name.startswith("depformer")
           and type(mod).__module__.startswith("moshi_ttt")]
    assert not dep, f"depformer got TTT modules: {dep}"
    assert all(type(layer) is StreamingTransformerLayer for layer in m.depformer.layers)
    # Every TTT module is one of the main transformer's gatings (and their target sub-modules).
    ttt_names = {name for name, mod in m.named_modules() if isinstance(mod, TTTGating)}
    assert ttt_names == {f"transformer.layers.{i}.gating" for i in range(n)}
    # Also with the default every/start placement.
    m2 = build_ttt_lm(lm_kwargs, dataclasses.replace(ttt, every=1, start=0))
    assert m2.ttt_layer_indices == list(range(n))
    assert not any(isinstance(mod, TTTGating) for mod in m2.depformer.modules())


@pytest.mark.parametrize("bad", [99, 4])
def test_out_of_range_layer_index_is_rejected(bad):
    lm_kwargs, ttt = load_lm_and_ttt("tiny")
    assert lm_kwargs["num_layers"] == 4
    cfg = dataclasses.replace(ttt, layers=(0, bad))
    # The message must name the bad index in a list (not merely "4 layers").
    with pytest.raises(ValueError, match=rf"\[(\d+, )*{bad}(, \d+)*\]"):
        build_ttt_lm(lm_kwargs, cfg)
