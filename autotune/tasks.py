"""What ``autotune.tune`` searches: per kernel, its shape buckets, the timed problems of each bucket, the small
problem every candidate must solve like the reference, and the parameter stages.

Buckets are the launchers' own keys (``nqkernels.attention.attention_buckets`` for attention; ``d{head_dim}_b{bits}``
for encode, decode, filter and unfilter; ``d{head_dim}_g{group}`` for scoring). Each bucket times problems at both
ends of the shapes it serves (a short and a long context, a small and a large batch), so a config that wins at one
end and loses at the other does not win. Problems are Llama-3-shaped: 8 KV heads, fp16 (bf16 for scoring, as in
a prefill).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nqkernels import KVCodec, PagedKVCache, RopeSpec, decode_attention, decode_kv, encode_kv, score_tokens
from nqkernels import filter_codes, unfilter_codes
from nqkernels import reference as R
from nqkernels.attention import BATCH_RANGES, CONTEXT_RANGES, attention_buckets
from nqkernels.config import code_layout
from nqkernels.reference import filter_reference

KERNELS = ("attention", "encode", "scoring", "filter", "unfilter", "decode")
HEAD_DIMS = (128, 64, 256, 96)  # tuning order: the common head_dim first, so a bounded run covers it
SETTINGS = ((3, 2), (4, 4), (3, 3), (2, 2))
KV_HEADS = 8
# The shapes timed for each context / batch range of decode attention: both ends of the range.
CONTEXT_SHAPE = {"t4k": (1024, 4096), "t32k": (8192, 32768), "tmax": (65536, 131072)}
BATCH_SHAPE = {"b1": (1,), "b16": (4, 16), "bmax": (32,)}
assert CONTEXT_SHAPE.keys() == CONTEXT_RANGES.keys() and BATCH_SHAPE.keys() == BATCH_RANGES.keys()
CODEC_SHAPES = ((1, 4096), (4, 32768))  # (batch, tokens) of 8 KV heads: encode and decode_kv
COLD_TOKENS = (2048, 16384)  # tokens of 64 streams: filter and unfilter
SCORING_TOKENS = (8192, 65536)  # keys of a 32-query window: scoring

Setup = Callable[[torch.device], tuple[list, Callable[[], float]]]


@dataclass
class Task:
    """One bucket of one kernel: ``setup(device)`` builds (timed calls, one per problem; check); check returns the
    candidate's error against the reference, which must be <= tol (0: bit-exact). ``graph``: the calls can be
    captured in a CUDA graph (they never synchronize with the host), so their GPU time is measured without the
    launcher's host time."""

    kernel: str
    bucket: str
    shape: str
    stages: list
    setup: Setup
    tol: float
    graph: bool = True


def _shape(problems, what: str) -> str:
    return ", ".join(f"{B}x{T}" for B, T in problems) + f" (batch x tokens), {what}"


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


def attention_setup(d: int, kb: int, vb: int, group: int, problems) -> Setup:
    def setup(device):
        torch.manual_seed(0)
        codec = KVCodec(head_dim=d, key_bits=kb, value_bits=vb)
        runs = []
        for B, T in problems:
            cache, _ = random_cache(codec, KV_HEADS, B, T, device)
            q = torch.randn(B, 1, KV_HEADS * group, d, device=device, dtype=torch.float16)
            runs.append(lambda q=q, cache=cache: decode_attention(q, cache))
        small = PagedKVCache(codec, 2, 3, num_pages=32, sink_tokens=4, device=device)
        k = torch.randn(3, 700, 2, d, device=device, dtype=torch.float16) + 0.2
        small.append(k, torch.randn_like(k), lengths=[700, 333, 90])
        qs = torch.randn(3, 1, 2 * group, d, device=device, dtype=torch.float16)
        ref = R.paged_attention(qs, small, d ** -0.5, None, None)
        return runs, (lambda: _rel(decode_attention(qs, small), ref))
    return setup


def codec_setup(d: int, bits: int, problems, decode: bool) -> Setup:
    codec = KVCodec(head_dim=d, key_bits=bits, value_bits=bits, rope=RopeSpec(theta=500000.0))

    def setup(device):
        torch.manual_seed(0)
        xs = [torch.randn(B, T, KV_HEADS, d, device=device, dtype=torch.float16) for B, T in problems]
        small = (torch.randn(1, 257, 2, d) * 3 + 0.3).half()
        ref = encode_kv(small, codec, "key")  # CPU: the torch reference
        if decode:
            encs = [encode_kv(x, codec, "key") for x in xs]
            ref_x = decode_kv(ref, codec, "key", dtype=torch.float32)
            ref_dev = type(ref)(*(t.to(device) for t in ref))
            return [lambda e=e: decode_kv(e, codec, "key") for e in encs], (
                lambda: _rel(decode_kv(ref_dev, codec, "key", dtype=torch.float32).cpu(), ref_x))
        means = [torch.randn(x.shape[0], KV_HEADS, d, device=device) * 0.1 for x in xs]
        small_dev, small_mean = small.to(device), ref.mean.to(device)

        def check():  # codes bit-exact; scales within an fp16 ulp (a last-bit rounding of the fit, seen at d256)
            got = encode_kv(small_dev, codec, "key", mean=small_mean)
            if not torch.equal(got.codes.cpu(), ref.codes):
                return float("inf")
            return _rel(got.scales.cpu(), ref.scales)
        return [lambda x=x, m=m: encode_kv(x, codec, "key", mean=m) for x, m in zip(xs, means)], check
    return setup


def scoring_setup(d: int, group: int, tokens) -> Setup:
    def setup(device):
        torch.manual_seed(0)
        ks = [torch.randn(1, T, KV_HEADS, d, device=device, dtype=torch.bfloat16) for T in tokens]
        q = torch.randn(1, 32, KV_HEADS * group, d, device=device, dtype=torch.bfloat16)
        k_small = torch.randn(3, 2051, 2, d, device=device, dtype=torch.bfloat16)
        q_small = torch.randn(3, 33, 2 * group, d, device=device, dtype=torch.bfloat16)
        lens = torch.tensor([2051, 1000, 17], device=device)
        ref = R.window_scores(q_small, k_small, lens, scale=d ** -0.5, aggregate="mean")
        return [lambda k=k: score_tokens(q, k) for k in ks], (
            lambda: _rel(score_tokens(q_small, k_small, seq_lens=lens), ref))
    return setup


def cold_setup(d: int, bits: int, tokens, inverse: bool) -> Setup:
    def setup(device):
        torch.manual_seed(0)
        W = d * bits // 32

        def streams(S, T):  # every filter mode, one per stream in turn
            return (torch.randint(-2**31, 2**31 - 1, (S, T, W), dtype=torch.int32, device=device),
                    torch.randn(S, T, device=device).half(), torch.arange(S, dtype=torch.int32, device=device) % 3)
        problems = [streams(64, T) for T in tokens]
        sc, ss, sm = streams(5, 1000)
        ref = filter_reference(sc, ss.view(torch.int16), sm, d, bits, 300)
        if not inverse:
            return [lambda p=p: filter_codes(*p, d, bits) for p in problems], (
                lambda: float((filter_codes(sc, ss, sm, d, bits, chunk=300) != ref).sum()))
        data = [(filter_codes(*p, d, bits), p[2]) for p in problems]

        def check():
            c, s = unfilter_codes(ref, sm, d, bits, chunk=300)
            return float((c != sc).sum() + (s.view(torch.int16) != ss.view(torch.int16)).sum())
        return [lambda x=x, m=m: unfilter_codes(x, m, d, bits) for x, m in data], check
    return setup


# maxnreg: a cap on registers per thread; at 168 three 4-warp split programs fit an SM, at 128 four (uncapped they
# need 164-197 at head_dim 128; at 128 they spill a little: K2V2 at 32K x 8 gained 8.5% with three programs per SM).
# pages_per_step: pages side by side in one softmax step (fewer instructions per page, more registers).
# two_pass: keys, then values, in two kernels of half the registers each; it wants more programs per SM, so it is
# searched with them. The Gluon passes (Hopper; elsewhere these candidates launch the portable kernels and never win
# by the 2% a winner needs): the fused pass with its warps and grid, its query operand made in the pass (head_dim
# 128; elsewhere the prep runs anyway), then the two Gluon passes instead.
STAGES = {"attention": [{"num_warps": [4, 8], "num_stages": [1, 2]},
                        {"programs_per_sm": [2, 4, 8, 16], "min_pages_per_split": [1, 2, 4, 8],
                         "maxnreg": [None, 168, 128], "two_pass": [False, True]},
                        {"pages_per_step": [1, 2, 4]},
                        {"gluon_fused": [True], "gluon_fused_warps": [2, 4], "programs_per_sm": [2, 4, 8, 16]},
                        {"gluon_query_in_pass": [True]},
                        {"gluon_fused": [False], "gluon_query_in_pass": [False], "two_pass": [True], "gluon_keys": [True], "gluon_values": [True],
                         "gluon_values_warps": [1, 2], "programs_per_sm": [4, 8, 16]}],
          "encode": [{"BLOCK_T": [64, 128], "num_warps": [4, 8]}, {"programs_per_sm": [1, 2, 4, 8]}],
          "decode": [{"BLOCK_T": [16, 32, 64], "num_warps": [2, 4]}],
          "scoring": [{"BLOCK_N": [64, 128], "num_warps": [4, 8]}, {"programs_per_sm": [2, 4, 8]}],
          "filter": [{"BT": [16, 32, 64], "num_warps": [2, 4]}],
          "unfilter": [{"BT": [16, 32, 64], "num_warps": [2, 4]}]}


def attention_stages(d: int, key_bits: int) -> list:
    """The attention search's stages for keys of ``key_bits`` at head_dim ``d``: the Gluon keys pass reads bit planes
    only, so where the keys are in the "fields" layout (``code_layout``) the two-pass stage pairs the portable keys
    pass with the Gluon values pass instead of searching a ``gluon_keys`` the launcher would not take; the query
    operand in the fused pass is searched only where the pass can make it (head_dim 128, 2-bit or "fields" keys)."""
    layout = code_layout("key", key_bits, d)
    stages = [st for st in STAGES["attention"]
              if "gluon_query_in_pass" not in st or st.get("gluon_fused") == [False]
              or (d == 128 and (key_bits == 2 or layout == "fields"))]
    if layout != "fields":
        return stages
    return stages[:-1] + [dict(stages[-1], gluon_keys=[False])]


def make_tasks(kernels=KERNELS, quick: bool = False) -> list[Task]:
    """Every (kernel, bucket) to search, most used first so that a bounded run covers them: tier 0 (``quick``)
    is head_dim 128 at K3V2/K4V4 (codes at 2 and 3 bits) and GQA 4; tier 1 the rest of head_dim 128 and decode_kv
    (the dense path, off the serving path); tier 2 the other head_dims (GQA 4)."""
    tasks = []  # (tier, task)
    for d in HEAD_DIMS:
        for kb, vb in SETTINGS:
            for group in (4, 8, 1) if d == 128 else (4,):
                tier = 2 if d != 128 else int((kb, vb) not in SETTINGS[:2] or group != 4)
                for ctx, Ts in CONTEXT_SHAPE.items():
                    for bat, Bs in BATCH_SHAPE.items():
                        bucket = attention_buckets(d, kb, vb, group, Bs[0], Ts[0])[0]
                        assert bucket.endswith(f"_{ctx}_{bat}")
                        problems = [(B, T) for B in Bs for T in Ts]
                        setup = attention_setup(d, kb, vb, group, problems)
                        tasks.append((tier, Task("attention", bucket, _shape(problems, f"{KV_HEADS * group}q/8kv"),
                                                 attention_stages(d, kb), setup, 1e-2)))
        for bits in (3, 2, 4):
            tier = 2 if d != 128 else int(bits == 4)
            coded = _shape(CODEC_SHAPES, "8 heads")
            cold = ", ".join(f"64x{T}" for T in COLD_TOKENS) + " streams x tokens"
            tasks += [(tier, Task("encode", f"d{d}_b{bits}", coded, STAGES["encode"],
                                  codec_setup(d, bits, CODEC_SHAPES, False), 2e-3)),
                      (max(tier, 1), Task("decode", f"d{d}_b{bits}", coded, STAGES["decode"],
                                          codec_setup(d, bits, CODEC_SHAPES, True), 2e-3))]
            tasks += [(tier, Task(k, f"d{d}_b{bits}", cold, STAGES[k],
                                  cold_setup(d, bits, COLD_TOKENS, k == "unfilter"), 0.0, graph=False))
                      for k in ("filter", "unfilter")]
        for group in (4, 8, 1) if d == 128 else (4,):
            tier = 2 if d != 128 else int(group != 4)
            shape = ", ".join(str(T) for T in SCORING_TOKENS) + f" keys, 32 queries, {KV_HEADS * group}q/8kv"
            tasks.append((tier, Task("scoring", f"d{d}_g{group}", shape, STAGES["scoring"],
                                     scoring_setup(d, group, SCORING_TOKENS), 1e-3)))
    tasks = [(tier, t) for tier, t in tasks if t.kernel in kernels and (tier == 0 or not quick)]
    return [t for _, t in sorted(tasks, key=lambda x: x[0])]
