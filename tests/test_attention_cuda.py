"""decode_attention's replayed launches on a GPU (skipped without CUDA): every layer of a decode step after the first
replays the recorded launches (nqkernels.launch) and must give what a fresh call gives, bit for bit; no call syncs with
the host and launches nothing but its plan's kernels; a call still captures into a CUDA graph."""
import pytest
import torch

from nqkernels import store
from nqkernels import KVCodec, PagedKVCache, decode_attention
from nqkernels.attention import launcher as attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _layers(n, codec, tokens, batch=2, kv_heads=2, dtype=torch.float16):
    caches = []
    for _ in range(n):
        cache = PagedKVCache(codec, num_kv_heads=kv_heads, max_batch=batch, num_pages=batch * (tokens // 16 + 2),
                             dtype=dtype, device="cuda")
        k = torch.randn(batch, tokens, kv_heads, codec.head_dim, dtype=dtype, device="cuda")
        cache.append(k, torch.randn_like(k), lengths=[tokens, tokens - 37])
        caches.append(cache)
    return caches


CASES = [(128, (3, 2), 1, {}), (128, (3, 2), 3, {}), (64, (4, 4), 1, {}), (256, (2, 2), 3, {}),
         (128, (3, 2), 1, dict(two_pass=True)), (128, (3, 2), 1, dict(two_pass=True, gluon_keys=True)),
         (64, (4, 4), 1, dict(two_pass=True, gluon_keys=True))]


@pytest.mark.parametrize("head_dim,bits,q_len,config", CASES)
def test_replayed_layers_equal_fresh_calls(head_dim, bits, q_len, config):
    codec = KVCodec(head_dim=head_dim, key_bits=bits[0], value_bits=bits[1], page_size=16)
    caches = _layers(4, codec, 300)
    qs = [torch.randn(2, q_len, 8, head_dim, dtype=torch.float16, device="cuda") for _ in caches]
    with store.override("attention", config):
        attention._PLANS.clear()
        replayed = [decode_attention(q, c, softcap=30.0) for q, c in zip(qs, caches)]  # layer 0 records, 1-3 replay
        assert len(attention._PLANS) == 1
        for q, c, got in zip(qs, caches, replayed):
            attention._PLANS.clear()
            assert torch.equal(decode_attention(q, c, softcap=30.0), got)


def test_a_config_override_is_not_served_a_stale_plan():
    codec = KVCodec(head_dim=128, page_size=16)
    cache, = _layers(1, codec, 400)
    q = torch.randn(2, 1, 8, 128, dtype=torch.float16, device="cuda")
    attention._PLANS.clear()
    decode_attention(q, cache)
    with store.override("attention", dict(two_pass=True)):
        decode_attention(q, cache)
        assert len(attention._PLANS) == 2  # a new plan under the override


def test_no_host_sync_and_graph_capture():
    codec = KVCodec(head_dim=128, page_size=16)
    caches = _layers(2, codec, 500)
    q = torch.randn(2, 1, 8, 128, dtype=torch.float16, device="cuda")
    want = [decode_attention(q, c) for c in caches]
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [decode_attention(q, c) for c in caches]  # replays: no host sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        decode_attention(q, caches[0])  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=stream):
            out = decode_attention(q, caches[0])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want[0])


@pytest.mark.parametrize("tokens,batch", [(4096, 1), (1000, 3)])
def test_a_replayed_call_launches_only_its_plans_kernels(tokens, batch):
    """Issue 32's host target, in counts: a replayed layer call makes its plan's launches (3 at 4K x 1: query prep,
    split, reduce) and no copy, memset or host sync."""
    codec = KVCodec(head_dim=128, page_size=64)
    caches = []
    for _ in range(5):
        cache = PagedKVCache(codec, num_kv_heads=8, max_batch=batch, num_pages=batch * (tokens // 64 + 2),
                             device="cuda")
        k = torch.randn(batch, tokens, 8, 128, dtype=torch.float16, device="cuda")
        cache.append(k, torch.randn_like(k))
        caches.append(cache)
    q = torch.randn(batch, 1, 32, 128, dtype=torch.float16, device="cuda")
    attention._PLANS.clear()
    decode_attention(q, caches[0])  # records
    plan, = attention._PLANS.values()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for cache in caches[1:]:
                decode_attention(q, cache)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    kernels = [e for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    assert len(events) == len(kernels) == 4 * len(plan), [e.name for e in events]
    if (tokens, batch) == (4096, 1):
        assert len(plan) == 3
