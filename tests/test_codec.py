"""encode_kv / decode_kv (Triton kernels under TRITON_INTERPRET=1, else the CPU fallback) vs the reference."""

import pytest
import torch

from nqkernels import EncodedKV, KVCodec, RopeSpec, centering_mean, decode_kv, encode_kv
from nqkernels import reference as R
from nqkernels.runtime import rope_tables

from .conftest import BITS, HEAD_DIMS, interpreted

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _reference(x, codec, kind, positions=None, mean=None):
    """Codes and scales straight from the reference functions (independent of the launcher's dispatch), for x
    ``[B, T, H, D]``: ``[B, T, H, ...]`` as encode_kv returns them."""
    bits = codec.bits_for(kind)
    B, T, H, D = x.shape
    cos = sin = None
    if kind == "key" and codec.rope is not None:
        pos = positions if positions is not None else torch.arange(T).expand(B, T)
        c, s = rope_tables(codec, int(pos.max()) + 1, x.device)
        cos, sin = c[pos.long()], s[pos.long()]
    return R.encode_reference(x, bits, alpha=codec.alpha[bits], fit=codec.scale_fit, scale_dtype=codec.scale_dtype,
                              cos=cos, sin=sin, mean=mean, layout=codec.layout(kind))


def _check(x, codec, kind, positions=None):
    enc = encode_kv(x, codec, kind, positions=positions)
    codes, scales = _reference(x, codec, kind, positions, enc.mean)
    assert torch.equal(enc.codes, codes), "codes differ from the reference"
    assert torch.equal(enc.scales.view(torch.int16), scales.view(torch.int16)), "scales differ"
    return enc


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("bits", BITS)
def test_encode_bit_exact_and_roundtrip(d, bits):
    codec = KVCodec(head_dim=d, key_bits=bits, value_bits=bits, rope=RopeSpec(theta=10000.0))
    x = torch.randn(2, 37, 3, d, dtype=torch.float16) * 2 + 0.5
    for kind in ("key", "value"):
        enc = _check(x, codec, kind)
        assert enc.codes.is_contiguous() and enc.scales.is_contiguous()
        out = decode_kv(enc, codec, kind, dtype=torch.float32)
        assert out.shape == x.shape and out.is_contiguous()
        nmse = ((out - x.float()) ** 2).mean() / ((x.float() - x.float().mean(1, keepdim=True)) ** 2).mean()
        assert nmse < {2: 0.12, 3: 0.04, 4: 0.012}[bits]
        fields = codec.layout(kind) == "fields"  # 3-bit keys at head_dim 128: 13 words, every index bit stored
        assert enc.codes.shape[-1] == (13 if fields and bits == 3 else d * codec.bits_for(kind) // 32)
        assert fields == (d == 128 and (bits == 4 or (kind, bits) == ("key", 3)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("scale_rule", ("rms", "rms_lsq", "rms_unbiased"))
def test_dtypes_and_scale_rules(dtype, scale_dtype, scale_rule):
    codec = KVCodec(head_dim=128, scale_dtype=scale_dtype, scale_rule=scale_rule)
    x = torch.randn(1, 19, 2, 128, dtype=dtype)
    for kind in ("key", "value"):
        enc = _check(x, codec, kind)
        assert enc.scales.dtype == scale_dtype
        for out_dtype in DTYPES:
            assert decode_kv(enc, codec, kind, dtype=out_dtype).dtype == out_dtype


@pytest.mark.parametrize("rope", [RopeSpec(theta=1e4, rotary_dim=64), RopeSpec(
    theta=5e5, scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                        ("original_max_position_embeddings", 8192), ("rope_type", "llama3")))],
                         ids=["partial", "llama3"])
def test_rope_undo_with_positions_and_strides(rope):
    codec = KVCodec(head_dim=128, rope=rope, center_keys=False)
    base = torch.randn(3, 4, 45, 128)  # transformers' [B, H, T, D]: a strided [B, T, H, D] view
    x = base.transpose(1, 2)[:, 3:]
    positions = torch.randint(0, 3000, (3, 42))
    enc = _check(x, codec, "key", positions=positions)
    out = decode_kv(enc, codec, "key", positions=positions, dtype=torch.float32)
    assert ((out - x) ** 2).mean() / (x ** 2).mean() < 0.04


def test_ragged_sizes_and_gqa_shapes():
    codec = KVCodec(head_dim=64)
    for B, H, T in [(1, 1, 1), (4, 8, 3), (2, 1, 65)]:
        _check(torch.randn(B, T, H, 64), codec, "key")


def test_non_finite_token_is_zeroed_and_isolated():
    codec = KVCodec(head_dim=128, center_keys=False, center_values=False)
    x = torch.randn(1, 10, 2, 128)
    clean = encode_kv(x, codec, "value")
    x[0, 3, 0, 7] = float("nan")
    x[0, 5, 1, 0] = float("inf")
    enc = encode_kv(x, codec, "value")
    bad = torch.zeros(1, 10, 2, dtype=torch.bool)
    bad[0, 3, 0] = bad[0, 5, 1] = True
    assert bool((enc.scales[bad] == 0).all()) and bool((enc.codes[bad] == 0).all())
    assert torch.equal(enc.codes[~bad], clean.codes[~bad])
    assert torch.equal(enc.scales[~bad], clean.scales[~bad])
    out = decode_kv(enc, codec, "value")
    assert bool(torch.isfinite(out).all()) and bool((out[bad] == 0).all())


@pytest.mark.parametrize("path", ("reference", "kernels"))
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("center", (True, False), ids=("centered", "uncentered"))
@pytest.mark.parametrize("bad", (float("nan"), float("inf")), ids=("nan", "inf"))
def test_non_finite_token_reaches_no_other_token(path, d, center, bad, request):
    """A NaN/Inf token is left out of the centering mean: every other token encodes and decodes as it would
    without it, and the bad token itself stores codes 0 and scale 0 (it decodes to the mean, or to zero)."""
    if path == "reference":
        request.getfixturevalue("reference_mode")
    elif not interpreted():
        pytest.skip("the kernels run under TRITON_INTERPRET=1")
    codec = KVCodec(head_dim=d, center_keys=center, center_values=center)
    x = torch.randn(1, 6, 2, d, dtype=torch.float16) * 2 + 0.5
    dirty = x.clone()
    dirty[0, 2, 0, 5] = bad  # head 0, token 2; head 1 is clean
    keep = [0, 1, 3, 4, 5]
    for kind in ("key", "value"):
        enc = encode_kv(dirty, codec, kind)
        # Tokens encode one by one given the mean, so the same mean must give the clean tokens' codes exactly.
        clean = encode_kv(x[:, keep], codec, kind, mean=enc.mean)
        assert torch.equal(enc.codes[:, keep], clean.codes)
        assert torch.equal(enc.scales[:, keep].view(torch.int16), clean.scales.view(torch.int16))
        assert bool((enc.codes[0, 2, 0] == 0).all()) and float(enc.scales[0, 2, 0]) == 0.0
        out = decode_kv(enc, codec, kind, dtype=torch.float32)
        assert torch.equal(out[:, keep], decode_kv(clean, codec, kind, dtype=torch.float32))
        assert bool(torch.isfinite(out).all())
        if center:  # the mean of the finite tokens only: head 0 without token 2, head 1 all of them
            want = torch.stack((centering_mean(x[:, keep, :1], codec, kind)[:, 0],
                                centering_mean(x[:, :, 1:], codec, kind)[:, 0]), 1)
            torch.testing.assert_close(enc.mean, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(out[0, 2, 0], enc.mean[0, 0] if center else torch.zeros(d))


def test_zero_token_decodes_to_zero():
    codec = KVCodec(head_dim=64, center_values=False)
    x = torch.randn(1, 4, 1, 64)
    x[0, 2, 0] = 0
    out = decode_kv(encode_kv(x, codec, "value"), codec, "value")
    assert bool((out[0, 2, 0] == 0).all())


def test_empty_sequence():
    codec = KVCodec(head_dim=128)
    enc = encode_kv(torch.randn(2, 0, 2, 128), codec, "key")
    assert enc.codes.shape == (2, 0, 2, 13)
    assert decode_kv(enc, codec, "key").shape == (2, 0, 2, 128)


def test_key_layout_planes_is_bit_exact():
    """``key_layout="planes"`` keeps 3-bit keys at head_dim 128 in bit planes: 12 words, 4 bytes per token less than
    the default "fields" layout; the kernel matches the reference in either."""
    planes = KVCodec(head_dim=128, key_bits=3, value_bits=2, key_layout="planes")
    x = torch.randn(2, 37, 3, 128)
    enc = _check(x, planes, "key")
    assert enc.codes.shape[-1] == 12 and planes.layout("key") == "planes"
    assert (planes.bytes_per_token("key"), KVCodec(head_dim=128).bytes_per_token("key")) == (50, 54)
    fields = _check(x, KVCodec(head_dim=128, key_bits=3, value_bits=2), "key")
    assert torch.equal(R.relayout(fields.codes, 3, 128, "fields", "planes"), enc.codes)  # the same lattice points
    assert torch.equal(R.relayout(enc.codes, 3, 128, "planes", "fields"), fields.codes)


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_dim=80), "head_dim=80"),
    (dict(key_bits=5), "key_bits=5"),
    (dict(value_bits=1), "value_bits=1"),
    (dict(scale_rule="amax"), "scale_rule"),
    (dict(page_size=48), "page_size"),
    (dict(key_layout="fields", key_bits=2), "key_layout"),
    (dict(key_layout="bitplanes"), "key_layout"),
    (dict(scale_dtype=torch.float32), "scale_dtype"),
    (dict(head_dim=64, rope=RopeSpec(rotary_dim=128)), "rotary_dim"),
])
def test_codec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVCodec(**kwargs)


# Every integer field, with a valid value: its float and bool forms must be refused by name (bool is an int).
INT_FIELDS = [(KVCodec, "head_dim", 128), (KVCodec, "key_bits", 3), (KVCodec, "value_bits", 2),
              (KVCodec, "page_size", 64), (RopeSpec, "rotary_dim", 64), (RopeSpec, "max_position_embeddings", 4096)]


@pytest.mark.parametrize("cls, name, valid", INT_FIELDS, ids=[f"{c.__name__}.{n}" for c, n, _ in INT_FIELDS])
@pytest.mark.parametrize("how", ("3.0", "True", "float"))
def test_integer_fields_refuse_floats_and_bools(cls, name, valid, how):
    value = {"3.0": 3.0, "True": True, "float": float(valid)}[how]
    assert cls(**{name: valid}) is not None
    with pytest.raises(TypeError, match=rf"{cls.__name__}\.{name} must be .*\bint\b.*got {type(value).__name__}"):
        cls(**{name: value})


def test_rope_spec_validation():
    with pytest.raises(ValueError, match="theta"):
        RopeSpec(theta=-1.0)
    with pytest.raises(ValueError, match="longrope"):
        RopeSpec(scaling=(("rope_type", "longrope"),))


def test_bad_inputs():
    codec = KVCodec(head_dim=128)
    with pytest.raises(ValueError, match="head_dim 64"):
        encode_kv(torch.randn(1, 1, 4, 64), codec)
    with pytest.raises(ValueError, match="4-D"):
        encode_kv(torch.randn(4, 128), codec)
    with pytest.raises(ValueError, match="float16"):
        encode_kv(torch.randint(0, 3, (1, 1, 4, 128)), codec)
    with pytest.raises(ValueError, match="kind"):
        encode_kv(torch.randn(1, 1, 4, 128), codec, kind="query")
    rope_codec = KVCodec(head_dim=128, rope=RopeSpec())
    with pytest.raises(ValueError, match="positions"):
        encode_kv(torch.randn(1, 1, 4, 128), rope_codec, positions=torch.arange(5)[None])
    enc = encode_kv(torch.randn(1, 1, 4, 128), codec, "key")
    with pytest.raises(ValueError, match="words per token"):
        decode_kv(enc, codec, "value")
    with pytest.raises(ValueError, match="mean"):
        decode_kv(enc._replace(mean=None), codec, "key")


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("scale_rule", ("rms", "rms_lsq"))
def test_every_scale_rule_bit_exact_at_every_head_dim(d, scale_rule):
    codec = KVCodec(head_dim=d, key_bits=3, value_bits=2, rope=RopeSpec(theta=1e4), scale_rule=scale_rule)
    x = torch.randn(1, 23, 2, d) * 1.5 - 0.2
    for kind in ("key", "value"):
        _check(x, codec, kind)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("T", (1, 33, 130))
@pytest.mark.parametrize("dtype", DTYPES)
def test_centering_mean_matches_torch(d, T, dtype):
    """The Triton mean (partial sums over token splits) vs the torch mean of the RoPE-undone keys, strided input."""
    codec = KVCodec(head_dim=d, rope=RopeSpec(theta=1e4, rotary_dim=d // 2))
    x = (torch.randn(2, 3, T, d) * 3 + 1).to(dtype).transpose(1, 2)  # [B, T, H, D], strided
    positions = torch.randint(0, 500, (2, T))
    got = centering_mean(x, codec, "key", positions)
    cos, sin = rope_tables(codec, 500, x.device)
    want = R.rope_undo(x.float(), cos[positions][:, :, None], sin[positions][:, :, None]).mean(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(centering_mean(x, codec, "value"), x.float().mean(1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="head_dim"):
        centering_mean(x[..., :-2], codec, "key")


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("bits", BITS)
def test_decode_matches_reference_on_random_codes(d, bits):
    # Random words exercise every index, coset flag and parity pattern of the word-level decode.
    codec = KVCodec(head_dim=d, key_bits=bits, value_bits=bits, rope=RopeSpec(theta=10000.0))
    B, H, T = 2, 3, 21
    codes = torch.randint(-2**31, 2**31 - 1, (B, T, H, codec.words_per_token("key")), dtype=torch.int32)
    if codec.layout("key") == "fields" and bits == 3:  # every index bit is stored: valid codes from random
        # indices, and random bits in the spare bits (15 and 31 of words 8-11, 12-15 and 28-31 of word 12), which
        # decoding ignores
        spare = torch.tensor([0] * 8 + [0x80008000] * 4 + [0xF000F000]).to(torch.int32)
        codes = R.pack_codes(torch.randint(0, 8, (B, T, H, d)), bits, "fields") | (codes & spare)
    scales = (torch.rand(B, T, H) + 0.1).half()
    mean = torch.randn(B, H, d)
    positions = torch.randint(0, 500, (B, T))
    out = decode_kv(EncodedKV(codes, scales, mean), codec, "key", positions=positions, dtype=torch.float32)
    c, s = rope_tables(codec, 500, "cpu")
    want = R.decode_reference(codes, scales, bits, d, cos=c[positions], sin=s[positions], mean=mean,
                              dtype=torch.float32, layout=codec.layout("key"))
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,rope,center,given", [("key", True, True, False), ("value", False, False, False),
                                                    ("value", False, True, True)],
                         ids=["key_rope_centered", "value_uncentered", "value_mean_given"])
def test_encode_decode_compile_without_graph_breaks(kind, rope, center, given):
    """Under torch.compile, encode_kv and decode_kv are one custom op each (nqkernels::encode_kv / decode_kv):
    a function that round-trips through them compiles with fullgraph=True and gives what the eager calls give, bit
    for bit; torch.library.opcheck passes (schema, fake implementations, no aliasing)."""
    from nqkernels import codec as C
    from nqkernels.runtime import codec_id

    codec = KVCodec(head_dim=64, rope=RopeSpec(theta=10000.0) if rope else None, center_keys=center,
                    center_values=center)
    x = torch.randn(2, 20, 2, 64, dtype=torch.float16)
    positions = torch.arange(5, 25).expand(2, 20) if kind == "key" else None
    mean = torch.randn(2, 2, 64) if given else None

    def round_trip(x, positions, mean):
        enc = encode_kv(x, codec, kind, positions, mean)
        return enc, decode_kv(enc, codec, kind, positions, dtype=torch.float32)

    (got, y), (want, y_want) = (torch.compile(round_trip, fullgraph=True, backend="aot_eager")(x, positions, mean),
                                round_trip(x, positions, mean))
    assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales) and torch.equal(y, y_want)
    assert (got.mean is None) == (want.mean is None) == (not center)
    if center:
        assert torch.equal(got.mean, want.mean)
    key, cid = kind == "key", codec_id(codec)
    torch.library.opcheck(C._encode_op, (x, cid, key, positions, mean))
    torch.library.opcheck(C._decode_op, (want.codes, want.scales, want.mean, positions, cid, key, torch.float32))
