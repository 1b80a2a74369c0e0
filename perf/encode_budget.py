"""Instruction budget of the encode kernel, counted without a GPU: compile ``codec._encode_kernel`` for sm_90 (the
H100) and count the SASS instructions of its persistent loop per coordinate, whole and with stages replaced.

    python -m perf.encode_budget [--block-t 128] [--warps 8]

Rows (K3 keys, head_dim 128, RoPE undo + centering, the shipped 128 tokens x 8 warps):
- ``full``: the shipped kernel;
- ``scalar search``: the E8 nearest point replaced by a clamped scalar rounding;
- ``+ no transform``: also the exact Hadamard transform replaced by a pass-through;
- ``+ no RoPE undo``: also without RoPE.
The differences approximate what each stage costs. Replacing a stage also changes the register layout that the
next stages get, so the split is approximate. Under triton 3.6 (the GPU machine's version) the rows fall
monotonically. Under triton 3.9 the replaced variants compile to larger loops than the full kernel, because the
layout changes.

Counts are static (each instruction of the loop once). Nsight Compute measured 118 executed instructions per
coordinate for the full kernel (perf/results/encode_h100.md).

Needs a triton with the NVIDIA backend's tools (ptxas, nvdisasm, cuobjdump), as pip ships it. No GPU is needed.
"""
from __future__ import annotations

import argparse
import inspect
import subprocess
import sys

import triton
import triton.language as tl

from autotune.sass import disassemble, loop_body
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nqkernels import codec as C


@triton.jit
def _scalar_nearest(t, BT: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr):
    # Stands in for lattice.e8_nearest: round each coordinate to its own codebook level.
    r = tl.minimum(tl.maximum(tl.floor(t + (1 << (BITS - 1))), 0.0), (1 << BITS) - 1)
    return r.to(tl.int32), r - (1 << (BITS - 1)) + 0.5


@triton.jit
def _pass_through(x_int, tm, BT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    # Stands in for lattice.integer_transform.
    return x_int


def loop_size(sass: str) -> int:
    """Instructions of the largest backward branch's body (the persistent tile loop)."""
    return len(loop_body(sass))


def count(block_t: int, warps: int, search: bool, transform: bool, rope: bool) -> tuple[float, int]:
    """(SASS instructions per coordinate in the loop, registers) of K3 key encode at head_dim 128."""
    saved = C.e8_nearest, C.integer_transform
    if not search:
        C.e8_nearest = _scalar_nearest
    if not transform:
        C.integer_transform = _pass_through
    try:
        fn = C._encode_kernel
        consts = dict(D=128, DP=128, BITS=3, ALPHA=1.0, SQRT_N=1.0, DN=128.0, FIX_BITS=11, FIT=2,
                      ROPE_HALF=64 if rope else 0, CENTER=True, DEST=False, BLOCK_T=block_t)
        ptrs = dict(x_ptr="*fp16", codes_ptr="*i32", scales_ptr="*fp16", cos_ptr="*fp32", sin_ptr="*fp32",
                    pos_ptr="*i32", mean_ptr="*fp32", dest_ptr="*i32")
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in inspect.signature(fn.fn).parameters}
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps))
    finally:
        C.e8_nearest, C.integer_transform = saved
    sass, regs = disassemble(k.asm["cubin"])
    return loop_size(sass) * 32 * warps / (block_t * 128), regs


VARIANTS = {"full": (True, True, True), "scalar search": (False, True, True),
            "+ no transform": (False, False, True), "+ no RoPE undo": (False, False, False)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-t", type=int, default=128)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--variant", choices=VARIANTS, help="count this one only (each is compiled in a process of its "
                    "own: triton keeps a kernel's dependency hash for the life of the process)")
    args = ap.parse_args()
    if args.variant:
        per, regs = count(args.block_t, args.warps, *VARIANTS[args.variant])
        print(f"| {args.variant} | {per:.1f} | {regs} |", flush=True)
        return 0
    print(f"triton {triton.__version__}, sm_90, K3 keys, head_dim 128, {args.block_t} tokens x {args.warps} warps")
    print("| variant | SASS instructions per coordinate (loop, static) | registers |\n|---|---|---|", flush=True)
    for name in VARIANTS:
        subprocess.run([sys.executable, "-m", "perf.encode_budget", "--block-t", str(args.block_t), "--warps",
                        str(args.warps), "--variant", name], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
