"""GPU benchmark of token scoring and selection (one script, one device call).

    python -m perf.bench_scoring [--quick] [--out DIR]

1. compiled ``score_tokens`` vs ``reference.window_scores``: every head_dim, GQA 1/4/8, fp16/bf16, ragged lengths,
   sum/mean/max (max relative error);
2. the cost of scoring a Llama-3-8B-shaped prompt (32 layers, 32 query / 8 KV heads, head_dim 128, a 32-query
   observation window, bf16) at 8K-128K tokens: ``score_tokens`` (max-pooled over 31 tokens) over every layer's own
   keys (so nothing is served from L2), then the cross-layer mean and one ``select_tokens`` (50% eviction), beside
   the same scores computed the way kvpress's SnapKV does (torch: the window's attention matrix materialised, softmax, mean, pooling) and beside the
   prefill they follow: a forward pass of a Llama-3-8B-shaped model (random bf16 weights, SDPA) over the same tokens.
   FLOPs: two passes of 2·W·Hq·T·D each per layer. Three views of the cost: the kernels' GPU time (profiler),
   the steps timed alone (launch-bound at small sizes), and the time added to a real prefill.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from nqkernels import reference as R
from nqkernels import score_tokens, select_tokens
from perf.bench_attention import log
from perf.bench_cold import llama8b_model

LAYERS, HQ, HKV, D, W = 32, 32, 8, 128, 32
POOL = 31  # the quality harness's default (docs/eviction.md)



def check(dev):
    rows = []
    for d in (64, 96, 128, 256):
        for group in (1, 4, 8):
            for dtype in (torch.float16, torch.bfloat16):
                q = torch.randn(3, 33, 2 * group, d, device=dev, dtype=dtype)
                k = torch.randn(3, 2051, 2, d, device=dev, dtype=dtype)
                lens = torch.tensor([2051, 1000, 17], device=dev)
                for agg in ("sum", "mean", "max"):
                    out = score_tokens(q, k, seq_lens=lens, aggregate=agg)
                    ref = R.window_scores(q, k, lens, scale=d ** -0.5, aggregate=agg)
                    err = ((out - ref).abs().max() / ref.abs().max()).item()
                    rows.append({"head_dim": d, "group": group, "dtype": str(dtype)[6:], "aggregate": agg,
                                 "max_rel_err": err})
    worst = max(r["max_rel_err"] for r in rows)
    log(f"check: {len(rows)} cases, worst max relative error {worst:.2e}")
    return rows, worst


def snapkv_torch(q, k, pool=7):
    """Window scores as kvpress's SnapKV computes them: the [Hq, W, T] attention matrix in memory."""
    T = k.shape[1]
    keys = k[0].transpose(0, 1).repeat_interleave(HQ // HKV, 0)  # [Hq, T, D]
    logits = torch.matmul(q[0].transpose(0, 1), keys.transpose(1, 2)) / D ** 0.5  # [Hq, W, T]
    mask = torch.ones(W, T, dtype=torch.bool, device=k.device).triu(T - W + 1)
    p = torch.softmax(logits.masked_fill(mask, float("-inf")), dim=-1, dtype=torch.float32)
    s = F.avg_pool1d(p.mean(1)[:, None], pool, stride=1, padding=pool // 2)[:, 0]
    return s.view(HKV, HQ // HKV, T).mean(1)


def time_scoring(dev, T):
    torch.manual_seed(0)
    keys = [torch.randn(1, T, HKV, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    queries = [torch.randn(1, W, HQ, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]

    def ours_scores():
        return [score_tokens(q, k, pool=POOL) for q, k in zip(queries, keys)]

    def ours_all():  # the shared (cross-layer) scores give one selection for every layer
        return select_tokens(torch.stack(ours_scores()).mean(0), evict=0.5, sinks=4, recent=32)

    def torch_snapkv():
        return [snapkv_torch(q, k) for q, k in zip(queries, keys)]

    res = {"tokens": T}
    ours_all()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ours_all()
        torch.cuda.synchronize()
    res["gpu_kernels_ms"] = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 1e3
    res["score_ms"] = do_bench(ours_scores, rep=200)
    res["score_select_ms"] = do_bench(ours_all, rep=200)
    try:
        res["snapkv_torch_ms"] = do_bench(torch_snapkv, rep=200)
    except torch.OutOfMemoryError:
        res["snapkv_torch_ms"] = None
    torch.cuda.empty_cache()
    flops = LAYERS * 2 * 2 * W * HQ * T * D
    res["score_tflops"] = flops / res["score_ms"] / 1e9
    res["key_bytes_read"] = LAYERS * 2 * T * HKV * D * 2  # two passes over K
    del keys, queries
    torch.cuda.empty_cache()
    return res


def prefill_with_scoring(dev, T, runs=5):
    """Seconds of (a) the prefill alone and (b) the prefill followed by scoring its cache (32 window-query blocks,
    score_tokens over each layer's cached keys, cross-layer mean, one select_tokens), alternated on one model: the
    difference is what scoring adds to a real prefill, whose GPU queue hides the launch overhead."""
    from integrations.hf.compat import output_cache

    model = llama8b_model(dev)
    ids = torch.randint(0, 128256, (1, T), device=dev)
    queries = [torch.randn(1, W, HQ, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
    plain, scored = [], []
    with torch.no_grad():
        for i in range(2 * runs + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            if i % 2:
                keys = [layer.keys.transpose(1, 2) for layer in output_cache(out).layers]  # [1, T, 8, 128] views
                shared = torch.stack([score_tokens(q, k, pool=POOL) for q, k in zip(queries, keys)]).mean(0)
                select_tokens(shared, evict=0.5, sinks=4, recent=32)
            torch.cuda.synchronize()
            if i:  # the first run warms up
                (scored if i % 2 else plain).append(time.perf_counter() - t0)
            del out
    del model
    torch.cuda.empty_cache()
    return sorted(plain)[len(plain) // 2], sorted(scored)[len(scored) // 2], plain, scored


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8K and 32K only")
    ap.add_argument("--out", default=os.environ.get("OUT", "perf/results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    meta = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    log(json.dumps(meta))
    rows, worst = check(dev)
    out = {"meta": meta, "check": rows, "check_worst": worst, "timing": []}
    for T in ((8192, 32768) if args.quick else (8192, 16384, 32768, 65536, 131072)):
        r = time_scoring(dev, T)
        r["prefill_s"], r["prefill_scored_s"], r["prefill_runs_s"], r["prefill_scored_runs_s"] = \
            prefill_with_scoring(dev, T)
        r["score_pct_of_prefill"] = 100 * r["score_select_ms"] / 1e3 / r["prefill_s"]
        r["gpu_pct_of_prefill"] = 100 * r["gpu_kernels_ms"] / 1e3 / r["prefill_s"]
        r["added_pct_of_prefill"] = 100 * (r["prefill_scored_s"] / r["prefill_s"] - 1)
        log(json.dumps(r))
        out["timing"].append(r)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scoring_h100.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(args.out, "scoring_h100.md"), "w") as f:
        f.write(table(out))
    log(table(out))


def table(out) -> str:
    m = out["meta"]
    lines = [f"# Token scoring cost ({m['device']}, torch {m['torch']}, triton {m['triton']})", "",
             f"Compiled kernel vs reference: worst max relative error {out['check_worst']:.1e} over "
             f"{len(out['check'])} cases.", "",
             "Llama-3-8B-shaped prompt: 32 layers, 32 q / 8 KV heads, head_dim 128, 32-query window, bf16. "
             "Times are do_bench medians over all 32 layers (each layer its own keys).", "",
             "GPU time: the sum of the scoring pipeline's kernel times (torch profiler), the device time it costs. "
             "Isolated: each step timed alone (the GPU waits for Python's launches, so small sizes are launch-bound). "
             "In a prefill: the same steps queued right after a Llama-3-8B-shaped forward pass (random bf16 weights, "
             "SDPA), medians of 5 runs alternated with the plain forward; the difference is what scoring adds.", "",
             "| tokens | score_tokens ×32 (ms) | TFLOP/s | + cross-layer mean + select (ms) | GPU time of all that (ms) | kvpress-style torch SnapKV ×32 (ms) | prefill (s) | GPU time / prefill | isolated / prefill | prefill + scoring (s) | added to prefill |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["timing"]:
        snap = "OOM" if r["snapkv_torch_ms"] is None else f"{r['snapkv_torch_ms']:.2f}"
        lines.append(f"| {r['tokens']} | {r['score_ms']:.2f} | {r['score_tflops']:.0f} | {r['score_select_ms']:.2f} | "
                     f"{r['gpu_kernels_ms']:.2f} | {snap} | {r['prefill_s']:.3f} | {r['gpu_pct_of_prefill']:.2f}% | "
                     f"{r['score_pct_of_prefill']:.2f}% | {r['prefill_scored_s']:.3f} | "
                     f"{r['added_pct_of_prefill']:+.2f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
