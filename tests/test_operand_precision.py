"""perf.operand_precision: its operand rounding and its attention, which without rounding is the quality harness's."""
import pytest
import torch

from perf.operand_precision import OperandAttention, round_operand
from perf.quality import _EvalAttention


def test_round_operand_precisions():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    assert torch.equal(round_operand(x, None), x)
    assert torch.equal(round_operand(x, "fp16"), x.half().float())
    amax = x.abs().amax(-1, keepdim=True)
    e4m3 = round_operand(x, "e4m3")
    assert (e4m3 - x).abs().max() > 0 and torch.all((e4m3 - x).abs() <= amax / 448 * 16)  # 3 mantissa bits
    assert torch.allclose(e4m3.abs().amax(-1, keepdim=True), amax, rtol=1e-6)  # the row's amax maps to 448 exactly
    int8 = round_operand(x, "int8")
    assert torch.allclose(torch.round(int8 / amax * 127), int8 / amax * 127, atol=1e-4)  # 255 symmetric levels
    w = torch.rand(2, 64)  # weights: unsigned, one scale per 16
    u8 = round_operand(w, "int8", 16)
    gmax = w.reshape(2, 4, 16).amax(-1, keepdim=True)
    steps = (u8.reshape(2, 4, 16) / gmax * 255)
    assert torch.allclose(steps, torch.round(steps), atol=1e-3) and (u8 - w).abs().max() <= gmax.max() / 510 + 1e-6
    with pytest.raises(ValueError, match="unknown operand precision"):
        round_operand(x, "fp4")


@pytest.mark.parametrize("q_len", (1, 5))
def test_unrounded_operands_are_the_harness_attention(q_len):
    """``exact``: the decomposition (q·(k − μ_k) through R and back, q·μ_k; Σ p·s/s·(v − μ_v) + Σp·μ_v) is the
    harness's attention; rounded operands change the compressed tokens' products only."""
    torch.manual_seed(1)

    class Module:
        layer_idx = 0
    q, k, v = torch.randn(1, 4, q_len, 128), torch.randn(1, 2, 72, 128), torch.randn(1, 2, 72, 128)
    ours, harness = OperandAttention(32), _EvalAttention(32)
    ours.state = {0: (64, torch.randn(2, 128), torch.randn(2, 128), torch.rand(2, 64) + 0.1)}  # a page compressed
    want, _ = harness(Module, q, k, v, None, scaling=128 ** -0.5)
    got, _ = ours(Module, q, k, v, None, scaling=128 ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ours.mode = ("e4m3", "e4m3")
    rounded, _ = ours(Module, q, k, v, None, scaling=128 ** -0.5)
    assert 0 < (rounded - want).abs().max() < 0.1
    with pytest.raises(ValueError, match="one sequence at a time"):
        ours(Module, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), None)
    ours.state = {}  # a layer without a compressed cache: the harness's attention
    torch.testing.assert_close(ours(Module, q, k, v, None, scaling=128 ** -0.5)[0], want)


def test_a_compression_the_study_cannot_see_raises(monkeypatch):
    """A quantizing preset whose HOT caches the study did not capture (here: none) would be reported unrounded:
    it raises instead."""
    from perf import operand_precision as O
    from perf.quality import Harness, parse_preset

    h = object.__new__(O.OperandHarness)
    h.num_layers, h.attn = 6, OperandAttention(32)
    monkeypatch.setattr(Harness, "compress", lambda self, preset, cache, queries: (cache, 0))
    with pytest.raises(ValueError, match="compresses 0 of 6 layers"):
        h.compress(parse_preset("k3v2"), None, None)
    assert h.compress(parse_preset("fp16"), None, None) == (None, 0) and h.attn.state == {}  # the no-op preset
