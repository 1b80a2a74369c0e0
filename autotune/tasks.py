"""What ``autotune.tune`` searches: per kernel, its shape buckets, the timed problem of each bucket, the small
problem every candidate must solve like the reference, and the parameter stages.

Buckets are the launchers' own keys (``nqkernels.attention.attention_buckets`` for attention; ``d{head_dim}_b{bits}``
for encode, decode, filter and unfilter; ``d{head_dim}_g{group}`` for scoring). Timed problems are Llama-3-shaped:
8 KV heads, fp16 (bf16 for scoring, as in a prefill), large enough that nothing is served from L2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nqkernels import KVCodec, PagedKVCache, RopeSpec, decode_attention, decode_kv, encode_kv, score_tokens
from nqkernels import filter_codes, unfilter_codes
from nqkernels import reference as R
from nqkernels.attention import BATCH_RANGES, CONTEXT_RANGES, _reference_attention, attention_buckets
from nqkernels.delta import filter_reference

KERNELS = ("attention", "encode", "scoring", "filter", "unfilter", "decode")
HEAD_DIMS = (128, 64, 256, 96)  # tuning order: the common head_dim first, so a bounded run covers it
SETTINGS = ((3, 2), (4, 4), (3, 3), (2, 2))
KV_HEADS = 8
# The shape timed for each context / batch range of decode attention.
CONTEXT_SHAPE = {"t4k": 4096, "t32k": 16384, "tmax": 65536}
BATCH_SHAPE = {"b1": 1, "b16": 8, "bmax": 32}
assert CONTEXT_SHAPE.keys() == CONTEXT_RANGES.keys() and BATCH_SHAPE.keys() == BATCH_RANGES.keys()

Setup = Callable[[torch.device], tuple[Callable[[], object], Callable[[], float]]]


@dataclass
class Task:
    """One bucket of one kernel: ``setup(device)`` builds (timed call, check); check returns the candidate's error
    against the reference, which must be <= tol (0: bit-exact). ``graph``: the call can be captured in a CUDA
    graph (it never synchronizes with the host), so its GPU time is measured without the launcher's host time."""

    kernel: str
    bucket: str
    shape: str
    stages: list
    setup: Setup
    tol: float
    graph: bool = True


def random_cache(codec: KVCodec, kv_heads: int, batch: int, tokens: int, device, dtype=torch.float16,
                 recent: Optional[int] = None, sinks: int = 0, x=None) -> tuple[PagedKVCache, tuple]:
    """A cache of ``batch`` sequences of ``tokens`` random keys/values (the same tokens in every slot, own pages)."""
    P = codec.page_size
    cache = PagedKVCache(codec, kv_heads, batch, num_pages=batch * (tokens // P + 1), sink_tokens=sinks,
                         recent_tokens=recent, dtype=dtype, device=device)
    if x is None:
        x = tuple(torch.randn(1, tokens, kv_heads, codec.head_dim, device=device, dtype=dtype) for _ in range(2))
    for b0 in range(0, batch, 8):  # 8 slots per append; slots before b0 get length 0
        n = min(8, batch - b0)
        cache.append(x[0].expand(b0 + n, -1, -1, -1), x[1].expand(b0 + n, -1, -1, -1), lengths=[0] * b0 + [tokens] * n)
    return cache, x


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _attention(d: int, kb: int, vb: int, group: int, batch: int, tokens: int) -> Setup:
    def setup(device):
        torch.manual_seed(0)
        codec = KVCodec(head_dim=d, key_bits=kb, value_bits=vb)
        cache, _ = random_cache(codec, KV_HEADS, batch, tokens, device)
        q = torch.randn(batch, 1, KV_HEADS * group, d, device=device, dtype=torch.float16)
        small = PagedKVCache(codec, 2, 3, num_pages=32, sink_tokens=4, device=device)
        k = torch.randn(3, 700, 2, d, device=device, dtype=torch.float16) + 0.2
        small.append(k, torch.randn_like(k), lengths=[700, 333, 90])
        qs = torch.randn(3, 1, 2 * group, d, device=device, dtype=torch.float16)
        ref = _reference_attention(qs, small, d ** -0.5, None, None)
        return (lambda: decode_attention(q, cache)), (lambda: _rel(decode_attention(qs, small), ref))
    return setup


def _encode(d: int, bits: int, tokens: int, decode: bool) -> Setup:
    codec = KVCodec(head_dim=d, key_bits=bits, value_bits=bits, rope=RopeSpec(theta=500000.0))

    def setup(device):
        torch.manual_seed(0)
        x = torch.randn(4, KV_HEADS, tokens, d, device=device, dtype=torch.float16)
        small = (torch.randn(1, 2, 257, d) * 3 + 0.3).half()
        ref = encode_kv(small, codec, "key")  # CPU: the torch reference
        if decode:
            enc = encode_kv(x, codec, "key")
            ref_x = decode_kv(ref, codec, "key", dtype=torch.float32)
            ref_dev = type(ref)(*(t.to(device) for t in ref))
            return (lambda: decode_kv(enc, codec, "key")), (
                lambda: _rel(decode_kv(ref_dev, codec, "key", dtype=torch.float32).cpu(), ref_x))
        mean = torch.randn(4, KV_HEADS, d, device=device) * 0.1
        small_dev, small_mean = small.to(device), ref.mean.to(device)

        def check():  # codes bit-exact; scales within an fp16 ulp (a last-bit rounding of the fit, seen at d256)
            got = encode_kv(small_dev, codec, "key", mean=small_mean)
            if not torch.equal(got.codes.cpu(), ref.codes):
                return float("inf")
            return _rel(got.scales.cpu(), ref.scales)
        return (lambda: encode_kv(x, codec, "key", mean=mean)), check
    return setup


def _scoring(d: int, group: int, tokens: int) -> Setup:
    def setup(device):
        torch.manual_seed(0)
        k = torch.randn(1, tokens, KV_HEADS, d, device=device, dtype=torch.bfloat16)
        q = torch.randn(1, 32, KV_HEADS * group, d, device=device, dtype=torch.bfloat16)
        ks = torch.randn(3, 2051, 2, d, device=device, dtype=torch.bfloat16)
        qs = torch.randn(3, 33, 2 * group, d, device=device, dtype=torch.bfloat16)
        lens = torch.tensor([2051, 1000, 17], device=device)
        ref = R.window_scores(qs, ks, lens, scale=d ** -0.5, aggregate="mean")
        return (lambda: score_tokens(q, k)), (lambda: _rel(score_tokens(qs, ks, seq_lens=lens), ref))
    return setup


def _cold(d: int, bits: int, tokens: int, inverse: bool) -> Setup:
    def setup(device):
        torch.manual_seed(0)
        W = d * bits // 32

        def streams(S, T):  # every filter mode, one per stream in turn
            return (torch.randint(-2**31, 2**31 - 1, (S, T, W), dtype=torch.int32, device=device),
                    torch.randn(S, T, device=device).half(), torch.arange(S, dtype=torch.int32, device=device) % 3)
        codes, scales, modes = streams(64, tokens)
        sc, ss, sm = streams(5, 1000)
        ref = filter_reference(sc, ss.view(torch.int16), sm, d, bits, 300)
        if not inverse:
            return (lambda: filter_codes(codes, scales, modes, d, bits)), (
                lambda: float((filter_codes(sc, ss, sm, d, bits, chunk=300) != ref).sum()))
        data = filter_codes(codes, scales, modes, d, bits)

        def check():
            c, s = unfilter_codes(ref, sm, d, bits, chunk=300)
            return float((c != sc).sum() + (s.view(torch.int16) != ss.view(torch.int16)).sum())
        return (lambda: unfilter_codes(data, modes, d, bits)), check
    return setup


STAGES = {"attention": [{"num_warps": [4, 8], "num_stages": [1, 2]},
                        {"programs_per_sm": [2, 4, 8, 16], "min_pages_per_split": [1, 2, 4, 8]}],
          "encode": [{"BLOCK_T": [64, 128], "num_warps": [4, 8]}, {"programs_per_sm": [1, 2, 4, 8]}],
          "decode": [{"BLOCK_T": [16, 32, 64], "num_warps": [2, 4]}],
          "scoring": [{"BLOCK_N": [64, 128], "num_warps": [4, 8]}, {"programs_per_sm": [2, 4, 8]}],
          "filter": [{"BT": [16, 32, 64], "num_warps": [2, 4]}],
          "unfilter": [{"BT": [16, 32, 64], "num_warps": [2, 4]}]}


def make_tasks(kernels=KERNELS, quick: bool = False) -> list[Task]:
    """Every (kernel, bucket) to search, most used first so that a bounded run covers them: tier 0 (``quick``)
    is head_dim 128 at K3V2/K4V4 (codes at 2 and 3 bits) and GQA 4; tier 1 the rest of head_dim 128 and decode_kv
    (the dense path, off the serving path); tier 2 the other head_dims (GQA 4)."""
    tasks = []  # (tier, task)
    for d in HEAD_DIMS:
        for kb, vb in SETTINGS:
            for group in (4, 8, 1) if d == 128 else (4,):
                tier = 2 if d != 128 else int((kb, vb) not in SETTINGS[:2] or group != 4)
                for ctx, T in CONTEXT_SHAPE.items():
                    for bat, B in BATCH_SHAPE.items():
                        bucket = attention_buckets(d, kb, vb, group, B, T)[0]
                        assert bucket.endswith(f"_{ctx}_{bat}")
                        tasks.append((tier, Task("attention", bucket, f"{B}x{T} tokens, {KV_HEADS * group}q/{KV_HEADS}kv",
                                                 STAGES["attention"], _attention(d, kb, vb, group, B, T), 1e-2)))
        for bits in (3, 2, 4):
            tier = 2 if d != 128 else int(bits == 4)
            coded = f"4x{KV_HEADS}x16384 tokens"
            tasks += [(tier, Task("encode", f"d{d}_b{bits}", coded, STAGES["encode"], _encode(d, bits, 16384, False), 2e-3)),
                      (max(tier, 1), Task("decode", f"d{d}_b{bits}", coded, STAGES["decode"],
                                          _encode(d, bits, 16384, True), 2e-3))]
            tasks += [(tier, Task(k, f"d{d}_b{bits}", "64 streams x 8192 tokens", STAGES[k],
                                  _cold(d, bits, 8192, k == "unfilter"), 0.0, graph=False)) for k in ("filter", "unfilter")]
        for group in (4, 8, 1) if d == 128 else (4,):
            tier = 2 if d != 128 else int(group != 4)
            tasks.append((tier, Task("scoring", f"d{d}_g{group}", f"32 queries x 32768 keys, {KV_HEADS * group}q/8kv",
                                     STAGES["scoring"], _scoring(d, group, 32768), 1e-3)))
    tasks = [(tier, t) for tier, t in tasks if t.kernel in kernels and (tier == 0 or not quick)]
    return [t for _, t in sorted(tasks, key=lambda x: x[0])]
