"""Instruction budget of the fused Gluon decode pass, counted without a GPU: compile
``attention.gluon._gluon_fused_kernel`` for sm_90 and count the SASS instructions of its page loop (the unmasked one:
pages before the sequence's end) per 16-token unit, whole and with one stage replaced at a time.

    python -m perf.fused_budget [--bits 3,2] [--head-dim 128] [--warps 2] [--maxnreg N]

Rows (a stage replaced by what costs nothing, the rest as shipped; the difference to ``full`` is about what that
stage costs, since each replacement also moves registers and scheduling; with 3-bit keys at head_dim 128, whose
"fields" layout has no parity restore, planes or per-plane masks, the first three rows change the values only, and
4-bit keys and values there, whose fields restore the parity with ``_nibble_pair``, they change neither):
- ``no parity restore``: the implied index bit of each lattice group taken as stored (``_parity_fold``,
  ``_with_parity``): what storing it explicitly (a format change) would save;
- ``no coset flags``: the coset registers zero (``_coset``);
- ``no field masks``: every A register the whole word (``_regs2``, ``_regs1``): the floor of one mask per register;
- ``no rescale``: the accumulators not rescaled per page (``_rescale_all``): what skipping the rescale when no
  maximum grew saves on the pages where none did.
Static counts (each instruction of the loop once; the loop runs once per page). Registers: ``cuobjdump -res-usage``;
local loads/stores: spills anywhere in the kernel.

Needs a triton with Gluon and the NVIDIA backend's tools (ptxas, nvdisasm, cuobjdump), as pip ships it. No GPU is
needed.
"""
from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from autotune.sass import disassemble, loop_bodies


@gluon.jit
def _no_parity_fold(w0, w1):
    return w0 * 0


@gluon.jit
def _no_parity(w, f):
    return w


@gluon.jit
def _no_coset(w):
    return w * 0


@gluon.jit
def _whole_words2(w):
    return (w, w, w, w, w, w, w, w)


@gluon.jit
def _whole_words1(w, N: gl.constexpr):
    r = (w, w, w, w, w, w, w, w)
    if N == 16:
        r = r + r
    return r


@gluon.jit
def _no_rescale(acc_lo, acc_hi, acc_c, l0, l1, ls0, ls1, a0, a1):
    return acc_lo, acc_hi, acc_c, l0, l1, ls0, ls1


# The stand-ins of each variant: attention.gluon's function name -> a Gluon function of the same signature.
STAND_INS = {"full": {}, "no parity restore": {"_parity_fold": _no_parity_fold, "_with_parity": _no_parity},
             "no coset flags": {"_coset": _no_coset}, "no field masks": {"_regs2": _whole_words2,
                                                                         "_regs1": _whole_words1},
             "no rescale": {"_rescale_all": _no_rescale}}


VARIANTS = tuple(STAND_INS)


def count(variant: str, head_dim: int, bits: tuple, warps: int, maxnreg: int = 0) -> tuple[float, int, int, int]:
    """(SASS instructions per 16-token unit in the unmasked page loop, HMMA per unit, registers, local-memory
    instructions in the kernel) of one variant; ``maxnreg``: a register cap handed to ptxas (0: none)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from nqkernels.attention import gluon as G

    kb, vb = bits
    nw = G.fused_warps(warps, head_dim, kb, 64)
    consts = G.fused_constants(head_dim=head_dim, key_bits=kb, value_bits=vb, page_size=64, q_len=1, group=4,
                               block_m=16, rs=4, num_warps=nw, l2_prefetch=2)
    ptrs = dict(kc_ptr="*i32", ks_ptr="*fp16", vc_ptr="*i32", vs_ptr="*fp16", bt_ptr="*i32", lens_ptr="*i32",
                qt_ptr="*fp16", fidx_ptr="*i32", qm_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32",
                q_ptr="*fp16", kmean_ptr="*fp32", sm_scale="fp32", softcap="fp32")
    fn = G._gluon_fused_kernel
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in inspect.signature(fn.fn).parameters}
    swap = STAND_INS[variant]
    missing = [n for n in swap if not hasattr(G, n)]
    if missing:  # a renamed stage would otherwise be measured as "full"
        raise RuntimeError(f"variant {variant!r}: attention.gluon has no {missing} to replace")
    saved = {n: getattr(G, n) for n in swap}
    for n, f in swap.items():
        setattr(G, n, f)
    try:
        k = triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=nw, **({"maxnreg": maxnreg} if maxnreg else {})))
    finally:
        for n, f in saved.items():
            setattr(G, n, f)
    sass, regs = disassemble(k.asm["cubin"])
    body = loop_bodies(sass)[0]  # the pages before the end (the masked last page's loop follows)
    units = 64 // 16 // nw
    hmma = sum(1 for t in body if "HMMA" in t)
    local = len(re.findall(r"\b(LDL|STL)\b", sass))
    return len(body) / units, hmma // units, regs, local


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.fused_budget", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", default="3,2", help="key bits, value bits (default 3,2)")
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128, 256))
    ap.add_argument("--warps", type=int, default=2, help="warps per program (raised as the launcher does)")
    ap.add_argument("--maxnreg", type=int, default=0, help="register cap handed to ptxas (default none)")
    ap.add_argument("--variant", choices=VARIANTS, help="count this one only (each is compiled in a process of its "
                    "own: triton keeps a kernel's dependency hash for the life of the process)")
    args = ap.parse_args()
    try:
        bits = tuple(int(b) for b in args.bits.split(","))
        assert len(bits) == 2 and all(b in (2, 3, 4) for b in bits)
    except (ValueError, AssertionError):
        sys.exit(f"--bits must be two of 2/3/4, as 3,2; got {args.bits!r}")
    if args.variant:
        try:
            per, hmma, regs, local = count(args.variant, args.head_dim, bits, args.warps, args.maxnreg)
        except ValueError as e:
            sys.exit(f"--variant: {e}")
        print(f"| {args.variant} | {per:.1f} | {hmma} | {regs} | {local} |", flush=True)
        return 0
    print(f"triton {triton.__version__}, sm_90, K{bits[0]}V{bits[1]}, head_dim {args.head_dim}, GQA 4, q_len 1, "
          f"{args.warps} warps asked" + (f", maxnreg {args.maxnreg}" if args.maxnreg else ""))
    print("| variant | SASS instructions per 16-token unit (unmasked page loop, static) | HMMA per unit | registers | "
          "local loads/stores (spills) |\n|---|---|---|---|---|", flush=True)
    for name in VARIANTS:
        run = subprocess.run([sys.executable, "-m", "perf.fused_budget", "--bits", args.bits, "--head-dim",
                              str(args.head_dim), "--warps", str(args.warps), "--maxnreg", str(args.maxnreg),
                              "--variant", name],
                             capture_output=True, text=True)
        if run.returncode:
            sys.exit(f"variant {name!r} failed:\n{run.stderr[-3000:]}")
        print(run.stdout.strip(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
