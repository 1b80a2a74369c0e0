"""The public API as a newcomer meets it: wrong types (lists, numpy arrays, strings, bools, floats for ints), wrong
layouts, integer tensors, devices that differ (the meta device stands in for a GPU) and empty inputs. Each mistake
raises a ValueError/TypeError that names the argument and what is allowed, before any kernel runs; empty inputs
that have an answer give it."""
import io
from types import SimpleNamespace

import pytest
import torch

from nqkernels import (EncodedKV, KVCodec, PagedKVCache, RopeSpec, centering_mean, decode_attention, decode_kv,
                       encode_kv, filter_codes, keep_for_bytes, layer_budgets, load_cache, random_scores, save_cache,
                       score_tokens, select_tokens, unfilter_codes)


@pytest.fixture(scope="module")
def c():
    gen = torch.Generator().manual_seed(0)
    codec = KVCodec(head_dim=64, page_size=16)
    cache = PagedKVCache(codec, num_kv_heads=2, max_batch=2, num_pages=8, device="cpu")
    k = torch.randn(1, 40, 2, 64, generator=gen).half()  # [batch, tokens, kv_heads, head_dim]
    cache.append(k, torch.randn(k.shape, generator=gen).half())
    x = torch.randn(1, 5, 2, 64, generator=gen)  # [batch, tokens, heads, head_dim]
    scores = torch.rand(1, 2, 40, generator=gen)
    return SimpleNamespace(codec=codec, rope_codec=KVCodec(head_dim=64, rope=RopeSpec()), cache=cache, k=k, x=x,
                           enc=encode_kv(x, codec, "key"), q=torch.randn(1, 1, 4, 64, generator=gen).half(),
                           scores=scores, sel=select_tokens(scores, evict=0.5, sinks=2, recent=4),
                           modes=torch.zeros(2, dtype=torch.int32), meta=torch.device("meta"))


def _filter(c, **kw):
    args = dict(codes=c.enc.codes[0].transpose(0, 1), scales=c.enc.scales[0].transpose(0, 1), modes=c.modes,
                head_dim=64, bits=3)
    return filter_codes(**{**args, **kw})


def _unfilter(c, **kw):
    args = dict(data=torch.randint(0, 256, (2, 26), dtype=torch.uint8), modes=c.modes, head_dim=64, bits=3)
    return unfilter_codes(**{**args, **kw})


CASES = [
    # configuration
    ("codec center int", lambda c: KVCodec(center_keys=1), TypeError, r"KVCodec\.center_keys must be a bool"),
    ("codec alpha missing", lambda c: KVCodec(alpha={3: 0.58}), ValueError, r"KVCodec\.alpha\[2\] must be a positive"),
    ("codec scale_dtype str", lambda c: KVCodec(scale_dtype="float16"), ValueError, r"scale_dtype .* got 'float16'"),
    ("rope theta str", lambda c: RopeSpec(theta="1e4"), ValueError, r"RopeSpec\.theta must be a positive finite"),
    ("rope scaling dict", lambda c: RopeSpec(scaling={"rope_type": "linear", "factor": 2.0}), TypeError,
     r"RopeSpec\.scaling must be a tuple of \(key, value\) pairs"),
    # encode / decode
    ("encode numpy", lambda c: encode_kv(c.x.numpy(), c.codec), ValueError, r"x must be a 4-D tensor .*got ndarray"),
    ("encode list", lambda c: encode_kv(c.x.tolist(), c.codec), ValueError, r"x must be a 4-D tensor .*got list"),
    ("encode int", lambda c: encode_kv(c.x.long(), c.codec), ValueError, r"x must be float16.*got torch\.int64"),
    ("encode codec str", lambda c: encode_kv(c.x, "k3v2"), TypeError, r"codec must be a KVCodec, got str"),
    ("encode mean list", lambda c: encode_kv(c.x, c.codec, mean=[0.0] * 64), ValueError,
     r"mean must be a \[batch, heads, head_dim\] = \[1, 2, 64\] tensor on cpu, got list"),
    ("encode mean device", lambda c: encode_kv(c.x, c.codec, mean=torch.zeros(1, 2, 64, device=c.meta)), ValueError,
     r"mean must be .* on cpu, got torch\.float32 \[1, 2, 64\] on meta"),
    ("encode mean, uncentered", lambda c: encode_kv(c.x, KVCodec(head_dim=64, center_values=False), "value",
                                                     mean=torch.zeros(1, 2, 64)), ValueError,
     r"mean is given but the codec does not center values"),
    ("encode positions list", lambda c: encode_kv(c.x, c.rope_codec, positions=[[0, 1, 2, 3, 4]]), TypeError,
     r"positions must be an int tensor \[batch, tokens\] = \[1, 5\], got list"),
    ("encode positions device", lambda c: encode_kv(c.x, c.rope_codec, positions=torch.zeros(1, 5, dtype=torch.long,
                                                                                          device=c.meta)),
     ValueError, r"positions must be an int32/int64 tensor on cpu, got torch\.int64 on meta"),
    ("centering codec None", lambda c: centering_mean(c.x, None), TypeError, r"codec must be a KVCodec, got NoneType"),
    ("decode pair", lambda c: decode_kv(c.enc[:2], c.codec), TypeError, r"enc must be an EncodedKV"),
    ("decode codes int64", lambda c: decode_kv(c.enc._replace(codes=c.enc.codes.long()), c.codec), ValueError,
     r"codes must be int32 .*got torch\.int64"),
    ("decode scales list", lambda c: decode_kv(c.enc._replace(scales=c.enc.scales.tolist()), c.codec), ValueError,
     r"scales must be a float tensor \[1, 5, 2\] on cpu .*got list"),
    ("decode scales device", lambda c: decode_kv(c.enc._replace(scales=c.enc.scales.to(c.meta)), c.codec),
     ValueError, r"scales must be a float tensor \[1, 5, 2\] on cpu .*on meta"),
    ("decode mean of one head", lambda c: decode_kv(c.enc._replace(mean=c.enc.mean[:, :1]), c.codec), ValueError,
     r"mean must be a \[batch, heads, head_dim\] = \[1, 2, 64\] tensor on cpu, got torch\.float32 \[1, 1, 64\]"),
    ("decode dtype str", lambda c: decode_kv(c.enc, c.codec, dtype="float16"), ValueError,
     r"dtype must be torch\.float16, .* got 'float16'"),
    # decode_attention
    ("attention q list", lambda c: decode_attention(c.q.tolist(), c.cache), ValueError,
     r"q must be a 4-D tensor \[batch, q_len, q_heads, head_dim\], got list"),
    ("attention q int", lambda c: decode_attention(c.q.long(), c.cache), ValueError,
     r"q is torch\.int64 but the cache holds torch\.float16"),
    ("attention q device", lambda c: decode_attention(c.q.to(c.meta), c.cache), ValueError,
     r"q is on meta but the cache is on cpu"),
    ("attention no q heads", lambda c: decode_attention(c.q[:, :, :0], c.cache), ValueError,
     r"q_heads a positive multiple of the cache's kv_heads \(2\), got q_heads=0"),
    ("attention q transposed", lambda c: decode_attention(c.q.transpose(1, 2), c.cache), ValueError,
     r"looks like \[batch, q_heads, q_len, head_dim\]: pass q\.transpose\(1, 2\)"),
    ("attention scale str", lambda c: decode_attention(c.q, c.cache, softmax_scale="0.1"), ValueError,
     r"softmax_scale must be a positive finite float, got '0\.1'"),
    ("attention softcap str", lambda c: decode_attention(c.q, c.cache, softcap="30"), ValueError,
     r"softcap must be a positive finite float, got '30'"),
    ("attention window bool", lambda c: decode_attention(c.q, c.cache, window=True), ValueError,
     r"window must be an int >= 1 or None, got True"),
    ("attention splits 0", lambda c: decode_attention(c.q, c.cache, num_splits=0), ValueError,
     r"num_splits must be an int >= 1 or None"),
    ("attention splits str", lambda c: decode_attention(c.q, c.cache, num_splits="2"), ValueError,
     r"num_splits must be an int >= 1 or None"),
    # scoring
    ("score k numpy", lambda c: score_tokens(c.q, c.k.numpy()), ValueError, r"k must be a 4-D tensor .*got ndarray"),
    ("score int", lambda c: score_tokens(c.q.long(), c.k.long()), ValueError, r"k must be float16.*got torch\.int64"),
    ("score k device", lambda c: score_tokens(c.q, c.k.to(c.meta)), ValueError, r"q is on cpu but k is on meta"),
    ("score no tokens", lambda c: score_tokens(c.q, c.k[:, :0]), ValueError, r"k must hold at least one token"),
    ("score no kv heads", lambda c: score_tokens(c.q, c.k[:, :, :0]), ValueError,
     r"q_heads \(4\) must be a positive multiple of kv_heads \(0\)"),
    ("score no head_dim", lambda c: score_tokens(c.q[..., :0], c.k[..., :0]), ValueError,
     r"head_dim must be in \[1, 256\], got 0"),
    ("score k transposed", lambda c: score_tokens(c.q, c.k.transpose(1, 2)), ValueError,
     r"k \[batch, tokens, kv_heads, head_dim\] \(from \[batch, heads, tokens, head_dim\] tensors pass "
     r"\.transpose\(1, 2\)\)"),
    ("score scale str", lambda c: score_tokens(c.q, c.k, softmax_scale="0.1"), ValueError,
     r"softmax_scale must be a positive finite float"),
    ("score pool bool", lambda c: score_tokens(c.q, c.k, pool=True), ValueError, r"pool must be 0 \(off\) or an odd"),
    ("score seq_lens str", lambda c: score_tokens(c.q, c.k, seq_lens="40"), ValueError,
     r"seq_lens must be a list or 1-D int tensor of 1 ints in \[1, 40\]"),
    ("score seq_lens int", lambda c: score_tokens(c.q, c.k, seq_lens=40), ValueError, r"seq_lens must be a list"),
    ("score seq_lens float", lambda c: score_tokens(c.q, c.k, seq_lens=torch.tensor([39.5])), ValueError,
     r"seq_lens must be a list"),
    ("random generator int", lambda c: random_scores(c.k, generator=0), TypeError,
     r"generator must be a torch\.Generator or None, got int"),
    # eviction
    ("select list", lambda c: select_tokens(c.scores.tolist(), evict=0.5), ValueError,
     r"scores must be a float tensor \[batch, kv_heads, tokens\], got list"),
    ("select int", lambda c: select_tokens(c.scores.long(), evict=0.5), ValueError, r"got torch\.int64 \[1, 2, 40\]"),
    ("select no tokens", lambda c: select_tokens(c.scores[..., :0], evict=0.5), ValueError,
     r"scores must hold at least one token"),
    ("select evict str", lambda c: select_tokens(c.scores, evict="0.5"), ValueError, r"evict must be a fraction"),
    ("select keep float", lambda c: select_tokens(c.scores, keep=10.0), ValueError,
     r"keep must be an int >= 1 or a list of 1 such ints"),
    ("select keep bool", lambda c: select_tokens(c.scores, keep=True), ValueError, r"keep must be an int >= 1"),
    ("select sinks bool", lambda c: select_tokens(c.scores, evict=0.5, sinks=True), ValueError,
     r"sinks must be an int >= 0, got True"),
    ("select per_head str", lambda c: select_tokens(c.scores, evict=0.5, per_head="no"), TypeError,
     r"per_head must be a bool"),
    ("gather transposed", lambda c: c.sel.gather(c.k.transpose(1, 2)), ValueError,
     r"x must be a 4-D tensor \[batch, tokens, kv_heads, head_dim\] with batch 1 and kv_heads 2"),
    ("gather other batch", lambda c: c.sel.gather(torch.cat((c.k, c.k))), ValueError, r"with batch 1 and kv_heads 2"),
    ("gather too few tokens", lambda c: c.sel.gather(c.k[:, :10]), ValueError,
     r"x holds 10 tokens but the selection keeps token 39"),
    ("layer_budgets keep str", lambda c: layer_budgets(4, "0.5"), ValueError, r"keep must be a fraction in \(0, 1\]"),
    ("layer_budgets layers bool", lambda c: layer_budgets(True, 0.5), ValueError, r"num_layers must be an int >= 1"),
    ("layer_budgets slope str", lambda c: layer_budgets(4, 0.5, "pyramid", slope="x"), ValueError,
     r"slope must be a float >= 0"),
    ("keep_for_bytes budget str", lambda c: keep_for_bytes("1000000", c.codec, 2), ValueError,
     r"budget must be a finite number of bytes"),
    ("keep_for_bytes codec None", lambda c: keep_for_bytes(10 ** 6, None, 2), TypeError, r"codec must be a KVCodec"),
    ("keep_for_bytes no heads", lambda c: keep_for_bytes(10 ** 6, c.codec, 0), ValueError,
     r"num_kv_heads must be an int >= 1, got 0"),
    # COLD
    ("save to bytes", lambda c: save_cache(c.cache, b"nqkv"), TypeError,
     r"file must be a path or a writable binary stream, got bytes \(wrap bytes in io\.BytesIO\)"),
    ("save level bool", lambda c: save_cache(c.cache, io.BytesIO(), level=True), ValueError, r"level must be an int"),
    ("save threads str", lambda c: save_cache(c.cache, io.BytesIO(), threads="2"), ValueError,
     r"threads must be an int >= 1 or None"),
    ("save sample 0", lambda c: save_cache(c.cache, io.BytesIO(), sample=0), ValueError, r"sample must be an int >= 1"),
    ("load bytes", lambda c: load_cache(b"NQKVCOLD", device="cpu"), TypeError,
     r"file must be a path or a readable, seekable binary stream, got bytes"),
    ("load device str", lambda c: load_cache(io.BytesIO(), device="gpu"), ValueError,
     r"device must be a torch\.device or a string such as 'cuda' or 'cpu', got 'gpu'"),
    ("load num_pages str", lambda c: load_cache(io.BytesIO(), device="cpu", num_pages="8"), ValueError,
     r"num_pages must be an int >= 1 or None"),
    ("load codec str", lambda c: load_cache(io.BytesIO(), device="cpu", codec="k3v2"), TypeError,
     r"codec must be a KVCodec or None"),
    # COLD filter
    ("filter codes list", lambda c: _filter(c, codes=c.enc.codes[0].tolist()), ValueError,
     r"codes must be int32 \[streams, tokens, 6\] .*got list"),
    ("filter bits float", lambda c: _filter(c, bits=3.0), ValueError, r"bits must be an int in \(2, 3, 4\), got 3\.0"),
    ("filter head_dim float", lambda c: _filter(c, head_dim=64.0), ValueError, r"head_dim must be an int in"),
    ("filter chunk bool", lambda c: _filter(c, chunk=True), ValueError, r"chunk must be an int >= 1, got True"),
    ("filter modes list", lambda c: _filter(c, modes=[0, 0]), ValueError, r"modes must be an int32 tensor"),
    ("filter scales device", lambda c: _filter(c, scales=c.enc.scales[0].transpose(0, 1).to(c.meta)), ValueError,
     r"scales are on meta but the codes on cpu"),
    ("unfilter data list", lambda c: _unfilter(c, data=[[1, 2]]), ValueError, r"data must be uint8 .*got list"),
    ("unfilter bits float", lambda c: _unfilter(c, bits=3.0), ValueError, r"bits must be an int in"),
    ("unfilter scale_dtype", lambda c: _unfilter(c, scale_dtype=torch.float32), ValueError,
     r"scale_dtype must be torch\.float16, torch\.bfloat16 or torch\.int16"),
    ("unfilter unknown mode", lambda c: _unfilter(c, modes=torch.tensor([0, 7], dtype=torch.int32)), ValueError,
     r"modes must each be 0 \(RAW\), 1 \(SHUFFLE\) or 2 \(DELTA\), got \[0, 7\]"),
    ("unfilter modes device", lambda c: _unfilter(c, modes=c.modes.to(c.meta)), ValueError,
     r"modes are on meta but the codes on cpu"),
    # paged cache
    ("paged heads bool", lambda c: PagedKVCache(c.codec, num_kv_heads=True, max_batch=1, num_pages=4, device="cpu"),
     ValueError, r"num_kv_heads must be an int >= 1, got True"),
    ("paged lengths float", lambda c: PagedKVCache(c.codec, 2, 1, 4, device="cpu").append(c.k[:, :3], c.k[:, :3],
                                                                                          lengths=[2.5]),
     ValueError, r"lengths must hold 1 ints in \[0, 3\] \(one per sequence\), got \[2\.5\]"),
    ("paged lengths bool", lambda c: PagedKVCache(c.codec, 2, 1, 4, device="cpu").append(c.k[:, :3], c.k[:, :3],
                                                                                         lengths=[True]),
     ValueError, r"lengths must hold 1 ints"),
]


@pytest.mark.parametrize("call, error, match", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_mistake_is_named(c, call, error, match):
    with pytest.raises(error, match=match):
        call(c)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_load_to_cuda_without_cuda():
    with pytest.raises(ValueError, match=r"device is cuda \(default cuda\) but CUDA is not available: pass "
                                         r"device='cpu'"):
        load_cache(io.BytesIO())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_paged_cache_on_cuda_without_cuda(c):
    with pytest.raises(ValueError, match=r"device='cuda' \(the default is 'cuda'\) but this torch sees no CUDA GPU"):
        PagedKVCache(c.codec, num_kv_heads=2, max_batch=1, num_pages=4)


def test_empty_inputs_give_empty_answers(c):
    for x in (c.x[:0], c.x[:, :0], c.x[:, :, :0]):
        enc = encode_kv(x, c.codec, "key")
        assert decode_kv(enc, c.codec, "key").shape == x.shape
    assert decode_attention(c.q[:0], c.cache).shape == (0, 1, 4, 64)
    assert score_tokens(c.q[:0], c.k[:0]).shape == (0, 2, 40)
    sel = select_tokens(c.scores[:0], evict=0.5)
    assert sel.indices.shape == (0, 2, 0) and sel.counts.shape == (0,)
    assert sel.gather(c.k[:0]).shape == (0, 0, 2, 64)
    assert isinstance(c.enc, EncodedKV)
