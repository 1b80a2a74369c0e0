"""Host cost of eager decode_attention calls: a loop of one call per layer over 32 distinct layer caches (the first
layer of a step records its launches, the rest replay them), beside the same loop without replays and SDPA's eager
call; launches per call from the profiler. GPU only. ``python -m perf.bench_host --out DIR`` writes host_time.json
(perf/results/host_h200.md)."""
import argparse
import json
import time

import torch
import torch.nn.functional as F
from nqkernels import KVCodec, PagedKVCache, decode_attention, attention

def per_call_us(fn, n_layers, reps=30):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) / n_layers)
    ts.sort(); return ts[len(ts) // 2] * 1e6

ap = argparse.ArgumentParser(prog="python -m perf.bench_host", description=__doc__.split("\n\n")[0])
ap.add_argument("--out", default=".", help="folder for host_time.json (default: .)")
if not torch.cuda.is_available():
    raise SystemExit("perf.bench_host measures CUDA launches: it needs a GPU")
rows = []
L = 32
for T, B, bits in ((4096, 1, (3, 2)), (32768, 1, (3, 2)), (8192, 16, (3, 2))):
    codec = KVCodec(head_dim=128, key_bits=bits[0], value_bits=bits[1])
    caches, Ks = [], []
    for _ in range(L):
        c = PagedKVCache(codec, num_kv_heads=8, max_batch=B, num_pages=B * (T // 64 + 2), device="cuda")
        k = torch.randn(B, T, 8, 128, dtype=torch.float16, device="cuda")
        c.append(k, torch.randn_like(k)); caches.append(c)
    q = torch.randn(B, 1, 32, 128, dtype=torch.float16, device="cuda")
    K = torch.randn(B, 8, T, 128, dtype=torch.float16, device="cuda"); V = torch.randn_like(K); qs = q.transpose(1, 2)
    def ours(): [decode_attention(q, c) for c in caches]
    def fresh():
        for c in caches:
            attention._PLANS.clear(); decode_attention(q, c)
    def sdpa(): [F.scaled_dot_product_attention(qs, K, V, enable_gqa=True) for _ in caches]
    r = dict(tokens=T, batch=B, bits=f"K{bits[0]}V{bits[1]}", ours_us=per_call_us(ours, L),
             no_replay_us=per_call_us(fresh, L), sdpa_us=per_call_us(sdpa, L))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ours(); torch.cuda.synchronize()
    r["launches_per_call"] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA") / L
    rows.append(r); print(json.dumps(r), flush=True)
out = ap.parse_args().out
json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
               rows=rows), open(f"{out}/host_time.json", "w"), indent=1)
