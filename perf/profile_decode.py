r"""Three eager ``decode_attention`` calls on one shape, for a profiler to attach to (Nsight Compute reads the third):

    ncu --clock-control none --kernel-name regex:gluon_fused --launch-skip 2 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats --section SourceCounters --print-details all \
        --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
        python -m perf.profile_decode --shape 8x32768x3x2 --fused
    P=avg.pct_of_peak_sustained_active
    M=sm__inst_executed_pipe_alu.$P,sm__inst_executed_pipe_fma.$P,sm__inst_executed_pipe_fmaheavy.$P
    M=$M,sm__pipe_alu_cycles_active.$P,sm__pipe_fma_cycles_active.$P,sm__pipe_tensor_cycles_active.$P
    M=$M,sm__inst_executed_pipe_lsu.$P,sm__inst_executed_pipe_xu.$P
    ncu --clock-control none --kernel-name regex:gluon_fused --launch-skip 2 --launch-count 1 \
        --section ComputeWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section Occupancy \
        --section SpeedOfLight --metrics "$M" python -m perf.profile_decode --shape 8x32768x3x2 --fused

Shape BxTxKxV[xD]: batch, context, key bits, value bits, head_dim (128 by default); Llama-3-8B heads (32 query, 8
KV), random keys and values (``autotune.tasks.random_cache``), the store's launch config for this GPU, ``--fused``
forcing the fused Gluon pass on top of it, ``--config`` setting fields on top of that.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from nqkernels import decode_attention, store
from nqkernels.attention import launcher as A
from perf.gluon_ab import decode_case, parse_shapes


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.profile_decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8x32768x3x2", help="BxTxKxV[xD] (default 8x32768x3x2)")
    ap.add_argument("--fused", action="store_true", help="force the fused Gluon pass on top of the store's config")
    ap.add_argument("--config", default="{}",
                    help="JSON fields on top of the config (as '{\"gluon_query_in_pass\": true}')")
    args = ap.parse_args()
    if "," in args.shape:
        sys.exit(f"--shape: one shape, got {args.shape!r}")
    (shape,) = parse_shapes(args.shape, "--shape")
    if not torch.cuda.is_available():
        sys.exit("perf.profile_decode needs a CUDA GPU")
    cache, _, q, cfg = decode_case(torch.device("cuda"), *shape)
    B, T, kb, vb, D = shape
    # --fused is a preference the launcher drops where the pass cannot run: say so rather than profile nothing
    fast = A._gluon(q)
    if args.fused and (fast is None or not fast.supports_fused(D, kb, vb, cache.codec.page_size, 32 // 8)):
        sys.exit(f"--fused: the fused Gluon pass does not run at {args.shape} here (gluon.supports_fused)")
    cfg = dict(cfg, gluon_fused=True, min_tokens=0) if args.fused else cfg
    cfg = dict(cfg, **json.loads(args.config))
    print("config", cfg, flush=True)
    with store.override("attention", cfg):
        for _ in range(3):
            A._PLANS.clear()  # a fresh plan per call: the profiler sees the launches as decode_attention makes them
            decode_attention(q, cache)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
