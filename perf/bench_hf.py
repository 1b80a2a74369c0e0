"""GPU benchmark of integrations.hf on a Llama-3-8B-shaped model (random bf16 weights, SDPA): cache memory and
decode speed against transformers' DynamicCache (one script, one device call).

    python -m perf.bench_hf [--quick] [--preset NAME ...] [--out DIR]

1. memory: ``torch.cuda.memory_allocated`` held after the prompt (batch 1, 8K-128K tokens) by a DynamicCache and by
   the NQCache of each preset (the difference of memory_allocated before and after the forward, the logits of the
   last token only; expandable allocator segments, after a warm-up forward), beside the bytes requested from the
   allocator and ``cache.nbytes()`` (the cache's tensors), and the prompt's peak;
2. decode: greedy decode steps (one forward of one token per sequence, next token = argmax) after that prompt,
   median wall step time → tokens/s, and the kernel time per step (profiler; transformers' decode is host-bound on
   the benchmark host: ~1,750 launches and ~80 ms of Python per step for every cache, ~12 ms of GPU work), batch 1
   (8K-128K) and batch 16 (8K; a 16K prompt at batch 16 does not fit the plain model in 80 GB); DynamicCache + SDPA
   vs each preset.
Bytes per decode step for reference: weights (15 GB) + the cache (DynamicCache: 128 KiB per token).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

from integrations.hf import PRESETS as HF_PRESETS
from integrations.hf import NQCache, patch, unpatch, with_cache
from perf.bench_attention import log
from perf.bench_cold import llama8b_model

PRESETS = ("dynamic", "near-lossless", "balanced", "balanced-evict50")
VOCAB = 128256


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def prompt_cache(model, preset: str, B: int, T: int):
    """Prefill B random prompts of T tokens; returns (cache, last ids, (bytes allocated by it, bytes it requested from
    the allocator), prompt peak, seconds)."""
    ids = torch.randint(0, VOCAB, (B, T), device="cuda", generator=torch.Generator("cuda").manual_seed(T + B))
    _free()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    requested = torch.cuda.memory_stats()["requested_bytes.all.current"]
    torch.cuda.reset_peak_memory_stats()
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config) if preset == "dynamic" else NQCache(model, preset)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    del out
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    _free()
    held = torch.cuda.memory_allocated() - base - nxt.nbytes
    requested = torch.cuda.memory_stats()["requested_bytes.all.current"] - requested - nxt.nbytes
    return cache, nxt, (held, requested), torch.cuda.max_memory_allocated() - base, seconds


def cache_bytes(cache) -> int:
    if isinstance(cache, NQCache):
        return cache.nbytes()
    return sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)


def decode_steps(model, cache, nxt, steps: int) -> list:
    times = []
    with torch.no_grad():
        for i in range(steps + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(nxt, **with_cache(model, cache), use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t0)
    return times


def gpu_ms_per_step(model, cache, nxt, steps: int = 3) -> float:
    """Kernel time per decode step (sum of CUDA time in the profiler / steps): the step time once the host keeps
    up (this host's Python launch overhead makes transformers' decode CPU-bound)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
        for _ in range(steps):
            nxt = model(nxt, **with_cache(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / steps


def run(model, preset: str, B: int, T: int, steps: int) -> dict:
    row = {"preset": preset, "batch": B, "tokens": T}
    try:
        if preset != "dynamic":
            patch(model, preset)
        cache, nxt, held, peak, secs = prompt_cache(model, preset, B, T)
        row.update(allocated=held[0], requested=held[1], nbytes=cache_bytes(cache), prompt_peak=peak, prompt_s=secs)
        times = sorted(decode_steps(model, cache, nxt, steps))
        row.update(step_ms=1e3 * times[len(times) // 2], tokens_per_s=B / times[len(times) // 2],
                   step_ms_all=[1e3 * t for t in times], gpu_ms=gpu_ms_per_step(model, cache, nxt))
        del cache, nxt
    except torch.OutOfMemoryError:
        row["oom"] = True
    finally:
        if preset != "dynamic":
            unpatch(model)
        _free()
    log(f"{preset:>18} B={B:<3} T={T:<7} " + ("OOM" if row.get("oom") else
        f"alloc {row['allocated'] / 2**20:9.1f} MiB  nbytes {row['nbytes'] / 2**20:9.1f} MiB  "
        f"peak {row['prompt_peak'] / 2**30:6.2f} GiB  prompt {row['prompt_s']:6.2f} s  step {row['step_ms']:7.2f} ms  "
        f"{row['tokens_per_s']:8.1f} tok/s  GPU {row['gpu_ms']:6.2f} ms/step"))
    return row


def table(rows: list) -> str:
    dyn = {(r["batch"], r["tokens"]): r for r in rows if r["preset"] == "dynamic" and not r.get("oom")}
    lines = ["| batch | tokens | cache | memory_allocated | ratio vs DynamicCache | ratio of nbytes | prompt peak | "
             "GPU time / step | vs DynamicCache | wall step (host-bound) | tokens/s (wall) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['batch']} | {r['tokens'] // 1024}K | {r['preset']} | OOM | | | | | | | |")
            continue
        d = dyn.get((r["batch"], r["tokens"]))
        ratio = f"{d['allocated'] / r['allocated']:.2f}×" if d else "—"
        ratio_nbytes = f"{d['nbytes'] / r['nbytes']:.2f}×" if d else "—"
        speed = f"{d['gpu_ms'] / r['gpu_ms']:.2f}×" if d else "—"
        lines.append(f"| {r['batch']} | {r['tokens'] // 1024}K | {r['preset']} | {r['allocated'] / 2**20:.0f} MiB | "
                     f"{ratio} | {ratio_nbytes} | {r['prompt_peak'] / 2**30:.1f} GiB | {r['gpu_ms']:.2f} ms | {speed} | "
                     f"{r['step_ms']:.1f} ms | {r['tokens_per_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m perf.bench_hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8K and 32K at batch 1, 8K at batch 16")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per row (default 16)")
    ap.add_argument("--preset", action="append", choices=("dynamic",) + tuple(HF_PRESETS),
                    help=f"repeatable; default: {', '.join(PRESETS)}")
    ap.add_argument("--out", default="perf/results")
    args = ap.parse_args(argv)
    # Expandable segments: memory_allocated then counts the cache's tensors. The default allocator hands out whole
    # cached blocks when the rest would be under 1 MiB, which added 0-25 MB to an 8K cache depending on what the
    # prompt had freed (measured: requested bytes equal nbytes either way).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not torch.cuda.is_available():
        sys.exit("perf.bench_hf needs a CUDA GPU")
    import transformers
    import triton
    model = llama8b_model("cuda")
    with torch.no_grad():  # allocates cuBLAS's workspace, which would otherwise count as the first cache's memory
        model(torch.zeros(1, 16, dtype=torch.long, device="cuda"), logits_to_keep=1)
    K = 1024
    shapes = [(1, 8 * K), (1, 32 * K), (16, 8 * K)] if args.quick else \
        [(1, t * K) for t in (8, 16, 32, 64, 128)] + [(16, 8 * K)]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "model": "Llama-3-8B-shaped (32 layers, 32 q / 8 kv heads, head_dim 128), random bf16 weights, sdpa",
            "date": time.strftime("%Y-%m-%d"), "steps": args.steps,
            "allocator": os.environ["PYTORCH_CUDA_ALLOC_CONF"]}
    os.makedirs(args.out, exist_ok=True)
    name = meta["device"]
    tag = "h200" if "H200" in name else "h100" if "H100" in name else name.lower().replace(" ", "-")
    if args.preset:
        tag += "_" + "_".join(args.preset)
    rows = []
    for B, T in shapes:
        for p in args.preset or PRESETS:
            rows.append(run(model, p, B, T, args.steps))
            with open(os.path.join(args.out, f"hf_{tag}.json"), "w") as f:  # after every row: a cut run keeps them
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
