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
3. ``--compiled``: the compiled decode path (``static=True``: ``torch.compile(mode="reduce-overhead")``, inductor and
   CUDA graphs, ``fullgraph``) beside transformers' StaticCache compiled the same way: tokens/s of greedy decode steps
   at batch × context (``--shapes``), and at the memory limit (``--limit T``: for each cache the largest batch whose
   cache fits the GPU's free memory at context T, tokens/s at that batch). The caches are filled directly with random
   K/V of the prompt's shape (encoded into pages for ours) instead of a prefill, which at the memory limit would not
   fit the benchmark's GPU time; decode steps read the same bytes either way.
Bytes per decode step for reference: weights (15 GB) + the cache (DynamicCache: 128 KiB per token).
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import platform
import sys
import time

import torch

from integrations.hf import PRESETS as HF_PRESETS
from integrations.hf import CompressedLayer, NQCache, patch, unpatch, with_cache
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


def kernel_ms(step, steps: int) -> tuple[float, list]:
    """Kernel time per call of ``step`` (sum of CUDA time in the profiler over ``steps`` calls / steps) and its five
    largest kernels (name, ms per call)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.no_grad():
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    return (sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
            [(e.key[:80], e.self_device_time_total / 1e3 / steps) for e in kernels[:5]])


def gpu_ms_per_step(model, cache, nxt, steps: int = 3) -> float:
    """Kernel time per decode step: the step time once the host keeps up (this host's Python launch overhead makes
    transformers' decode CPU-bound)."""
    state = [nxt]

    def step():
        state[0] = model(state[0], **with_cache(model, cache), use_cache=True).logits[:, -1:].argmax(-1)
    return kernel_ms(step, steps)[0]


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


# -- the compiled decode path ---------------------------------------------------------------------------------------
STEP_MARGIN = 64  # tokens of room beyond the prompt: warm-up, timed and profiled steps (compiled_steps checks)


def filled_cache(model, kind: str, B: int, T: int):
    """A cache holding B sequences of T random tokens, filled directly (no prefill): ``"static"`` is transformers'
    StaticCache (zeros; SDPA reads every slot up to max_cache_len either way), otherwise the NQCache of preset
    ``kind`` with ``static=True``, each layer's pages encoded from one random sequence repeated B times."""
    from transformers import StaticCache

    cfg = model.config
    H, D = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    L = T + STEP_MARGIN
    dev = model.device
    g = torch.Generator(dev).manual_seed(T)
    if kind == "static":
        cache = StaticCache(config=cfg, max_cache_len=L)
        empty = torch.empty(B, H, 1, D, dtype=model.dtype, device=dev)
        for layer in cache.layers:
            layer.lazy_initialization(empty, empty)
            layer.cumulative_length.fill_(T)
        return cache
    cache = NQCache(model, kind, static=True, max_cache_len=L)
    for layer in cache.layers:
        k, v = torch.randn(2, 1, T, H, D, dtype=model.dtype, device=dev, generator=g)
        k, v = k.expand(B, T, H, D), v.expand(B, T, H, D)
        layer.lazy_initialization(k.transpose(1, 2), v.transpose(1, 2))
        if isinstance(layer, CompressedLayer):  # as after the prompt's forward: T tokens seen, then encoded
            layer.seen = T
            layer.seen_t.fill_(T)
            layer.encode(k, v, [T] * B, None, None)
    return cache


def compiled_steps(model, cache, B: int, T: int, steps: int, warm: int = 3) -> tuple[list, float, dict]:
    """Greedy decode steps through ``model.forward`` compiled as ``generate`` compiles it for a static cache
    (inductor, ``reduce-overhead``: CUDA graphs; ``fullgraph``): (seconds of each timed step, seconds of the first
    call, the compile; what ran: kernel time per step under the profiler, its five largest kernels, and inductor's
    count of graphs that skipped CUDA graphs)."""
    from torch._dynamo.utils import counters
    prof_steps = 2
    if warm + steps + prof_steps > STEP_MARGIN:
        raise ValueError(f"--steps {steps}: at most {STEP_MARGIN - warm - prof_steps} (the caches hold the prompt "
                         f"and {STEP_MARGIN} tokens more)")
    fwd = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    dev = model.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    nxt = torch.randint(0, model.config.vocab_size, (B, 1), device=dev)
    pos = torch.full((B, 1), T, dtype=torch.long, device=dev)
    extra = {"cache_position": pos[0]} if "cache_position" in inspect.signature(model.forward).parameters else {}
    times, first = [], 0.0
    with torch.no_grad():
        for i in range(warm + steps):
            sync()
            t0 = time.perf_counter()
            out = fwd(nxt, position_ids=pos, **with_cache(model, cache), use_cache=True, **extra)
            nxt = out.logits[:, -1:].argmax(-1)
            pos += 1
            sync()
            if i == 0:
                first = time.perf_counter() - t0
            elif i >= warm:
                times.append(time.perf_counter() - t0)
    state = [nxt]

    def step():
        state[0] = fwd(state[0], position_ids=pos, **with_cache(model, cache), use_cache=True,
                       **extra).logits[:, -1:].argmax(-1)
        pos.add_(1)
    gpu, top = kernel_ms(step, prof_steps)
    return times, first, {"gpu_ms": gpu, "top_kernels": top,
                          "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"])}


def run_compiled(model, kind: str, B: int, T: int, steps: int, limit: bool = False) -> dict:
    name = "StaticCache" if kind == "static" else f"{kind} static=True"
    row = {"cache": name + " + compile", "batch": B, "tokens": T, "memory_limit": limit, "fill": "direct"}
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    try:
        if kind != "static":
            patch(model, kind, static=True)
        cache = filled_cache(model, kind, B, T)
        row["nbytes"] = cache_bytes(cache) if kind != "static" else sum(
            l.keys.nbytes + l.values.nbytes for l in cache.layers)
        times, first, ran = compiled_steps(model, cache, B, T, steps)
        times.sort()
        med = times[len(times) // 2]
        row.update(step_ms=1e3 * med, tokens_per_s=B / med, first_call_s=first, step_ms_all=[1e3 * t for t in times],
                   **ran)
        del cache
    except torch.OutOfMemoryError:
        row["oom"] = True
    finally:
        if kind != "static":
            unpatch(model)
        torch._dynamo.reset()
        _free()
    log(f"{row['cache']:>32} B={B:<4} T={T:<7} " + ("OOM" if row.get("oom") else
        f"{row['nbytes'] / 2**30:7.2f} GiB  step {row['step_ms']:7.2f} ms  {row['tokens_per_s']:9.1f} tok/s  "
        f"GPU {row['gpu_ms']:7.2f} ms  (first call {row['first_call_s']:.0f} s, cudagraph skips "
        f"{row['cudagraph_skips']})"))
    for name, ms in row.get("top_kernels", []):
        log(f"{'':>36}{ms:7.3f} ms  {name}")
    return row


def limit_batch(model, kind: str, T: int, headroom: float) -> int:
    """The largest batch whose cache at context T fits the free memory less ``headroom`` bytes (bytes per sequence
    measured on a batch-1 cache)."""
    _free()
    one = filled_cache(model, kind, 1, T)
    per_seq = cache_bytes(one) if kind != "static" else sum(l.keys.nbytes + l.values.nbytes for l in one.layers)
    del one
    _free()
    return max(1, int((torch.cuda.mem_get_info()[0] - headroom) // per_seq))


def compiled_table(rows: list) -> str:
    lines = ["| batch | context | cache | bytes held | step | tokens/s | vs StaticCache + compile |", "|---|---|---|---|---|---|---|"]
    peer = {(r["memory_limit"], r["batch"], r["tokens"]) if not r["memory_limit"] else (True, r["tokens"]): r
            for r in rows if r["cache"].startswith("StaticCache") and not r.get("oom")}  # at the limit: the batch that fit
    for r in rows:
        key = (True, r["tokens"]) if r["memory_limit"] else (False, r["batch"], r["tokens"])
        p = peer.get(key)
        shape = f"{r['batch']} (memory limit)" if r["memory_limit"] else str(r["batch"])
        if r.get("oom"):
            lines.append(f"| {shape} | {r['tokens'] // 1024}K | {r['cache']} | OOM | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}×" if p else "—"
        lines.append(f"| {shape} | {r['tokens'] // 1024}K | {r['cache']} | {r['nbytes'] / 2**30:.2f} GiB | "
                     f"{r['step_ms']:.2f} ms | {r['tokens_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m perf.bench_hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="8K and 32K at batch 1, 8K at batch 16")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per row (default 16)")
    ap.add_argument("--preset", action="append", choices=("dynamic",) + tuple(HF_PRESETS),
                    help=f"repeatable; default: {', '.join(PRESETS)}")
    ap.add_argument("--out", default="perf/results")
    ap.add_argument("--compiled", action="store_true", help="the compiled decode path beside StaticCache + compile")
    ap.add_argument("--shapes", default="1x8192,1x32768,16x8192", help="--compiled: batch x context, comma-separated")
    ap.add_argument("--limit", type=int, default=0, help="--compiled: also at the memory limit at this context")
    ap.add_argument("--headroom-gib", type=float, default=8.0,
                    help="--limit: memory left free beside the cache (activations, CUDA graph pools); default 8")
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
    if args.compiled:
        return main_compiled(model, args, meta, tag)
    rows = []
    for B, T in shapes:
        for p in args.preset or PRESETS:
            rows.append(run(model, p, B, T, args.steps))
            with open(os.path.join(args.out, f"hf_{tag}.json"), "w") as f:  # after every row: a cut run keeps them
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(table(rows))


def main_compiled(model, args, meta: dict, tag: str) -> None:
    kinds = ["static"] + (args.preset or ["balanced"])
    meta.update(compiled=True, headroom_gib=args.headroom_gib, margin_tokens=STEP_MARGIN)
    rows, path = [], os.path.join(args.out, f"hf_compiled_{tag}.json")

    def save():
        with open(path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)

    try:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        sys.exit(f"--shapes must be BxT,BxT,... (e.g. 1x8192,16x8192), got {args.shapes!r}")
    for B, T in shapes:
        for kind in kinds:
            rows.append(run_compiled(model, kind, B, T, args.steps))
            save()
    if args.limit:
        for kind in kinds:
            B = limit_batch(model, kind, args.limit, args.headroom_gib * 2**30)
            for _ in range(4):  # the estimate's headroom may fall short (CUDA-graph pools): 7% fewer until one fits
                log(f"memory limit at {args.limit}: {kind} batch {B}")
                rows.append(run_compiled(model, kind, B, args.limit, args.steps, limit=True))
                save()
                if not rows[-1].get("oom"):
                    break
                B = max(1, B * 93 // 100)
    print(compiled_table(rows))


if __name__ == "__main__":
    main()
