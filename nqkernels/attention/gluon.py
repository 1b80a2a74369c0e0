"""Gluon fast path (NVIDIA, capability >= 9), in today's HOT format: the keys and values passes of the two-pass decode,
and both fused into one pass (``_gluon_fused_kernel``, section "fused pass" below).

``_gluon_keys_kernel`` writes exactly what ``kernels._attn_keys_kernel`` writes (the fp32 logits workspace
``lg[program, token, row]`` in log2 units, masked keys -inf, and each split's max per row), so the portable
``_attn_values_kernel`` and ``_attn_reduce_kernel`` complete the attention unchanged. GPU only (Gluon has no CPU
interpreter); ``launcher.decode_attention`` imports this module lazily and only where it can run, and the portable
kernel stays the fallback and the reference.

Shape of the computation: warps work on their own 16-token units, with no shared memory and no cross-warp
exchange but the split's final max. A unit's logitsᵀ [16 tokens × 8 query rows] are ``mma.sync.m16n8k16`` products
(inline PTX) with the decoded key codes as A and the query as B: the query rows of a GQA group (q_len · group ≤ 8)
fill N = 8. A thread (lane 4g + c) holds tokens g and g + 8 of the unit and loads, of each, the code words whose
fields are its own A-fragment elements (columns 2c, 2c + 1, 2c + 8, 2c + 9 of every k-tile): one mask of a word
yields one A register, two fp16 subnormals (field · 2^k · 2^-24, as ``lattice.plane_pairs``), so the words go from
the load to the tensor core with one LOP3 per register and never leave the thread.

Register order (per thread c, per token; ``fragment_elements`` / ``fragment_index`` are the host-side map,
``tests/test_attention_gluon.py`` checks it against the reference by a pure-torch emulation of the fragments):
  * coset registers: low-plane word c·D/64 + k → 2c·2^-24 for the coset flag c of each of its two groups (the
    varying part of the group constant e = 2c - (2^(b+1) - 1), ``lattice.coset_pairs``), padded with zeros to an
    even count;
  * low plane: word c·D/64 + k // 8 with its parity restored, register k % 8 = j holds field j of each 16-bit half
    (coordinates 16w + j and 16w + 8 + j, times 4^(j % 4));
  * high plane, 3 bits: bit j of each half of word c·D/128 + k // 16 (head_dim 64: the byte j // 8 = c % 2 of word
    c // 2), times 2^(j % 8); 4 bits: as the low plane.
  * 3-bit keys at head_dim 128 in the "fields" layout (the fused pass; docs/format.md): register j holds the whole
    indices of low-plane register j's coordinate pair, one mask of word 2c, 2c + 1, 8 + c or 12 (``_fields_regs``,
    times 2^(3·(j mod 5) mod 9), which ``_fields_query`` divides out of the query), the coset flags from bit 15 of the
    halves of words 2c, 2c + 1; no high plane.
  * 4-bit keys at head_dim 128 in the "fields" layout: words 4c .. 4c + 3 are the nibble words of low-plane words
    2c, 2c + 1; register j holds the whole indices of low-plane register j's coordinate pair, one mask per register
    (times 16^(j % 2), ``_fields_query``), each group's eighth index made whole and its coset flag taken from it
    (``_nibble_pair``, ``_nibble_regs``); no high plane. 4-bit values likewise (``_nibble_value_products``): one
    product chain, no high-plane accumulators.
Register 2t and 2t + 1 of a plane are the a0/a2 (token g) and a1/a3 (token g + 8) of k-tile t. The B fragment of
lane (g', c) is the prep's query operand (``kernels._query_prep_kernel``, pair order, unchanged) gathered to the
elements of thread c's registers, column g': each program gathers its fragments once, through a cached index table
(``fragment_index``); at head_dim 128 the fused pass can make the same fragments from q itself
(``_query_in_pass``, ``gluon_query_in_pass``: no prep kernel). The coset registers hold 2c only; the constant part
of the group constants is the low chain's start value (``_coset_const``), and the parity is restored for two words at once (``_parity_fold``).

Loads: a page ahead into registers (``prefetch``), and optionally a bulk L2 prefetch further ahead (``l2_prefetch``):
ptxas schedules the register prefetch late in the loop body, so without it the loads have less than an iteration to
arrive. perf/results/attention_h200.md has the measurements and the SASS counts.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from .. import reference as ref
from ..config import code_layout, code_words
from ..launch import launcher

LOG2E = gl.constexpr(1.4426950408889634)
SUBNORMAL_UNIT = gl.constexpr(16777216.0)  # 2^24
HEAD_DIMS = (64, 128, 256)  # head_dim 96 (Helmert, padded to 128) stays on the portable kernel
MAX_ROWS = 8  # the N of one m16n8k16 product: q_len · group


@gluon.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """One m16n8k16 f16 × f16 → f32 product per warp, each tensor one fragment register per thread."""
    return gl.inline_asm_elementwise(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};",
        "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
        dtype=(gl.float32, gl.float32, gl.float32, gl.float32), is_pure=True, pack=1)


@gluon.jit
def _shfl_max(x, MASK: gl.constexpr):
    y = gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, " + MASK + ", 31, -1;", "=f,f", [x],
                                  dtype=gl.float32, is_pure=True, pack=1)
    return gl.maximum(x, y)


@gluon.jit
def _parity_fold(w0, w1):
    """The implied index bit of each group of two low-plane words at once (``lattice.restore_parity``): the low bits
    of fields 0..6 of w0 on the even bits, of w1 on the odd ones, xor-folded upwards, so bit 14 (30) is the parity
    of w0's low (high) half and bit 15 (31) that of w1's."""
    f = (w0 & 0x15551555) | ((w1 & 0x15551555) << 1)
    f = f ^ (f << 8)
    f = f ^ (f << 4)
    return f ^ (f << 2)


@gluon.jit
def _with_parity(w, f):
    """w with bit 14 (30), where the coset flag is stored, replaced by f's."""
    return (w & -0x40004001) | (f & 0x40004000)


@gluon.jit
def _coset(w):
    """The coset flags of a low-plane word (before the parity restore) as 2c·2^-24 per half. The group constant is
    e = 2c - (2^(b+1) - 1) (``lattice.coset_pairs``); its constant part is the accumulator's start value
    (``_coset_const``)."""
    return (w >> 13) & 0x00020002


@gluon.jit
def _coset_const(QF, zero, zero_i, D: gl.constexpr, KBITS: gl.constexpr):
    """The logits' part that does not depend on the codes, -(2^(b+1) - 1)·Σ_group (query coset coefficient): the
    coset tiles with every A element -(2^(b+1) - 1)·2^-24 (equal in every row)."""
    M: gl.constexpr = (1 << (KBITS + 1)) - 1
    SIGNED_M: gl.constexpr = (0x8000 | M) * 0x10001 - (1 << 32)
    k = zero_i + SIGNED_M
    a0, a1, a2, a3 = zero, zero, zero, zero
    for t in gl.static_range(max(2, D // 64) // 2):
        k2 = k
        if 2 * t + 1 >= D // 64:
            k2 = zero_i  # padding register
        a0, a1, a2, a3 = _mma(k, k, k2, k2, QF[2 * t], QF[2 * t + 1], a0, a1, a2, a3)
    return a0, a1, a2, a3


@gluon.jit
def _regs2(w):
    """Registers of a word of 2-bit fields: j = 0..7 holds field j of each half, times 4^(j % 4)."""
    x = w >> 8
    return (w & 0x00030003, w & 0x000C000C, w & 0x00300030, w & 0x00C000C0,
            x & 0x00030003, x & 0x000C000C, x & 0x00300030, x & 0x00C000C0)


@gluon.jit
def _regs1(w, N: gl.constexpr):
    """Registers of a word of 1-bit fields: j = 0..N-1 holds bit j of each half, times 2^(j % 8)."""
    x = w >> 8
    r = (w & 0x00010001, w & 0x00020002, w & 0x00040004, w & 0x00080008,
         w & 0x00100010, w & 0x00200020, w & 0x00400040, w & 0x00800080)
    if N == 16:
        r = r + (x & 0x00010001, x & 0x00020002, x & 0x00040004, x & 0x00080008,
                 x & 0x00100010, x & 0x00200020, x & 0x00400040, x & 0x00800080)
    return r


@gluon.jit
def _ld(ptr, N: gl.constexpr, VEC: gl.constexpr):
    """N consecutive words from ``ptr`` (a tuple): one ``ld.global.nc.v2/v4`` where VEC (the launcher checked the
    alignment; the codes are read-only while the kernel runs), else word by word."""
    if N == 1:
        return (gl.load(ptr),)
    elif VEC and N == 2:
        return gl.inline_asm_elementwise("ld.global.nc.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [ptr],
                                         dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
    elif VEC and N == 4:
        return gl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [ptr],
                                         dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1)
    else:
        w = ()
        for i in gl.static_range(N):
            w = w + (gl.load(ptr + i),)
        return w


@gluon.jit
def _token_words(lo_ptr, hi_ptr, D: gl.constexpr, KBITS: gl.constexpr, VEC: gl.constexpr):
    """The code words of one token that a thread decodes (``_word_offsets``): its low-plane words, then its
    high-plane words (tuples)."""
    lo = _ld(lo_ptr, D // 64, VEC)
    hi = ()
    if KBITS > 2:
        hi = _ld(hi_ptr, max(1, D * (KBITS - 2) // 128), VEC)
    return lo, hi


@gluon.jit
def _word_offsets(t, c, D: gl.constexpr, KBITS: gl.constexpr, W: gl.constexpr, FIELDS: gl.constexpr):
    """Offsets (words, from the page's first word) of the first low-plane and high-plane word that thread column c
    decodes of page token t: low words c·D/64 .., high words c·D/128 .. (3 bits; head_dim 64: word c // 2), c·D/64 ..
    (4 bits). The "fields" layout at 4 bits: words 4c, 4c + 1 and 4c + 2, 4c + 3 (head_dim 128)."""
    hw: gl.constexpr = D * (KBITS - 2) // 128
    lo = t * W + c * (D // 64)
    if FIELDS and KBITS == 4:
        lo = t * W + 4 * c
        hi = lo + 2
    elif hw >= 1:
        hi = t * W + D // 16 + c * hw
    else:
        hi = t * W + D // 16 + (c >> 1)
    return lo, hi


@gluon.jit
def _token_regs(lo, hi, c, D: gl.constexpr, KBITS: gl.constexpr, FIELDS: gl.constexpr):
    """A registers of one token: (coset registers, padded to >= 2; low plane; high plane). Keys in the "fields"
    layout give no high plane: at 3 bits they carry two high words (``_page_units``), at 4 bits the thread's four
    nibble words are ``lo`` and ``hi`` (``_word_offsets``)."""
    if FIELDS and KBITS == 3:
        cs, lr, hr = _fields_regs(lo, hi, c)
    elif FIELDS:
        cs, lr, hr = _nibble_regs(lo, hi)
    else:
        cs, lr, hr = _plane_regs(lo, hi, c, D, KBITS)
    return cs, lr, hr


@gluon.jit
def _plane_regs(lo, hi, c, D: gl.constexpr, KBITS: gl.constexpr):
    cs = ()
    lr = ()
    for i in gl.static_range(D // 128 if D >= 128 else 1):  # pairs of low-plane words
        if D >= 128:
            f = _parity_fold(lo[2 * i], lo[2 * i + 1])
            cs = cs + (_coset(lo[2 * i]), _coset(lo[2 * i + 1]))
            lr = lr + _regs2(_with_parity(lo[2 * i], f)) + _regs2(_with_parity(lo[2 * i + 1], f >> 1))
        else:
            f = _parity_fold(lo[0], gl.zeros_like(lo[0]))
            cs = (_coset(lo[0]), gl.zeros_like(lo[0]))
            lr = _regs2(_with_parity(lo[0], f))
    hr = ()
    if KBITS == 3:
        if D >= 128:
            for i in gl.static_range(D // 128):
                hr = hr + _regs1(hi[i], 16)
        else:
            hr = _regs1(hi[0] >> ((c & 1) * 8), 8)
    elif KBITS == 4:
        for i in gl.static_range(D // 64):
            hr = hr + _regs2(hi[i])
    return cs, lr, hr


@gluon.jit
def _fields_regs(lo, hi, c):
    """A thread's key registers of one token in the "fields" layout (docs/format.md, "Codes"; 13 words at head_dim
    128): register j holds the coordinate pair of the planes' low-plane register j, its whole 3-bit index at bits
    3·(j mod 5) of words lo[0] = 2c, lo[1] = 2c + 1, hi[0] = 8 + c (fields 3, 4 after a shift by 9), register 15 at
    bits 3c of the shared word hi[1] = 12: one mask per register, times 2^(3·(j mod 5) mod 9) (``_fields_query``
    divides the query by it). The coset flags at bit 15 of each half of lo[0], lo[1]. No high plane."""
    lr = ()
    words = (lo[0], lo[1], hi[0])
    for i in gl.static_range(3):
        w = words[i]
        x = w >> 9
        lr = lr + (w & 0x00070007, w & 0x00380038, w & 0x01C001C0, x & 0x00070007, x & 0x00380038)
    lr = lr + ((hi[1] >> (3 * c)) & 0x00070007,)
    return ((lo[0] >> 14) & 0x00020002, (lo[1] >> 14) & 0x00020002), lr, ()


@gluon.jit
def _nibble_pair(w0, w1):
    """(w1 with each group's eighth index whole, the coset registers 2c·2^-24 per half) of two words of 4-bit fields
    whose half h holds nibbles 0-3 (w0) and 4-7 (w1) of one lattice group: the coset flag c is stored in nibble 7's
    low bit (bit 12 + 16h, the implied parity bit's place). The xor of the group's 8 low bits is flag ^ parity, so
    xoring it into that bit puts the parity there."""
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
def _nibble_regs(lo, hi):
    """A thread's key registers of one token in the "fields" layout at 4 bits (docs/format.md, "Codes"): column c's
    words 4c .. 4c + 3 (``lo``, ``hi``) are nibble words 2m, 2m + 1 of its low-plane words m = 2c, 2c + 1, so register
    j holds the coordinate pair of the planes' low-plane register j, its whole index times 16^(j % 2)
    (``_fields_query`` divides the query by it). The coset flags from each group's eighth index. No high plane."""
    w1, c0 = _nibble_pair(lo[0], lo[1])
    w3, c1 = _nibble_pair(hi[0], hi[1])
    return (c0, c1), _nibbles(lo[0]) + _nibbles(w1) + _nibbles(hi[0]) + _nibbles(w3), ()


@gluon.jit
def _page_units(kc_h, ks_h, page, skc_p, sks_p, offs, D: gl.constexpr, KBITS: gl.constexpr, W: gl.constexpr,
                UPW: gl.constexpr, OFF64: gl.constexpr, VEC: gl.constexpr):
    """The codes of a page's units that this warp takes (``offs``: per unit, its word offsets and token of token g):
    per unit (low words and high words of token g, then of token g + 8, and the two fp32 scales). Every load stays
    inside the page, so none is masked: tokens past the sequence are masked in the logits."""
    if OFF64:
        page = page.to(gl.int64)  # pools of 2^31 words or more
    base = kc_h + page * skc_p
    sbase = ks_h + page * sks_p
    units = ()
    for k in gl.static_range(UPW):
        o_lo = offs[k][0]
        o_hi = offs[k][1]
        t0 = offs[k][2]
        lo0, hi0 = _token_words(base + o_lo, base + o_hi, D, KBITS, VEC)
        lo1, hi1 = _token_words(base + (o_lo + 8 * W), base + (o_hi + 8 * W), D, KBITS, VEC)
        if len(offs[k]) == 4:  # the "fields" layout: the token's shared word 12
            hi0 = hi0 + (gl.load(base + offs[k][3]),)
            hi1 = hi1 + (gl.load(base + (offs[k][3] + 8 * W)),)
        s0 = gl.load(sbase + t0).to(gl.float32)
        s1 = gl.load(sbase + (t0 + 8)).to(gl.float32)
        units = units + ((lo0, hi0, lo1, hi1, s0, s1),)
    return units


@gluon.jit
def _bulk_prefetch(ptr, first, size):
    return gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.eq.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }",
        "=r,l,r,r", [ptr, first, size], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _l2_prefetch(kc_h, ks_h, page, skc_p, sks_p, first, CODE_BYTES: gl.constexpr, SCALE_BYTES: gl.constexpr,
                 OFF64: gl.constexpr):
    """Bring a page's codes and scales (one head) into L2 ahead of its loads: two ``cp.async.bulk.prefetch.L2`` from
    the CTA's first thread (sm_90; the launcher checked the 16-byte alignment)."""
    if OFF64:
        page = page.to(gl.int64)
    _bulk_prefetch(kc_h + page * skc_p, first, first * 0 + CODE_BYTES)
    _bulk_prefetch(ks_h + page * sks_p, first, first * 0 + SCALE_BYTES)


@gluon.jit
def _seen(tok, end, n_sink, q_index, window, WINDOW: gl.constexpr, CAUSAL: gl.constexpr):
    ok = tok < end
    if CAUSAL or WINDOW:
        k_index = n_sink + tok
        ok = ok & (k_index <= q_index)
        if WINDOW:
            ok = ok & (k_index > q_index - window)
    return ok


@gluon.jit
def _lanes(L: gl.constexpr, NW: gl.constexpr):
    """The [NW warps, 32 lanes] grid of a program in layout L (one element per thread): zeros, lane, warp, and the
    lane's mma.sync fragment coordinates g = lane // 4 (group) and c = lane % 4 (thread in group)."""
    zero_i = gl.zeros([NW, 32], gl.int32, L)
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, L))[None, :] + zero_i
    warp = gl.arange(0, NW, layout=gl.SliceLayout(1, L))[:, None] + zero_i
    return zero_i, lane, warp, lane >> 2, lane & 3


@gluon.jit
def _split_program(lens_ptr, H, n_parts, max_batch, c, Q_LEN: gl.constexpr, GROUP: gl.constexpr):
    """A split program of the keys or fused pass (grid (batch · KV heads, splits)): its program and split ids,
    sequence b and KV head h, the sequence's compressed length and sinks, its partials' index (n_parts per
    program: the splits, then the uncompressed parts), and this thread's
    columns of the C fragment (query rows (chunk position, head) = divmod(col, GROUP)) with their query positions."""
    pid = gl.program_id(0)
    split = gl.program_id(1)
    b = pid // H
    h = pid % H
    seq_len = gl.load(lens_ptr + b)
    comp = gl.load(lens_ptr + max_batch + b)
    n_sink = gl.load(lens_ptr + 3 * max_batch + b)
    part = pid * n_parts + split
    col0 = 2 * c
    col1 = col0 + 1
    return (pid, split, b, h, comp, n_sink, part, col0, col1, seq_len - Q_LEN + col0 // GROUP,
            seq_len - Q_LEN + col1 // GROUP)


@gluon.jit
def _split_pages(split, pages_per_split, comp, PAGE: gl.constexpr):
    """A split's pages [p_lo, p_hi) of a sequence with ``comp`` compressed tokens, the end of its last token, and the
    page that block-table reads ahead are clamped to (p_hi - 1, at least 0; what they load then is not used)."""
    p_lo = split * pages_per_split
    p_hi = gl.minimum(p_lo + pages_per_split, (comp + PAGE - 1) // PAGE)
    return p_lo, p_hi, gl.minimum(comp, p_hi * PAGE), gl.maximum(p_hi - 1, 0)


@gluon.jit
def _logit_units(qm0, qm1, sm_scale, SOFTCAP: gl.constexpr):
    """q·mean_k of columns 2c, 2c + 1 and the factor from the accumulator to logits: 2^24, times the softmax scale in
    log2 units without softcap (``kernels._logit_units``; with softcap the scale is applied inside the tanh)."""
    unit = SUBNORMAL_UNIT
    if not SOFTCAP:
        unit = SUBNORMAL_UNIT * sm_scale * LOG2E
        qm0 = qm0 * (sm_scale * LOG2E)
        qm1 = qm1 * (sm_scale * LOG2E)
    return qm0, qm1, unit


@gluon.jit
def _query_operand(qt_ptr, fidx_ptr, qm_ptr, pid, lane, col0, col1, sm_scale, D: gl.constexpr, KBITS: gl.constexpr,
                   KQ: gl.constexpr, BLOCK_M: gl.constexpr, SOFTCAP: gl.constexpr):
    """The keys product's B fragments (the prep's query operand in pair order, gathered to the kernel's order through
    ``fragment_index``), q·mean_k of this thread's columns col0, col1, and the factor from the accumulator to logits
    (2^24, times the softmax scale in log2 units without softcap: ``kernels._logit_units``)."""
    NREG: gl.constexpr = max(2, D // 64) + D // 8 * (2 if KBITS > 2 else 1)
    qt = qt_ptr + pid * (KQ * BLOCK_M)
    fi = fidx_ptr + 2 * lane
    QF = ()
    for r in gl.static_range(NREG):
        h0 = gl.load(qt + gl.load(fi + r * 64))
        h1 = gl.load(qt + gl.load(fi + (r * 64 + 1)))
        QF = QF + (gl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [h0, h1], dtype=gl.int32,
                                             is_pure=True, pack=1),)
    qm0 = gl.load(qm_ptr + pid * BLOCK_M + col0)
    qm1 = gl.load(qm_ptr + pid * BLOCK_M + col1)
    qm0, qm1, unit = _logit_units(qm0, qm1, sm_scale, SOFTCAP)
    return QF, qm0, qm1, unit


@gluon.jit
def _unit_logits(unit, QF, kc4, c, zero, unit_scale, qm0, qm1, sm_scale, softcap, tok0, end, partial, n_sink,
                 q_index0, q_index1, window, D: gl.constexpr, KBITS: gl.constexpr, SOFTCAP: gl.constexpr,
                 WINDOW: gl.constexpr, CAUSAL_PAGES: gl.constexpr, KFIELDS: gl.constexpr):
    """A 16-token unit's logits in log2 units, this thread's four C elements: (token g, row 2c), (g, 2c + 1),
    (g + 8, 2c), (g + 8, 2c + 1); keys past ``end`` (and, with CAUSAL_PAGES / WINDOW, keys a row may not see) -inf.
    ``unit``: the unit's words and scales (``_page_units``), ``kc4``: the accumulator's start value
    (``_coset_const``), ``tok0``: the split's token index of token g, ``partial``: the page reaches past ``end``."""
    NCR: gl.constexpr = max(2, D // 64)
    NLR: gl.constexpr = D // 8
    lo0, hi0, lo1, hi1, s0, s1 = unit[0], unit[1], unit[2], unit[3], unit[4], unit[5]
    cs0, lr0, hr0 = _token_regs(lo0, hi0, c, D, KBITS, KFIELDS)
    cs1, lr1, hr1 = _token_regs(lo1, hi1, c, D, KBITS, KFIELDS)
    a0, a1, a2, a3 = kc4  # coset + low plane, from the constant part
    for t in gl.static_range(NCR // 2):
        a0, a1, a2, a3 = _mma(cs0[2 * t], cs1[2 * t], cs0[2 * t + 1], cs1[2 * t + 1], QF[2 * t], QF[2 * t + 1],
                              a0, a1, a2, a3)
    for t in gl.static_range(NLR // 2):
        a0, a1, a2, a3 = _mma(lr0[2 * t], lr1[2 * t], lr0[2 * t + 1], lr1[2 * t + 1], QF[NCR + 2 * t],
                              QF[NCR + 2 * t + 1], a0, a1, a2, a3)
    if KBITS > 2 and len(hr0) > 0:  # high plane: a second accumulator chain (none in the "fields" layout)
        e0, e1, e2, e3 = zero, zero, zero, zero
        for t in gl.static_range(NLR // 2):
            e0, e1, e2, e3 = _mma(hr0[2 * t], hr1[2 * t], hr0[2 * t + 1], hr1[2 * t + 1], QF[NCR + NLR + 2 * t],
                                  QF[NCR + NLR + 2 * t + 1], e0, e1, e2, e3)
        a0 = a0 + e0
        a1 = a1 + e1
        a2 = a2 + e2
        a3 = a3 + e3
    u0 = s0 * unit_scale
    u1 = s1 * unit_scale
    x0 = a0 * u0 + qm0
    x1 = a1 * u0 + qm1
    x2 = a2 * u1 + qm0
    x3 = a3 * u1 + qm1
    if SOFTCAP:
        f = 2.0 * sm_scale / softcap
        x0 = softcap * (1.0 - 2.0 / (gl.exp(x0 * f) + 1.0)) * LOG2E
        x1 = softcap * (1.0 - 2.0 / (gl.exp(x1 * f) + 1.0)) * LOG2E
        x2 = softcap * (1.0 - 2.0 / (gl.exp(x2 * f) + 1.0)) * LOG2E
        x3 = softcap * (1.0 - 2.0 / (gl.exp(x3 * f) + 1.0)) * LOG2E
    tok1 = tok0 + 8
    if CAUSAL_PAGES or WINDOW:
        x0 = gl.where(_seen(tok0, end, n_sink, q_index0, window, WINDOW, CAUSAL_PAGES), x0, float("-inf"))
        x1 = gl.where(_seen(tok0, end, n_sink, q_index1, window, WINDOW, CAUSAL_PAGES), x1, float("-inf"))
        x2 = gl.where(_seen(tok1, end, n_sink, q_index0, window, WINDOW, CAUSAL_PAGES), x2, float("-inf"))
        x3 = gl.where(_seen(tok1, end, n_sink, q_index1, window, WINDOW, CAUSAL_PAGES), x3, float("-inf"))
    elif partial:  # the split's last page, partly past the sequence
        x0 = gl.where(tok0 < end, x0, float("-inf"))
        x1 = gl.where(tok0 < end, x1, float("-inf"))
        x2 = gl.where(tok1 < end, x2, float("-inf"))
        x3 = gl.where(tok1 < end, x3, float("-inf"))
    return x0, x1, x2, x3


@gluon.jit
def _gluon_keys_kernel(kc_ptr, ks_ptr, bt_ptr, lens_ptr, qt_ptr, fidx_ptr, qm_ptr, lg_ptr, m_ptr,
                       H, n_parts, pages_per_split, n_tok, max_batch, sm_scale, softcap, window,
                       skc_p, skc_h, sks_p, sks_h, sbt,
                       Q_LEN: gl.constexpr, GROUP: gl.constexpr, D: gl.constexpr, KBITS: gl.constexpr,
                       PAGE: gl.constexpr, SOFTCAP: gl.constexpr, WINDOW: gl.constexpr, BLOCK_M: gl.constexpr,
                       RS: gl.constexpr, CAUSAL_PAGES: gl.constexpr, NW: gl.constexpr, W: gl.constexpr,
                       KQ: gl.constexpr, OFF64: gl.constexpr, VEC: gl.constexpr, PF: gl.constexpr,
                       L2PF: gl.constexpr):
    # Grid (batch · KV heads, splits), as ``_attn_keys_kernel`` with one row block (q_len · group <= 8). A CTA of NW
    # warps takes a split's pages one after another, warp w the units w, w + NW, .. of each page; the codes of the
    # page PF ahead are loaded before the current page is decoded, and its block-table entry one page earlier. With
    # L2PF > 0 the page L2PF further ahead is prefetched into L2 (its loads are then L2 hits, wherever the compiler
    # schedules them).
    L: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [NW, 1], [1, 0])
    zero_i, lane, warp, g, c = _lanes(L, NW)
    pid, split, b, h, comp, n_sink, part, col0, col1, q_index0, q_index1 = _split_program(lens_ptr, H, n_parts,
                                                                                         max_batch, c, Q_LEN, GROUP)
    QF, qm0, qm1, unit = _query_operand(qt_ptr, fidx_ptr, qm_ptr, pid, lane, col0, col1, sm_scale, D, KBITS, KQ,
                                        BLOCK_M, SOFTCAP)
    zero = gl.zeros([NW, 32], gl.float32, L)
    kc4 = _coset_const(QF, zero, zero_i, D, KBITS)
    m0 = zero - float("inf")
    m1 = zero - float("inf")
    UPW: gl.constexpr = PAGE // 16 // NW
    offs = ()  # per unit of a page: this thread's word offsets and token (g), the same on every page
    for k in gl.static_range(UPW):
        t0 = 16 * (k * NW + warp) + g
        o_lo, o_hi = _word_offsets(t0, c, D, KBITS, W, False)
        offs = offs + ((o_lo, o_hi, t0),)
    p_lo, p_hi, end, last = _split_pages(split, pages_per_split, comp, PAGE)
    kc_h = kc_ptr + h * skc_h
    ks_h = ks_ptr + h * sks_h
    bt_b = bt_ptr + b * sbt
    lg0 = lg_ptr + pid.to(gl.int64) * n_tok * RS + (16 * warp + g) * RS + col0  # token g of unit 0 of page 0
    nxt = _page_units(kc_h, ks_h, gl.load(bt_b + gl.minimum(p_lo, last)), skc_p, sks_p, offs, D, KBITS, W, UPW,
                      OFF64, VEC)
    if PF == 2:
        nxt2 = _page_units(kc_h, ks_h, gl.load(bt_b + gl.minimum(p_lo + 1, last)), skc_p, sks_p, offs, D, KBITS, W,
                           UPW, OFF64, VEC)
    page = gl.load(bt_b + gl.minimum(p_lo + PF, last))
    if L2PF > 0:
        CODE_BYTES: gl.constexpr = PAGE * W * 4
        first = lane + warp
        for i in gl.static_range(L2PF):
            _l2_prefetch(kc_h, ks_h, gl.load(bt_b + gl.minimum(p_lo + PF + i, last)), skc_p, sks_p, first, CODE_BYTES,
                         PAGE * 2, OFF64)
        l2_page = gl.load(bt_b + gl.minimum(p_lo + PF + L2PF, last))
    for pg in range(p_lo, p_hi):
        if L2PF > 0:
            _l2_prefetch(kc_h, ks_h, l2_page, skc_p, sks_p, first, CODE_BYTES, PAGE * 2, OFF64)
            l2_page = gl.load(bt_b + gl.minimum(pg + PF + L2PF + 1, last))
        cur = nxt
        if PF == 2:
            nxt = nxt2
            nxt2 = _page_units(kc_h, ks_h, page, skc_p, sks_p, offs, D, KBITS, W, UPW, OFF64, VEC)
        else:
            nxt = _page_units(kc_h, ks_h, page, skc_p, sks_p, offs, D, KBITS, W, UPW, OFF64, VEC)
        page = gl.load(bt_b + gl.minimum(pg + PF + 1, last))
        lg_pg = lg0 + pg * (PAGE * RS)
        for k in gl.static_range(UPW):
            x0, x1, x2, x3 = _unit_logits(cur[k], QF, kc4, c, zero, unit, qm0, qm1, sm_scale, softcap,
                                          pg * PAGE + offs[k][2], end, pg * PAGE + PAGE > end, n_sink, q_index0,
                                          q_index1, window, D, KBITS, SOFTCAP, WINDOW, CAUSAL_PAGES, False)
            m0 = gl.maximum(m0, gl.maximum(x0, x2))
            m1 = gl.maximum(m1, gl.maximum(x1, x3))
            st = lg_pg + (16 * NW * RS) * k
            gl.store(st, x0, mask=col0 < RS)
            gl.store(st + 1, x1, mask=col1 < RS)
            gl.store(st + 8 * RS, x2, mask=col0 < RS)
            gl.store(st + (8 * RS + 1), x3, mask=col1 < RS)
    # The split's max per column: over the lanes of a column (g), then over the warps.
    m0 = _shfl_max(_shfl_max(_shfl_max(m0, "4"), "8"), "16")
    m1 = _shfl_max(_shfl_max(_shfl_max(m1, "4"), "8"), "16")
    m0 = gl.max(m0, axis=0)
    m1 = gl.max(m1, axis=0)
    lane1 = gl.arange(0, 32, layout=gl.SliceLayout(0, L))
    c1 = 2 * (lane1 & 3)
    g0 = lane1 < 4
    gl.store(m_ptr + part * BLOCK_M + c1, m0, mask=g0 & (c1 < RS))
    gl.store(m_ptr + part * BLOCK_M + c1 + 1, m1, mask=g0 & (c1 + 1 < RS))


# ------------------------------------------------------------------------------------------------- values pass
#
# Values contract over tokens: acc[coordinate, row] += Σ_t v_t[coordinate] · p_t[row] · s_t. One m16n8k16 product
# per 16 coordinates of a 16-token unit: A [16 coordinates × 16 tokens] from the codes, B [16 tokens × 8 rows] the
# weights p·s in fp16, C the fp32 accumulator. An A register holds one coordinate of two consecutive tokens (2c and
# 2c + 1, or 2c + 8 and 2c + 9), so a thread (lane 4g + c) loads, of those four tokens, the code bits of "its"
# coordinates g·D/8 .. (g + 1)·D/8 - 1 (a word, half a word or a byte per plane), and one PRMT per pair of tokens
# puts the two tokens' bits in the two 16-bit halves of one register ("pair word"). From there a pair word is what a
# token's code word is to the keys pass: one mask per A register (fp16 subnormals), the parity restored on whole
# words, the coset flags two instructions per group. The weights p = 2^(logit - split max) come from the keys pass's
# workspace; B's column g is query row g, and its rows 2c, 2c + 1, 2c + 8, 2c + 9 are exactly this thread's tokens.
# The coset flags of the thread's groups are a product of their own (M rows = groups). At the split's end a thread
# holds, for its coordinates and query rows 2c, 2c + 1, Σ p·s·v in storage order (v = lo + c/2 + 4·hi + OFF), and
# rotates it back with a Hadamard transform in registers and across lanes: the split's partial is what the portable
# ``_attn_values_kernel`` writes, so ``_attn_reduce_kernel`` is unchanged.


@gluon.jit
def _prmt(a, b, SEL: gl.constexpr):
    """Bytes of (a, b) selected by a constant selector (``prmt.b32``)."""
    return gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, " + SEL + ";", "=r,r,r", [a, b], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _prmt_r(a, b, sel):
    """Bytes of (a, b) selected by a per-thread selector."""
    return gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, sel], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _f16x2(lo, hi):
    """Two fp32 values as one register of two fp16 (round to nearest): lo in bits 0-15."""
    return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _shfl_idx(x, src):
    return gl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 31, -1;", "=f,f,r", [x, src], dtype=gl.float32,
                                     is_pure=True, pack=1)


@gluon.jit
def _shfl_add(x, MASK: gl.constexpr):
    return x + gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, " + MASK + ", 31, -1;", "=f,f", [x],
                                         dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _launch_dependents(x):
    """``griddepcontrol.launch_dependents``: a grid launched after this one with programmatic dependent launch may
    start (it waits with ``griddepcontrol.wait`` before reading what this grid writes)."""
    return gl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.b32 $0, 0;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _pair_words(wa, wb, sel, TB: gl.constexpr, NWT: gl.constexpr):
    """The pair words of tokens a, b (each a tuple of the thread's words of one plane): per 16 bits of the thread's
    span, token a's in bits 0-15 and token b's in bits 16-31. A span below a word is the half (TB 16) or byte (TB 8)
    ``sel`` picks."""
    p = ()
    if TB >= 32:
        for i in gl.static_range(NWT):
            p = p + (_prmt(wa[i], wb[i], "0x5410"), _prmt(wa[i], wb[i], "0x7632"))
    else:
        p = (_prmt_r(wa[0], wb[0], sel),)
    return p


@gluon.jit
def _value_regs(pa, pb, TB: gl.constexpr, FBITS: gl.constexpr, LOW: gl.constexpr):
    """A registers of two token pairs' pair words of one plane (a: tokens 2c, 2c + 1; b: 2c + 8, 2c + 9): register r
    of each holds the thread's coordinate r (times 4^(r % 4) at 2 bits, 2^(r % 8) at 1 bit, and 2^-24). The low plane
    has its implied parity bits restored first, and also returns its coset registers (2c·2^-24 per group), one per
    pair word of each pair."""
    ca = ()
    cb = ()
    if LOW:
        for i in gl.static_range(len(pa)):
            ca = ca + (_coset(pa[i]),)
            cb = cb + (_coset(pb[i]),)
        ra = ()
        rb = ()
        for i in gl.static_range(0, len(pa), 2):
            if i + 1 < len(pa):
                fa = _parity_fold(pa[i], pa[i + 1])
                fb = _parity_fold(pb[i], pb[i + 1])
                ra = ra + _regs2(_with_parity(pa[i], fa)) + _regs2(_with_parity(pa[i + 1], fa >> 1))
                rb = rb + _regs2(_with_parity(pb[i], fb)) + _regs2(_with_parity(pb[i + 1], fb >> 1))
            else:  # a single pair word (head_dim 64): folded with its partner, whose parity bits land on bit 15
                f = _parity_fold(pa[i], pb[i])
                ra = ra + _regs2(_with_parity(pa[i], f))
                rb = rb + _regs2(_with_parity(pb[i], f >> 1))
    else:
        ra = ()
        rb = ()
        for i in gl.static_range(len(pa)):
            if FBITS == 2:
                ra = ra + _regs2(pa[i])
                rb = rb + _regs2(pb[i])
            else:
                ra = ra + _regs1(pa[i], min(16, TB))
                rb = rb + _regs1(pb[i], min(16, TB))
    return ra, rb, ca, cb


@gluon.jit
def _value_words(p_lo, p_hi, t, D: gl.constexpr, VBITS: gl.constexpr, W: gl.constexpr, VEC: gl.constexpr):
    """The value code words a thread decodes of the unit ``t`` tokens after its first token (``p_lo``/``p_hi``: its
    low- and high-plane words of that token): per token 2c, 2c + 1, 2c + 8, 2c + 9, (low words, high words)."""
    NWL: gl.constexpr = max(1, D // 8 * 2 // 32)
    NWH: gl.constexpr = max(1, D // 8 * max(1, VBITS - 2) // 32)
    words = ()
    for dt in gl.static_range(4):
        lo = _ld(p_lo + (t + dt % 2 + 8 * (dt // 2)) * W, NWL, VEC)
        hi = ()
        if VBITS > 2:
            hi = _ld(p_hi + (t + dt % 2 + 8 * (dt // 2)) * W, NWH, VEC)
        words = words + ((lo, hi),)
    return words


@gluon.jit
def _value_units(vc_h, vs_h, lg0, page, pg, g_ok, svc_p, svs_p, o_lo, o_hi, t0, D: gl.constexpr,
                 VBITS: gl.constexpr, W: gl.constexpr, PAGE: gl.constexpr, RS: gl.constexpr, UPW: gl.constexpr,
                 NW: gl.constexpr, OFF64: gl.constexpr, VEC: gl.constexpr):
    """What a page's units need of this thread (``o_lo``/``o_hi``/``t0``: its word offsets and token 16w + 2c in
    unit 0; unit k is 16·NW·k tokens further): per unit, the low- and high-plane words of its four tokens (2c,
    2c + 1, 2c + 8, 2c + 9), their scales and the logits of query row g. One pointer per page and stream, every
    load at a constant offset from it. Every load stays inside the page; the logits past the sequence are -inf in
    the workspace."""
    if OFF64:
        page = page.to(gl.int64)
    p_lo = vc_h + page * svc_p + o_lo
    p_hi = vc_h + page * svc_p + o_hi
    p_s = vs_h + page * svs_p + t0
    p_x = lg0 + (pg * PAGE + t0) * RS
    units = ()
    for k in gl.static_range(UPW):
        words = _value_words(p_lo, p_hi, 16 * NW * k, D, VBITS, W, VEC)
        s = ()
        x = ()
        for dt in gl.static_range(4):
            s = s + (gl.load(p_s + (16 * NW * k + dt % 2 + 8 * (dt // 2))).to(gl.float32),)
            x = x + (gl.load(p_x + (16 * NW * k + dt % 2 + 8 * (dt // 2)) * RS, mask=g_ok, other=float("-inf")),)
        units = units + ((words, s, x),)
    return units


@gluon.jit
def _value_spans(g, zero_i, D: gl.constexpr, VBITS: gl.constexpr, FIELDS: gl.constexpr):
    """A thread's span of a token's value words (coordinates g·D/8 .. (g + 1)·D/8 - 1): its first low-plane word and
    PRMT selector, its first high-plane word (words D/16 ..) and selector. A span below a word is picked by the
    selector (half: 0x5410 / 0x7632; byte k: k·0x1111 + 0x4400). The "fields" layout at 4 bits: nibble words 2g and
    2g + 1 (head_dim 128) in the places of the low- and high-plane word."""
    CT: gl.constexpr = D // 8  # coordinates per thread
    TBL: gl.constexpr = CT * 2
    TBH: gl.constexpr = CT * max(1, VBITS - 2)
    if FIELDS:
        lo_w = 2 * g
        sel_lo = zero_i
    elif TBL >= 32:
        lo_w = g * (TBL // 32)
        sel_lo = zero_i
    else:
        lo_w = g >> 1
        sel_lo = 0x5410 + (g & 1) * 0x2222
    if FIELDS:
        hi_w = 2 * g + 1
        sel_hi = zero_i
    elif TBH >= 32:
        hi_w = D // 16 + g * (TBH // 32)
        sel_hi = zero_i
    elif TBH == 16:
        hi_w = D // 16 + (g >> 1)
        sel_hi = 0x5410 + (g & 1) * 0x2222
    else:
        hi_w = D // 16 + (g >> 2)
        sel_hi = (g & 3) * 0x1111 + 0x4400
    return lo_w, sel_lo, hi_w, sel_hi


@gluon.jit
def _value_accumulators(zero, D: gl.constexpr, VBITS: gl.constexpr, FIELDS: gl.constexpr):
    """Zero accumulators: D/16 tiles (16 coordinates each) per plane (one plane in the "fields" layout), max(1, D/128)
    coset tiles (16 groups each); each tile (c0, c1, c2, c3) = (coordinate g, row 2c), (g, 2c + 1), (g + 8, 2c),
    (g + 8, 2c + 1)."""
    acc_lo = ()
    for t in gl.static_range(D // 16):
        acc_lo = acc_lo + ((zero, zero, zero, zero),)
    acc_hi = ()
    if VBITS > 2 and not FIELDS:
        for t in gl.static_range(D // 16):
            acc_hi = acc_hi + ((zero, zero, zero, zero),)
    acc_c = ()
    for t in gl.static_range(max(1, D // 128)):
        acc_c = acc_c + ((zero, zero, zero, zero),)
    return acc_lo, acc_hi, acc_c


@gluon.jit
def _value_products(words, b0, b1, acc_lo, acc_hi, acc_c, sel_lo, sel_hi, zero_i, D: gl.constexpr,
                    VBITS: gl.constexpr, FIELDS: gl.constexpr):
    """One 16-token unit's products: acc[coordinate, row] += codes · weights, per plane and for the coset flags.
    ``words``: the unit's value words (``_value_words``), ``b0``/``b1``: the B fragment (weights of tokens 2c, 2c + 1
    and 2c + 8, 2c + 9 for query row g, fp16 pairs), ``sel_lo``/``sel_hi``: the PRMT selectors of a span below a word.
    ``FIELDS`` (4 bits, head_dim 128): one product chain of whole indices (``_nibble_value_products``)."""
    if FIELDS:
        out = _nibble_value_products(words, b0, b1, acc_lo, acc_hi, acc_c, D)
    else:
        out = _plane_value_products(words, b0, b1, acc_lo, acc_hi, acc_c, sel_lo, sel_hi, zero_i, D, VBITS)
    return out


@gluon.jit
def _nibble_value_products(words, b0, b1, acc_lo, acc_hi, acc_c, D: gl.constexpr):
    """``_value_products`` of 4-bit values in the "fields" layout: the pair words of nibble words 2g (half h:
    nibbles 0-3 of group 2g + h) and 2g + 1 (nibbles 4-7) of tokens (2c, 2c + 1) and (2c + 8, 2c + 9), each group's
    eighth index made whole (``_nibble_pair``): register r holds coordinate r of the thread's span times
    16^(r % 2), as the planes' low-plane register r (times 4^(r % 4)) does. ``acc_hi`` is empty."""
    a_lo = _pair_words(words[0][0], words[1][0], 0, 32, 1)
    a_hi = _pair_words(words[0][1], words[1][1], 0, 32, 1)
    b_lo = _pair_words(words[2][0], words[3][0], 0, 32, 1)
    b_hi = _pair_words(words[2][1], words[3][1], 0, 32, 1)
    ra = ()
    rb = ()
    ca = ()
    cb = ()
    for i in gl.static_range(2):  # group 2g + i: nibbles 0-3 in the low words' half i, 4-7 in the high words'
        w1, f = _nibble_pair(a_lo[i], a_hi[i])
        ra = ra + _nibbles(a_lo[i]) + _nibbles(w1)
        ca = ca + (f,)
        w1, f = _nibble_pair(b_lo[i], b_hi[i])
        rb = rb + _nibbles(b_lo[i]) + _nibbles(w1)
        cb = cb + (f,)
    nacc = ()
    for t in gl.static_range(D // 16):
        a = acc_lo[t]
        nacc = nacc + (_mma(ra[2 * t], ra[2 * t + 1], rb[2 * t], rb[2 * t + 1], b0, b1, a[0], a[1], a[2], a[3]),)
    a = acc_c[0]
    return nacc, acc_hi, (_mma(ca[0], ca[1], cb[0], cb[1], b0, b1, a[0], a[1], a[2], a[3]),)


@gluon.jit
def _plane_value_products(words, b0, b1, acc_lo, acc_hi, acc_c, sel_lo, sel_hi, zero_i, D: gl.constexpr,
                          VBITS: gl.constexpr):
    """``_value_products`` of bit-plane values."""
    CT: gl.constexpr = D // 8
    TBL: gl.constexpr = CT * 2
    TBH: gl.constexpr = CT * max(1, VBITS - 2)
    NT: gl.constexpr = D // 16
    NCT: gl.constexpr = max(1, D // 128)
    pa = _pair_words(words[0][0], words[1][0], sel_lo, TBL, max(1, TBL // 32))
    pb = _pair_words(words[2][0], words[3][0], sel_lo, TBL, max(1, TBL // 32))
    ra, rb, ca, cb = _value_regs(pa, pb, TBL, 2, True)
    nacc = ()
    for t in gl.static_range(NT):
        a = acc_lo[t]
        nacc = nacc + (_mma(ra[2 * t], ra[2 * t + 1], rb[2 * t], rb[2 * t + 1], b0, b1, a[0], a[1], a[2], a[3]),)
    acc_lo = nacc
    nacc = ()
    for t in gl.static_range(NCT):
        a = acc_c[t]
        if 2 * t + 1 < len(ca):
            nacc = nacc + (_mma(ca[2 * t], ca[2 * t + 1], cb[2 * t], cb[2 * t + 1], b0, b1, a[0], a[1], a[2], a[3]),)
        else:  # one group per thread (head_dim 64): rows g + 8 are zero
            nacc = nacc + (_mma(ca[2 * t], zero_i, cb[2 * t], zero_i, b0, b1, a[0], a[1], a[2], a[3]),)
    acc_c = nacc
    if VBITS > 2:
        ha = _pair_words(words[0][1], words[1][1], sel_hi, TBH, max(1, TBH // 32))
        hb = _pair_words(words[2][1], words[3][1], sel_hi, TBH, max(1, TBH // 32))
        ra, rb, ca, cb = _value_regs(ha, hb, TBH, VBITS - 2, False)
        nacc = ()
        for t in gl.static_range(NT):
            a = acc_hi[t]
            nacc = nacc + (_mma(ra[2 * t], ra[2 * t + 1], rb[2 * t], rb[2 * t + 1], b0, b1, a[0], a[1], a[2],
                                a[3]),)
        acc_hi = nacc
    return acc_lo, acc_hi, acc_c


@gluon.jit
def _gluon_values_kernel(vc_ptr, vs_ptr, bt_ptr, lens_ptr, lg_ptr, m_ptr, l_ptr, acc_ptr,
                         H, n_parts, pages_per_split, n_tok, max_batch, svc_p, svc_h, svs_p, svs_h, sbt,
                         ROWS: gl.constexpr, D: gl.constexpr, VBITS: gl.constexpr, PAGE: gl.constexpr,
                         BLOCK_M: gl.constexpr, RS: gl.constexpr, NW: gl.constexpr, W: gl.constexpr,
                         OFF64: gl.constexpr, VEC: gl.constexpr, L2PF: gl.constexpr, OUT_SCALE: gl.constexpr,
                         LOG2CT: gl.constexpr, VFIELDS: gl.constexpr):
    # Grid (batch · KV heads, splits), as the compressed programs of ``_attn_values_kernel``. A CTA of NW warps takes
    # a split's pages in order, warp w the units w, w + NW, .. of each page, the next page's loads issued before the
    # current page is decoded; with L2PF > 0 the page L2PF further ahead is prefetched into L2.
    L: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [NW, 1], [1, 0])
    zero_i, lane, warp, g, c = _lanes(L, NW)
    _launch_dependents(zero_i)  # the uncompressed part's kernel (PDL) may start beside this grid
    pid = gl.program_id(0)
    split = gl.program_id(1)
    b = pid // H
    h = pid % H
    comp = gl.load(lens_ptr + max_batch + b)
    part = pid * n_parts + split
    lo_w, sel_lo, hi_w, sel_hi = _value_spans(g, zero_i, D, VBITS, VFIELDS)
    g_ok = g < RS
    m_g = gl.load(m_ptr + part * BLOCK_M + g, mask=g_ok, other=float("-inf"))
    m_g = gl.where(m_g == float("-inf"), 0.0, m_g)
    zero = gl.zeros([NW, 32], gl.float32, L)
    UPW: gl.constexpr = PAGE // 16 // NW
    t0 = 16 * warp + 2 * c  # the thread's first token in unit 0 of a page
    o_lo = t0 * W + lo_w
    o_hi = t0 * W + hi_w
    p_lo, p_hi, end, last = _split_pages(split, pages_per_split, comp, PAGE)
    vc_h = vc_ptr + h * svc_h
    vs_h = vs_ptr + h * svs_h
    bt_b = bt_ptr + b * sbt
    lg0 = lg_ptr + pid.to(gl.int64) * n_tok * RS + g
    acc_lo, acc_hi, acc_c = _value_accumulators(zero, D, VBITS, VFIELDS)
    l_g = zero
    ls_g = zero
    nxt = _value_units(vc_h, vs_h, lg0, gl.load(bt_b + gl.minimum(p_lo, last)), gl.minimum(p_lo, last), g_ok, svc_p,
                       svs_p, o_lo, o_hi, t0, D, VBITS, W, PAGE, RS, UPW, NW, OFF64, VEC)
    page = gl.load(bt_b + gl.minimum(p_lo + 1, last))
    if L2PF > 0:
        CODE_BYTES: gl.constexpr = PAGE * W * 4
        first = lane + warp
        for i in gl.static_range(L2PF):
            _l2_prefetch(vc_h, vs_h, gl.load(bt_b + gl.minimum(p_lo + 1 + i, last)), svc_p, svs_p, first, CODE_BYTES,
                         PAGE * 2, OFF64)
        l2_page = gl.load(bt_b + gl.minimum(p_lo + 1 + L2PF, last))
    for pg in range(p_lo, p_hi):
        if L2PF > 0:
            _l2_prefetch(vc_h, vs_h, l2_page, svc_p, svs_p, first, CODE_BYTES, PAGE * 2, OFF64)
            l2_page = gl.load(bt_b + gl.minimum(pg + 2 + L2PF, last))
        cur = nxt
        nxt = _value_units(vc_h, vs_h, lg0, page, gl.minimum(pg + 1, last), g_ok, svc_p, svs_p, o_lo, o_hi, t0, D,
                           VBITS, W, PAGE, RS, UPW, NW, OFF64, VEC)
        page = gl.load(bt_b + gl.minimum(pg + 2, last))
        for k in gl.static_range(UPW):
            words, s, x = cur[k]
            p0 = gl.exp2(x[0] - m_g)
            p1 = gl.exp2(x[1] - m_g)
            p2 = gl.exp2(x[2] - m_g)
            p3 = gl.exp2(x[3] - m_g)
            q0 = p0 * s[0]
            q1 = p1 * s[1]
            q2 = p2 * s[2]
            q3 = p3 * s[3]
            if pg * PAGE + PAGE > end:  # the split's last page: slots past the sequence may hold any scale
                tk = pg * PAGE + 16 * NW * k + t0
                q0 = gl.where(tk < end, q0, 0.0)
                q1 = gl.where(tk + 1 < end, q1, 0.0)
                q2 = gl.where(tk + 8 < end, q2, 0.0)
                q3 = gl.where(tk + 9 < end, q3, 0.0)
            l_g = l_g + ((p0 + p1) + (p2 + p3))
            ls_g = ls_g + ((q0 + q1) + (q2 + q3))
            b0 = _f16x2(q0, q1)
            b1 = _f16x2(q2, q3)
            acc_lo, acc_hi, acc_c = _value_products(words, b0, b1, acc_lo, acc_hi, acc_c, sel_lo, sel_hi,
                                                    zero_i, D, VBITS, VFIELDS)
    # Σp and Σp·s of row g: over the thread's column (lanes 4g .. 4g + 3) and the warps, then fetched for the rows
    # 2c, 2c + 1 this thread's accumulators hold (lanes 8c and 8c + 4).
    l_g = gl.sum(_shfl_add(_shfl_add(l_g, "1"), "2"), axis=0)
    ls_g = gl.sum(_shfl_add(_shfl_add(ls_g, "1"), "2"), axis=0)
    lane1 = gl.arange(0, 32, layout=gl.SliceLayout(0, L))
    c1 = lane1 & 3
    g1 = lane1 >> 2
    col0 = 2 * c1
    col1 = col0 + 1
    ls0 = _shfl_idx(ls_g, 8 * c1)
    ls1 = _shfl_idx(ls_g, 8 * c1 + 4)
    row_l = l_ptr + part * BLOCK_M
    gl.store(row_l + g1, l_g, mask=(c1 == 0) & (g1 < ROWS))
    _store_values_partial(acc_lo, acc_hi, acc_c, ls0, ls1, g1, col0, col1, acc_ptr + part * BLOCK_M * D, ROWS, D,
                          VBITS, OUT_SCALE, LOG2CT, VFIELDS)

# -------------------------------------------------------------------------------------------------- fused pass
#
# Keys and values in one loop, with an online softmax (no logits workspace). A unit's keys product leaves its
# logits in the C layout of m16n8k16: thread (g, c) holds tokens g, g + 8 × query rows 2c, 2c + 1. The values
# product wants the weights as its B operand: thread (g, c) holds tokens 2c, 2c + 1 (and 2c + 8, 2c + 9) of query
# row g. Those are transposes of each other per 8 × 8 block, so the weights, packed to fp16 pairs in the C layout,
# become the B fragment with one ``movmatrix.trans`` per 8 tokens. The running max is per page: the page's logits
# of rows 2c, 2c + 1 are reduced over the lanes of a column (g) and the accumulators, whose columns are the same
# rows 2c, 2c + 1, are rescaled once per page.


@gluon.constexpr_function
def _storage_bits(i):
    """σ(i): the storage order's bit permutation (bits 1-2 and 3-4 swapped; docs/format.md), an involution."""
    return (i & ~30) | (((i >> 3) & 3) << 1) | (((i >> 1) & 3) << 3)


@gluon.jit
def _query_in_pass(q_ptr, kmean_ptr, b, h, g, c, zero, sqb, sqt, sqh, smb, smh, sm_scale, GROUP: gl.constexpr,
                   ROWS: gl.constexpr, CENTER_K: gl.constexpr, SOFTCAP: gl.constexpr, INV_SQRT_N: gl.constexpr):
    """``_query_operand`` computed in the pass from the queries (head_dim 128, no prep kernel): the keys product's
    coset and low-plane B fragments, q·mean_k of columns 2c, 2c + 1 and the accumulator-to-logits factor.

    Thread (g, c) needs, of query row g, y_s = R[s]·q for the storage coordinates s = 32c .. 32c + 31 and the sums
    of their four lattice groups (``fragment_elements``: both lie in the thread's own block). R = H_128·P_σ
    (``reference.rotation_matrix``; Sylvester H commutes with the storage order's bit permutation σ), so y = H q'
    with q'_j = q_σ(j): the thread loads q'_32c.. (σ keeps bits 5 and 6), transforms its 32 values in registers
    (index bits 0-4) and across the 4 lanes of its group (bits 5 and 6), as the prep's product with the decode
    matrix would give them (``launcher._decode_matrix``): y·2^-p/√n in fp16, p = 2·(j mod 4) the low plane's power
    of register j, the coset registers ¼·Σ of a group's 8 values. Rows g >= ROWS are zero."""
    real = g < ROWS
    row = q_ptr + b * sqb + (g // GROUP) * sqt + (h * GROUP + g % GROUP) * sqh + 32 * c
    y = ()
    qm = zero
    for i in gl.static_range(32):
        x = gl.load(row + _storage_bits(i), mask=real, other=0.0).to(gl.float32)
        y = y + (x,)
        if CENTER_K:
            qm = qm + x * gl.load(kmean_ptr + b * smb + h * smh + (32 * c + _storage_bits(i)))
    y = _fwht_regs(y, 32, 5)
    y = _fwht_lanes(y, 1.0 - 2.0 * (c & 1).to(gl.float32), 32, "1")
    y = _fwht_lanes(y, 1.0 - 2.0 * ((c >> 1) & 1).to(gl.float32), 32, "2")
    QF = ()
    for r in gl.static_range(2):  # groups 4c + 2r (low half) and 4c + 2r + 1 (high half)
        s0 = y[16 * r]
        s1 = y[16 * r + 8]
        for t in gl.static_range(1, 8):
            s0 = s0 + y[16 * r + t]
            s1 = s1 + y[16 * r + 8 + t]
        QF = QF + (_f16x2(s0 * (0.25 * INV_SQRT_N), s1 * (0.25 * INV_SQRT_N)),)
    for k in gl.static_range(16):  # low-plane register k: coordinates 16·(k // 8) + k % 8 and 8 further, × 4^-(k % 4)
        QF = QF + (_f16x2(y[16 * (k // 8) + k % 8] * (INV_SQRT_N / (1 << (2 * (k % 4)))),
                          y[16 * (k // 8) + k % 8 + 8] * (INV_SQRT_N / (1 << (2 * (k % 4))))),)
    qm0 = zero
    qm1 = zero
    if CENTER_K:  # q·mean_k of row g in every lane of its group, then of rows 2c and 2c + 1 (lanes 8c, 8c + 4)
        qm = _shfl_add(_shfl_add(qm, "1"), "2")
        qm0 = _shfl_idx(qm, 8 * c)
        qm1 = _shfl_idx(qm, 8 * c + 4)
    qm0, qm1, unit = _logit_units(qm0, qm1, sm_scale, SOFTCAP)
    return QF, qm0, qm1, unit


@gluon.jit
def _fields_query(QF, KBITS: gl.constexpr):
    """The query operand for keys in the "fields" layout: QF[2 + j] times 4^(j mod 4) / 2^pos_j, at 3 bits pos_j =
    3·(j mod 5) mod 9 (0 for j = 15), at 4 bits 4·(j mod 2). The prep's low-plane rows undo the low plane's
    4^(j mod 4) (``plane_pairs``); a ``_fields_regs`` / ``_nibble_regs`` register holds its index times 2^pos_j.
    Exact (powers of two), once per program. The high plane's registers stay unused."""
    out = (QF[0], QF[1])
    for j in gl.static_range(16):
        if KBITS == 4:
            POS = 4 * (j % 2)
        else:
            POS = 0 if j == 15 else (3 * (j % 5)) % 9
        E = 2 * (j % 4) - POS
        F = ((15 + E) << 10) * 0x10001  # fp16 2^E in both halves
        out = out + (gl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [QF[2 + j], QF[2 + j] * 0 + F],
                                               dtype=gl.int32, is_pure=True, pack=1),)
    for r in gl.static_range(18, len(QF)):
        out = out + (QF[r],)
    return out


@gluon.jit
def _transpose8(x):
    """An 8 × 8 block of fp16 pairs in the mma fragment layout (thread 4g + c: row g, columns 2c, 2c + 1), transposed
    (``movmatrix.sync.aligned.m8n8.trans.b16``)."""
    return gl.inline_asm_elementwise("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", "=r,r", [x], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _rescale(acc, a0, a1):
    """Accumulator tiles (c0, c1, c2, c3: columns 2c, 2c + 1, 2c, 2c + 1) times a0 (column 2c) and a1 (2c + 1)."""
    out = ()
    for t in gl.static_range(len(acc)):
        x = acc[t]
        out = out + ((x[0] * a0, x[1] * a1, x[2] * a0, x[3] * a1),)
    return out


@gluon.jit
def _rescale_all(acc_lo, acc_hi, acc_c, l0, l1, ls0, ls1, a0, a1):
    """A warp's value accumulators, Σp and Σp·s of rows 2c, 2c + 1 times a0 and a1 (a new reference max)."""
    return (_rescale(acc_lo, a0, a1), _rescale(acc_hi, a0, a1), _rescale(acc_c, a0, a1), l0 * a0, l1 * a1, ls0 * a0,
            ls1 * a1)


@gluon.jit
def _gluon_fused_kernel(kc_ptr, ks_ptr, vc_ptr, vs_ptr, bt_ptr, lens_ptr, qt_ptr, fidx_ptr, qm_ptr, m_ptr, l_ptr,
                        acc_ptr, q_ptr, kmean_ptr, H, n_parts, pages_per_split, max_batch, sm_scale, softcap, window,
                        skc_p, skc_h, sks_p, sks_h, svc_p, svc_h, svs_p, svs_h, sbt, sqb, sqt, sqh, smb, smh,
                        Q_LEN: gl.constexpr, GROUP: gl.constexpr, ROWS: gl.constexpr, D: gl.constexpr,
                        KBITS: gl.constexpr, VBITS: gl.constexpr, PAGE: gl.constexpr, SOFTCAP: gl.constexpr,
                        WINDOW: gl.constexpr, BLOCK_M: gl.constexpr, RS: gl.constexpr, CAUSAL_PAGES: gl.constexpr,
                        NW: gl.constexpr, WK: gl.constexpr, WV: gl.constexpr, KQ: gl.constexpr, OFF64: gl.constexpr,
                        VEC_K: gl.constexpr, VEC_V: gl.constexpr, L2PF: gl.constexpr, OUT_SCALE: gl.constexpr,
                        LOG2CT: gl.constexpr, KFIELDS: gl.constexpr, VFIELDS: gl.constexpr,
                        QIN: gl.constexpr, CENTER_K: gl.constexpr, INV_SQRT_N: gl.constexpr):
    # Grid (batch · KV heads, splits), as the split programs of ``_attn_split_kernel`` (one row block, q_len · group
    # <= 8); each split writes its max, Σp and partial Σ p·x in the original basis, so ``_attn_reduce_kernel``
    # completes the attention. Warp w takes the units w, w + NW, .. of each page with its own running max; the warps
    # are merged at the split's end. The next page's key and value words are loaded before the current page is
    # decoded; with L2PF > 0 the page L2PF further ahead is prefetched into L2.
    L: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [NW, 1], [1, 0])
    zero_i, lane, warp, g, c = _lanes(L, NW)
    _launch_dependents(zero_i)  # the uncompressed part's kernel (PDL) may start beside this grid
    pid, split, b, h, comp, n_sink, part, col0, col1, q_index0, q_index1 = _split_program(lens_ptr, H, n_parts,
                                                                                         max_batch, c, Q_LEN, GROUP)
    zero = gl.zeros([NW, 32], gl.float32, L)
    if QIN:  # the query operand made here from q (head_dim 128): no prep kernel before the pass
        QF, qm0, qm1, unit = _query_in_pass(q_ptr, kmean_ptr, b, h, g, c, zero, sqb, sqt, sqh, smb, smh, sm_scale,
                                            GROUP, ROWS, CENTER_K, SOFTCAP, INV_SQRT_N)
    else:
        QF, qm0, qm1, unit = _query_operand(qt_ptr, fidx_ptr, qm_ptr, pid, lane, col0, col1, sm_scale, D, KBITS, KQ,
                                            BLOCK_M, SOFTCAP)
    kc4 = _coset_const(QF, zero, zero_i, D, KBITS)
    if KFIELDS:  # keys in the "fields" layout
        QF = _fields_query(QF, KBITS)
    UPW: gl.constexpr = PAGE // 16 // NW
    offs = ()  # keys: per unit of a page, this thread's word offsets and token g
    for k in gl.static_range(UPW):
        tk = 16 * (k * NW + warp) + g
        o_klo, o_khi = _word_offsets(tk, c, D, KBITS, WK, KFIELDS)
        if KFIELDS and KBITS == 3:  # the shared word 12
            offs = offs + ((o_klo, o_khi, tk, tk * WK + 12),)
        else:
            offs = offs + ((o_klo, o_khi, tk),)
    lo_w, sel_lo, hi_w, sel_hi = _value_spans(g, zero_i, D, VBITS, VFIELDS)
    tv = 16 * warp + 2 * c  # values: the thread's first token in unit 0 of a page
    o_vlo = tv * WV + lo_w
    o_vhi = tv * WV + hi_w
    p_lo, p_hi, end, last = _split_pages(split, pages_per_split, comp, PAGE)
    kc_h = kc_ptr + h * skc_h
    ks_h = ks_ptr + h * sks_h
    vc_h = vc_ptr + h * svc_h
    vs_h = vs_ptr + h * svs_h
    bt_b = bt_ptr + b * sbt
    acc_lo, acc_hi, acc_c = _value_accumulators(zero, D, VBITS, VFIELDS)
    m0 = zero - float("inf")  # running max, Σp and Σp·s of rows 2c, 2c + 1 (this warp's units)
    m1 = zero - float("inf")
    l0 = zero
    l1 = zero
    ls0 = zero
    ls1 = zero
    page = gl.load(bt_b + gl.minimum(p_lo, last))
    nxt_k = _page_units(kc_h, ks_h, page, skc_p, sks_p, offs, D, KBITS, WK, UPW, OFF64, VEC_K)
    nxt_v = _fused_value_units(vc_h, vs_h, page, svc_p, svs_p, o_vlo, o_vhi, offs, D, VBITS, WV, UPW, NW, OFF64,
                               VEC_V)
    page = gl.load(bt_b + gl.minimum(p_lo + 1, last))
    first = lane + warp
    l2_page = 0  # (a constant without L2PF: nothing carried)
    if L2PF > 0:
        for i in gl.static_range(L2PF):
            pf = gl.load(bt_b + gl.minimum(p_lo + 1 + i, last))
            _l2_prefetch(kc_h, ks_h, pf, skc_p, sks_p, first, PAGE * WK * 4, PAGE * 2, OFF64)
            _l2_prefetch(vc_h, vs_h, pf, svc_p, svs_p, first, PAGE * WV * 4, PAGE * 2, OFF64)
        l2_page = gl.load(bt_b + gl.minimum(p_lo + 1 + L2PF, last))
    streams = (kc_h, ks_h, vc_h, vs_h, skc_p, sks_p, svc_p, svs_p, bt_b, last, first, o_vlo, o_vhi, offs)
    query = (QF, kc4, unit, qm0, qm1, sm_scale, softcap, n_sink, q_index0, q_index1, window, c, zero, zero_i,
             sel_lo, sel_hi)
    state = (nxt_k, nxt_v, page, l2_page, acc_lo, acc_hi, acc_c, m0, m1, l0, l1, ls0, ls1)
    if NW > 1:  # the pages wholly before the end run without its mask, the split's last page if partial after them
        p_full = gl.maximum(gl.minimum(p_hi, end // PAGE), p_lo)
        for pg in range(p_lo, p_full):
            state = _fused_page(pg, end, False, state, streams, query, False, D, KBITS, VBITS, PAGE, SOFTCAP, WINDOW,
                                CAUSAL_PAGES, NW, WK, WV, UPW, OFF64, VEC_K, VEC_V, L2PF, KFIELDS,
                                VFIELDS)
        for pg in range(p_full, p_hi):
            state = _fused_page(pg, end, True, state, streams, query, True, D, KBITS, VBITS, PAGE, SOFTCAP, WINDOW,
                                CAUSAL_PAGES, NW, WK, WV, UPW, OFF64, VEC_K, VEC_V, L2PF, KFIELDS,
                                VFIELDS)
    else:  # one warp: one loop, each page masked if partial (a second copy of the page spills at 2 bits)
        for pg in range(p_lo, p_hi):
            state = _fused_page(pg, end, pg * PAGE + PAGE > end, state, streams, query, True, D, KBITS, VBITS, PAGE,
                                SOFTCAP, WINDOW, CAUSAL_PAGES, NW, WK, WV, UPW, OFF64, VEC_K, VEC_V, L2PF, KFIELDS,
                                VFIELDS)
    acc_lo, acc_hi, acc_c, m0, m1, l0, l1, ls0, ls1 = (state[4], state[5], state[6], state[7], state[8], state[9],
                                                        state[10], state[11], state[12])
    # Σp and Σp·s over the lanes of a column; then the warps, each scaled to the split's max.
    l0 = _shfl_add(_shfl_add(_shfl_add(l0, "4"), "8"), "16")
    l1 = _shfl_add(_shfl_add(_shfl_add(l1, "4"), "8"), "16")
    ls0 = _shfl_add(_shfl_add(_shfl_add(ls0, "4"), "8"), "16")
    ls1 = _shfl_add(_shfl_add(_shfl_add(ls1, "4"), "8"), "16")
    M0 = gl.max(m0, axis=0)
    M1 = gl.max(m1, axis=0)
    if NW > 1:
        w0 = gl.exp2(m0 - gl.expand_dims(gl.where(M0 == float("-inf"), 0.0, M0), 0))
        w1 = gl.exp2(m1 - gl.expand_dims(gl.where(M1 == float("-inf"), 0.0, M1), 0))
        acc_lo, acc_hi, acc_c, l0, l1, ls0, ls1 = _rescale_all(acc_lo, acc_hi, acc_c, l0, l1, ls0, ls1, w0, w1)
    l0 = gl.sum(l0, axis=0)
    l1 = gl.sum(l1, axis=0)
    ls0 = gl.sum(ls0, axis=0)
    ls1 = gl.sum(ls1, axis=0)
    lane1 = gl.arange(0, 32, layout=gl.SliceLayout(0, L))
    c1 = lane1 & 3
    g1 = lane1 >> 2
    s0 = 2 * c1
    s1 = s0 + 1
    g0 = lane1 < 4
    gl.store(m_ptr + part * BLOCK_M + s0, M0, mask=g0 & (s0 < RS))
    gl.store(m_ptr + part * BLOCK_M + s1, M1, mask=g0 & (s1 < RS))
    gl.store(l_ptr + part * BLOCK_M + s0, l0, mask=g0 & (s0 < RS))
    gl.store(l_ptr + part * BLOCK_M + s1, l1, mask=g0 & (s1 < RS))
    _store_values_partial(acc_lo, acc_hi, acc_c, ls0, ls1, g1, s0, s1, acc_ptr + part * BLOCK_M * D, ROWS, D, VBITS,
                          OUT_SCALE, LOG2CT, VFIELDS)


@gluon.jit
def _fused_page(pg, end, partial, state, streams, query, MASKED: gl.constexpr, D: gl.constexpr, KBITS: gl.constexpr,
                VBITS: gl.constexpr, PAGE: gl.constexpr, SOFTCAP: gl.constexpr, WINDOW: gl.constexpr,
                CAUSAL_PAGES: gl.constexpr, NW: gl.constexpr, WK: gl.constexpr, WV: gl.constexpr, UPW: gl.constexpr,
                OFF64: gl.constexpr, VEC_K: gl.constexpr, VEC_V: gl.constexpr, L2PF: gl.constexpr,
                KFIELDS: gl.constexpr, VFIELDS: gl.constexpr):
    """One page of the fused pass: the next page's words loaded (and one further ahead prefetched into L2), this
    page's logits, the running max and rescale, its value products. ``state``: (this page's key and value words,
    the next page's block-table entry, the L2 prefetch's, the accumulators, running max, Σp and Σp·s);
    ``partial``: the page reaches past ``end`` (keys and value scales there masked), read only where ``MASKED``."""
    if not MASKED:
        partial = False
    cur_k, cur_v, page, l2_page, acc_lo, acc_hi, acc_c, m0, m1, l0, l1, ls0, ls1 = state
    kc_h, ks_h, vc_h, vs_h, skc_p, sks_p, svc_p, svs_p, bt_b, last, first, o_vlo, o_vhi, offs = streams
    QF, kc4, unit, qm0, qm1, sm_scale, softcap, n_sink, q_index0, q_index1, window, c, zero, zero_i, sel_lo, \
        sel_hi = query
    if L2PF > 0:
        _l2_prefetch(kc_h, ks_h, l2_page, skc_p, sks_p, first, PAGE * WK * 4, PAGE * 2, OFF64)
        _l2_prefetch(vc_h, vs_h, l2_page, svc_p, svs_p, first, PAGE * WV * 4, PAGE * 2, OFF64)
        l2_page = gl.load(bt_b + gl.minimum(pg + 2 + L2PF, last))
    nxt_k = _page_units(kc_h, ks_h, page, skc_p, sks_p, offs, D, KBITS, WK, UPW, OFF64, VEC_K)
    nxt_v = _fused_value_units(vc_h, vs_h, page, svc_p, svs_p, o_vlo, o_vhi, offs, D, VBITS, WV, UPW, NW, OFF64,
                               VEC_V)
    page = gl.load(bt_b + gl.minimum(pg + 2, last))
    xs = ()
    mp0 = m0
    mp1 = m1
    for k in gl.static_range(UPW):
        x = _unit_logits(cur_k[k], QF, kc4, c, zero, unit, qm0, qm1, sm_scale, softcap, pg * PAGE + offs[k][2],
                         end, partial, n_sink, q_index0, q_index1, window, D, KBITS, SOFTCAP, WINDOW, CAUSAL_PAGES,
                         KFIELDS)
        xs = xs + (x,)
        mp0 = gl.maximum(mp0, gl.maximum(x[0], x[2]))
        mp1 = gl.maximum(mp1, gl.maximum(x[1], x[3]))
    mp0 = _shfl_max(_shfl_max(_shfl_max(mp0, "4"), "8"), "16")  # the new max of rows 2c, 2c + 1
    mp1 = _shfl_max(_shfl_max(_shfl_max(mp1, "4"), "8"), "16")
    ms0 = gl.where(mp0 == float("-inf"), 0.0, mp0)  # nothing seen yet: any finite reference
    ms1 = gl.where(mp1 == float("-inf"), 0.0, mp1)
    a0 = gl.exp2(m0 - ms0)
    a1 = gl.exp2(m1 - ms1)
    acc_lo, acc_hi, acc_c, l0, l1, ls0, ls1 = _rescale_all(acc_lo, acc_hi, acc_c, l0, l1, ls0, ls1, a0, a1)
    for k in gl.static_range(UPW):
        x0, x1, x2, x3 = xs[k]
        words, sv0, sv1 = cur_v[k]
        p0 = gl.exp2(x0 - ms0)  # (token g, row 2c), (g, 2c + 1), (g + 8, 2c), (g + 8, 2c + 1)
        p1 = gl.exp2(x1 - ms1)
        p2 = gl.exp2(x2 - ms0)
        p3 = gl.exp2(x3 - ms1)
        q0 = p0 * sv0
        q1 = p1 * sv0
        q2 = p2 * sv1
        q3 = p3 * sv1
        if partial:  # slots past the sequence may hold any scale
            tk = pg * PAGE + offs[k][2]
            q0 = gl.where(tk < end, q0, 0.0)
            q1 = gl.where(tk < end, q1, 0.0)
            q2 = gl.where(tk + 8 < end, q2, 0.0)
            q3 = gl.where(tk + 8 < end, q3, 0.0)
        l0 = l0 + (p0 + p2)
        l1 = l1 + (p1 + p3)
        ls0 = ls0 + (q0 + q2)
        ls1 = ls1 + (q1 + q3)
        b0 = _transpose8(_f16x2(q0, q1))  # tokens 2c, 2c + 1 of row g
        b1 = _transpose8(_f16x2(q2, q3))  # tokens 2c + 8, 2c + 9
        acc_lo, acc_hi, acc_c = _value_products(words, b0, b1, acc_lo, acc_hi, acc_c, sel_lo, sel_hi, zero_i, D,
                                                VBITS, VFIELDS)
    return nxt_k, nxt_v, page, l2_page, acc_lo, acc_hi, acc_c, mp0, mp1, l0, l1, ls0, ls1


@gluon.jit
def _fused_value_units(vc_h, vs_h, page, svc_p, svs_p, o_lo, o_hi, offs, D: gl.constexpr, VBITS: gl.constexpr,
                       W: gl.constexpr, UPW: gl.constexpr, NW: gl.constexpr, OFF64: gl.constexpr, VEC: gl.constexpr):
    """What the fused pass needs of a page's values: per unit, this thread's value words (``_value_words``) and the
    value scales of its key tokens g and g + 8 (``offs``), which weight the probabilities before the transpose."""
    if OFF64:
        page = page.to(gl.int64)
    p_lo = vc_h + page * svc_p + o_lo
    p_hi = vc_h + page * svc_p + o_hi
    sbase = vs_h + page * svs_p
    units = ()
    for k in gl.static_range(UPW):
        words = _value_words(p_lo, p_hi, 16 * NW * k, D, VBITS, W, VEC)
        t0 = offs[k][2]
        units = units + ((words, gl.load(sbase + t0).to(gl.float32), gl.load(sbase + (t0 + 8)).to(gl.float32)),)
    return units


@gluon.jit
def _store_values_partial(acc_lo, acc_hi, acc_c, ls0, ls1, g1, col0, col1, out_ptr, ROWS: gl.constexpr,
                          D: gl.constexpr, VBITS: gl.constexpr, OUT_SCALE: gl.constexpr, LOG2CT: gl.constexpr,
                          FIELDS: gl.constexpr):
    """A split's partial Σ p·x in the original basis, rows col0 and col1 of ``out_ptr`` ([rows, D] fp32), from the
    accumulators of the warps (summed here; each already scaled to the split's max), this thread's coordinates g1·D/8
    .. in storage order: the planes and coset flags weighted (v = lo + c/2 + 4·hi + OFF, OFF carried by Σ p·s =
    ``ls0``/``ls1``), then rotated back. ``FIELDS``: whole indices in ``acc_lo`` times 16^(r % 2), no high plane."""
    CT: gl.constexpr = D // 8
    OFF: gl.constexpr = 0.25 - (1 << (VBITS - 1))
    y0 = ()
    y1 = ()
    for r in gl.static_range(CT):
        # (c0, c1) of tile r // 2: row g (coordinate r, r even); (c2, c3): row g + 8 (r odd). The coset tile of the
        # thread's group r // 8 is r // 16, rows g (even group) or g + 8.
        POW = 4 * (r % 2) if FIELDS else 2 * (r % 4)  # the register's power of two
        a0 = gl.sum(acc_lo[r // 2][2 * (r % 2)], axis=0) * (SUBNORMAL_UNIT / (1 << POW))
        a1 = gl.sum(acc_lo[r // 2][2 * (r % 2) + 1], axis=0) * (SUBNORMAL_UNIT / (1 << POW))
        if VBITS == 3:
            a0 = a0 + gl.sum(acc_hi[r // 2][2 * (r % 2)], axis=0) * (4.0 * SUBNORMAL_UNIT / (1 << (r % 8)))
            a1 = a1 + gl.sum(acc_hi[r // 2][2 * (r % 2) + 1], axis=0) * (4.0 * SUBNORMAL_UNIT / (1 << (r % 8)))
        elif VBITS == 4 and not FIELDS:
            a0 = a0 + gl.sum(acc_hi[r // 2][2 * (r % 2)], axis=0) * (4.0 * SUBNORMAL_UNIT / (1 << (2 * (r % 4))))
            a1 = a1 + gl.sum(acc_hi[r // 2][2 * (r % 2) + 1], axis=0) * (4.0 * SUBNORMAL_UNIT / (1 << (2 * (r % 4))))
        y0 = y0 + (a0 + gl.sum(acc_c[r // 16][2 * (r // 8 % 2)], axis=0) * (SUBNORMAL_UNIT * 0.25) + ls0 * OFF,)
        y1 = y1 + (a1 + gl.sum(acc_c[r // 16][2 * (r // 8 % 2) + 1], axis=0) * (SUBNORMAL_UNIT * 0.25) + ls1 * OFF,)
    # Back to the original basis: x = Rᵀ y / √n = σ(H y) / √D (Sylvester H commutes with the bit permutation σ of
    # the storage order, docs/format.md). Coordinate g·CT + r: H = H_8 over g (lanes 4, 8, 16 apart) ⊗ H_CT over r
    # (in registers); H y's element j lands at x[σ(j)], σ(g·CT + r) = σ(g·CT) + σ(r).
    y0 = _fwht_regs(y0, CT, LOG2CT)
    y1 = _fwht_regs(y1, CT, LOG2CT)
    sgn = 1.0 - 2.0 * (g1 & 1).to(gl.float32)
    y0 = _fwht_lanes(y0, sgn, CT, "4")
    y1 = _fwht_lanes(y1, sgn, CT, "4")
    sgn = 1.0 - 2.0 * ((g1 >> 1) & 1).to(gl.float32)
    y0 = _fwht_lanes(y0, sgn, CT, "8")
    y1 = _fwht_lanes(y1, sgn, CT, "8")
    sgn = 1.0 - 2.0 * ((g1 >> 2) & 1).to(gl.float32)
    y0 = _fwht_lanes(y0, sgn, CT, "16")
    y1 = _fwht_lanes(y1, sgn, CT, "16")
    j = g1 * CT
    sg = (j & ~30) | (((j >> 3) & 3) << 1) | (((j >> 1) & 3) << 3)  # σ(g·CT)
    out0 = out_ptr + col0 * D + sg
    out1 = out0 + D
    for r in gl.static_range(CT):
        sr = (r & ~30) | (((r >> 3) & 3) << 1) | (((r >> 1) & 3) << 3)
        gl.store(out0 + sr, y0[r] * OUT_SCALE, mask=col0 < ROWS)
        gl.store(out1 + sr, y1[r] * OUT_SCALE, mask=col1 < ROWS)


@gluon.jit
def _fwht_regs(y, N: gl.constexpr, LOGN: gl.constexpr):
    """Sylvester Hadamard over a thread's N = 2^LOGN registers (a tuple): butterflies (a, b) -> (a + b, a - b)."""
    for s in gl.static_range(LOGN):
        z = ()
        for r in gl.static_range(N):
            if (r >> s) & 1:
                z = z + (y[r - (1 << s)] - y[r],)
            else:
                z = z + (y[r] + y[r + (1 << s)],)
        y = z
    return y


@gluon.jit
def _fwht_lanes(y, sgn, N: gl.constexpr, MASK: gl.constexpr):
    """One butterfly stage across lanes MASK apart: the lower lane gets a + b, the upper a - b (sgn: +1 / -1)."""
    z = ()
    for r in gl.static_range(N):
        other = gl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, " + MASK + ", 31, -1;", "=f,f", [y[r]],
                                          dtype=gl.float32, is_pure=True, pack=1)
        z = z + (other + sgn * y[r],)
    return z


# ---------------------------------------------------------------------------------------------------- launcher


MIN_TRITON = (3, 6)  # the Gluon API this module is written against (compiled and tested with 3.6 and 3.9)


def _triton_version() -> tuple:
    return tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])


def supports(head_dim: int, bits: int, page_size: int, rows: int) -> bool:
    """Whether a Gluon pass covers a launch (``bits``: the key bits for the keys pass, the value bits for the values
    pass): a triton >= 3.6, head_dim 64/128/256, 2-4 bits, pages of a multiple of 16 tokens, q_len · group <= 8 (one
    row block of at most 8 rows; more rows run the portable kernel)."""
    return (_triton_version() >= MIN_TRITON and head_dim in HEAD_DIMS and bits in (2, 3, 4)
            and page_size % 16 == 0 and 1 <= rows <= MAX_ROWS)


def supports_fused(head_dim: int, key_bits: int, value_bits: int, page_size: int, rows: int) -> bool:
    """Whether the fused pass covers a launch: both passes' conditions (``supports``), and at head_dim 256 2 value
    bits only (3-4 value bits need more accumulator registers than a thread has beside the query operand: ptxas
    spills)."""
    return (supports(head_dim, key_bits, page_size, rows) and supports(head_dim, value_bits, page_size, rows)
            and (head_dim < 256 or value_bits == 2))


def fused_warps(num_warps: int, head_dim: int, key_bits: int, page_size: int) -> int:
    """Warps per program of the fused pass: ``num_warps``, but with 3-4 key bits at least 2 at head_dim 128 and 4 at
    head_dim 256 (a warp holds its units' words of two pages; more units per warp take more registers than a thread
    has: ptxas spills), and at most one per 16-token unit."""
    if key_bits > 2 and head_dim >= 128:
        num_warps = max(num_warps, 2 if head_dim == 128 else 4)
    return max(1, min(num_warps, page_size // 16))


def num_regs(head_dim: int, key_bits: int) -> int:
    """B-fragment registers per thread (the query operand): coset (>= 2), low plane, high plane."""
    return max(2, head_dim // 64) + head_dim // 8 * (2 if key_bits > 2 else 1)


def hmma_per_unit(head_dim: int, key_bits: int) -> int:
    """m16n8k16 products per 16-token unit."""
    return num_regs(head_dim, key_bits) // 2


def fragment_elements(head_dim: int, key_bits: int) -> list:
    """For each B register r and thread column c (lane % 4) and half h: (block, coordinate, log2 of the power of two
    on the A element) with block 'coset' (coordinate: the lattice group; None for padding), 'lo' or 'hi' (the
    coordinate in storage order within that plane). The kernel's register order (module docstring)."""
    D = head_dim
    ncr, nlr = max(2, D // 64), D // 8
    out = []
    for r in range(num_regs(D, key_bits)):
        row = []
        for c in range(4):
            pair = []
            for h in range(2):
                if r < ncr:
                    k = r
                    pair.append(("coset", 2 * (c * (D // 64) + k) + h if k < D // 64 else None, 0))
                elif r < ncr + nlr:
                    k = r - ncr
                    w, j = c * (D // 64) + k // 8, k % 8
                    pair.append(("lo", 16 * w + 8 * h + j, 2 * (j % 4)))
                else:
                    k = r - ncr - nlr
                    if key_bits == 3:
                        if D >= 128:
                            w, j = c * (D // 128) + k // 16, k % 16
                        else:
                            w, j = c // 2, 8 * (c % 2) + k
                        pair.append(("hi", 32 * w + 16 * h + j, j % 8))
                    else:
                        w, j = c * (D // 64) + k // 8, k % 8
                        pair.append(("hi", 16 * w + 8 * h + j, 2 * (j % 4)))
            row.append(pair)
        out.append(row)
    return out


@functools.lru_cache(maxsize=None)
def fragment_index(head_dim: int, key_bits: int, block_m: int, device: str) -> torch.Tensor:
    """Flat indices into one program's prep output ``q_t[pid]`` ([KQ, block_m] fp16, ``_query_prep_kernel``, pair
    order) that give its B fragments in the kernel's order: int32 [NREG, 32 lanes, 2 halves], lane 4g' + c reading
    column g' (the kernel gathers them once per program). Checks that the prep's power of two at each element undoes
    the kernel's (``kernels._pair_inv_scale``)."""
    from .launcher import _deal_order, _pair_order

    D = head_dim
    dp = ref.next_pow2(D)
    nwl = dp // 16
    ng = max(16, 2 * nwl)
    word, reg, half = _deal_order(nwl, ng // (2 * nwl))
    coset_kappa = {int(2 * w + hh): k for k, (w, r, hh) in enumerate(zip(word, reg, half)) if r == 0}
    hb = 1 if key_bits == 3 else 2

    def plane(fbits: int):
        order = _pair_order(dp * fbits // 32, fbits)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order))
        cw = min(4, dp * fbits // 32)
        power = fbits * (torch.arange(len(order)) // 2 // cw % (8 // fbits))  # kernels._pair_inv_scale
        return inv, power

    lo_inv, lo_pow = plane(2)
    hi_inv, hi_pow = plane(hb) if key_bits > 2 else (None, None)
    idx = torch.empty(num_regs(D, key_bits), 32, 2, dtype=torch.long)
    for r, row in enumerate(fragment_elements(D, key_bits)):
        for c, pair in enumerate(row):
            for h, (block, coord, p) in enumerate(pair):
                if block == "coset":
                    kappa = coset_kappa[coord] if coord is not None else 0  # padding: times a zero A register
                elif block == "lo":
                    kappa = int(lo_inv[coord])
                    assert int(lo_pow[kappa]) == p, (r, c, h)
                    kappa += ng
                else:
                    kappa = int(hi_inv[coord])
                    assert int(hi_pow[kappa]) == p, (r, c, h)
                    kappa += ng + dp
                for gq in range(8):
                    idx[r, 4 * gq + c, h] = kappa * block_m + gq
    return idx.flatten().to(device=device, dtype=torch.int32)


def keys_pass(cache, q_t, q_mean, logits, m_part, *, q_len: int, group: int, block_m: int, rs: int, num_splits: int,
              pages_per_split: int, n_tok: int, scale: float, softcap, window, num_warps: int = 2,
              prefetch: int = 1, l2_prefetch: int = 2, maxnreg=None, launch=None) -> None:
    """Launch the Gluon keys pass where ``decode_attention`` launches ``_attn_keys_kernel`` (same workspace, same
    partial maxima). ``q_t``/``q_mean``: the prep's outputs (one page slot, [programs, 1, KQ, block_m] fp16).
    ``num_warps``: warps per program (each takes its own 16-token units of a page); ``prefetch``: pages whose codes
    are loaded ahead into registers (1 or 2); ``l2_prefetch``: prefetch the page that many further ahead into L2
    (0: off); ``maxnreg``: the register cap handed to ptxas; ``launch``: ``nqkernels.launch.launcher``'s (default:
    a plain launch). The defaults measured fastest on the H200 at 32K × 8,
    128K × 1 and 8K × 16 (perf/results/attention_h200.md)."""
    codec = cache.codec
    D, P = codec.head_dim, codec.page_size
    kc, ks = cache.k_codes, cache.k_scales
    words = kc.shape[3]
    assert codec.layout("key") == "planes", "keys in the 'fields' layout: the fused pass (fused_pass) reads them"
    assert kc.stride(3) == 1 and kc.stride(2) == words and ks.stride(2) == 1 and q_t.is_contiguous()
    nw = max(1, min(num_warps, P // 16))
    n_prog, _, kq, _ = q_t.shape
    # vector loads of a thread's runs of 2 or 4 words: aligned when the pool and every stride are
    vec = kc.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in kc.stride()[:2]) and words % 4 == 0
    # bulk L2 prefetch of a page's codes and scales: 16-byte aligned starts
    l2 = (kc.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in kc.stride()[:2]) and ks.data_ptr() % 16 == 0
          and all(st * ks.element_size() % 16 == 0 for st in ks.stride()[:2]))
    (launch or launcher(None))(_gluon_keys_kernel, (n_prog, num_splits),
        kc, ks, cache.block_table, cache.lengths, q_t, fragment_index(D, codec.key_bits, block_m, str(q_t.device)),
        q_mean, logits, m_part, cache.num_kv_heads, m_part.shape[1], pages_per_split, n_tok, cache.max_batch, scale,
        float(softcap or 1.0), int(window or 0), *kc.stride()[:2], *ks.stride()[:2], cache.block_table.stride(0),
        Q_LEN=q_len, GROUP=group, D=D, KBITS=codec.key_bits, PAGE=P, SOFTCAP=softcap is not None,
        WINDOW=window is not None, BLOCK_M=block_m, RS=rs, CAUSAL_PAGES=q_len > 1, NW=nw, W=words, KQ=kq,
        OFF64=kc.numel() >= 2 ** 31 or ks.numel() >= 2 ** 31, VEC=vec, PF=prefetch, L2PF=l2_prefetch if l2 else 0,
        num_warps=nw, maxnreg=maxnreg)


def values_pass(cache, logits, m_part, l_part, acc_part, *, rows: int, block_m: int, rs: int, num_splits: int,
                pages_per_split: int, n_tok: int, num_warps: int = 2, l2_prefetch: int = 2, maxnreg=None,
                launch=None) -> None:
    """Launch the Gluon values pass for the compressed splits of the two-pass decode: from the keys pass's logits
    workspace and split maxima, each split's Σp ([programs, parts, block_m] ``l_part``) and Σ p·x in the
    original basis ([programs, parts, block_m, head_dim] ``acc_part``, rows < ``rows``), as the compressed
    programs of ``kernels._attn_values_kernel`` write them. ``num_warps``: warps per program (each takes its own 16-token
    units); ``l2_prefetch``: prefetch the page that many ahead into L2 (0: off); ``maxnreg``: the register cap;
    ``launch``: ``nqkernels.launch.launcher``'s (default: a plain launch)."""
    codec = cache.codec
    D, P = codec.head_dim, codec.page_size
    vc, vs = cache.v_codes, cache.v_scales
    words = vc.shape[3]
    assert vc.stride(3) == 1 and vc.stride(2) == words and vs.stride(2) == 1
    nw = max(1, min(num_warps, P // 16))
    vec = vc.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in vc.stride()[:2]) and words % 4 == 0
    l2 = (vc.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in vc.stride()[:2]) and vs.data_ptr() % 16 == 0
          and all(st * vs.element_size() % 16 == 0 for st in vs.stride()[:2]))
    (launch or launcher(None))(_gluon_values_kernel, (logits.shape[0], num_splits),
        vc, vs, cache.block_table, cache.lengths, logits, m_part, l_part, acc_part, cache.num_kv_heads,
        m_part.shape[1], pages_per_split, n_tok, cache.max_batch, *vc.stride()[:2], *vs.stride()[:2],
        cache.block_table.stride(0),
        ROWS=rows, D=D, VBITS=codec.value_bits, PAGE=P, BLOCK_M=block_m, RS=rs, NW=nw, W=words,
        OFF64=vc.numel() >= 2 ** 31 or vs.numel() >= 2 ** 31, VEC=vec, L2PF=l2_prefetch if l2 else 0,
        OUT_SCALE=D ** -0.5, LOG2CT=(D // 8).bit_length() - 1, VFIELDS=codec.layout("value") == "fields",
        num_warps=nw, maxnreg=maxnreg)


def fused_constants(*, head_dim: int, key_bits: int, value_bits: int, page_size: int, q_len: int, group: int,
                    block_m: int, rs: int, num_warps: int, softcap: bool = False, window: bool = False,
                    off64: bool = False, vec_k: bool = True, vec_v: bool = True, l2_prefetch: int = 0,
                    key_layout: str = "auto", query_in_pass: bool = False, center_keys: bool = False) -> dict:
    """The constexpr arguments of ``_gluon_fused_kernel`` for a launch (``fused_pass``; also what the sm_90 compile
    tests and ``perf.fused_budget`` compile): ``num_warps`` as ``fused_warps`` gives it, ``off64`` a pool of 2^31
    words or more, ``vec_k``/``vec_v`` vector loads of a thread's runs, ``l2_prefetch`` the L2 prefetch distance
    (0: off), ``key_layout`` the keys' (``KVCodec.layout``; "auto": ``config.code_layout``'s), ``query_in_pass``
    the query operand made by the pass from q (where ``supports_query_in_pass``), ``center_keys`` then q·mean_k
    too."""
    D = head_dim
    layout = code_layout("key", key_bits, D) if key_layout == "auto" else key_layout
    v_layout = code_layout("value", value_bits, D)
    return dict(Q_LEN=q_len, GROUP=group, ROWS=q_len * group, D=D, KBITS=key_bits, VBITS=value_bits, PAGE=page_size,
                SOFTCAP=softcap, WINDOW=window, BLOCK_M=block_m, RS=rs, CAUSAL_PAGES=q_len > 1, NW=num_warps,
                WK=code_words(D, key_bits, layout), WV=code_words(D, value_bits, v_layout), KFIELDS=layout == "fields",
                VFIELDS=v_layout == "fields",
                KQ=max(16, D // 8) + D * (2 if key_bits > 2 else 1),
                OFF64=off64, VEC_K=vec_k, VEC_V=vec_v, L2PF=l2_prefetch, OUT_SCALE=D ** -0.5,
                LOG2CT=(D // 8).bit_length() - 1, QIN=query_in_pass, CENTER_K=center_keys and query_in_pass,
                INV_SQRT_N=1.0 / math.sqrt(ref.transform_norm(D)))


def supports_query_in_pass(head_dim: int, key_bits: int, key_layout: str) -> bool:
    """Whether the fused pass makes its query operand itself (``_query_in_pass``), so no prep kernel runs before
    it: head_dim 128 with keys whose operand is the coset and low-plane registers only (2-bit keys, "fields")."""
    return head_dim == 128 and (key_bits == 2 or key_layout == "fields")


def fused_pass(cache, q, q_t, q_mean, m_part, l_part, acc_part, *, q_len: int, group: int, block_m: int, rs: int,
               num_splits: int, pages_per_split: int, scale: float, softcap, window, num_warps: int = 1,
               l2_prefetch: int = 2, maxnreg=None, launch=None) -> None:
    """Launch the fused Gluon pass for the compressed splits: keys and values in one loop with an online softmax,
    each split's max, Σp and Σ p·x in the original basis ([programs, parts, block_m(, head_dim)]
    ``m_part``/``l_part``/``acc_part``, rows < q_len · group), as the compressed programs of
    ``kernels._attn_split_kernel`` write them. No logits workspace. Covers what ``supports_fused`` says. ``q``: the
    queries [B, q_len, q_heads, head_dim] in the cache's dtype (fp16/bf16, unit stride in head_dim); ``q_t``/``q_mean``:
    the prep's query operand [programs, 1, KQ, block_m] fp16 and q·mean_k [programs, block_m] fp32, or None where the
    pass makes them from ``q`` itself (``supports_query_in_pass``: then no prep kernel runs).
    ``num_warps``: warps per program (each takes its own 16-token units, merged at the split's end; ``fused_warps``);
    ``l2_prefetch``: prefetch the page that many ahead into L2 (0: off); ``maxnreg``: the register cap; ``launch``:
    ``nqkernels.launch.launcher``'s (default: a plain launch)."""
    codec = cache.codec
    D, P = codec.head_dim, codec.page_size
    kc, ks, vc, vs = cache.k_codes, cache.k_scales, cache.v_codes, cache.v_scales
    wk, wv = kc.shape[3], vc.shape[3]
    assert kc.stride(3) == 1 and kc.stride(2) == wk and ks.stride(2) == 1 and q.stride(3) == 1
    assert vc.stride(3) == 1 and vc.stride(2) == wv and vs.stride(2) == 1
    qin = q_t is None
    if qin and not supports_query_in_pass(D, codec.key_bits, codec.layout("key")):
        raise ValueError(f"fused_pass: q_t is needed at head_dim {D} with {codec.key_bits}-bit "
                         f"{codec.layout('key')!r} keys (supports_query_in_pass)")
    nw = fused_warps(num_warps, D, codec.key_bits, P)
    n_prog = m_part.shape[0]
    vec_k = kc.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in kc.stride()[:2]) and wk % 4 == 0
    vec_v = vc.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in vc.stride()[:2]) and wv % 4 == 0
    l2 = all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:2])
             for t in (kc, ks, vc, vs))
    consts = fused_constants(head_dim=D, key_bits=codec.key_bits, value_bits=codec.value_bits, page_size=P,
                             q_len=q_len, group=group, block_m=block_m, rs=rs, num_warps=nw,
                             softcap=softcap is not None, window=window is not None,
                             off64=max(t.numel() for t in (kc, ks, vc, vs)) >= 2 ** 31, vec_k=vec_k, vec_v=vec_v,
                             l2_prefetch=l2_prefetch if l2 else 0, key_layout=codec.layout("key"),
                             query_in_pass=qin, center_keys=codec.center_keys)
    assert (consts["WK"], consts["WV"]) == (wk, wv), "code words of another shape"
    if qin:  # (placeholders of the prep's operands, never read)
        q_t, fidx, q_mean = m_part, cache.lengths, m_part
    else:
        assert q_t.is_contiguous() and q_t.shape[2] == consts["KQ"], "query operand of another shape"
        fidx = fragment_index(D, codec.key_bits, block_m, str(q_t.device))
    k_mean = cache.k_mean
    (launch or launcher(None))(_gluon_fused_kernel, (n_prog, num_splits),
        kc, ks, vc, vs, cache.block_table, cache.lengths, q_t, fidx, q_mean, m_part, l_part, acc_part, q, k_mean,
        cache.num_kv_heads, m_part.shape[1], pages_per_split, cache.max_batch, scale, float(softcap or 1.0),
        int(window or 0), *kc.stride()[:2], *ks.stride()[:2], *vc.stride()[:2], *vs.stride()[:2],
        cache.block_table.stride(0), *q.stride()[:3], *k_mean.stride()[:2], **consts, num_warps=nw, maxnreg=maxnreg)
