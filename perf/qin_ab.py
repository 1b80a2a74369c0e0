"""A/B of the fused pass's query operand: made by the prep kernel (``kernels._query_prep_kernel``, one launch before
the pass) against made by the pass itself from q (``gluon_query_in_pass``; head_dim 128, no prep), each on top of
the store's config for the shape (where that config takes the fused pass). Whole decode calls (CUDA-graph replays,
L2 cleared), SDPA fp16 in the same process; outputs compared (relative difference of the two).

    python -m perf.qin_ab [--shapes BxTxKxV[xD][:recent],...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from autotune.tasks import random_cache
from autotune.tune import bench_ms
from nqkernels import KVCodec, decode_attention, runtime, store
from nqkernels.attention import launcher as A
from perf.bench_attention import device_info
from perf.gluon_ab import parse_shapes

SHAPES = ("8x32768x3x2,1x131072x3x2,1x32768x3x2,16x8192x3x2,4x32768x3x2,8x32768x2x2,1x131072x2x2,8x32768x4x4,"
          "1x131072x4x4,8x4096x4x4,4x8192x4x4,8x32768x3x3,1x131072x3x3,8x32768x4x2,32x32768x3x2")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m perf.qin_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="BxTxKxV[xD][:recent tokens kept in fp16], ...")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    for spec in args.shapes.split(","):
        shape, _, recent = spec.partition(":")
        (B, T, kb, vb, D), = parse_shapes(shape)
        recent = int(recent) if recent else None
        torch.manual_seed(0)
        cache, x = random_cache(KVCodec(head_dim=D, key_bits=kb, value_bits=vb), 8, B, T, dev, recent=recent)
        q = torch.randn(B, 1, 32, D, device=dev, dtype=torch.float16)
        qs = q.transpose(1, 2)
        k16 = x[0].expand(B, -1, -1, -1).transpose(1, 2).contiguous()
        v16 = x[1].expand(B, -1, -1, -1).transpose(1, 2).contiguous()
        sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qs, k16, v16, enable_gqa=True)) * 1e3
        del k16, v16
        cfg = runtime.launch_config("attention", A.attention_buckets(D, kb, vb, 4, B, T), dev).as_dict()
        us, outs = {}, {}
        for rep in range(3):  # alternated, the fastest kept
            for name, qin in (("prep", False), ("in_pass", True)):
                with store.override("attention", dict(cfg, gluon_query_in_pass=qin)):
                    A._PLANS.clear()
                    if rep == 0:
                        outs[name] = decode_attention(q, cache).float()
                    t = bench_ms(lambda: decode_attention(q, cache)) * 1e3
                    us[name] = min(us.get(name, t), t)
        A._PLANS.clear()
        diff = ((outs["prep"] - outs["in_pass"]).norm() / outs["prep"].norm()).item()
        rows.append(dict(B=B, T=T, D=D, bits=f"K{kb}V{vb}", recent=recent, sdpa_us=sdpa, us=us, rel_diff=diff))
        print(f"K{kb}V{vb} {B}x{T} D{D} recent {recent}: SDPA {sdpa:.1f} us; prep {us['prep']:.1f} "
              f"({sdpa / us['prep']:.2f}x), in the pass {us['in_pass']:.1f} ({sdpa / us['in_pass']:.2f}x); "
              f"rel. diff {diff:.1e}", flush=True)
        with open(os.path.join(args.out, "qin_ab.json"), "w") as f:
            json.dump(dict(info=device_info(dev), rows=rows), f, indent=1)
        del cache


if __name__ == "__main__":
    main()
