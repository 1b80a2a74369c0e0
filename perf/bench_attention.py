"""GPU benchmark of decode_attention over the paged HOT cache (one script, one device call).

    python -m perf.bench_attention [--quick] [--skip-check] [--shapes ...] [--out DIR]

1. compiled kernels vs fp32 attention over the dequantized cache (||out - ref|| / ||ref||), every head_dim, both
   key modes, GQA ratios, q_len 1 and 4, fp16/bf16, softcap and sliding window;
2. a device-to-device copy (bytes read + written), the bandwidth ceiling;
3. decode latency (q_len 1) for Llama-3-8B-shaped layers (32 query heads, 8 KV heads, head_dim 128), plus one
   head_dim 64 and one 256 shape, contexts 1K-128K, batch 1-64, at K4V4/K3V3/K3V2/K2V2, beside torch SDPA over
   fp16 K/V with GQA (and FlashInfer's fp16 decode when it imports) in the same run. Latency is the GPU time of
   one call, replayed from a CUDA graph as a served model's decode step is (autotune.tune.bench_ms: the launcher's
   Python time is not counted), with L2 cleared before every replay, so no run is served from cache. Achieved
   bandwidth counts the bytes the kernel must read: codes, scales, the fp16 window, block table. "ours_fp16" is
   this kernel over an uncompressed cache (every token in the
   fp16 window), which separates the kernel's quality from the compression.

Launch configs come from the config store (``python -m autotune.tune`` searches them).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from nqkernels import store
from nqkernels.store import gpu_key, untuned
from autotune.tasks import random_cache
from autotune.tune import bench_ms, graph_replay
from nqkernels import KVCodec, PagedKVCache, RopeSpec, decode_attention
from nqkernels.reference import paged_attention

SETTINGS = ((4, 4), (3, 3), (3, 2), (2, 2))


def log(*a):
    print(*a, flush=True)


def check(dev):
    rows = []
    cases = []
    for d in (64, 96, 128, 256):
        for rope in (None, RopeSpec(theta=500000.0)):
            cases.append(dict(d=d, rope=rope, group=4, q_len=1, dtype=torch.float16, bits=(3, 2)))
    for group, q_len in ((1, 1), (8, 1), (4, 4), (8, 3)):
        cases.append(dict(d=128, rope=None, group=group, q_len=q_len, dtype=torch.float16, bits=(3, 2)))
    for bits in SETTINGS:
        cases.append(dict(d=128, rope=None, group=4, q_len=1, dtype=torch.bfloat16, bits=bits))
    cases.append(dict(d=128, rope=RopeSpec(theta=10000.0), group=4, q_len=2, dtype=torch.bfloat16, bits=(3, 2),
                      softcap=30.0, window=700))
    # the two-pass kernels (launch config two_pass; the store picks them for some buckets only)
    cases.append(dict(d=128, rope=None, group=4, q_len=1, dtype=torch.float16, bits=(3, 2), config={"two_pass": True}))
    cases.append(dict(d=96, rope=None, group=8, q_len=3, dtype=torch.bfloat16, bits=(4, 4), softcap=30.0, window=700,
                      config={"two_pass": True, "maxnreg": 128}))
    for c in cases:
        codec = KVCodec(head_dim=c["d"], key_bits=c["bits"][0], value_bits=c["bits"][1], rope=c["rope"])
        H, B = 2, 3
        cache = PagedKVCache(codec, H, B, num_pages=64, sink_tokens=4, dtype=c["dtype"], device=dev)
        k = torch.randn(B, 1500, H, c["d"], device=dev, dtype=c["dtype"]) + 0.2
        cache.append(k, torch.randn_like(k), lengths=[1500, 777, 130])
        q = torch.randn(B, c["q_len"], H * c["group"], c["d"], device=dev, dtype=c["dtype"])
        out = torch.full_like(q, float("nan"))
        with store.override("attention", c["config"]) if "config" in c else contextlib.nullcontext():
            out.copy_(decode_attention(q, cache, softcap=c.get("softcap"), window=c.get("window")))
        ref = paged_attention(q, cache, c["d"] ** -0.5, c.get("softcap"), c.get("window"))
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        rows.append(dict(head_dim=c["d"], rope_undone=c["rope"] is not None, group=c["group"], q_len=c["q_len"],
                         dtype=str(c["dtype"]).split(".")[-1], bits=f"K{c['bits'][0]}V{c['bits'][1]}",
                         softcap=c.get("softcap"), window=c.get("window"), config=c.get("config"), rel_err=rel,
                         finite=bool(torch.isfinite(out).all())))
    return rows


def device_info(dev) -> dict:
    """The device, its config-store key, the versions and the date: the head of every result file."""
    return dict(device=torch.cuda.get_device_name(dev), gpu_key=gpu_key(dev), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d"))


def copy_bandwidth(dev):
    a = torch.randn(1 << 29, device=dev, dtype=torch.float16)
    b = torch.empty_like(a)
    return 2 * a.nbytes / do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median") / 1e6


def cache_bytes_read(cache, B):
    """Bytes one decode step must read: codes and scales of the compressed tokens, the fp16 window, tables."""
    codec, H = cache.codec, cache.num_kv_heads
    per_tok = codec.bytes_per_token("key") + codec.bytes_per_token("value")
    comp = sum(cache.compressed_lens()[:B])
    fp = int(cache.lengths[2, :B].sum())
    return comp * H * per_tok + fp * H * codec.head_dim * 2 * cache.fp_k.element_size()


def profiled_replays(fn, replays=20) -> list:
    """The GPU kernels of ``replays`` replays of a CUDA graph of one call of ``fn`` under torch.profiler, L2 flushed
    before every replay: a list per replay (after its flush kernel) of (name, start µs, end µs, device µs)."""
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    replay = graph_replay(fn)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            flush.zero_()
            replay()
        torch.cuda.synchronize()
    runs = []
    for e in sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start):
        if "fill" in e.name.lower() or "zero" in e.name.lower():  # the flush: a replay follows
            runs.append([])
        elif runs:
            runs[-1].append((e.name, e.time_range.start, e.time_range.end, e.device_time))
    return [r for r in runs if r]


def kernel_times(fn, replays=20) -> dict:
    """GPU time (us, mean) of each kernel of one call of ``fn`` (``profiled_replays``)."""
    times = {}
    for run in profiled_replays(fn, replays):
        for name, _, _, t in run:
            times.setdefault(name, []).append(t)
    return {name: sum(t) / len(t) for name, t in times.items()}


def bench_decode(dev, Hq, H, D, B, T, copy_gbps, quick, compare_untuned=False, per_kernel=False):
    """Rows of SDPA (and FlashInfer), ours at each setting and ours over fp16; ``compare_untuned``: ours also timed
    with the launchers' default configs (``tuned`` = default time / tuned time); ``per_kernel``: ours also split
    into its kernels' GPU times (``kernel_us``)."""
    rows = []

    def ours(method, cache, nbytes):
        ms = bench_ms(lambda: decode_attention(q, cache))
        row = dict(method=method, head_dim=D, batch=B, context=T, us=ms * 1e3, bytes=nbytes, GBps=nbytes / ms / 1e6,
                   pct_copy=100 * nbytes / ms / 1e6 / copy_gbps)
        if compare_untuned:
            with untuned():
                row["tuned"] = bench_ms(lambda: decode_attention(q, cache)) / ms
        if per_kernel:
            row["kernel_us"] = kernel_times(lambda: decode_attention(q, cache))
        rows.append(row)

    q = torch.randn(B, 1, Hq, D, device=dev, dtype=torch.float16)
    x = [torch.randn(1, T, H, D, device=dev, dtype=torch.float16) for _ in range(2)]
    # SDPA over fp16 K/V with GQA: [B, heads, T, D], one real copy per sequence.
    k16 = x[0].expand(B, -1, -1, -1).transpose(1, 2).contiguous()
    v16 = x[1].expand(B, -1, -1, -1).transpose(1, 2).contiguous()
    qs = q.transpose(1, 2)
    ms = bench_ms(lambda: F.scaled_dot_product_attention(qs, k16, v16, enable_gqa=True))
    ref = F.scaled_dot_product_attention(qs, k16, v16, enable_gqa=True)
    fp16_bytes = 2 * k16.nbytes
    rows.append(dict(method="sdpa_fp16", head_dim=D, batch=B, context=T, us=ms * 1e3, bytes=fp16_bytes,
                     GBps=fp16_bytes / ms / 1e6))
    if FLASHINFER is not None and D not in FLASHINFER_HEAD_DIMS:
        log(f"flashinfer: head_dim {D} not supported (its kernels: {FLASHINFER_HEAD_DIMS}); not run")
    elif FLASHINFER is not None:
        for kv_dtype in (torch.float16, torch.float8_e4m3fn):
            fi_row = flashinfer_decode(dev, q, x, B, T, H, D, ref, kv_dtype)
            if fi_row is not None:
                rows.append(fi_row)
    for kb, vb in SETTINGS if not quick else ((3, 2),):
        cache, _ = random_cache(KVCodec(head_dim=D, key_bits=kb, value_bits=vb), H, B, T, dev, x=x)
        ours(f"K{kb}V{vb}", cache, cache_bytes_read(cache, B))
    if not quick:  # the same kernel with every token uncompressed (fp16 window), to separate kernel from format
        cache, _ = random_cache(KVCodec(head_dim=D), H, B, T, dev, x=x, recent=T)
        ours("ours_fp16", cache, fp16_bytes)
    base = rows[0]["us"]
    for r in rows:
        r["speedup_vs_sdpa"] = base / r["us"]
    return rows


def _import_flashinfer():
    """FlashInfer, if it imports: its kernels are compiled on first use (JIT, with this machine's nvcc), for this
    GPU's architecture only."""
    if torch.cuda.is_available() and "FLASHINFER_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        os.environ["FLASHINFER_CUDA_ARCH_LIST"] = f"{major}.{minor}{'a' if major >= 9 else ''}"
    try:
        import flashinfer
        log(f"flashinfer {flashinfer.__version__}")
        return flashinfer
    except Exception as e:  # not installed (the flashinfer extra), or no CUDA toolkit
        log(f"flashinfer: not available ({type(e).__name__}: {e})")
        return None


FLASHINFER = None
# FlashInfer 0.5.3 compiles decode kernels for these only; head_dim 96 fails with an illegal memory access that
# leaves the CUDA context unusable, so it is not attempted.
FLASHINFER_HEAD_DIMS = (64, 128, 256)


def flashinfer_decode(dev, q, x, B, T, H, D, ref, kv_dtype=torch.float16):
    """FlashInfer's batch decode over the same K/V in 16-token pages, stored as ``kv_dtype`` (fp16, or
    ``torch.float8_e4m3fn``: the FP8 KV cache a user would pick instead of ours, K/V cast with scale 1, which the
    unit-variance test data fits), with its CUDA-core and its tensor-core kernels (``use_tensor_cores``; it recommends
    the latter for GQA); the row is the faster, both times are kept. Timed as a CUDA graph replay like the others
    when its run captures, else as plain calls. ``ref``: SDPA's output [B, Hq, 1, D], to check the result."""
    fi = FLASHINFER
    page = 16
    n_pages = B * (T // page)
    kv = torch.stack([t.expand(B, -1, -1, -1).reshape(n_pages, page, H, D) for t in x], dim=1).to(kv_dtype)
    indptr = torch.arange(0, n_pages + 1, T // page, device=dev, dtype=torch.int32)
    indices = torch.arange(n_pages, device=dev, dtype=torch.int32)
    last = torch.full((B,), page, device=dev, dtype=torch.int32)
    qq = q[:, 0].contiguous()
    fp8 = kv_dtype != torch.float16
    scales = dict(k_scale=1.0, v_scale=1.0) if fp8 else {}
    row = dict(method="flashinfer_fp8" if fp8 else "flashinfer_fp16", head_dim=D, batch=B, context=T, bytes=kv.nbytes,
               variants={})
    for tensor_cores in (False, True):
        name = "tensor_cores" if tensor_cores else "cuda_cores"
        try:
            t0 = time.time()
            ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
            w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tensor_cores)
            w.plan(indptr, indices, last, q.shape[2], H, D, page, q_data_type=torch.float16, kv_data_type=kv_dtype)
            out = w.run(qq, kv, **scales)
            torch.cuda.synchronize()
            err = ((out.float() - ref[:, :, 0].float()).norm() / ref.float().norm()).item()
            first_s = time.time() - t0
            try:
                ms, graph = bench_ms(lambda: w.run(qq, kv, **scales)), True
            except Exception:  # its run does not capture: plain calls (launch time may then count)
                torch.cuda.synchronize()
                ms, graph = bench_ms(lambda: w.run(qq, kv, **scales), graph=False), False
            row["variants"][name] = dict(us=ms * 1e3, graph=graph, rel_err=err, first_call_s=round(first_s, 1))
        except Exception as e:
            row["variants"][name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
            log(f"flashinfer {name}: {row['variants'][name]['error']}")
    timed = [v for v in row["variants"].values() if "us" in v]
    if not timed:
        return None
    row["us"] = min(v["us"] for v in timed)
    row["GBps"] = kv.nbytes / row["us"] / 1e3
    return row


def main():
    global FLASHINFER
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--shapes", help="only these decode shapes, 'HQxHxDxBxT,...' (e.g. 32x8x128x8x32768)")
    ap.add_argument("--kernel-times", action="store_true",
                    help="also the GPU time of each of ours' kernels (query prep, split, reduce), via torch.profiler")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    info = device_info(dev)
    log(json.dumps(info))
    res = dict(info=info)
    FLASHINFER = _import_flashinfer()
    if not args.skip_check:
        t0 = time.time()
        res["check"] = check(dev)
        worst = max(r["rel_err"] for r in res["check"])
        log(f"check: {len(res['check'])} configs, worst rel err {worst:.2e}, all finite "
            f"{all(r['finite'] for r in res['check'])} ({time.time() - t0:.0f}s)")
        for r in res["check"]:
            if r["rel_err"] > 1e-2 or not r["finite"]:
                log("  BAD", r)
    res["copy_GBps"] = copy_bandwidth(dev)
    log(f"copy: {res['copy_GBps']:.0f} GB/s")
    res["decode"] = []
    shapes = [(32, 8, 128, B, T) for T in (1024, 4096, 16384, 32768, 131072) for B in (1, 8, 32, 64)
              if B * T <= (1 << 21)]
    shapes += [(32, 8, 64, 8, 32768), (16, 8, 256, 8, 32768)]
    if args.quick:
        shapes = [(32, 8, 128, 8, 4096), (32, 8, 128, 8, 32768), (32, 8, 128, 1, 131072)]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for Hq, H, D, B, T in shapes:
        rows = bench_decode(dev, Hq, H, D, B, T, res["copy_GBps"], args.quick, per_kernel=args.kernel_times)
        res["decode"].extend(rows)
        log(f"D={D} B={B:2d} T={T:6d}: " + "  ".join(
            f"{r['method']} {r['us']:7.1f}us {r['GBps']:5.0f}GB/s x{r['speedup_vs_sdpa']:.2f}" for r in rows))
        for r in rows:
            if "kernel_us" in r:
                log(f"  {r['method']} kernels: " + ", ".join(f"{k} {v:.1f}us" for k, v in r["kernel_us"].items()))
            if "variants" in r:
                log(f"  {r['method']}: " + ", ".join(f"{k} {v}" for k, v in r["variants"].items()))
        with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
