"""GPU benchmark of the Gluon passes (nqkernels/attention/gluon.py) against the portable ones, one device call.

    python -m perf.bench_attention_gluon [--shapes 8x32768,16x8192,1x131072] [--out DIR]
    python -m perf.bench_attention_gluon --decode --bits K3V2 [--shapes ...] [--fused-warps 1,2] [--mults 1,2]
    python -m perf.bench_attention_gluon --shipped --bits K3V2,K2V2 --shapes 8x32768,1x4096x64

Llama-3-8B-shaped layers (32 query heads, 8 KV heads, head_dim 128), K3V2, q_len 1, at each context × batch:
- the keys pass alone: ``_attn_keys_kernel`` (the launch ``decode_attention`` makes in its two-pass branch, with this
  GPU's tuned config) against the Gluon kernel (each launch variant, ``parse_variant``) on the same prep output, at
  the decode's split count and at 2 and 4 times it;
- the whole decode: two passes with each keys pass (the Gluon one in the variant fastest at the decode's splits) at
  the decode's split count and twice it, the config store's own choice (``shipped``), and torch SDPA over fp16 K/V
  with GQA, same run;
- the GPU time of each kernel of the two two-pass decodes (torch.profiler over graph replays).
Times are CUDA-graph replays with L2 cleared before each (``autotune.tune.bench_ms``). Also checks that the Gluon
logits match the portable ones and that both decodes agree.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch
import torch.nn.functional as F
import triton

from nqkernels import store
from autotune.tasks import random_cache
from autotune.tune import bench_ms
from nqkernels import KVCodec, decode_attention
from nqkernels.attention import gluon as G
from nqkernels.attention import kernels as K
from nqkernels.attention import launcher as A
from nqkernels import reference as ref
from nqkernels import runtime
from perf.bench_attention import copy_bandwidth, device_info, kernel_times, log


def capture_keys_launch(q, cache, cfg):
    """One decode with the Gluon keys pass, recording the arguments of its keys pass (the prep's outputs and the
    workspace) so that either keys kernel can be replayed alone."""
    seen = {}
    real = G.keys_pass

    def spy(cache, q_t, q_mean, logits, m_part, **kw):
        seen.update(cache=cache, q_t=q_t, q_mean=q_mean, logits=logits, m_part=m_part, kw=kw)
        real(cache, q_t, q_mean, logits, m_part, **kw)

    G.keys_pass = spy
    try:
        with store.override("attention", dict(cfg, two_pass=True, gluon_keys=True, gluon_fused=False)):
            decode_attention(q, cache)
    finally:
        G.keys_pass = real
    torch.cuda.synchronize()
    return seen


def triton_keys(s, cfg, logits, m_part, splits=None):
    cache, kw = s["cache"], s["kw"]
    codec = cache.codec
    D, kb = codec.head_dim, codec.key_bits
    DP = ref.next_pow2(D)
    NG = max(16, DP // 8)
    splits, pps = split_args(s, splits)
    grid = (s["q_t"].shape[0], splits)

    def run():
        K._attn_keys_kernel[grid](
            cache.k_codes, cache.k_scales, cache.block_table, cache.lengths, s["q_t"], s["q_mean"], logits, m_part,
            cache.num_kv_heads, 1, splits, pps, m_part.shape[1], kw["n_tok"], cache.max_batch,
            kw["scale"], 1.0, 0, *cache.k_codes.stride()[:3], *cache.k_scales.stride()[:2], cache.k_codes.stride(3),
            cache.block_table.stride(0), Q_LEN=1, GROUP=kw["group"], D=D, DP=DP, KBITS=kb, PAGE=codec.page_size,
            NG=NG, KQ=NG + DP * (2 if kb > 2 else 1), SOFTCAP=False, WINDOW=False, ASM=True, BLOCK_M=kw["block_m"],
            RS=kw["rs"], JOIN_K=A._join_runs(kb, cache.k_codes), PDL=False, CAUSAL_PAGES=False,
            KFIELDS=codec.layout("key") == "fields",
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"])
    return run


def split_args(s, splits):
    """(splits, pages per split) as decode_attention derives them from a requested split count."""
    kw = s["kw"]
    if splits is None:
        return kw["num_splits"], kw["pages_per_split"]
    max_pages = kw["n_tok"] // s["cache"].codec.page_size
    pps = triton.cdiv(max_pages, min(splits, max_pages))
    return triton.cdiv(max_pages, pps), pps


def parse_variant(v: str) -> dict:
    """'w2p1l2r128' -> warps 2, register prefetch 1 page, L2 prefetch 2 pages further, maxnreg 128 (r optional)."""
    m = re.fullmatch(r"w(\d+)p(\d+)l(\d+)(?:r(\d+))?", v)
    return dict(num_warps=int(m[1]), prefetch=int(m[2]), l2_prefetch=int(m[3]),
                maxnreg=int(m[4]) if m[4] else None)


def gluon_cfg(v: str) -> dict:
    p = parse_variant(v)
    return dict(gluon_keys=True, gluon_warps=p["num_warps"], gluon_prefetch=p["prefetch"], gluon_l2=p["l2_prefetch"],
                gluon_maxnreg=p["maxnreg"])


def gluon_keys(s, logits, m_part, v, splits=None):
    kw = dict(s["kw"])
    kw["num_splits"], kw["pages_per_split"] = split_args(s, splits)
    kw.update(parse_variant(v))
    return lambda: G.keys_pass(s["cache"], s["q_t"], s["q_mean"], logits, m_part, **kw)


def sdpa_and_shipped(q, cache, x) -> dict:
    """µs of SDPA over the fp16 K/V ``x`` (one copy per sequence, GQA) and of the store's own decode launch."""
    B = q.shape[0]
    qs = q.transpose(1, 2)
    k16 = x[0].expand(B, -1, -1, -1).transpose(1, 2).contiguous()
    v16 = x[1].expand(B, -1, -1, -1).transpose(1, 2).contiguous()
    dec = {"sdpa_fp16": bench_ms(lambda: F.scaled_dot_product_attention(qs, k16, v16, enable_gqa=True)) * 1e3}
    del k16, v16
    dec["shipped"] = bench_ms(lambda: decode_attention(q, cache)) * 1e3
    return dec


def capture_fused_splits(q, cache, cfg) -> int:
    """The split count of one decode with the fused Gluon pass (where the keys pass cannot run: fields keys)."""
    seen = {}
    real = G.fused_pass

    def spy(*args, **kw):
        seen.update(kw)
        real(*args, **kw)

    G.fused_pass = spy
    try:
        with store.override("attention", dict(cfg, gluon_fused=True, min_tokens=0)):
            decode_attention(q, cache)
    finally:
        G.fused_pass = real
    return seen["num_splits"]


def rel(a, b):
    fin = torch.isfinite(b)
    return ((a[fin] - b[fin]).abs().max() / b[fin].abs().max()).item()


def bench_shape(dev, Hq, H, D, B, T, variants, mults=(1, 2, 4)):
    torch.manual_seed(0)
    codec = KVCodec(head_dim=D, key_bits=3, value_bits=2, key_layout="planes")  # the Gluon keys pass reads planes
    group = Hq // H
    cache, x = random_cache(codec, H, B, T, dev)
    q = torch.randn(B, 1, Hq, D, device=dev, dtype=torch.float16)
    cfg = runtime.launch_config("attention", A.attention_buckets(D, 3, 2, group, B, T), dev).as_dict()  # this GPU's
    cfg = dict(cfg, gluon_fused=False)  # tuned config, with the two passes compared here
    row = dict(batch=B, context=T, head_dim=D, q_heads=Hq, kv_heads=H, bits="K3V2", config=cfg)
    s = capture_keys_launch(q, cache, cfg)
    kw = s["kw"]
    s0 = kw["num_splits"]
    row.update(num_splits=s0, pages_per_split=kw["pages_per_split"], programs=s["q_t"].shape[0] * s0)
    # correctness at this shape: logits and split maxima of both keys passes (every variant)
    lg_t, m_t = s["logits"].clone().fill_(float("nan")), s["m_part"].clone().fill_(float("nan"))
    triton_keys(s, cfg, lg_t, m_t)()
    checks = {}
    for v in variants:
        lg_g, m_g = lg_t.clone().fill_(float("nan")), m_t.clone().fill_(float("nan"))
        gluon_keys(s, lg_g, m_g, v)()
        torch.cuda.synchronize()
        same = all(torch.equal(f(a), f(b)) for a, b in ((lg_g, lg_t), (m_g, m_t))
                   for f in (torch.isnan, torch.isneginf))
        checks[v] = dict(logits_rel_err=rel(lg_g, lg_t), max_rel_err=rel(m_g, m_t), same_mask=same)
    row["keys_check"] = checks
    # keys pass alone, over split counts (each keys pass can take any; the values pass shares the decode's)
    split_list = sorted({m * s0 for m in mults})
    t = {}
    for sp in split_list:
        n, pps = split_args(s, sp)
        m_buf = torch.empty(s["q_t"].shape[0], n + 1, kw["block_m"], device=dev)
        t[f"triton_s{n}"] = bench_ms(triton_keys(s, cfg, lg_t, m_buf, sp)) * 1e3
        for v in variants:
            t[f"gluon_{v}_s{n}"] = bench_ms(gluon_keys(s, lg_t, m_buf, v, sp)) * 1e3
    row["keys_us"] = t
    n0 = split_args(s, s0)[0]
    best_g = min((v, k) for k, v in t.items() if k.startswith("gluon") and k.endswith(f"_s{n0}"))[1]
    bv = best_g.split("_")[1]
    row["best_gluon_at_decode_splits"] = best_g
    # whole decode: SDPA, the shipped config, two passes with each keys pass (the decode's splits and the others)
    dec = sdpa_and_shipped(q, cache, x)
    outs = {}
    for sp in split_list[:2]:
        n = split_args(s, sp)[0]
        for name, extra in (("triton", dict(gluon_keys=False)), (f"gluon_{bv}", gluon_cfg(bv))):
            with store.override("attention", dict(cfg, two_pass=True, **extra)):
                dec[f"two_pass_{name}_s{n}"] = bench_ms(lambda: decode_attention(q, cache, num_splits=sp)) * 1e3
                outs[f"{name}_s{n}"] = decode_attention(q, cache, num_splits=sp).float()
    row["decode_us"] = dec
    base = outs[f"triton_s{n0}"]
    row["decode_rel_diff_vs_triton"] = {k: ((v - base).norm() / base.norm()).item() for k, v in outs.items()}
    kt = {}
    for name, extra in (("two_pass_triton", dict(gluon_keys=False)),
                        (f"two_pass_gluon_{bv}", gluon_cfg(bv))):
        with store.override("attention", dict(cfg, two_pass=True, **extra)):
            kt[name] = kernel_times(lambda: decode_attention(q, cache))
    row["kernel_us"] = kt
    return row


def decode_variants(dev, B, T, D, bits, Hq=32, H=8, value_warps=(1, 2, 4), fused_warps=(1, 2, 4), mults=(1, 2),
                    fused_maxnreg=()):
    """The whole decode (q_len 1) with each pass portable or Gluon (two passes, or the fused pass with N warps per
    program: ``gluon_fused_wN``), beside SDPA fp16 (GQA) and the config store's choice, in one process; every
    variant's output against the portable two-pass one; the kernels of the portable and of the fastest Gluon
    decode."""
    torch.manual_seed(0)
    kb, vb = bits
    codec = KVCodec(head_dim=D, key_bits=kb, value_bits=vb)
    group = Hq // H
    cache, x = random_cache(codec, H, B, T, dev)
    q = torch.randn(B, 1, Hq, D, device=dev, dtype=torch.float16)
    cfg = runtime.launch_config("attention", A.attention_buckets(D, kb, vb, group, B, T), dev).as_dict()
    planes = codec.layout("key") == "planes"  # the Gluon keys pass reads bit planes only
    s0 = capture_keys_launch(q, cache, cfg)["kw"]["num_splits"] if planes else capture_fused_splits(q, cache, cfg)
    dec = sdpa_and_shipped(q, cache, x)
    variants = {"portable": dict(gluon_keys=False, gluon_values=False, gluon_fused=False)}
    if planes:
        variants["gluon_keys"] = dict(gluon_keys=True, gluon_values=False, gluon_fused=False)
    for w in value_warps if planes else ():
        variants[f"gluon_kv_w{w}"] = dict(gluon_keys=True, gluon_values=True, gluon_values_warps=w, gluon_fused=False)
    for w in fused_warps:
        variants[f"gluon_fused_w{w}"] = dict(gluon_fused=True, gluon_fused_warps=w, min_tokens=0)
        for r in fused_maxnreg:  # a register cap: more programs per SM
            variants[f"gluon_fused_w{w}_r{r}"] = dict(gluon_fused=True, gluon_fused_warps=w, gluon_maxnreg=r,
                                                      min_tokens=0)
    outs, cfgs = {}, {}
    for m in mults:
        sp = m * s0
        for name, extra in variants.items():
            c = dict(cfg, two_pass=True, **extra)
            with store.override("attention", c):
                dec[f"{name}_s{sp}"] = bench_ms(lambda: decode_attention(q, cache, num_splits=sp)) * 1e3
                outs[f"{name}_s{sp}"] = decode_attention(q, cache, num_splits=sp).float()
            cfgs[f"{name}_s{sp}"] = (c, sp)
    base = outs[f"portable_s{s0}"]
    diff = {k: ((v - base).norm() / base.norm()).item() for k, v in outs.items()}
    best = min((v, k) for k, v in dec.items() if k.startswith(("gluon_kv", "gluon_fused")))[1]
    kt = {}
    for name in (f"portable_s{s0}", best):
        c, sp = cfgs[name]
        with store.override("attention", c):
            kt[name] = kernel_times(lambda: decode_attention(q, cache, num_splits=sp))
    per_tok = codec.bytes_per_token("key") + codec.bytes_per_token("value")
    nbytes = B * T * H * per_tok
    return dict(batch=B, context=T, head_dim=D, q_heads=Hq, kv_heads=H, bits=f"K{kb}V{vb}", config=cfg,
                num_splits=s0, decode_us=dec, rel_diff_vs_portable=diff, best=best, kernel_us=kt,
                compressed_bytes=nbytes, best_GBps=nbytes / dec[best] / 1e3)


def ints(text: str) -> tuple:
    return tuple(int(v) for v in text.split(",") if v)


def main_decode(args, dev, res):
    for bits in args.bits.split(","):
        kb, vb = int(bits[1]), int(bits[3])
        for shape in args.shapes.split(","):
            parts = [int(v) for v in shape.split("x")]
            B, T, D = parts[0], parts[1], parts[2] if len(parts) > 2 else 128
            t0 = time.time()
            row = decode_variants(dev, B, T, D, (kb, vb), value_warps=ints(args.value_warps),
                                  fused_warps=ints(args.fused_warps), mults=ints(args.mults),
                                  fused_maxnreg=ints(args.fused_maxnreg))
            res["decode_rows"].append(row)
            d = row["decode_us"]
            log(f"{bits} B={B} T={T} D={D} splits {row['num_splits']} ({time.time() - t0:.0f}s): " +
                "  ".join(f"{n} {v:.1f} (x{d['sdpa_fp16'] / v:.2f})" for n, v in d.items()))
            log(f"  best {row['best']}: {row['best_GBps']:.0f} GB/s of compressed bytes; diff vs portable " +
                json.dumps({n: f"{v:.1e}" for n, v in row["rel_diff_vs_portable"].items()}))
            for n, v in row["kernel_us"].items():
                log(f"  {n} kernels: " + ", ".join(f"{kn[:40]} {kv:.1f}" for kn, kv in v.items()))
            with open(os.path.join(args.out, f"attention_gluon_decode_{res['info']['gpu_key']}.json"), "w") as f:
                json.dump(res, f, indent=1)


def shipped_rows(dev, bits_list, shapes, Hq=32, H=8):
    """Per bit pair and shape (B, T, D): SDPA fp16 (GQA) and ``decode_attention(q, cache)`` with no override, the
    store's bucket and config, in one process."""
    for kb, vb in bits_list:
        for B, T, D in shapes:
            torch.manual_seed(0)
            codec = KVCodec(head_dim=D, key_bits=kb, value_bits=vb)
            cache, x = random_cache(codec, H, B, T, dev)
            q = torch.randn(B, 1, Hq, D, device=dev, dtype=torch.float16)
            buckets = A.attention_buckets(D, kb, vb, Hq // H, B, T)
            dec = sdpa_and_shipped(q, cache, x)
            yield dict(batch=B, context=T, head_dim=D, bits=f"K{kb}V{vb}", buckets=buckets,
                       config=A.call_config(runtime.launch_config("attention", buckets, dev), B, T).as_dict(),
                       decode_us=dec,
                       speedup=dec["sdpa_fp16"] / dec["shipped"])
            del cache, x


def main_shipped(args, dev, res):
    bits = [(int(b[1]), int(b[3])) for b in args.bits.split(",")]
    shapes = []
    for shape in args.shapes.split(","):
        parts = [int(v) for v in shape.split("x")]
        shapes.append((parts[0], parts[1], parts[2] if len(parts) > 2 else 128))
    res["shipped_rows"] = []
    for row in shipped_rows(dev, bits, shapes):
        res["shipped_rows"].append(row)
        d = row["decode_us"]
        log(f"{row['bits']} B={row['batch']} T={row['context']} D={row['head_dim']}: SDPA {d['sdpa_fp16']:.1f}  "
            f"shipped {d['shipped']:.1f} (x{row['speedup']:.2f})  " + json.dumps(row["config"]))
        with open(os.path.join(args.out, f"attention_shipped_{res['info']['gpu_key']}.json"), "w") as f:
            json.dump(res, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode", action="store_true", help="whole-decode variants only (decode_variants)")
    ap.add_argument("--bits", default="K3V2,K2V2,K4V4", help="bit pairs for --decode")
    ap.add_argument("--shapes", default="8x32768,16x8192,1x131072", help="BxT[xD],...")
    ap.add_argument("--value-warps", default="1,2,4", help="warps of the Gluon values pass for --decode (none: '')")
    ap.add_argument("--fused-warps", default="1,2,4", help="warps of the fused Gluon pass for --decode (none: '')")
    ap.add_argument("--mults", default="1,2", help="split counts for --decode, as multiples of the decode's")
    ap.add_argument("--fused-maxnreg", default="", help="register caps of extra fused variants for --decode")
    ap.add_argument("--shipped", action="store_true", help="SDPA and the config store's launch only, per bit pair "
                                                           "and shape (shipped_rows)")
    ap.add_argument("--variants", default="w1p1l0,w2p1l0,w4p1l0,w1p1l2,w2p1l2,w4p1l2,w2p1l4,w4p1l0r128,w2p2l2",
                    help="Gluon launch variants (parse_variant), ...")
    ap.add_argument("--splits", default="1,2,4", help="split counts for the keys pass alone, as multiples of the "
                                                      "decode's (the whole decode takes the first two)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    info = device_info(dev)
    log(json.dumps(info))
    res = dict(info=info, copy_GBps=copy_bandwidth(dev), rows=[], decode_rows=[])
    if args.decode:
        return main_decode(args, dev, res)
    if args.shipped:
        return main_shipped(args, dev, res)
    variants = args.variants.split(",")
    for shape in args.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        t0 = time.time()
        row = bench_shape(dev, 32, 8, 128, B, T, variants, [int(m) for m in args.splits.split(",")])
        res["rows"].append(row)
        k, d = row["keys_us"], row["decode_us"]
        n0 = row["num_splits"]
        log(f"B={B} T={T} decode splits {n0}, checks " + json.dumps(row["keys_check"]) + f" ({time.time() - t0:.0f}s)")
        log("  keys: " + "  ".join(f"{n} {v:.1f}" for n, v in k.items()))
        bt = min((v, n) for n, v in k.items() if n.startswith("triton"))
        bg = min((v, n) for n, v in k.items() if n.startswith("gluon"))
        tk, bd = k[f"triton_s{n0}"], row["best_gluon_at_decode_splits"]
        log(f"  keys at the decode's splits: triton {tk:.1f} vs {bd} {k[bd]:.1f} -> {tk / k[bd]:.2f}x; "
            f"best of each: {bt[1]} {bt[0]:.1f} vs {bg[1]} {bg[0]:.1f} -> {bt[0] / bg[0]:.2f}x")
        log("  decode: " + "  ".join(f"{n} {v:.1f} (x{d['sdpa_fp16'] / v:.2f})" for n, v in d.items()))
        log("  diff vs two-pass triton: " + json.dumps({n: f"{v:.1e}" for n, v in
                                                          row["decode_rel_diff_vs_triton"].items()}))
        for n, v in row["kernel_us"].items():
            log(f"  {n} kernels: " + ", ".join(f"{kn[:40]} {kv:.1f}" for kn, kv in v.items()))
        with open(os.path.join(args.out, f"attention_gluon_{res['info']['gpu_key']}.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
