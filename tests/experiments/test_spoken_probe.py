"""The spoken-memory probes: the linear probe separates what is linearly decodable from what is not, and the oracle
read-out answers exactly when the keys single out the asked fact."""

import torch

from moshi_ttt.experiments.spoken import probe
from moshi_ttt.models.streams import FRAME_RATE


def test_linear_probe_decodes_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    n = torch.arange(1500)
    x = torch.randn(1500, 20, generator=g, dtype=torch.float64)
    w = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = (x @ w).argmax(-1)
    noise = torch.randint(0, 5, (1500,), generator=g)
    fit, within, across = n < 1000, (n >= 1000) & (n < 1250), n >= 1250
    good = probe.probe(x, y, 5, fit, within, across)
    bad = probe.probe(x, noise, 5, fit, within, across)
    assert good["within"] > 0.8 and good["across"] > 0.8
    assert bad["across"] < 0.4  # chance is 0.2
    assert good["l2"] in probe.L2


def _conversation(fact_ends, numbers, colours, q_ends):
    utts = [{"kind": "fact", "end": e, "number": n, "colour": c} for e, n, c in zip(fact_ends, numbers, colours)]
    qs = [{"colour": c, "answer": n, "q_end": q} for c, n, q in zip(colours, numbers, q_ends)]
    return {"utterances": utts, "questions": qs}


def test_oracle_read_answers_with_selective_keys_and_fails_with_crossed_ones():
    T, h = 200, 4
    sm = _conversation([2.0, 6.0], ["seven", "two"], ["red", "blue"], [10.0, 14.0])
    frames = {"fact": [int(2.0 * FRAME_RATE), int(6.0 * FRAME_RATE)],
              "question": [int(10.0 * FRAME_RATE), int(14.0 * FRAME_RATE)]}
    lo, hi = probe.READ_FRAMES

    def keys(crossed: bool) -> torch.Tensor:
        z = torch.zeros(1, T, h)
        for f, a in enumerate(frames["fact"]):
            z[0, a + lo:a + hi, f] = 1.0  # fact f's number word written under key e_f
        for k, qa in enumerate(frames["question"]):
            z[0, qa, (1 - k) if crossed else k] = 1.0  # question k asks with e_k (or the other fact's key)
        return z

    for crossed, expect in ((False, [True, True]), (True, [False, False])):
        out = {"read": {}, "read_chance": []}
        probe.oracle_read(out, {"z0": keys(crossed), "x0": torch.zeros(1, T, 8)}, 0, sm, 0, T)
        assert out["read"] == {"z0": expect}
        assert out["read_chance"] == [0.5, 0.5]


def test_gated_is_moshis_gated_activation():
    from moshi.modules.gating import ActivationGating

    torch.manual_seed(0)
    g = ActivationGating(8, 32, torch.nn.functional.silu)
    x = torch.randn(2, 3, 8)
    # moshi's output is linear_out(Z): Z recomputed here must give it back exactly
    torch.testing.assert_close(g.linear_out(probe.gated(g, x)), g(x))
