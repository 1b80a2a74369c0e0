"""Gluon fast path (NVIDIA, capability >= 9): the keys pass of the two-pass decode, in today's HOT format.

``_gluon_keys_kernel`` writes exactly what ``attention._attn_keys_kernel`` writes (the fp32 logits workspace
``lg[program, token, row]`` in log2 units, masked keys -inf, and each split's max per row), so the portable
``_attn_values_kernel`` and ``_attn_reduce_kernel`` complete the attention unchanged. GPU only (Gluon has no CPU
interpreter); ``attention.decode_attention`` imports this module lazily and only where it can run, and the portable
kernel stays the fallback and the reference.

Shape of the computation: warps work on their own 16-token units, with no shared memory and no cross-warp
exchange but the split's final max. A unit's logitsᵀ [16 tokens × 8 query rows] are ``mma.sync.m16n8k16`` products
(inline PTX) with the decoded key codes as A and the query as B: the query rows of a GQA group (q_len · group ≤ 8)
fill N = 8. A thread (lane 4g + c) holds tokens g and g + 8 of the unit and loads, of each, the code words whose
fields are its own A-fragment elements (columns 2c, 2c + 1, 2c + 8, 2c + 9 of every k-tile): one mask of a word
yields one A register, two fp16 subnormals (field · 2^k · 2^-24, as ``lattice.plane_pairs``), so the words go from
the load to the tensor core with one LOP3 per register and never leave the thread.

Register order (per thread c, per token; ``fragment_elements`` / ``_fragment_index`` are the host-side map,
``tests/test_attention_gluon.py`` checks it against the reference by a pure-torch emulation of the fragments):
  * coset registers: low-plane word c·D/64 + k → 2c·2^-24 for the coset flag c of each of its two groups (the
    varying part of the group constant e = 2c - (2^(b+1) - 1), ``lattice.coset_pairs``), padded with zeros to an
    even count;
  * low plane: word c·D/64 + k // 8 with its parity restored, register k % 8 = j holds field j of each 16-bit half
    (coordinates 16w + j and 16w + 8 + j, times 4^(j % 4));
  * high plane, 3 bits: bit j of each half of word c·D/128 + k // 16 (head_dim 64: the byte j // 8 = c % 2 of word
    c // 2), times 2^(j % 8); 4 bits: as the low plane.
Register 2t and 2t + 1 of a plane are the a0/a2 (token g) and a1/a3 (token g + 8) of k-tile t. The B fragment of
lane (g', c) is the prep's query operand (``attention._query_prep_kernel``, pair order, unchanged) gathered to the
elements of thread c's registers, column g': each program gathers its fragments once, through a cached index table
(``_fragment_index``). The coset registers hold 2c only; the constant part of the group constants is the low chain's
start value (``_coset_const``), and the parity is restored for two words at once (``_parity_fold``).

Loads: a page ahead into registers (``prefetch``), and optionally a bulk L2 prefetch further ahead (``l2_prefetch``):
ptxas schedules the register prefetch late in the loop body, so without it the loads have less than an iteration to
arrive. perf/results/attention_gluon_h200.md has the measurements and the SASS counts.
"""
from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from . import reference as ref
from .launch import launcher

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
def _word_offsets(t, c, D: gl.constexpr, KBITS: gl.constexpr, W: gl.constexpr):
    """Offsets (words, from the page's first word) of the first low-plane and high-plane word that thread column c
    decodes of page token t: low words c·D/64 .., high words c·D/128 .. (3 bits; head_dim 64: word c // 2), c·D/64 ..
    (4 bits)."""
    hw: gl.constexpr = D * (KBITS - 2) // 128
    if hw >= 1:
        hi = t * W + D // 16 + c * hw
    else:
        hi = t * W + D // 16 + (c >> 1)
    return t * W + c * (D // 64), hi


@gluon.jit
def _token_regs(lo, hi, c, D: gl.constexpr, KBITS: gl.constexpr):
    """A registers of one token: (coset registers, padded to >= 2; low plane; high plane)."""
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
        o_lo, o_hi, t0 = offs[k]
        lo0, hi0 = _token_words(base + o_lo, base + o_hi, D, KBITS, VEC)
        lo1, hi1 = _token_words(base + (o_lo + 8 * W), base + (o_hi + 8 * W), D, KBITS, VEC)
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
def _gluon_keys_kernel(kc_ptr, ks_ptr, bt_ptr, lens_ptr, qt_ptr, fidx_ptr, qm_ptr, lg_ptr, m_ptr,
                       H, n_splits, pages_per_split, n_tok, max_batch, sm_scale, softcap, window,
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
    zero_i = gl.zeros([NW, 32], gl.int32, L)
    lane = gl.arange(0, 32, layout=gl.SliceLayout(0, L))[None, :] + zero_i
    warp = gl.arange(0, NW, layout=gl.SliceLayout(1, L))[:, None] + zero_i
    g = lane >> 2
    c = lane & 3
    pid = gl.program_id(0)
    split = gl.program_id(1)
    b = pid // H
    h = pid % H
    seq_len = gl.load(lens_ptr + b)
    comp = gl.load(lens_ptr + max_batch + b)
    n_sink = gl.load(lens_ptr + 3 * max_batch + b)
    part = pid * (n_splits + 1) + split
    col0 = 2 * c  # this thread's columns of the C fragment: query rows (chunk position, head) = divmod(col, GROUP)
    col1 = col0 + 1
    q_index0 = seq_len - Q_LEN + col0 // GROUP
    q_index1 = seq_len - Q_LEN + col1 // GROUP
    NCR: gl.constexpr = max(2, D // 64)  # coset registers (padded)
    NLR: gl.constexpr = D // 8  # registers per plane
    NREG: gl.constexpr = NCR + NLR * (2 if KBITS > 2 else 1)
    # The B fragments: the prep's query operand (pair order) gathered to the kernel's order (``_fragment_index``).
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
    unit = SUBNORMAL_UNIT  # (``attention._logit_units``)
    if not SOFTCAP:
        unit = SUBNORMAL_UNIT * sm_scale * LOG2E
        qm0 = qm0 * (sm_scale * LOG2E)
        qm1 = qm1 * (sm_scale * LOG2E)
    zero = gl.zeros([NW, 32], gl.float32, L)
    k0, k1, k2, k3 = _coset_const(QF, zero, zero_i, D, KBITS)
    m0 = zero - float("inf")
    m1 = zero - float("inf")
    UPW: gl.constexpr = PAGE // 16 // NW
    offs = ()  # per unit of a page: this thread's word offsets and token (g), the same on every page
    for k in gl.static_range(UPW):
        t0 = 16 * (k * NW + warp) + g
        o_lo, o_hi = _word_offsets(t0, c, D, KBITS, W)
        offs = offs + ((o_lo, o_hi, t0),)
    p_lo = split * pages_per_split
    p_hi = gl.minimum(p_lo + pages_per_split, (comp + PAGE - 1) // PAGE)
    end = gl.minimum(comp, p_hi * PAGE)
    kc_h = kc_ptr + h * skc_h
    ks_h = ks_ptr + h * sks_h
    bt_b = bt_ptr + b * sbt
    lg0 = lg_ptr + pid.to(gl.int64) * n_tok * RS + (16 * warp + g) * RS + col0  # token g of unit 0 of page 0
    last = gl.maximum(p_hi - 1, 0)
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
            lo0, hi0, lo1, hi1, s0, s1 = cur[k]
            cs0, lr0, hr0 = _token_regs(lo0, hi0, c, D, KBITS)
            cs1, lr1, hr1 = _token_regs(lo1, hi1, c, D, KBITS)
            a0, a1, a2, a3 = k0, k1, k2, k3  # coset + low plane, from the constant part
            for t in gl.static_range(NCR // 2):
                a0, a1, a2, a3 = _mma(cs0[2 * t], cs1[2 * t], cs0[2 * t + 1], cs1[2 * t + 1], QF[2 * t],
                                      QF[2 * t + 1], a0, a1, a2, a3)
            for t in gl.static_range(NLR // 2):
                a0, a1, a2, a3 = _mma(lr0[2 * t], lr1[2 * t], lr0[2 * t + 1], lr1[2 * t + 1], QF[NCR + 2 * t],
                                      QF[NCR + 2 * t + 1], a0, a1, a2, a3)
            if KBITS > 2:  # high plane: a second accumulator chain
                e0, e1, e2, e3 = zero, zero, zero, zero
                for t in gl.static_range(NLR // 2):
                    e0, e1, e2, e3 = _mma(hr0[2 * t], hr1[2 * t], hr0[2 * t + 1], hr1[2 * t + 1],
                                          QF[NCR + NLR + 2 * t], QF[NCR + NLR + 2 * t + 1], e0, e1, e2, e3)
                a0 = a0 + e0
                a1 = a1 + e1
                a2 = a2 + e2
                a3 = a3 + e3
            u0 = s0 * unit
            u1 = s1 * unit
            x0 = a0 * u0 + qm0  # (token g, col0), (token g, col1), (token g + 8, col0), (token g + 8, col1)
            x1 = a1 * u0 + qm1
            x2 = a2 * u1 + qm0
            x3 = a3 * u1 + qm1
            if SOFTCAP:
                f = 2.0 * sm_scale / softcap
                x0 = softcap * (1.0 - 2.0 / (gl.exp(x0 * f) + 1.0)) * LOG2E
                x1 = softcap * (1.0 - 2.0 / (gl.exp(x1 * f) + 1.0)) * LOG2E
                x2 = softcap * (1.0 - 2.0 / (gl.exp(x2 * f) + 1.0)) * LOG2E
                x3 = softcap * (1.0 - 2.0 / (gl.exp(x3 * f) + 1.0)) * LOG2E
            tok0 = pg * PAGE + offs[k][2]
            tok1 = tok0 + 8
            if CAUSAL_PAGES or WINDOW:
                x0 = gl.where(_seen(tok0, end, n_sink, q_index0, window, WINDOW, CAUSAL_PAGES), x0, float("-inf"))
                x1 = gl.where(_seen(tok0, end, n_sink, q_index1, window, WINDOW, CAUSAL_PAGES), x1, float("-inf"))
                x2 = gl.where(_seen(tok1, end, n_sink, q_index0, window, WINDOW, CAUSAL_PAGES), x2, float("-inf"))
                x3 = gl.where(_seen(tok1, end, n_sink, q_index1, window, WINDOW, CAUSAL_PAGES), x3, float("-inf"))
            elif pg * PAGE + PAGE > end:  # the split's last page, partly past the sequence
                x0 = gl.where(tok0 < end, x0, float("-inf"))
                x1 = gl.where(tok0 < end, x1, float("-inf"))
                x2 = gl.where(tok1 < end, x2, float("-inf"))
                x3 = gl.where(tok1 < end, x3, float("-inf"))
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


# ---------------------------------------------------------------------------------------------------- launcher


MIN_TRITON = (3, 6)  # the Gluon API this module is written against (compiled and tested with 3.6 and 3.9)


def _triton_version() -> tuple:
    return tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])


def supports(head_dim: int, key_bits: int, page_size: int, rows: int) -> bool:
    """Whether the Gluon keys pass covers a launch: a triton >= 3.6, head_dim 64/128/256, 2-4 key bits, pages of a
    multiple of 16 tokens, q_len · group <= 8 (one row block of at most 8 rows; more rows run the portable kernel)."""
    return (_triton_version() >= MIN_TRITON and head_dim in HEAD_DIMS and key_bits in (2, 3, 4)
            and page_size % 16 == 0 and 1 <= rows <= MAX_ROWS)


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
def _fragment_index(head_dim: int, key_bits: int, block_m: int, device: str) -> torch.Tensor:
    """Flat indices into one program's prep output ``q_t[pid]`` ([KQ, block_m] fp16, ``_query_prep_kernel``, pair
    order) that give its B fragments in the kernel's order: int32 [NREG, 32 lanes, 2 halves], lane 4g' + c reading
    column g' (the kernel gathers them once per program). Checks that the prep's power of two at each element undoes
    the kernel's (``attention._pair_inv_scale``)."""
    from .attention import _deal_order, _pair_order

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
        power = fbits * (torch.arange(len(order)) // 2 // cw % (8 // fbits))  # attention._pair_inv_scale
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
    128K × 1 and 8K × 16 (perf/results/attention_gluon_h200.md)."""
    codec = cache.codec
    D, P = codec.head_dim, codec.page_size
    kc, ks = cache.k_codes, cache.k_scales
    words = kc.shape[3]
    assert kc.stride(3) == 1 and kc.stride(2) == words and ks.stride(2) == 1 and q_t.is_contiguous()
    nw = max(1, min(num_warps, P // 16))
    n_prog, _, kq, _ = q_t.shape
    # vector loads of a thread's runs of 2 or 4 words: aligned when the pool and every stride are
    vec = kc.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in kc.stride()[:2]) and words % 4 == 0
    # bulk L2 prefetch of a page's codes and scales: 16-byte aligned starts
    l2 = (kc.data_ptr() % 16 == 0 and all(st % 4 == 0 for st in kc.stride()[:2]) and ks.data_ptr() % 16 == 0
          and all(st * ks.element_size() % 16 == 0 for st in ks.stride()[:2]))
    (launch or launcher(None))(_gluon_keys_kernel, (n_prog, num_splits),
        kc, ks, cache.block_table, cache.lengths, q_t, _fragment_index(D, codec.key_bits, block_m, str(q_t.device)),
        q_mean, logits, m_part, cache.num_kv_heads, num_splits, pages_per_split, n_tok, cache.max_batch, scale,
        float(softcap or 1.0), int(window or 0), *kc.stride()[:2], *ks.stride()[:2], cache.block_table.stride(0),
        Q_LEN=q_len, GROUP=group, D=D, KBITS=codec.key_bits, PAGE=P, SOFTCAP=softcap is not None,
        WINDOW=window is not None, BLOCK_M=block_m, RS=rs, CAUSAL_PAGES=q_len > 1, NW=nw, W=words, KQ=kq,
        OFF64=kc.numel() >= 2 ** 31 or ks.numel() >= 2 ** 31, VEC=vec, PF=prefetch, L2PF=l2_prefetch if l2 else 0,
        num_warps=nw, maxnreg=maxnreg)
