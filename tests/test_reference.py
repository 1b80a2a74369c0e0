"""The torch reference (the oracle) against first principles."""
import itertools

import pytest
import torch

from nqkernels import RopeSpec
from nqkernels import reference as R
from nqkernels.rope import rope_cos_sin, rope_inv_freq

from .conftest import BITS, HEAD_DIMS


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_rotation_is_orthogonal_and_inverts(d):
    n = R.transform_norm(d)
    eye = torch.eye(d, dtype=torch.float64)
    T = R.hadamard(eye.float()).double()  # rows: T applied to basis vectors = columns of T, transposed
    torch.testing.assert_close(T @ T.T, n * eye, atol=1e-4, rtol=0)
    x = torch.randn(7, d)
    torch.testing.assert_close(R.inverse_hadamard(R.hadamard(x)), x, atol=1e-5, rtol=1e-5)


def test_tree_sum_matches_sum():
    x = torch.randn(5, 96)
    torch.testing.assert_close(R.tree_sum(x), x.sum(-1), atol=1e-5, rtol=1e-5)


def _codebook(bits):
    """Every point of the truncated codebook of one 8-group, as (stored indices, values)."""
    n = 1 << bits
    idx = torch.tensor(list(itertools.product(range(n), repeat=8)), dtype=torch.int64)
    return idx, R.e8_values(idx, bits)


@pytest.mark.parametrize("bits", [1, 2])
def test_e8_nearest_is_the_nearest_codeword(bits):
    idx_all, val_all = _codebook(bits)
    assert len({tuple(v) for v in val_all.tolist()}) == len(val_all)  # 8*bits bits, all distinct points
    t = torch.randn(300, 8) * (1 << (bits - 1))
    got = R.e8_nearest(t, bits)
    d_got = ((R.e8_values(got, bits) - t) ** 2).sum(-1)
    d_best = torch.cdist(t.double(), val_all.double()).pow(2).min(-1).values
    torch.testing.assert_close(d_got.double(), d_best, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_codebook_points_are_shifted_e8(bits):
    idx = torch.randint(0, 1 << bits, (500, 8))
    x = R.e8_values(idx, bits) + 0.25  # undo the -1/4 shift
    frac = x - x.floor()
    assert bool(((frac == 0).all(-1) | (frac == 0.5).all(-1)).all())  # D8 or D8 + 1/2
    assert bool(((x - frac[:, :1]).sum(-1) % 2 == 0).all())  # even coordinate sum


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_pack_unpack_roundtrip(bits, d):
    idx = torch.randint(0, 1 << bits, (3, 5, d))
    words = R.pack_codes(idx, bits)
    assert words.dtype == torch.int32 and words.shape[-1] == d * bits // 32
    assert torch.equal(R.unpack_codes(words, bits, d), idx)


@pytest.mark.parametrize("rotary", [None, 64])
def test_rope_undo_inverts_apply(rotary):
    cos, sin = rope_cos_sin(RopeSpec(theta=500000.0, rotary_dim=rotary), 128, 50)
    x = torch.randn(2, 50, 128)
    y = R.rope_apply(x, cos, sin)
    torch.testing.assert_close(R.rope_undo(y, cos, sin), x, atol=1e-5, rtol=1e-5)
    if rotary:
        assert torch.equal(y[..., rotary:], x[..., rotary:])


SCALINGS = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"])
def test_rope_frequencies_match_transformers(scaling):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128,
                                   max_position_embeddings=4096,
                                   rope_parameters={"rope_theta": 10000.0, **scaling})
    spec = RopeSpec.from_hf_config(cfg)
    seq = 6000 if scaling["rope_type"] == "dynamic" else None
    ours = rope_inv_freq(spec, 128, seq_len=seq)
    if scaling["rope_type"] == "default":
        theirs = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    elif scaling["rope_type"] == "dynamic":
        base = 10000.0 * ((2.0 * seq / 4096) - 1) ** (128 / 126)
        theirs = 1.0 / (base ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    else:
        theirs = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")[0].double()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bits", BITS)
def test_quantization_error_on_gaussian(bits):
    """Normalised MSE of the fixed-rate E8 codec on Gaussian data: between the rate-distortion bound
    2^(-2R) and the optimal scalar (Lloyd-Max) quantizer at the same rate."""
    x = torch.randn(2000, 128)
    idx, s = R.quantize(x, bits, {2: 0.98, 3: 0.58, 4: 0.33}[bits], "lsq", torch.float16)
    nmse = ((R.dequantize(idx, s, bits) - x) ** 2).mean().item()
    lloyd_max = {2: 0.1175, 3: 0.03454, 4: 0.009497}[bits]
    assert 2 ** (-2 * bits) < nmse < lloyd_max * 1.02


@pytest.mark.parametrize("bits", BITS)
def test_scale_fits(bits):
    """lsq: the error is orthogonal to the reconstruction (so <x̂, x> = |x̂|² < |x|², a shrunk vector);
    unbiased: the reconstruction projects exactly onto x (<x̂, x> = |x|²), up to the fp16 rounding of the scale."""
    x = torch.randn(500, 128) * torch.logspace(-2, 2, 500)[:, None]
    for fit in ("lsq", "unbiased"):
        idx, s = R.quantize(x, bits, {2: 0.98, 3: 0.58, 4: 0.33}[bits], fit, torch.float16)
        xh = R.dequantize(idx, s, bits)
        target = (xh * xh).sum(-1) if fit == "lsq" else (x * x).sum(-1)
        torch.testing.assert_close((xh * x).sum(-1) / target, torch.ones(500), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="fit"):
        R.quantize(x, bits, 0.5, "amax", torch.float16)


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_integer_transform_is_the_rotation_on_the_grid(d):
    x = torch.randn(9, d) * torch.logspace(-3, 3, 9)[:, None]
    x_int, e, ok = R.fixed_point(x)
    assert bool(ok.all()) and bool((x_int.abs() <= 2 ** 15).all()) and bool((x_int == x_int.round()).all())
    q = R.exp2i(e - R.FIX_BITS)[:, None]
    assert bool(((x_int * q - x).abs() <= 0.5 * q).all())  # round to nearest on the grid
    y = R.integer_transform(x_int)
    tol = 0.5 if d == 96 else 0.0  # head_dim 96 rounds its Helmert mix to integers
    assert float((y.double() - R.hadamard(x_int).double()).abs().max()) <= tol + 1e-3


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_storage_order_is_an_involution_that_keeps_padding_last(d):
    y = torch.arange(d).float()[None]
    s = R.storage_order(y)
    assert torch.equal(R.storage_order(s), y)
    assert sorted(s[0].tolist()) == y[0].tolist()
    group = s[0, :8].long()  # lattice group 0: transform outputs {8m + i : m < 4, i < 2}
    assert group.tolist() == [0, 1, 8, 9, 16, 17, 24, 25]


def test_fixed_point_flags_non_finite_and_zero_tokens():
    x = torch.randn(4, 64)
    x[1, 3] = float("nan")
    x[2, 0] = float("-inf")
    x[3] = 0
    x_int, _, ok = R.fixed_point(x)
    assert ok.tolist() == [True, False, False, False]
    assert bool((x_int[1:] == 0).all())
