"""integrations.flash.flash_attn_with_kvcache: the flash-attn-shaped call equals append + decode_attention and
maps flash-attn's arguments (cache_seqlens, block_table, window_size, softcap, causal) as documented."""
import pytest
import torch

from integrations.flash import flash_attn_with_kvcache
from nqkernels import KVCodec, PagedKVCache, decode_attention


def _pair(recent=5, batch=2, d=64):
    def make():
        codec = KVCodec(head_dim=d, key_bits=3, value_bits=2, page_size=16)
        return PagedKVCache(codec, num_kv_heads=2, max_batch=batch, num_pages=32, recent_tokens=recent,
                            device="cpu")
    return make(), make()


def _kv(B, T, d=64):
    k = torch.randn(B, T, 2, d, dtype=torch.float16) + 0.2
    return k, torch.randn_like(k)


def test_serving_loop_matches_append_plus_decode_attention():
    ours, plain = _pair()
    k, v = _kv(2, 37)
    q = torch.randn(2, 3, 8, 64, dtype=torch.float16)
    plain.append(k, v)
    want = decode_attention(q, plain)
    got = flash_attn_with_kvcache(q, ours, k, v, cache_seqlens=torch.zeros(2, dtype=torch.int32))
    assert torch.equal(got, want)
    for step in range(4):  # decode steps: one new token per sequence, lengths checked each time
        k1, v1 = _kv(2, 1)
        q1 = torch.randn(2, 1, 8, 64, dtype=torch.float16)
        seqlens = torch.tensor(ours.seq_lens(), dtype=torch.int32)
        got = flash_attn_with_kvcache(q1, ours, k1, v1, cache_seqlens=seqlens, block_table=ours.block_table,
                                      softmax_scale=0.2, softcap=3.0, window_size=(20, 0), num_splits=2)
        plain.append(k1, v1)
        want = decode_attention(q1, plain, softmax_scale=0.2, softcap=3.0, window=21, num_splits=2)
        assert torch.equal(got, want)
    assert ours.seq_lens() == [41, 41] and ours.compressed_lens() == [32, 32]


def test_no_new_tokens_and_non_causal_single_query():
    ours, plain = _pair()
    k, v = _kv(2, 30)
    ours.append(k, v)
    plain.append(k, v)
    q = torch.randn(2, 1, 2, 64, dtype=torch.float16)
    assert torch.equal(flash_attn_with_kvcache(q, ours, causal=False), decode_attention(q, plain))
    # A copy of the block table with the same used pages is accepted too.
    assert torch.equal(flash_attn_with_kvcache(q, ours, block_table=ours.block_table.clone()),
                       decode_attention(q, plain))


def test_bad_arguments_are_named():
    ours, _ = _pair()
    k, v = _kv(2, 40)
    ours.append(k, v)
    q = torch.randn(2, 2, 4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, ours, cache_seqlens=[40, 39])
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, ours, *_kv(2, 1), cache_seqlens=41)
    bad = ours.block_table.clone()
    bad[0, 0] += 1
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_with_kvcache(q, ours, block_table=bad)
    with pytest.raises(ValueError, match="causal"):
        flash_attn_with_kvcache(q, ours, causal=False)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_with_kvcache(q, ours, window_size=(4, 2))
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_with_kvcache(q, ours, window_size=8)
    with pytest.raises(ValueError, match="k and v"):
        flash_attn_with_kvcache(q, ours, k)
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_with_kvcache(q, ours, softcap=-1.0)
    with pytest.raises(TypeError, match="PagedKVCache"):
        flash_attn_with_kvcache(q, torch.zeros(1))
    assert ours.seq_lens() == [40, 40]  # nothing was appended by a refused call
