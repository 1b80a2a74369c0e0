"""Latency/throughput tables: ``python -m perf.sweep [--quick] [--json]``.

On a GPU this runs the encode benchmark (perf.bench_encode: bit-exactness, copy ceiling, encode GB/s, prior
art). Without a GPU it runs a reduced sweep through the Triton interpreter: the kernels execute and are checked
against the reference, but CPU timings mean nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def cpu_sweep(as_json: bool):
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from nqkernels import KVCodec, RopeSpec, decode_kv, encode_kv

    print("No GPU: reduced sweep through the Triton interpreter. These timings say nothing about GPU speed.",
          file=sys.stderr)
    rows = []
    for d in (64, 96, 128, 256):
        for kb, vb in ((4, 4), (3, 2), (2, 2)):
            codec = KVCodec(head_dim=d, key_bits=kb, value_bits=vb, rope=RopeSpec(theta=10000.0))
            k, v = torch.randn(1, 2, 64, d), torch.randn(1, 2, 64, d)
            t0 = time.perf_counter()
            ek, ev = encode_kv(k, codec, "key"), encode_kv(v, codec, "value")
            dt = time.perf_counter() - t0
            err = max(((decode_kv(e, codec, kind, dtype=torch.float32) - x) ** 2).mean().item() / (x ** 2).mean().item()
                      for e, x, kind in ((ek, k, "key"), (ev, v, "value")))
            hot = sum(t.nbytes for e in (ek, ev) for t in e[:2]) / (2 * 64)
            rows.append(dict(head_dim=d, setting=f"K{kb}V{vb}", bytes_per_token_head=hot,
                             ratio_vs_fp16=4 * d / hot, worst_nmse=err, interpreter_s=dt))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print("| head_dim | setting | HOT bytes/token/head (K+V) | vs fp16 | worst NMSE | interpreter time (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head_dim']} | {r['setting']} | {r['bytes_per_token_head']:.0f} | {r['ratio_vs_fp16']:.2f}x | "
              f"{r['worst_nmse']:.4f} | {r['interpreter_s']:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", action="store_true", help="JSON instead of a markdown table (CPU sweep)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        return cpu_sweep(args.json)
    from perf import bench_encode

    sys.argv = [sys.argv[0]] + (["--quick"] if args.quick else [])
    return bench_encode.main()


if __name__ == "__main__":
    sys.exit(main())
