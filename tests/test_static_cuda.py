"""Static mode on a GPU (skipped without CUDA): a decode step (append one token per sequence + decode_attention)
captured once in a CUDA graph and replayed through page fills must keep the state the host-bookkeeping cache keeps
(lengths, fp tokens, codes and scales bit for bit) and attend within the reference's tolerance; the same step under
torch.compile(mode="reduce-overhead") (inductor, CUDA graphs) too."""
import pytest
import torch

from nqkernels import KVCodec, PagedKVCache, decode_attention
from nqkernels import reference as R

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

CASES = [(128, (3, 2), 2, 16, torch.float16), (128, (2, 2), 0, 64, torch.bfloat16), (64, (4, 4), 4, 5, torch.float16),
         (256, (3, 3), 1, 16, torch.float16), (96, (4, 2), 0, 0, torch.float16)]


def _pair(head_dim, bits, sinks, recent, dtype, lens=(300, 41, 129)):
    codec = KVCodec(head_dim=head_dim, key_bits=bits[0], value_bits=bits[1], page_size=16)
    caches = [PagedKVCache(codec, num_kv_heads=2, max_batch=len(lens), num_pages=64, max_pages_per_seq=32,
                           sink_tokens=sinks, recent_tokens=recent, dtype=dtype, device="cuda") for _ in range(2)]
    k, v = torch.randn(2, len(lens), max(lens), 2, head_dim, dtype=dtype, device="cuda")
    for c in caches:
        c.append(k, v, lengths=list(lens))
    return caches


def _close(out, q, cache):
    ref = R.paged_attention(q, cache, q.shape[-1] ** -0.5)
    tol = 2e-2 if q.dtype == torch.bfloat16 else 3e-3
    err = (out.float() - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max error {err}"


def _same_state(host, static):
    assert torch.equal(host.lengths, static.lengths)
    for b, n in enumerate(host.compressed_lens()):
        pages = n // host.codec.page_size
        for name in ("k_codes", "k_scales", "v_codes", "v_scales"):
            assert torch.equal(getattr(host, name)[host.block_table[b, :pages].long()],
                               getattr(static, name)[static.block_table[b, :pages].long()]), (name, b)
        fp = host.lengths[2, b].item()
        assert torch.equal(host.fp_k[b, :, :fp], static.fp_k[b, :, :fp])
        assert torch.equal(host.fp_v[b, :, :fp], static.fp_v[b, :, :fp])


@pytest.mark.parametrize("head_dim,bits,sinks,recent,dtype", CASES)
def test_captured_step_replays_through_page_fills(head_dim, bits, sinks, recent, dtype):
    host, static = _pair(head_dim, bits, sinks, recent, dtype)
    B, steps = static.max_batch, 40
    static.make_static(max(static.seq_lens()) + steps + 1)
    k_in, v_in = torch.randn(2, B, 1, 2, head_dim, dtype=dtype, device="cuda")
    q_in = torch.randn(B, 1, 8, head_dim, dtype=dtype, device="cuda")
    static.append(k_in, v_in)  # one eager step on both caches: the kernels compile outside the capture
    host.append(k_in, v_in)
    decode_attention(q_in, static)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # recorded, not run
        static.append(k_in, v_in)
        out = decode_attention(q_in, static)
    for _ in range(steps):
        k, v = torch.randn(2, B, 1, 2, head_dim, dtype=dtype, device="cuda")
        q = torch.randn(B, 1, 8, head_dim, dtype=dtype, device="cuda")
        k_in.copy_(k), v_in.copy_(v), q_in.copy_(q)
        graph.replay()
        host.append(k, v)
        _close(out, q, host)
    _same_state(host, static)


def _compiled_steps(host, static):
    """``steps(n)``: n decode steps (append + attention) of a function compiled with ``reduce-overhead`` (inductor,
    CUDA graphs) over ``static``, each checked against the host-bookkeeping cache."""
    B = static.max_batch

    def step(k, v, q):
        static.append(k, v)
        return decode_attention(q, static)

    torch._dynamo.reset()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def steps(n):
        for _ in range(n):
            k, v = torch.randn(2, B, 1, 2, 128, dtype=torch.float16, device="cuda")
            q = torch.randn(B, 1, 8, 128, dtype=torch.float16, device="cuda")
            out = compiled(k, v, q).clone()
            host.append(k, v)
            _close(out, q, host)
    return steps


def test_reduce_overhead_compile_matches_host():
    host, static = _pair(128, (3, 2), 2, 16, torch.float16)
    static.make_static(max(static.seq_lens()) + 64)
    _compiled_steps(host, static)(30)
    _same_state(host, static)


def test_reduce_overhead_across_a_host_chunk():
    """Compiled steps, a chunk on the host bookkeeping (sync_host), static mode again with a larger capacity, more
    compiled steps: the step is traced again for the new capacity (an argument of its ops), never replayed stale."""
    host, static = _pair(128, (3, 2), 2, 16, torch.float16)
    B = static.max_batch
    static.make_static(max(static.seq_lens()) + 24)
    steps = _compiled_steps(host, static)
    steps(20)
    static.sync_host()
    k, v = torch.randn(2, B, 70, 2, 128, dtype=torch.float16, device="cuda")
    host.append(k, v)
    static.append(k, v)
    static.make_static(max(static.seq_lens()) + 40)
    steps(30)
    _same_state(host, static)
