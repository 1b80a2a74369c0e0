"""Where a short decode's time goes: the launch chain of one ``decode_attention`` call on the GPU.

    python -m perf.bench_chain [--shapes K3V2:1x4096x128,K4V4:1x4096x128] [--splits 16,32] [--q-heads 32]
                               [--configs ...] [--out DIR]

Per bit pair and shape (Llama-3-8B heads: 32 query / 8 KV unless ``--q-heads``, q_len 1), CUDA-graph replays with L2
cleared before each (``autotune.tune.bench_ms``), SDPA fp16 (GQA) in the same process:
- the floor: a graph of one one-element kernel, timed the same way (graph launch, events, an idle GPU's wake-up);
- the shipped call, and its recorded launches (``attention.launcher``'s decode plan) replayed alone and in subsets
  (each kernel alone, all but the first, all but the last), which bounds what fusing launches can save;
- the timeline of one replay (torch.profiler: each kernel's start and end from the first kernel's start), ours and
  SDPA's;
- the call at other split counts;
each with the store's launch config and with the configs given (``--configs``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F

from autotune.tasks import random_cache
from autotune.tune import bench_ms
from nqkernels import KVCodec, decode_attention, store
from nqkernels.attention import launcher as A
from perf.bench_attention import device_info, log, profiled_replays


def timeline(fn, replays: int = 20) -> list:
    """[(kernel, start µs, end µs)] of one graph replay of ``fn`` (times from its first kernel's start; the median
    replay by span), L2 flushed before each replay (``bench_attention.profiled_replays``)."""
    runs = profiled_replays(fn, replays)
    r = sorted(runs, key=lambda r: max(t[2] for t in r) - r[0][1])[len(runs) // 2]
    return [(n[:60], round(s - r[0][1], 2), round(t - r[0][1], 2)) for n, s, t, _ in r]


def subset(record, keep) -> callable:
    """Replay only the recorded launches at positions ``keep`` (the call's tensors as recorded)."""
    launches = [record._launches[i] for i in keep]

    def run():
        stream = torch.cuda.current_stream().cuda_stream
        for _, runner, ordered, _ in launches:  # LaunchRecord's (direct call, runner, args, swaps)
            runner(*ordered, stream=stream)
    return run


def kernel_name(runner, i: int) -> str:
    """The kernel name behind a recorded launch's runner (a closure over triton's CompiledKernel), else its index."""
    for cell in getattr(runner, "__closure__", None) or ():
        try:
            name = getattr(cell.cell_contents, "name", None)
        except ValueError:
            continue
        if isinstance(name, str):
            return name
    return str(i)


def chain_row(dev, bits, B, T, D, splits, configs, Hq=32, H=8) -> dict:
    torch.manual_seed(0)
    kb, vb = bits
    codec = KVCodec(head_dim=D, key_bits=kb, value_bits=vb)
    cache, x = random_cache(codec, H, B, T, dev)
    q = torch.randn(B, 1, Hq, D, device=dev, dtype=torch.float16)
    qs = q.transpose(1, 2)
    k16 = x[0].expand(B, -1, -1, -1).transpose(1, 2).contiguous()
    v16 = x[1].expand(B, -1, -1, -1).transpose(1, 2).contiguous()
    sdpa = lambda: F.scaled_dot_product_attention(qs, k16, v16, enable_gqa=True)  # noqa: E731
    tiny = torch.zeros(1, device=dev)
    row = dict(bits=f"K{kb}V{vb}", batch=B, context=T, head_dim=D,
               floor_us=bench_ms(lambda: tiny.add_(1)) * 1e3, sdpa_us=bench_ms(sdpa) * 1e3,
               shipped_us=bench_ms(lambda: decode_attention(q, cache)) * 1e3, configs={})
    row["timeline_sdpa"] = timeline(sdpa)
    want = decode_attention(q, cache).float()
    for name, config in configs.items():
        with contextlib.nullcontext() if config is None else store.override("attention", config):
            A._PLANS.clear()
            out = decode_attention(q, cache)  # eager: records the plan
            torch.cuda.synchronize()
            record = next(iter(A._PLANS.values()))
            n = len(record._launches)
            subsets = {f"only_{i}": [i] for i in range(n)}
            if n > 1:
                subsets.update(all_but_first=list(range(1, n)), all_but_last=list(range(n - 1)))
            row["configs"][name] = dict(
                launches=[kernel_name(r[1], i) for i, r in enumerate(record._launches)],
                rel_diff=((out.float() - want).norm() / want.norm()).item(),
                us=bench_ms(lambda: decode_attention(q, cache)) * 1e3,
                splits_us={s: bench_ms(lambda: decode_attention(q, cache, num_splits=s)) * 1e3 for s in splits},
                subsets_us={k: bench_ms(subset(record, v)) * 1e3 for k, v in subsets.items()},
                timeline=timeline(lambda: decode_attention(q, cache)))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="K3V2:1x4096x128,K2V2:1x4096x128,K4V4:1x4096x128,K3V2:1x4096x64,"
                                        "K3V2:1x32768x128")
    ap.add_argument("--splits", default="16,32")
    ap.add_argument("--q-heads", type=int, default=32, help="query heads (8 KV heads): 32 is GQA 4, 16 GQA 2")
    ap.add_argument("--configs", default='{"shipped": null}',
                    help='JSON {name: launch config or null}: each replaces the store\'s config (null: the store\'s), '
                         'e.g. \'{"shipped": null, "32 splits": {"min_pages_per_split": 2}}\'')
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    res = dict(info=device_info(dev), command=" ".join(sys.argv), rows=[])
    log(json.dumps(res["info"]))
    for item in args.shapes.split(","):
        bits, shape = item.split(":")
        B, T, D = (int(v) for v in shape.split("x"))
        row = chain_row(dev, (int(bits[1]), int(bits[3])), B, T, D, [int(s) for s in args.splits.split(",")],
                        json.loads(args.configs), Hq=args.q_heads)
        res["rows"].append(row)
        log(f"{row['bits']} {B}x{T} d{D}: floor {row['floor_us']:.1f} SDPA {row['sdpa_us']:.1f} shipped "
            f"{row['shipped_us']:.1f}  sdpa timeline {json.dumps(row['timeline_sdpa'])}")
        for name, c in row["configs"].items():
            log(f"  {name}: {c['us']:.1f} (x{row['sdpa_us'] / c['us']:.2f}) diff {c['rel_diff']:.1e} splits " +
                " ".join(f"{k}:{v:.1f}" for k, v in c["splits_us"].items()) + f" launches {c['launches']}")
            log("    subsets " + " ".join(f"{k} {v:.1f}" for k, v in c["subsets_us"].items()) +
                "  timeline " + json.dumps(c["timeline"]))
        with open(os.path.join(args.out, "chain.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
