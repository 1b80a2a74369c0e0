"""The COLD format: filter kernels (delta, zigzag, shuffle) bit-exact against the torch reference under the
interpreter, HOT -> COLD -> HOT round trips (random and fixture caches), offload/restore, and every failure case."""
import io
import os

import pytest
import torch

from nqkernels import (ColdFormatError, KVCodec, PagedKVCache, RopeSpec, filter_codes, load_cache, save_cache,
                       unfilter_codes)
from nqkernels import reference as R
from nqkernels.reference import filter_reference, record_bytes, unfilter_reference

from .conftest import BITS, FIXTURE, HEAD_DIMS


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("bits", BITS)
def test_filter_matches_reference_and_inverts(d, bits):
    T = 157  # odd, several 64-token blocks, chunks of 50 cut through blocks
    idx = torch.randint(0, 1 << bits, (4, T, d))
    idx[1, 40:60] = idx[1, 39]  # a run of equal tokens (what DELTA and RAW's matches like)
    base = torch.zeros(4, T + 3, d * bits // 32, dtype=torch.int32)
    base[:, 3:] = R.pack_codes(idx, bits)
    codes = base[:, 3:]  # a strided view
    scales = torch.randint(-2**15, 2**15, (4, T), dtype=torch.int16).view(torch.bfloat16)  # any bits, NaN included
    modes = torch.tensor([0, 1, 2, 2], dtype=torch.int32)
    out = filter_codes(codes, scales, modes, d, bits, chunk=50)
    want = filter_reference(codes, scales.view(torch.int16), modes, d, bits, 50)
    assert out.shape == (4, T * record_bytes(d, bits)) and torch.equal(out, want)
    c, s = unfilter_codes(out, modes, d, bits, chunk=50, scale_dtype=torch.bfloat16)
    assert torch.equal(c, codes) and torch.equal(s.view(torch.int16), scales.view(torch.int16))
    c2, s2 = unfilter_reference(want, modes, d, bits, 50)
    assert torch.equal(c2, codes) and torch.equal(s2, scales.view(torch.int16))


def test_filter_layouts_are_as_documented():
    codes = R.pack_codes(torch.randint(0, 4, (1, 5, 64)), 2)
    scales = torch.rand(1, 5).half()
    rec = torch.cat((codes[0].view(torch.uint8).reshape(5, -1), scales[0].view(torch.uint8).reshape(5, 2)), 1)
    raw = filter_codes(codes, scales, torch.tensor([0], dtype=torch.int32), 64, 2, chunk=8)
    shuf = filter_codes(codes, scales, torch.tensor([1], dtype=torch.int32), 64, 2, chunk=8)
    assert torch.equal(raw[0], rec.reshape(-1)) and torch.equal(shuf[0], rec.T.reshape(-1))
    same = codes.expand(1, 5, -1).clone()
    same[0, :] = codes[0, 2]
    delta = filter_codes(same, scales[:, :1].expand(1, 5), torch.tensor([2], dtype=torch.int32), 64, 2, chunk=8)
    assert (delta[0].view(record_bytes(64, 2), 5)[:, 1:] == 0).all()  # equal tokens give zero deltas


def test_filter_bad_inputs():
    codes = torch.zeros(2, 10, 12, dtype=torch.int32)
    scales = torch.zeros(2, 10, dtype=torch.float16)
    with pytest.raises(ValueError, match="modes"):
        filter_codes(codes, scales, torch.tensor([0, 3], dtype=torch.int32), 128, 3)
    with pytest.raises(ValueError, match="codes"):
        filter_codes(codes, scales, torch.zeros(2, dtype=torch.int32), 128, 2)
    with pytest.raises(ValueError, match="scales"):
        filter_codes(codes, scales.float(), torch.zeros(2, dtype=torch.int32), 128, 3)
    with pytest.raises(ValueError, match="data"):
        unfilter_codes(torch.zeros(2, 7, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32), 128, 3)


# ---------------------------------------------------------------------------------------------------------------

def _caches(layers=2, d=64, bits=(3, 2), lengths=(70, 0, 33), sinks=2, recent=5, rope=None, dtype=torch.float16):
    codec = KVCodec(head_dim=d, key_bits=bits[0], value_bits=bits[1], page_size=16, rope=rope)
    out = []
    for _ in range(layers):
        c = PagedKVCache(codec, num_kv_heads=2, max_batch=len(lengths), num_pages=32, sink_tokens=sinks,
                         recent_tokens=recent, dtype=dtype, device="cpu")
        k = (torch.randn(len(lengths), max(lengths), 2, d) + 0.3).to(dtype)
        k[:, 10:20] = k[:, 9:10]  # repeated tokens
        c.append(k, torch.randn_like(k), lengths=list(lengths))
        out.append(c)
    return out


def _assert_same(a: PagedKVCache, b: PagedKVCache):
    assert a.seq_lens() == b.seq_lens() and a.compressed_lens() == b.compressed_lens()
    for slot in range(a.max_batch):
        if not a.seq_lens()[slot]:
            continue
        sa, sb = a.export_slot(slot), b.export_slot(slot)
        assert sa.sinks == sb.sinks and sa.next_position == sb.next_position
        assert sa.layouts == sb.layouts
        for x, y in zip(sa[:8] + sa[10:12], sb[:8] + sb[10:12]):
            assert (x is None) == (y is None)
            assert x is None or (x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)))


def _saved(caches, **kw) -> bytes:
    buf = io.BytesIO()
    stats = save_cache(caches, buf, **kw)
    assert stats["file_bytes"] == len(buf.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("bits", ((2, 2), (3, 2), (4, 3)))
def test_round_trip_bit_exact(d, bits):
    caches = _caches(d=d, bits=bits)
    back = load_cache(io.BytesIO(_saved(caches, chunk=40)), device="cpu", num_pages=32)
    assert len(back) == 2
    for a, b in zip(caches, back):
        _assert_same(a, b)


@pytest.mark.parametrize("modes", ("auto", "raw", "shuffle", "delta", {"key": "delta", "value": "raw"}))
def test_round_trip_every_mode_both_key_modes(modes):
    for rope in (None, RopeSpec(theta=10000.0)):
        caches = _caches(rope=rope, dtype=torch.bfloat16, sinks=0, recent=0, lengths=(48, 17))
        for a, b in zip(caches, load_cache(io.BytesIO(_saved(caches, modes=modes)), device="cpu")):
            _assert_same(a, b)


def test_sequences_without_pages_round_trip():
    for rope in (None, RopeSpec(theta=10000.0)):
        caches = _caches(lengths=(10, 3, 1), sinks=2, recent=16, rope=rope)  # only sinks and window, no pages
        assert caches[0].compressed_lens() == [0, 0, 0]
        for a, b in zip(caches, load_cache(io.BytesIO(_saved(caches)), device="cpu")):
            _assert_same(a, b)


def test_save_to_path_is_atomic_and_loads(tmp_path, monkeypatch):
    caches = _caches()
    path = tmp_path / "cache.nqkv"
    stats = save_cache(caches, path, level=5, progress=True)
    assert path.stat().st_size == stats["file_bytes"] and os.listdir(tmp_path) == ["cache.nqkv"]
    for a, b in zip(caches, load_cache(path, device="cpu", codec=caches[0].codec, num_layers=2, num_kv_heads=2)):
        _assert_same(a, b)
    # An interrupted save leaves the old file intact and no temporary behind.
    import nqkernels.cold as cold
    calls = {"n": 0}
    real = cold.filter_codes

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(cold, "filter_codes", failing)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        save_cache(caches, path, modes="raw")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["cache.nqkv"]


def test_loaded_cache_attends_like_the_saved_one():
    from nqkernels import decode_attention
    caches = _caches(layers=1, d=128, lengths=(70, 0, 33))
    [back] = load_cache(io.BytesIO(_saved(caches)), device="cpu")
    q = torch.randn(3, 1, 4, 128, dtype=torch.float16)
    q[1] = 0
    back.append(torch.ones(3, 1, 2, 128, dtype=torch.float16), torch.ones(3, 1, 2, 128, dtype=torch.float16))
    caches[0].append(torch.ones(3, 1, 2, 128, dtype=torch.float16), torch.ones(3, 1, 2, 128, dtype=torch.float16))
    assert torch.equal(decode_attention(q, back), decode_attention(q, caches[0]))


@pytest.mark.parametrize("damage", ("magic", "version", "header", "frame", "index", "truncate_end",
                                    "truncate_mid", "empty"))
def test_corrupted_files_are_named(damage):
    data = bytearray(_saved(_caches()))
    if damage == "magic":
        data[0] ^= 1
        match = "not an nqkernels COLD file"
    elif damage == "version":
        data[8] = 9
        match = "version 9"
    elif damage == "header":
        data[30] ^= 0x40
        match = "header checksum"
    elif damage == "frame":
        data[len(data) // 3] ^= 0x10
        match = "checksum mismatch in frame"
    elif damage == "index":
        data[-30] ^= 0x01
        match = "index checksum"
    elif damage == "truncate_end":
        data = data[:-5]
        match = "truncated"
    elif damage == "truncate_mid":
        data = data[:len(data) // 2]
        match = "truncated"
    else:
        data = bytearray()
        match = "not an nqkernels COLD file"
    with pytest.raises(ColdFormatError, match=match):
        load_cache(io.BytesIO(bytes(data)), device="cpu")


@pytest.mark.parametrize("extra", (1, 37, (1 << 20) + 5), ids=("1", "37", "over_a_search_block"))
def test_trailing_bytes_are_counted(extra, tmp_path):
    """Bytes appended after a complete file are named as such (not as truncation), with their count; without them
    the file loads."""
    data = _saved(_caches(layers=1))
    tail = torch.randint(0, 256, (extra,), dtype=torch.uint8).numpy().tobytes()
    path = tmp_path / "appended.nqkv"
    path.write_bytes(data + tail)
    for file in (io.BytesIO(data + tail), path):
        with pytest.raises(ColdFormatError, match=f"{extra} trailing bytes after the end of the cache "
                                                  f"\\(byte {len(data)}\\)"):
            load_cache(file, device="cpu")
    [back] = load_cache(io.BytesIO(data), device="cpu")
    assert back.seq_lens() == [70, 0, 33]


def test_files_hold_bit_planes_whatever_the_key_layout():
    """Keys in the "fields" layout (3 bits, head_dim 128) are saved as bit planes: a cache loads into either key
    layout (the caller's codec), the codes equal after ``reference.relayout``, and back again."""
    caches = _caches(d=128, bits=(3, 2))
    assert caches[0].k_codes.shape[-1] == 13
    data = _saved(caches, modes="raw")
    planes = KVCodec(head_dim=128, key_bits=3, value_bits=2, page_size=16, key_layout="planes")
    back = load_cache(io.BytesIO(data), device="cpu", codec=planes)
    assert back[0].codec.layout("key") == "planes" and back[0].k_codes.shape[-1] == 12
    for a, b in zip(caches, back):
        for slot in (0, 2):
            ka, kb = a.export_slot(slot).k_codes, b.export_slot(slot).k_codes
            assert torch.equal(R.relayout(ka, 3, 128, "fields", "planes"), kb)
    for a, b in zip(caches, load_cache(io.BytesIO(_saved(back, modes="raw")), device="cpu", codec=caches[0].codec)):
        _assert_same(a, b)


def test_4_bit_fields_are_saved_as_bit_planes():
    """4-bit keys and values at head_dim 128 ("fields": nibbles) are saved as bit planes and load back bit for bit;
    keys load into bit planes too where the caller's codec asks for them."""
    caches = _caches(d=128, bits=(4, 4))
    assert [caches[0].codec.layout(k) for k in ("key", "value")] == ["fields", "fields"]
    data = _saved(caches, modes="raw")
    for a, b in zip(caches, load_cache(io.BytesIO(data), device="cpu")):
        _assert_same(a, b)
    planes = KVCodec(head_dim=128, key_bits=4, value_bits=4, page_size=16, key_layout="planes")
    for a, b in zip(caches, load_cache(io.BytesIO(data), device="cpu", codec=planes)):
        for slot in (0, 2):
            ka, kb = a.export_slot(slot).k_codes, b.export_slot(slot).k_codes
            assert torch.equal(R.relayout(ka, 4, 128, "fields", "planes"), kb)


def test_other_codec_or_shape_is_refused():
    data = _saved(_caches())
    with pytest.raises(ColdFormatError, match="another codec"):
        load_cache(io.BytesIO(data), device="cpu", codec=KVCodec(head_dim=64, key_bits=4, page_size=16))
    with pytest.raises(ColdFormatError, match="num_layers is 2, expected 32"):
        load_cache(io.BytesIO(data), device="cpu", num_layers=32)
    with pytest.raises(ColdFormatError, match="num_kv_heads"):
        load_cache(io.BytesIO(data), device="cpu", num_kv_heads=8)
    with pytest.raises(ValueError, match="num_pages"):
        load_cache(io.BytesIO(data), device="cpu", num_pages=1)


def test_save_bad_arguments():
    caches = _caches()
    with pytest.raises(ValueError, match="modes"):
        save_cache(caches, io.BytesIO(), modes="zip")
    with pytest.raises(ValueError, match="level"):
        save_cache(caches, io.BytesIO(), level=0)
    with pytest.raises(TypeError, match="PagedKVCache"):
        save_cache([], io.BytesIO())
    other = _caches(layers=1, d=128)
    with pytest.raises(ValueError, match="layer 1"):
        save_cache([caches[0], other[0]], io.BytesIO())


def test_fixture_cache_round_trip():
    transformers = pytest.importorskip("transformers")
    from integrations.hf.compat import output_cache
    model_dir = os.path.join(FIXTURE, "llama-tiny-hd128")
    if not os.path.isdir(model_dir):
        pytest.skip(f"fixture model not found at {model_dir} (set NQ_FIXTURE_DIR)")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    with open(os.path.join(FIXTURE, "text", "eval_pydocs.txt")) as f:
        ids = tok(f.read()[:6000], return_tensors="pt").input_ids[:, :300]
    with torch.no_grad():
        kv = output_cache(model(ids, use_cache=True))
    caches = []
    for layer in kv.layers:
        c = PagedKVCache(KVCodec(head_dim=128, page_size=64), num_kv_heads=2, max_batch=1, num_pages=8, device="cpu")
        c.append(layer.keys.transpose(1, 2).half(), layer.values.transpose(1, 2).half())
        caches.append(c)
    data = _saved(caches)
    for a, b in zip(caches, load_cache(io.BytesIO(data), device="cpu")):
        _assert_same(a, b)
