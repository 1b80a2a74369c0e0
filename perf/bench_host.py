"""Host cost of eager decode_attention calls: a loop of one call per layer over 32 distinct layer caches (the first
layer of a step records its launches, the rest replay them), beside the same loop without replays and SDPA's eager
call; launches per call from the profiler. GPU only.

    python -m perf.bench_host [--out DIR] [--profile N] [--quick]

writes host_time.json (perf/results/host_h200.md); ``--profile N`` also prints the N functions that take the most
host time in the replayed loop at 4K × 1 (cProfile, own time).
"""
import argparse
import cProfile
import json
import pstats
import time

import torch
import torch.nn.functional as F

from nqkernels import KVCodec, PagedKVCache, decode_attention
from nqkernels.attention import launcher

LAYERS = 32
SHAPES = ((4096, 1, (3, 2)), (32768, 1, (3, 2)), (8192, 16, (3, 2)))  # tokens, batch, bits


def per_call_us(fns: dict, n_layers: int, rounds: int = 5, reps: int = 10) -> dict:
    """Median wall time of each of ``fns`` (one call per layer; a loop of n_layers calls, synchronized before, not
    after: host time, unless the GPU falls behind), per layer, µs. The functions take turns, ``reps`` loops each per
    round, so a slow stretch of the host (frequency, another process) does not fall on one of them."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    ts = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                ts[name].append((time.perf_counter() - t0) / n_layers)
    return {name: sorted(t)[len(t) // 2] * 1e6 for name, t in ts.items()}


def shape_row(T: int, B: int, bits: tuple, profile: int) -> dict:
    codec = KVCodec(head_dim=128, key_bits=bits[0], value_bits=bits[1])
    caches = []
    for _ in range(LAYERS):
        c = PagedKVCache(codec, num_kv_heads=8, max_batch=B, num_pages=B * (T // 64 + 2), device="cuda")
        k = torch.randn(B, T, 8, 128, dtype=torch.float16, device="cuda")
        c.append(k, torch.randn_like(k))
        caches.append(c)
    q = torch.randn(B, 1, 32, 128, dtype=torch.float16, device="cuda")
    K = torch.randn(B, 8, T, 128, dtype=torch.float16, device="cuda")
    V = torch.randn_like(K)
    qs = q.transpose(1, 2)

    def ours():
        for c in caches:
            decode_attention(q, c)

    def fresh():
        for c in caches:
            launcher._PLANS.clear()
            decode_attention(q, c)

    def sdpa():
        for _ in caches:
            F.scaled_dot_product_attention(qs, K, V, enable_gqa=True)

    us = per_call_us(dict(ours=ours, no_replay=fresh, sdpa=sdpa), LAYERS)
    r = dict(tokens=T, batch=B, bits=f"K{bits[0]}V{bits[1]}", ours_us=us["ours"], no_replay_us=us["no_replay"],
             sdpa_us=us["sdpa"])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ours()
        torch.cuda.synchronize()
    r["launches_per_call"] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA") / LAYERS
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(20):
            ours()
        pr.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(pr).sort_stats("tottime")
        calls = 20 * LAYERS
        r["profile_us_per_call"] = [
            (f"{f[0].split('/')[-1]}:{f[1]}({f[2]})", round(st[2] / calls * 1e6, 2), round(st[3] / calls * 1e6, 2))
            for f, st in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:profile]]  # own, cumulative
    return r


def main():
    ap = argparse.ArgumentParser(prog="python -m perf.bench_host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".", help="folder for host_time.json (default: .)")
    ap.add_argument("--profile", type=int, default=0, help="print the N functions with the most own host time at 4K x 1")
    ap.add_argument("--quick", action="store_true", help="4K x 1 only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("perf.bench_host measures CUDA launches: it needs a GPU")
    rows = []
    for i, (T, B, bits) in enumerate(SHAPES[:1] if args.quick else SHAPES):
        r = shape_row(T, B, bits, args.profile if i == 0 else 0)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "profile_us_per_call"}), flush=True)
        for name, own, cum in r.get("profile_us_per_call", []):
            print(f"  {own:7.2f} us own {cum:7.2f} us cumulative  {name}")
    with open(f"{args.out}/host_time.json", "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=__import__("triton").__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
