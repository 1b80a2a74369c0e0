"""Instruction budget of the fused Gluon decode pass, counted without a GPU: compile
``attention.gluon._gluon_fused_kernel`` for sm_90 and count the SASS instructions of its page loop (the unmasked one:
pages before the sequence's end) per 16-token unit, whole and with one stage replaced at a time.

    python -m perf.fused_budget [--bits 3,2] [--head-dim 128] [--warps 2] [--maxnreg N]

Rows (a stage replaced by what costs nothing, the rest as shipped; the difference to ``full`` is about what that
stage costs, since each replacement also moves registers and scheduling; with 3-bit keys at head_dim 128, whose
"fields" layout has no parity restore, planes or per-plane masks, the first three rows change the values only):
- ``no parity restore``: the implied index bit of each lattice group taken as stored (``_parity_fold``,
  ``_with_parity``): what storing it explicitly (a format change) would save;
- ``no coset flags``: the coset registers zero (``_coset``);
- ``no field masks``: every A register the whole word (``_regs2``, ``_regs1``): the floor of one mask per register;
- ``no rescale``: the accumulators not rescaled per page (``_rescale_all``): what skipping the rescale when no
  maximum grew saves on the pages where none did;
- ``4-bit fields``: a format what-if for 4-bit keys and values at head_dim 128, the bytes unchanged: each index a
  whole nibble, four per 16-bit half (word 2m + k, half h: nibbles 4k..4k+3 of group 2m + h), the coset flag kept
  in the implied parity bit's place and the parity restored per group before the masks; one product chain per
  stream instead of one per plane (keys: ``_plane_regs``; values: ``_value_products``, their high-plane
  accumulators unused). Other streams as shipped.
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
from nqkernels.attention.gluon import _coset, _mma, _pair_words, _plane_regs, _rescale, _value_products


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


@gluon.jit
def _nibble_pair(w0, w1):
    """(w1 with each group's slot, nibble 7's low bit at bits 12 / 28, set to the parity of the other 7 low bits;
    the coset registers 2c·2^-24 per half): half h of w0 holds nibbles 0-3 of a group, of w1 its nibbles 4-7, whose
    slot stores the coset flag c. The fold xors all 8 low bits: flag ^ parity, so xoring it in swaps them."""
    f = (w0 ^ w1) & 0x11111111
    f = f ^ (f >> 8)
    f = f ^ (f >> 4)
    return w1 ^ ((f << 12) & 0x10001000), (w1 >> 11) & 0x00020002


@gluon.jit
def _nibbles(w):
    """Registers of a word of 4-bit fields: j = 0..3 holds nibble j of each half, times 16^(j % 2)."""
    x = w >> 8
    return (w & 0x000F000F, w & 0x00F000F0, x & 0x000F000F, x & 0x00F000F0)


@gluon.jit
def _nibble_set(w):
    """(coset registers, registers) of four words of 4-bit fields, pairs (w[0], w[1]) and (w[2], w[3]) as
    ``_nibble_pair`` takes them."""
    cs = ()
    regs = ()
    for i in gl.static_range(2):
        w1, f = _nibble_pair(w[2 * i], w[2 * i + 1])
        cs = cs + (f,)
        regs = regs + _nibbles(w[2 * i]) + _nibbles(w1)
    return cs, regs


@gluon.jit
def _nibble_key_regs(lo, hi, c, D: gl.constexpr, KBITS: gl.constexpr):
    """``_plane_regs`` with 4-bit keys at head_dim 128 as nibble fields (the thread's 4 words, as many as today's
    2 low + 2 high): one register set, no high plane."""
    if KBITS == 4 and D == 128:
        cs, lr = _nibble_set((lo[0], lo[1], hi[0], hi[1]))
        hr = ()
    else:
        cs, lr, hr = _plane_regs(lo, hi, c, D, KBITS)
    return cs, lr, hr


@gluon.jit
def _nibble_value_products(words, b0, b1, acc_lo, acc_hi, acc_c, sel_lo, sel_hi, zero_i, D: gl.constexpr,
                           VBITS: gl.constexpr):
    """``_value_products`` with 4-bit values at head_dim 128 as nibble fields (the thread's 2 words per token, as
    many as today's low + high): pair words of tokens (2c, 2c + 1) and (2c + 8, 2c + 9), one product chain into
    ``acc_lo``; ``acc_hi`` left as it is."""
    if VBITS == 4 and D == 128:
        pa = _pair_words(words[0][0], words[1][0], sel_lo, 32, 1) + _pair_words(words[0][1], words[1][1], sel_hi,
                                                                                32, 1)
        pb = _pair_words(words[2][0], words[3][0], sel_lo, 32, 1) + _pair_words(words[2][1], words[3][1], sel_hi,
                                                                                32, 1)
        ca, ra = _nibble_set((pa[0], pa[2], pa[1], pa[3]))  # group 2g + i: nibbles 0-3 in pa[i], 4-7 in pa[2 + i]
        cb, rb = _nibble_set((pb[0], pb[2], pb[1], pb[3]))
        nacc = ()
        for t in gl.static_range(D // 16):
            a = acc_lo[t]
            nacc = nacc + (_mma(ra[2 * t], ra[2 * t + 1], rb[2 * t], rb[2 * t + 1], b0, b1, a[0], a[1], a[2],
                                a[3]),)
        a = acc_c[0]
        out = nacc, acc_hi, (_mma(ca[0], ca[1], cb[0], cb[1], b0, b1, a[0], a[1], a[2], a[3]),)
    else:
        out = _value_products(words, b0, b1, acc_lo, acc_hi, acc_c, sel_lo, sel_hi, zero_i, D, VBITS)
    return out


@gluon.jit
def _rescale_but_high(acc_lo, acc_hi, acc_c, l0, l1, ls0, ls1, a0, a1):
    """``_rescale_all`` without the values' high-plane accumulators (unused with 4-bit value fields)."""
    return (_rescale(acc_lo, a0, a1), acc_hi, _rescale(acc_c, a0, a1), l0 * a0, l1 * a1, ls0 * a0, ls1 * a1)


# The stand-ins of each variant: attention.gluon's function name -> a Gluon function of the same signature.
STAND_INS = {"full": {}, "no parity restore": {"_parity_fold": _no_parity_fold, "_with_parity": _no_parity},
             "no coset flags": {"_coset": _no_coset}, "no field masks": {"_regs2": _whole_words2,
                                                                         "_regs1": _whole_words1},
             "no rescale": {"_rescale_all": _no_rescale},
             "4-bit fields": {"_plane_regs": _nibble_key_regs, "_value_products": _nibble_value_products,
                              "_rescale_all": _rescale_but_high}}


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
                sm_scale="fp32", softcap="fp32")
    fn = G._gluon_fused_kernel
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in inspect.signature(fn.fn).parameters}
    swap = dict(STAND_INS[variant])
    if variant == "4-bit fields" and (vb != 4 or head_dim != 128):
        del swap["_rescale_all"]  # the values' high-plane accumulators stay in use
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
