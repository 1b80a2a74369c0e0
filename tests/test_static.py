"""Static mode of PagedKVCache (``make_static``): one-token appends that keep the bookkeeping on the device, and
decode attention sized for the reserved capacity, so a decode step can be captured in a CUDA graph or compiled.

Every check runs the same tokens through two caches, one with host bookkeeping (the oracle: its appends are tested in
test_paged_state) and one in static mode, and asks for the same state bit for bit: lengths, uncompressed tokens, codes
and scales of every compressed page (the same encode of the same tokens with the same means), and the same attention.
torch.compile checks trace a step with ``fullgraph=True`` (no graph break: the append and the attention are one custom
op each) on the aot_eager backend (functionalization and the fake implementations; CUDA graphs need a GPU:
tests/test_attention_cuda.py)."""
import pytest
import torch

from nqkernels import KVCodec, PagedKVCache, RopeSpec, decode_attention

from .conftest import compile_for_hopper, interpreted


def _pair(D=64, bits=(3, 2), H=2, B=3, P=16, sinks=2, recent=5, dtype=torch.float16, prompt=(40, 7, 23)):
    """Two equal caches holding ragged prompts (the second's prompt lengths come from ``prompt``)."""
    codec = KVCodec(head_dim=D, key_bits=bits[0], value_bits=bits[1], page_size=P)
    caches = [PagedKVCache(codec, num_kv_heads=H, max_batch=B, num_pages=4, sink_tokens=sinks, recent_tokens=recent,
                           dtype=dtype, device="cpu") for _ in range(2)]
    T = max(prompt)
    k, v = torch.randn(2, B, T, H, D, dtype=dtype)
    for c in caches:
        c.grow(40, 40)
        c.append(k, v, lengths=list(prompt[:B]))
    return caches


def _same_state(host: PagedKVCache, static: PagedKVCache, B: int):
    assert torch.equal(host.lengths, static.lengths)
    assert static.seq_lens() == host.seq_lens() and static.compressed_lens() == host.compressed_lens()
    Kh, Vh, vh = host.dense(B)
    Ks, Vs, vs = static.dense(B)
    assert torch.equal(vh, vs) and torch.equal(Kh, Ks) and torch.equal(Vh, Vs)
    for b in range(B):  # the codes and scales of every compressed page, through each cache's block table
        n = host.compressed_lens()[b] // host.codec.page_size
        for name in ("k_codes", "k_scales", "v_codes", "v_scales"):
            a = getattr(host, name)[host.block_table[b, :n].long()]
            s = getattr(static, name)[static.block_table[b, :n].long()]
            assert torch.equal(a, s), (name, b)


@pytest.mark.parametrize("case", [
    dict(),
    dict(D=128, bits=(4, 4), H=1, B=2, sinks=0, recent=16, prompt=(3, 50)),
    dict(D=96, bits=(2, 2), H=2, B=2, sinks=4, recent=0, dtype=torch.bfloat16, prompt=(2, 33)),
    dict(D=64, bits=(2, 3), H=1, B=1, P=32, sinks=1, recent=40, prompt=(70,)),
])
def test_static_steps_match_host_appends_bit_for_bit(case, reference_mode):
    """Decode steps through page fills, sinks still filling and empty windows (recent 0), on the reference path."""
    host, static = _pair(**case)
    B, H, D = static.max_batch, static.num_kv_heads, static.codec.head_dim
    steps = 2 * static.codec.page_size + 5
    static.make_static(max(host.seq_lens()) + steps)
    assert static.static_pages is not None
    for _ in range(steps):
        k, v = torch.randn(2, B, 1, H, D, dtype=static.dtype)
        host.append(k, v)
        static.append(k, v)
        q = torch.randn(B, 1, 4 * H, D, dtype=static.dtype)
        torch.testing.assert_close(decode_attention(q, static), decode_attention(q, host), rtol=0, atol=0)
    _same_state(host, static, B)
    static.sync_host()  # back to host bookkeeping: the same slots, pages and lengths, and appends go on
    assert static.static_pages is None and static.seq_lens() == host.seq_lens()
    k, v = torch.randn(2, B, 20, H, D, dtype=static.dtype)
    host.append(k, v)
    static.append(k, v)
    _same_state(host, static, B)
    free = static.free_pages()
    static.reset()
    assert static.free_pages() == free + sum(len(p) for p in host._pages)


@pytest.mark.skipif(not interpreted(), reason="the Triton kernels run only under TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("case", [
    dict(D=64, H=1, B=2, sinks=1, recent=3, prompt=(20, 5)),
    dict(D=96, bits=(2, 2), H=2, B=3, sinks=0, recent=0, dtype=torch.bfloat16, prompt=(33, 2, 17)),
    dict(D=256, bits=(4, 3), H=1, B=2, sinks=2, recent=21, prompt=(9, 40)),
    dict(D=128, bits=(3, 3), H=1, B=1, P=32, sinks=3, recent=5, prompt=(1,)),
])
def test_static_steps_run_the_kernels(case):
    """The window write, bookkeeping, first-page mean, encode-into-pages and shift kernels and the attention kernels
    in static mode (interpreter), against the host-bookkeeping cache on the same kernels, bit for bit: odd head_dim,
    bf16, no window, a window longer than a page, first pages (and sinks) filled during the static steps, a NaN
    token."""
    host, static = _pair(**case)
    B, H, D = static.max_batch, static.num_kv_heads, static.codec.head_dim
    steps = static.codec.page_size + static.recent_tokens + static.sink_tokens + 1
    static.make_static(max(static.seq_lens()) + steps)
    for i in range(steps):
        k, v = torch.randn(2, B, 1, H, D, dtype=static.dtype)
        if i == 3:
            k[0, 0, 0, 0] = float("nan")
        host.append(k, v)
        static.append(k, v)
    _same_state(host, static, B)
    assert torch.equal(host.k_mean, static.k_mean) and torch.equal(host.v_mean, static.v_mean)
    q = torch.randn(B, 1, 4 * H, D, dtype=static.dtype)
    torch.testing.assert_close(decode_attention(q, static), decode_attention(q, host), rtol=0, atol=0)


def _compiled_steps(host, static):
    """``steps(n)``: n decode steps (append + attention) of a compiled function over ``static`` (aot_eager,
    fullgraph), each checked against the host-bookkeeping cache."""
    def step(k, v, q):
        static.append(k, v)
        return decode_attention(q, static)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")

    def steps(n):
        for _ in range(n):
            k, v = torch.randn(2, static.max_batch, 1, static.num_kv_heads, 64, dtype=torch.float16)
            q = torch.randn(static.max_batch, 1, 4 * static.num_kv_heads, 64, dtype=torch.float16)
            host.append(k, v)
            torch.testing.assert_close(compiled(k, v, q), decode_attention(q, host), rtol=0, atol=0)
    return steps


def test_compiled_step_has_no_graph_break_and_matches_eager(reference_mode):
    host, static = _pair(B=2, prompt=(30, 9))
    static.make_static(80)
    _compiled_steps(host, static)(20)
    _same_state(host, static, 2)


def test_compiled_step_across_a_host_chunk(reference_mode):
    """Static steps, then a chunk on the host bookkeeping (sync_host), then static mode again with a larger capacity:
    the compiled step is traced again (the capacity is an argument of its ops)."""
    host, static = _pair(B=2, prompt=(30, 9))
    static.make_static(60)
    steps = _compiled_steps(host, static)

    steps(10)
    static.sync_host()
    k, v = torch.randn(2, 2, 40, 2, 64, dtype=torch.float16)
    host.append(k, v)
    static.append(k, v)
    static.make_static(140)
    steps(20)
    _same_state(host, static, 2)


def test_make_static_after_crop_keeps_every_page(reference_mode):
    """A slot may hold more pages than max_tokens' reservation (after a crop): none is left out of the launch."""
    host, static = _pair(B=1, prompt=(64,), sinks=0, recent=16)
    for c in (host, static):
        c.crop(16)  # 48 tokens, all in pages
    static.make_static(50)
    assert static.static_pages >= 3
    for _ in range(2):
        k, v = torch.randn(2, 1, 1, 2, 64, dtype=torch.float16)
        host.append(k, v)
        static.append(k, v)
        q = torch.randn(1, 1, 8, 64, dtype=torch.float16)
        torch.testing.assert_close(decode_attention(q, static), decode_attention(q, host), rtol=0, atol=0)


def test_codecs_differing_in_alpha_are_different_ops_arguments():
    from nqkernels.runtime import codec_id, codec_of

    a = KVCodec(head_dim=64)
    b = KVCodec(head_dim=64, alpha={**a.alpha, 3: a.alpha[3] * 1.1})
    assert a == b and codec_id(a) != codec_id(b) and codec_of(codec_id(b)).alpha == b.alpha
    assert codec_id(KVCodec(head_dim=64)) == codec_id(a)


def test_ops_pass_opcheck(reference_mode):
    from nqkernels.attention.launcher import _attention_op
    from nqkernels.runtime import codec_id
    from nqkernels.paged import _append_step_op

    _, static = _pair(B=2, prompt=(30, 9))
    static.make_static(64)
    q = torch.randn(2, 1, 8, 64, dtype=torch.float16)
    numbers = (codec_id(static.codec), static.sink_tokens, static.recent_tokens, static.static_pages)
    torch.library.opcheck(_attention_op, (q, *static.op_tensors(), *numbers, 0.125, None, None, None))
    k = torch.randn(2, 1, 2, 64, dtype=torch.float16)
    torch.library.opcheck(_append_step_op, (k, k, *static.op_tensors(), *numbers))


def test_static_mode_refuses_what_it_cannot_do(reference_mode):
    host, static = _pair(B=2, prompt=(30, 9))
    static.make_static(50)
    k = torch.randn(2, 2, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="one token per sequence"):
        static.append(k, k)
    with pytest.raises(ValueError, match="lengths"):
        static.append(k[:, :1], k[:, :1], lengths=[1, 1])
    for call in (lambda: static.crop(1), lambda: static.reset(), lambda: static.grow(1), lambda: static.export_slot(0)):
        with pytest.raises(ValueError, match="static mode.*sync_host"):
            call()
    with pytest.raises(ValueError, match="q_len"):
        decode_attention(torch.randn(2, 2, 8, 64, dtype=torch.float16), static)
    with pytest.raises(ValueError, match="max_tokens"):
        host.make_static(0)
    with pytest.raises(ValueError, match="below the longest"):
        host.make_static(10)
    with pytest.raises(Exception, match="needs the cache in static mode"):  # dynamo re-raises it as Unsupported
        torch.compile(lambda q: decode_attention(q, host), fullgraph=True, backend="aot_eager")(
            torch.randn(2, 1, 8, 64, dtype=torch.float16))
    rope = PagedKVCache(KVCodec(head_dim=64, rope=RopeSpec(theta=1e4)), num_kv_heads=1, max_batch=1, num_pages=2,
                        device="cpu")
    with pytest.raises(ValueError, match="post-RoPE"):
        rope.make_static(32)


def test_static_capacity_is_enforced_on_the_device(reference_mode):
    _, static = _pair(B=1, prompt=(30,), sinks=0, recent=5)
    static.make_static(40)  # pages for 40 tokens: (40 - 5) // 16 = 2; a window holds up to 5 + 15 beyond them
    k = torch.randn(1, 1, 2, 64, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="grew past the max_tokens"):
        for _ in range(40):
            static.append(k, k)


_STATIC_COMPILE = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nqkernels import codec as C, paged as Pg

PTRS = dict(lens_ptr="*i32", bt_ptr="*i32", flags_ptr="*i32", first_ptr="*i1", full_ptr="*i1", fpk_ptr="*fp16",
            fpv_ptr="*fp16", kmean_ptr="*fp32", vmean_ptr="*fp32", x_ptr="*fp16", codes_ptr="*i32",
            scales_ptr="*fp16", cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i32", mean_ptr="*fp32", dest_ptr="*i32")
KERNELS = [
    (Pg._advance_lengths_kernel, {}),
    (Pg._first_page_means_kernel, dict(D=128, DP=128, CENTER_K=True, CENTER_V=True, BLOCK_T=32)),
    (Pg._window_shift_kernel, dict(R=64, RP=64, D=128, DP=128)),
    (C._encode_kernel, dict(D=128, DP=128, BITS=3, ALPHA=1.0, SQRT_N=1.0, DN=128.0, FIX_BITS=11, FIT=2, ROPE_HALF=0,
                            CENTER=True, DEST=True, BLOCK_T=32)),
]
for fn, consts in KERNELS:
    names = inspect.signature(fn.fn).parameters
    sig = {n: "constexpr" if n in consts else PTRS.get(n, "i32") for n in names}
    triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    print("compiled", fn.fn.__name__)
"""


def test_static_step_kernels_compile_for_hopper():
    """The static step's kernels compile for sm_90 (syntax and layouts the interpreter does not check)."""
    assert compile_for_hopper(_STATIC_COMPILE).count("compiled") == 4


@pytest.mark.skipif(not interpreted(), reason="counts Triton launches under TRITON_INTERPRET=1")
def test_a_static_step_launches_six_kernels_and_reads_nothing_back(monkeypatch):
    """The window write, the bookkeeping, the first-page means, two encodes into the pages, the window shift; no
    value comes back to the host (what a CUDA graph could not capture)."""
    from triton.runtime.interpreter import InterpretedFunction

    _, static = _pair(B=2, prompt=(30, 9))
    static.make_static(80)
    k = torch.randn(2, 1, 2, 64, dtype=torch.float16)
    static.append(k, k)  # warm
    launched = []
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        return run(self, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("a static step read a value back to the host")

    monkeypatch.setattr(InterpretedFunction, "run", counted)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    static.append(k, k)
    monkeypatch.undo()
    assert launched == ["_window_write_kernel", "_advance_lengths_kernel", "_first_page_means_kernel",
                        "_encode_kernel", "_encode_kernel", "_window_shift_kernel"]
