"""Decode attention over a paged HOT cache (``PagedKVCache``): split-K partial kernel + reduce kernel.

Math. A stored token decodes as x = Rᵀ v · s / √n (R = σ·T, ``reference.rotation_matrix``), so
    q·k   = (R q / √n) · v_k · s_k + q·mean_k           (keys stored post-RoPE)
    Σ p v = Rᵀ (Σ p s_v v_v) / √n + (Σ p) · mean_v
Codes become tensor-core operands without conversions: one mask of a code word yields two fp16 subnormals
(``lattice.plane_pairs``), in an order ("pair order") that the contraction does not care about and that puts each
decoded element in the register where the tensor-core product wants it. So the query is multiplied by the rows of R
in pair order once per (sequence, KV head) (``_query_prep_kernel``, ``_decode_matrix``), keys are never rotated
back, and values are accumulated in pair order and rotated back once per split, at its end (``_values_original``: a
gather to storage order and an inverse Hadamard transform), so the reduce only weighs and adds. fp16 K/V never reach
memory. Keys stored with RoPE undone are decoded to the original basis per page (one product with R) and RoPE is
re-applied at each key's stored position (``PagedKVCache.positions``).

Grid: (batch · kv_heads · row blocks, splits + 1). Programs 0..splits-1 each take a run of pages (64-token pages
are the A operand of the logit product, keys along axis 0); the last one takes the uncompressed sinks and window.
Each writes (running max, sum, accumulator); the reduce combines them. A block of few rows may take several pages
per softmax step, side by side in its columns (``pages_per_step``, ``_query_rows``). On Hopper the split kernel and
the reduce start while their predecessor still runs (programmatic dependent launch, ``_pdl``). Rows are (query
position, query head of the group) pairs, so the codes of a KV head are read once for all its query heads (GQA) and
all positions of a chunk (q_len > 1, causal inside the chunk).

Two passes (launch config ``two_pass``, post-RoPE keys): the split's keys first (``_attn_keys_kernel``: fp32 logits
to a workspace of 4 bytes per (token, row), and the split's max), then its values (``_attn_values_kernel``: no
running max, nothing rescaled). Each loop holds half the state, so more programs fit an SM and its issue slots are
shared by more independent work; the logits cost a write and a read (docs/attention.md, "One call: three kernels").
On Hopper the keys pass may be the Gluon kernel of ``attention_gluon`` (launch config ``gluon_keys``).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from autotune import store

from . import reference as ref
from .runtime import launch_config, max_programs, rope_tables, rotation, use_triton
from .config import check_positive_float, describe, is_int
from .launch import LaunchRecord, launcher, signature
from .lattice import (SUBNORMAL_UNIT, coset_pairs, coset_plane_pairs, inverse_hadamard, load_e8_doubled, plane_pairs,
                      restore_parity, rope_partner, rope_rotate, rope_rows_at, storage_order)
from .paged import PagedKVCache

# Shape buckets of the config store (autotune): ranges of the longest compressed sequence and of the batch, upper
# bounds inclusive (None: unbounded). The split count that fills the GPU, and so the best launch, depends on both.
CONTEXT_RANGES = {"t4k": 4096, "t32k": 32768, "tmax": None}
BATCH_RANGES = {"b1": 1, "b16": 16, "bmax": None}
LOG2E = tl.constexpr(1.4426950408889634)


def _range(x: int, ranges: dict) -> str:
    return next(name for name, hi in ranges.items() if hi is None or x <= hi)


def attention_buckets(head_dim: int, key_bits: int, value_bits: int, group: int, batch: int,
                      context: int) -> list[str]:
    """Config-store buckets of a decode_attention launch, most specific first: ``d128_k3v2_g4_t32k_b16``
    (head_dim, bits, GQA ratio, context range, batch range); then the same range at GQA 4, and at K3V2 GQA 4 (the
    H100 and H200 searches at K3V2 and K4V4 chose the same grid in every range: it follows the range, not the
    bits); below head_dim 128 then head_dim 128's (tiles no larger, so its register caps hold; on the H100 it beat
    the default at every head_dim 64/96 shape measured but 4-16 × 8K-32K, which has buckets of its own); then the
    head_dim and bits alone (``d64_k4v4``)."""
    base = f"d{head_dim}_k{key_bits}v{value_bits}"
    work = f"{_range(context, CONTEXT_RANGES)}_{_range(batch, BATCH_RANGES)}"
    chain = [f"{base}_g{group}_{work}", f"{base}_g4_{work}", f"d{head_dim}_k3v2_g4_{work}"]
    if head_dim < 128:
        chain.append(f"d128_k3v2_g4_{work}")
    return list(dict.fromkeys(chain + [base]))


@triton.jit
def _softcap_log2(s, sm_scale, softcap):
    """Soft-capped logits in log2 units: softcap · tanh(s · scale / softcap) · log2(e), with
    tanh(y) = 1 - 2 / (exp(2y) + 1)."""
    return softcap * (1.0 - 2.0 / (tl.exp(s * (2.0 * sm_scale / softcap)) + 1.0)) * LOG2E


@triton.jit
def _online_softmax(s, seen, m_i, sm_scale, SOFTCAP: tl.constexpr, softcap, AXIS: tl.constexpr,
                    SCALED: tl.constexpr = False):
    """Fold one tile of raw logits s = q·k into the running max m_i (log2 domain); keys run along AXIS. Returns the
    probabilities p (s's shape), the factor alpha for the accumulators and sums, and the new m_i. With SCALED (no
    soft cap) s is already q·k · sm_scale · log2(e)."""
    if SOFTCAP:
        s = _softcap_log2(s, sm_scale, softcap)
    elif not SCALED:
        s = s * (sm_scale * LOG2E)
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=AXIS))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row keeps p = 0, alpha = 0
    alpha = tl.exp2(m_i - m_safe)
    return tl.exp2(s - tl.expand_dims(m_safe, AXIS)), alpha, m_new


@triton.jit
def _causal(k_index, q_index, WINDOW: tl.constexpr, window):
    """Keys (token indices, broadcast against the queries') not after the query and, with WINDOW, less than
    ``window`` tokens before it."""
    seen = k_index <= q_index
    if WINDOW:
        seen = seen & (k_index > q_index - window)
    return seen


@triton.jit
def _visible(valid, k_index, q_index, WINDOW: tl.constexpr, window, AXIS: tl.constexpr):
    """Mask with keys along AXIS and queries along the other axis: key valid and ``_causal``."""
    return tl.expand_dims(valid, 1 - AXIS) & _causal(tl.expand_dims(k_index, 1 - AXIS), tl.expand_dims(q_index, AXIS),
                                                      WINDOW, window)


@triton.jit
def _word_runs(row0, lim, sc_t, sc_w, FIRST: tl.constexpr, N: tl.constexpr, J: tl.constexpr, JL: tl.constexpr,
               RUN: tl.constexpr, C: tl.constexpr, PAGE: tl.constexpr):
    # Words J·c + JL + r (r < RUN) of the page's tokens as [C, 8, slabs, REP, RUN] (token 8·REP·slab + 8·rep + g).
    SLABS: tl.constexpr = min(4, PAGE // 16)
    REP: tl.constexpr = PAGE // (8 * SLABS)
    c = tl.arange(0, C)[:, None, None, None, None]
    g = tl.arange(0, 8)[None, :, None, None, None]
    slab = tl.arange(0, SLABS)[None, None, :, None, None]
    rep = tl.arange(0, REP)[None, None, None, :, None]
    r = tl.arange(0, RUN)[None, None, None, None, :]
    tok = 8 * REP * slab + 8 * rep + g
    j = J * c + JL + r
    return tl.load(row0 + tok * sc_t + (FIRST + J * c + JL) * sc_w + r, mask=(tok < lim) & (j < N), other=0)


@triton.jit
def _page_words(row0, lim, sc_t, sc_w, FIRST: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                PAGE: tl.constexpr, JOIN: tl.constexpr):
    """Words FIRST..FIRST+N-1 of a page's first ``lim`` tokens (``row0`` points at its first token; word stride sc_w),
    zero-padded to NP columns; other tokens read as zero: [PAGE, NP]. Built as [C, 8, slabs, REP, J] (token
    8·REP·slab + 8·rep + g, word J·c + jl): the words of a 16-token slab on one warp, 8 tokens across its lanes and a
    run of J words per thread, which is how a 64-row tensor-core product holds its A operand in pair order
    (``lattice.plane_pairs``), so decoded key pages never pass through shared memory.

    With JOIN, runs of more than one word are loaded word by word and joined: a join keeps the run in one thread's
    registers, where a single 5-D load lets the compiler lay the run across lanes (the decoded key plane then went
    through shared memory: docs/attention.md, "Loads: the join rule"). (sc_w is 1, but a runtime value: were
    the runs provably adjacent, the compiler would give one thread all C·J words of a token as one vector and then
    exchange them through shared memory.)"""
    C: tl.constexpr = min(4, NP)
    J: tl.constexpr = NP // C
    if J == 1 or not JOIN:
        w = _word_runs(row0, lim, sc_t, sc_w, FIRST, N, J, 0, J, C, PAGE)
    else:
        S: tl.constexpr = (C, 8, min(4, PAGE // 16), PAGE // (8 * min(4, PAGE // 16)))  # [C, 8, slabs, REP]
        w0 = tl.reshape(_word_runs(row0, lim, sc_t, sc_w, FIRST, N, J, 0, 1, C, PAGE), S)
        w1 = tl.reshape(_word_runs(row0, lim, sc_t, sc_w, FIRST, N, J, 1, 1, C, PAGE), S)
        if J == 2:
            w = tl.join(w0, w1)
        else:  # J == 4; joined axes flatten as 2·i + o, so words (0, 2) and (1, 3) pair up first
            w2 = tl.reshape(_word_runs(row0, lim, sc_t, sc_w, FIRST, N, J, 2, 1, C, PAGE), S)
            w3 = tl.reshape(_word_runs(row0, lim, sc_t, sc_w, FIRST, N, J, 3, 1, C, PAGE), S)
            w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (C, 8, S[2], S[3], 4))
    return tl.reshape(tl.permute(w, (2, 3, 1, 0, 4)), (PAGE, NP))


@triton.jit
def _page_codes(c_ptr, s_ptr, page, h, lim, sc_p, sc_h, sc_t, sc_w, ss_p, ss_h, D: tl.constexpr, DP: tl.constexpr,
                BITS: tl.constexpr, HB: tl.constexpr, PAGE: tl.constexpr, JOIN: tl.constexpr):
    """One page of one head: low-plane words [PAGE, DP/16], high-plane words [PAGE, DP·HB/32] (the low ones again
    when BITS == 2, unused) and fp32 scales [PAGE]; tokens from ``lim`` on read as zero."""
    page = page.to(tl.int64)  # large pools overflow 32-bit offsets
    row0 = c_ptr + page * sc_p + h * sc_h
    lo = _page_words(row0, lim, sc_t, sc_w, 0, D // 16, DP // 16, PAGE, JOIN)
    hi = lo
    if BITS > 2:
        hi = _page_words(row0, lim, sc_t, sc_w, D // 16, D * (BITS - 2) // 32, DP * HB // 32, PAGE, JOIN)
    t = tl.arange(0, PAGE)
    return lo, hi, tl.load(s_ptr + page * ss_p + h * ss_h + t, mask=t < lim, other=0.0).to(tl.float32)


@triton.jit
def _pair_inv_scale(kappa, FBITS: tl.constexpr, DP: tl.constexpr):
    """1 / (the power of two ``plane_pairs`` puts on element kappa of a plane of FBITS-bit fields): 2^-(FBITS·k), k
    the field within its byte."""
    C: tl.constexpr = min(4, DP * FBITS // 32)
    return tl.exp2(-(FBITS * ((kappa >> 1) // C % (8 // FBITS))).to(tl.float32))


@triton.jit
def _segment_inv_scale(kappa, NG: tl.constexpr, DP: tl.constexpr, HBITS: tl.constexpr):
    """``_pair_inv_scale`` of row kappa of a decode matrix [per-group constants (NG) | low plane (DP) | high plane
    (DP, HBITS-bit fields)]: 1 for the constants, which carry no power of two."""
    plane = tl.where(kappa < NG + DP, _pair_inv_scale(kappa - NG, 2, DP), _pair_inv_scale(kappa - NG - DP, HBITS, DP))
    return tl.where(kappa < NG, 1.0, plane)


@triton.jit
def _query_rows(pid, H, n_mblk, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, PK: tl.constexpr):
    """The query columns of program ``pid`` of a (batch · KV head · row block) grid. Rows are (chunk position, query
    head of the group) pairs; with PK > 1 pages per step (one row block) the BLOCK_M columns are PK slots of
    BLOCK_M / PK rows each, slot k taking the k-th page of a step. Returns (b, h, chunk position qi [BLOCK_M], head
    within the group g [BLOCK_M], slot [BLOCK_M])."""
    bh, mb = pid // n_mblk, pid % n_mblk
    c = tl.arange(0, BLOCK_M)
    r = mb * BLOCK_M + c % (BLOCK_M // PK)
    return bh // H, bh % H, r // GROUP, r % GROUP, c // (BLOCK_M // PK)


@triton.jit
def _query_load(q_ptr, b, h, qi, g, sqb, sqt, sqh, Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                DP: tl.constexpr, DOT: tl.constexpr):
    """The rows' queries, [BLOCK_M, DP] as DOT (zero past D and past the chunk)."""
    d = tl.arange(0, DP)
    return tl.load(q_ptr + b * sqb + qi[:, None] * sqt + (h * GROUP + g)[:, None] * sqh + d[None, :],
                   mask=(qi < Q_LEN)[:, None] & (d < D)[None, :], other=0.0).to(DOT)


@triton.jit
def _query_prep_kernel(q_ptr, pk_ptr, kmean_ptr, qt_ptr, qm_ptr, H, n_mblk, sqb, sqt, sqh, smb, smh,
                       Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       KBITS: tl.constexpr, NG: tl.constexpr, KQ: tl.constexpr, INV_SQRT_N: tl.constexpr,
                       CENTER_K: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, PK: tl.constexpr,
                       QR: tl.constexpr, PDL: tl.constexpr):
    """Per (batch, KV head, row block) and block of QR decode-matrix rows, once for all splits: the query against
    those rows of the decode matrix (``_decode_matrix``: [per-group constants | low plane | high plane]), each
    divided by its pair element's power of two, so that (query operand) · (decoded pairs) · 2^24 = q̃ · v; stored
    transposed as fp16 [PK, KQ, BLOCK_M], the B operands of the logit products, one per page slot (``_query_rows``)
    with the other slots' columns zero. Block 0 also stores q·mean_k [BLOCK_M] fp32. Each program is one short
    load-product-store chain: the whole operand in one program took 6.4 µs."""
    if PDL:  # the split kernel may start its prologue now (see ``_pdl``)
        gdc_launch_dependents()
    pid, blk = tl.program_id(0), tl.program_id(1)
    b, h, qi, g, slot = _query_rows(pid, H, n_mblk, GROUP, BLOCK_M, PK)
    q = _query_load(q_ptr, b, h, qi, g, sqb, sqt, sqh, Q_LEN, GROUP, D, DP, DOT)
    d = tl.arange(0, DP)
    kappa = blk * QR + tl.arange(0, QR)
    rows = tl.load(pk_ptr + kappa[:, None] * DP + d[None, :], mask=(kappa < KQ)[:, None], other=0.0).to(DOT)
    qb = tl.dot(q, tl.trans(rows)) * INV_SQRT_N
    qb = (qb * _segment_inv_scale(kappa, NG, DP, 1 if KBITS == 3 else 2)[None, :]).to(tl.float16)
    m = tl.arange(0, BLOCK_M)
    for k in tl.static_range(PK):
        tl.store(qt_ptr + ((pid * PK + k) * KQ + kappa[:, None]) * BLOCK_M + m[None, :],
                 tl.trans(tl.where(slot[:, None] == k, qb, 0.0)), mask=(kappa < KQ)[:, None])
    if blk == 0:
        q_mean = tl.zeros((BLOCK_M,), tl.float32)
        if CENTER_K:
            k_mean = tl.load(kmean_ptr + b * smb + h * smh + d, mask=d < D, other=0.0)
            q_mean = tl.sum(q.to(tl.float32) * k_mean[None, :], axis=1)
        tl.store(qm_ptr + pid * BLOCK_M + m, q_mean)


@triton.jit
def _values_original(acc_lo, acc_hi, ls, vg_ptr, RS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     LOG2DP: tl.constexpr, VBITS: tl.constexpr, INV_SQRT_N: tl.constexpr):
    """A split's value accumulator -> its Σ p·x [RS, DP] in the original basis. The planes [DP, RS] hold Σ p·s·u and
    Σ p·s·hi in pair order (u = 2·lo + c, ``coset_plane_pairs``), ls = Σ p·s; a value coordinate is
    v = u/2 + 4·hi + OFF, so per storage coordinate j (``_value_gather``: where each plane holds it and its weight)
    y = Σ p·s·v, and Rᵀ y / √n = √n · T⁻¹(storage order → transform order of y) (``reference.rotation_matrix``)."""
    j = tl.arange(0, DP)
    at = tl.broadcast_to(tl.load(vg_ptr + j).to(tl.int32)[None, :], (RS, DP))
    y = tl.gather(tl.trans(acc_lo), at, 1) * tl.load(vg_ptr + DP + j)[None, :]
    if VBITS > 2:
        at = tl.broadcast_to(tl.load(vg_ptr + 2 * DP + j).to(tl.int32)[None, :], (RS, DP))
        y += tl.gather(tl.trans(acc_hi), at, 1) * tl.load(vg_ptr + 3 * DP + j)[None, :]
    y += (ls * (0.25 - (1 << (VBITS - 1))))[:, None]
    return inverse_hadamard(storage_order(y, RS, DP), RS, D, DP, LOG2DP) * (1.0 / INV_SQRT_N)


@triton.jit
def _merge_slots(m_i, l_i, ls, acc_lo, acc_hi, PK: tl.constexpr, RS: tl.constexpr, DP: tl.constexpr):
    """Combine the PK page slots of a split's columns (``_query_rows``) into RS rows: each slot ran its own online
    softmax over its pages, so its sums and accumulators are weighted by 2^(m_slot - max over slots)."""
    if PK == 1:
        return m_i, l_i, ls, acc_lo, acc_hi
    m2 = tl.reshape(m_i, (PK, RS))
    m_row = tl.max(m2, axis=0)
    w = tl.exp2(m2 - tl.where(m_row == float("-inf"), 0.0, m_row)[None, :])  # 0 for a slot that saw no page
    l_i = tl.sum(tl.reshape(l_i, (PK, RS)) * w, axis=0)
    ls = tl.sum(tl.reshape(ls, (PK, RS)) * w, axis=0)
    acc_lo = tl.sum(tl.reshape(acc_lo, (DP, PK, RS)) * w[None, :, :], axis=1)
    acc_hi = tl.sum(tl.reshape(acc_hi, (DP, PK, RS)) * w[None, :, :], axis=1)
    return m_row, l_i, ls, acc_lo, acc_hi


@triton.jit
def _query_operands(qt_ptr, slot, KQ: tl.constexpr, NG: tl.constexpr, DP: tl.constexpr, KBITS: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    """One page slot's query operand, written by ``_query_prep_kernel`` (slot ``pid · PK + k`` of [·, KQ, BLOCK_M]):
    its per-group-constant, low-plane and high-plane rows, the B operands of ``_key_products`` (at 2 bits the
    high plane's is a placeholder, never read)."""
    qt = qt_ptr + slot * KQ * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    d = tl.arange(0, DP)
    qt_c = tl.load(qt + tl.arange(0, NG)[:, None] * BLOCK_M)
    qt_lo = tl.load(qt + (NG + d)[:, None] * BLOCK_M)
    qt_hi = qt_lo
    if KBITS > 2:
        qt_hi = tl.load(qt + (NG + DP + d)[:, None] * BLOCK_M)
    return qt_c, qt_lo, qt_hi


@triton.jit
def _logit_units(qm_ptr, pid, sm_scale, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The factor of a page's raw logits (the products' 2^-24 times its key scales; without a soft cap also
    sm_scale · log2(e), so logits come out in log2 units at once) and the block's q·mean_k in the same units."""
    q_mean = tl.load(qm_ptr + pid * BLOCK_M + tl.arange(0, BLOCK_M))
    logit_unit = SUBNORMAL_UNIT
    if not SOFTCAP:
        logit_unit = SUBNORMAL_UNIT * sm_scale * LOG2E
        q_mean = q_mean * (sm_scale * LOG2E)
    return logit_unit, q_mean


@triton.jit
def _key_products(k_lo, k_hi, qt_c, qt_lo, qt_hi, PAGE: tl.constexpr, NWL: tl.constexpr, NG: tl.constexpr,
                  DP: tl.constexpr, KBITS: tl.constexpr, KHI: tl.constexpr, ASM: tl.constexpr):
    """A page's raw logits [PAGE, BLOCK_M] in pair order: its coset flags, low plane and (3-4 bits) high plane, each
    times the prep's query operand; the key scales and mean are applied by the caller."""
    sk = tl.dot(coset_pairs(k_lo, PAGE, NWL, NG, KBITS, ASM), qt_c)
    sk = tl.dot(plane_pairs(restore_parity(k_lo), PAGE, NWL, 2, ASM), qt_lo, sk)
    if KBITS > 2:
        sk = tl.dot(plane_pairs(k_hi, PAGE, DP * KHI // 32, KHI, ASM), qt_hi, sk)
    return sk


@triton.jit
def _value_products(v_lo, v_hi, pv, acc_lo, acc_hi, PAGE: tl.constexpr, NWL: tl.constexpr, DP: tl.constexpr,
                    VBITS: tl.constexpr, VHI: tl.constexpr, ASM: tl.constexpr):
    """acc += a page's value planes (pair order, [DP, PAGE]) times its weights pv [PAGE, BLOCK_M] (p · scale)."""
    acc_lo = tl.dot(tl.trans(coset_plane_pairs(v_lo, PAGE, NWL, ASM)), pv, acc_lo)
    if VBITS > 2:
        acc_hi = tl.dot(tl.trans(plane_pairs(v_hi, PAGE, DP * VHI // 32, VHI, ASM)), pv, acc_hi)
    return acc_lo, acc_hi


@triton.jit
def _split_pages(bt_ptr, b, sbt, split, pages_per_split, comp, PAGE: tl.constexpr):
    """A split's pages [p_lo, p_hi) of its sequence's ``comp`` compressed tokens, the token where they end, and the
    physical page of its first one (in bounds, unused if the split is empty)."""
    p_lo = split * pages_per_split
    p_hi = tl.minimum(p_lo + pages_per_split, tl.cdiv(comp, PAGE))
    end = tl.minimum(comp, p_hi * PAGE)
    return p_lo, p_hi, end, tl.load(bt_ptr + b * sbt + tl.maximum(tl.minimum(p_lo, p_hi - 1), 0))


@triton.jit
def _uncompressed_part(q_ptr, fpk_ptr, fpv_ptr, m_ptr, l_ptr, acc_ptr, b, h, qi, g, slot, part, n_fp, n_sink, comp,
                       q_index, sm_scale, softcap, window, sqb, sqt, sqh, sfb, sfh, sft, Q_LEN: tl.constexpr,
                       GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, SOFTCAP: tl.constexpr,
                       WINDOW: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The last part of a (sequence, KV head, row block): its uncompressed sinks and window, in the original basis
    (columns 0..DP-1 of the part; with pages per step > 1 the slots repeat the rows, and slot 0's are written)."""
    d = tl.arange(0, DP)
    dmask = d < D
    rows = part * BLOCK_M + tl.arange(0, BLOCK_M)
    real = (qi < Q_LEN) & (slot == 0)
    q = _query_load(q_ptr, b, h, qi, g, sqb, sqt, sqh, Q_LEN, GROUP, D, DP, DOT)
    m_f = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_f = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DP), tl.float32)
    j = tl.arange(0, BLOCK_N)
    for j0 in range(0, n_fp, BLOCK_N):
        jj = j0 + j
        jvalid = jj < n_fp
        k_index = tl.where(jj < n_sink, jj, comp + jj)
        row = b.to(tl.int64) * sfb + h * sfh + jj[:, None] * sft + d[None, :]  # long windows pass 2^31
        kv_mask = jvalid[:, None] & dmask[None, :]
        s = tl.dot(q, tl.trans(tl.load(fpk_ptr + row, mask=kv_mask, other=0.0).to(DOT)))
        seen = _visible(jvalid, k_index, q_index, WINDOW, window, 1)
        p, alpha, m_f = _online_softmax(s, seen, m_f, sm_scale, SOFTCAP, softcap, 1)
        l_f = l_f * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), tl.load(fpv_ptr + row, mask=kv_mask, other=0.0).to(DOT))
    tl.store(acc_ptr + rows[:, None] * DP + d[None, :], acc, mask=real[:, None])
    tl.store(m_ptr + rows, m_f, mask=real)
    tl.store(l_ptr + rows, l_f, mask=real)


@triton.jit(do_not_specialize=["sc_w"])  # see _page_words
def _attn_split_kernel(q_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, bt_ptr, lens_ptr, kmean_ptr, qt_ptr, qm_ptr, rot_ptr,
                       cos_ptr, sin_ptr, pos_ptr, fpk_ptr, fpv_ptr, m_ptr, l_ptr, acc_ptr, vg_ptr,
                       H, n_mblk, n_splits, pages_per_split, max_batch, sm_scale, softcap, window,
                       sqb, sqt, sqh, skc_p, skc_h, skc_t, sks_p, sks_h, svc_p, svc_h, svc_t, svs_p, svs_h, sc_w,
                       spos_p, spos_h, sbt, sfb, sfh, sft, smb, smh,
                       Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       KBITS: tl.constexpr, VBITS: tl.constexpr, PAGE: tl.constexpr, INV_SQRT_N: tl.constexpr,
                       NG: tl.constexpr, KQ: tl.constexpr, LOG2DP: tl.constexpr, ROPE_HALF: tl.constexpr,
                       CENTER_K: tl.constexpr,
                       SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
                       BLOCK_M: tl.constexpr, PK: tl.constexpr, BLOCK_N: tl.constexpr, JOIN_K: tl.constexpr,
                       JOIN_V: tl.constexpr,
                       PDL: tl.constexpr, CAUSAL_PAGES: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    b, h, qi, g, slot = _query_rows(pid, H, n_mblk, GROUP, BLOCK_M, PK)  # q is loaded only where it is read
    RS: tl.constexpr = BLOCK_M // PK  # rows per page slot
    d = tl.arange(0, DP)
    dmask = d < D
    seq_len = tl.load(lens_ptr + b)
    comp = tl.load(lens_ptr + max_batch + b)
    n_fp = tl.load(lens_ptr + 2 * max_batch + b)
    n_sink = tl.load(lens_ptr + 3 * max_batch + b)
    q_index = seq_len - Q_LEN + qi  # each column's token index in its sequence
    part = pid * (n_splits + 1) + split
    # A part's partials are its first RS rows (slot 0's columns); rows past the chunk pad the tile and are neither
    # written nor read.
    if split < n_splits:
        # Compressed pages, keys along axis 0: logitsᵀ [PAGE, BLOCK_M] = (decoded codes) · (query blocks)ᵀ, and
        # accᵀ [pairs, BLOCK_M] = (decoded value codes)ᵀ · (p·s)ᵀ, all in the rotated domain and pair order.
        # v = lo + 4·hi + (c/2 + OFF) per coordinate (index planes lo/hi; c the coset flag of its group of 8). Keys
        # take c/2 + OFF as a product of its own; values fold c into the low plane (u = 2·lo + c,
        # ``coset_plane_pairs``) and OFF into Σ p·s, since a transposed product of 16 coset columns cost 18%.
        # A step takes PK pages, page k in the columns of slot k (its query operand is zero in the others), so the
        # online softmax, whose cross-warp max costs two barriers, runs once per step on all PK·RS columns.
        NWL: tl.constexpr = DP // 16  # low-plane words (2-bit fields), padded
        KHI: tl.constexpr = 1 if KBITS == 3 else 2  # field bits of the high plane
        VHI: tl.constexpr = 1 if VBITS == 3 else 2
        if ROPE_HALF != 0:
            # Keys stored with RoPE undone (PK == 1): decode each tile to the original basis (one product with R),
            # add the mean, re-apply RoPE at each key's position.
            q = _query_load(q_ptr, b, h, qi, g, sqb, sqt, sqh, Q_LEN, GROUP, D, DP, DOT)
            rot = tl.load(rot_ptr + d[:, None] * DP + d[None, :]).to(DOT)
            rot_sum = tl.sum(rot.to(tl.float32), axis=0) * (0.25 - (1 << (KBITS - 1)))  # Rᵀ(OFF·1)
            k_mean = tl.zeros((DP,), tl.float32)
            if CENTER_K:
                k_mean = tl.load(kmean_ptr + b * smb + h * smh + d, mask=dmask, other=0.0)
        t = tl.arange(0, PAGE)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        acc_lo = tl.zeros((DP, BLOCK_M), tl.float32)
        acc_hi = tl.zeros((DP, BLOCK_M), tl.float32)
        # Σp stays per element until the end of the split (a cross-thread sum per page costs more than the page).
        l_t = tl.zeros((PAGE, BLOCK_M), tl.float32)
        ls_t = tl.zeros((PAGE, BLOCK_M), tl.float32)  # Σ p·s likewise: the weight of the values' offset OFF
        # Software prefetch: keys one page ahead; a step's values at its start (one page: a page ahead), used after
        # its softmax.
        p_lo, p_hi, end, page = _split_pages(bt_ptr, b, sbt, split, pages_per_split, comp, PAGE)
        nk_lo, nk_hi, nks = _page_codes(kc_ptr, ks_ptr, page, h, end - p_lo * PAGE, skc_p, skc_h, skc_t, sc_w, sks_p,
                                        sks_h, D, DP, KBITS, KHI, PAGE, JOIN_K)
        if PK == 1:  # one page per step: its values too are loaded a page ahead (a step start is too late at batch 1)
            nv_lo, nv_hi, nvs = _page_codes(vc_ptr, vs_ptr, page, h, end - p_lo * PAGE, svc_p, svc_h, svc_t, sc_w,
                                            svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V)
        if ROPE_HALF == 0:  # the query's operands, from _query_prep_kernel, once the first page is on its way
            if PDL:
                gdc_wait()
            qt_c, qt_lo, qt_hi = (), (), ()
            for k in tl.static_range(PK):
                c, lo, hi = _query_operands(qt_ptr, pid * PK + k, KQ, NG, DP, KBITS, BLOCK_M)
                qt_c, qt_lo, qt_hi = qt_c + (c,), qt_lo + (lo,), qt_hi + (hi,)
            logit_unit, q_mean = _logit_units(qm_ptr, pid, sm_scale, SOFTCAP, BLOCK_M)
        for pg0 in range(p_lo, p_hi, PK):
            pages, vcodes = (), ()  # ``page``: this step's first page, loaded with its keys
            for k in tl.static_range(PK):
                if k > 0:
                    page = tl.load(bt_ptr + b * sbt + tl.minimum(pg0 + k, p_hi - 1))
                pages = pages + (page,)
                if PK == 1:
                    vcodes = vcodes + ((nv_lo, nv_hi, nvs),)
                else:
                    vcodes = vcodes + (_page_codes(vc_ptr, vs_ptr, page, h, end - (pg0 + k) * PAGE, svc_p, svc_h,
                                                   svc_t, sc_w, svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V),)
            for k in tl.static_range(PK):
                k_lo, k_hi, ks = nk_lo, nk_hi, nks
                if k + 1 < PK:
                    page = pages[k + 1]
                else:  # the next step's first page
                    page = tl.load(bt_ptr + b * sbt + tl.minimum(pg0 + PK, p_hi - 1))
                nk_lo, nk_hi, nks = _page_codes(kc_ptr, ks_ptr, page, h, end - (pg0 + k + 1) * PAGE, skc_p, skc_h,
                                                skc_t, sc_w, sks_p, sks_h, D, DP, KBITS, KHI, PAGE, JOIN_K)
                if PK == 1:
                    nv_lo, nv_hi, nvs = _page_codes(vc_ptr, vs_ptr, page, h, end - (pg0 + 1) * PAGE, svc_p, svc_h,
                                                    svc_t, sc_w, svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V)
                if ROPE_HALF == 0:
                    sk = _key_products(k_lo, k_hi, qt_c[k], qt_lo[k], qt_hi[k], PAGE, NWL, NG, DP, KBITS, KHI, ASM)
                    if k == 0:
                        s = sk * (ks * logit_unit)[:, None] + q_mean[None, :]
                    else:
                        s += sk * (ks * logit_unit)[:, None]
                else:
                    tvalid = pg0 * PAGE + t < end
                    krow = kc_ptr + pages[0].to(tl.int64) * skc_p + h * skc_h + t[:, None] * skc_t
                    uk = load_e8_doubled(krow, tvalid, D, DP, KBITS, PAGE).to(DOT)
                    kd = (tl.dot(uk, rot) * 0.5 + rot_sum[None, :]) * (ks * INV_SQRT_N)[:, None] + k_mean[None, :]
                    k_pos = tl.load(pos_ptr + pages[0].to(tl.int64) * spos_p + h * spos_h + t, mask=tvalid, other=0)
                    cos, sin, _ = rope_rows_at(cos_ptr, sin_ptr, k_pos, tvalid, d, ROPE_HALF)
                    kd = rope_rotate(kd, rope_partner(kd, d, ROPE_HALF), d, cos, sin, ROPE_HALF, False)
                    s = tl.dot(kd.to(DOT), tl.trans(q))
            tok = (pg0 + slot[None, :]) * PAGE + t[:, None]  # [PAGE, BLOCK_M]: token of each slot's page
            seen = tok < end
            if CAUSAL_PAGES or WINDOW:  # else every compressed token precedes every query
                seen = seen & _causal(n_sink + tok, q_index[None, :], WINDOW, window)
            p, alpha, m_i = _online_softmax(s, seen, m_i, sm_scale, SOFTCAP, softcap, 0, ROPE_HALF == 0 and not SOFTCAP)
            l_t = l_t * alpha[None, :] + p
            ls_t = ls_t * alpha[None, :]
            acc_lo = acc_lo * alpha[None, :]
            if VBITS > 2:
                acc_hi = acc_hi * alpha[None, :]
            for k in tl.static_range(PK):
                v_lo, v_hi, vs = vcodes[k]
                ps = p * vs[:, None]
                if PK > 1:
                    ps = tl.where(slot[None, :] == k, ps, 0.0)
                ls_t += ps
                acc_lo, acc_hi = _value_products(v_lo, v_hi, ps.to(tl.float16), acc_lo, acc_hi, PAGE, NWL, DP, VBITS,
                                                 VHI, ASM)
        m_r, l_r, ls, acc_lo, acc_hi = _merge_slots(m_i, tl.sum(l_t, axis=0), tl.sum(ls_t, axis=0), acc_lo, acc_hi,
                                                    PK, RS, DP)
        # The partial in the original basis (rotated back once per split, so the reduce only weighs and adds).
        r = tl.arange(0, RS)
        keep = ((pid % n_mblk) * BLOCK_M + r) // GROUP < Q_LEN
        x = _values_original(acc_lo, acc_hi, ls, vg_ptr, RS, D, DP, LOG2DP, VBITS, INV_SQRT_N)
        tl.store(acc_ptr + (part * BLOCK_M + r)[:, None] * DP + d[None, :], x, mask=keep[:, None])
        tl.store(m_ptr + part * BLOCK_M + r, m_r, mask=keep)
        tl.store(l_ptr + part * BLOCK_M + r, l_r, mask=keep)
    else:
        _uncompressed_part(q_ptr, fpk_ptr, fpv_ptr, m_ptr, l_ptr, acc_ptr, b, h, qi, g, slot, part, n_fp, n_sink, comp,
                           q_index, sm_scale, softcap, window, sqb, sqt, sqh, sfb, sfh, sft, Q_LEN, GROUP, D, DP,
                           SOFTCAP, WINDOW, DOT, BLOCK_M, BLOCK_N)
    if PDL:  # the reduce may launch now; it waits for this grid to end before it reads
        gdc_launch_dependents()


@triton.jit(do_not_specialize=["sc_w"])  # see _page_words
def _attn_keys_kernel(kc_ptr, ks_ptr, bt_ptr, lens_ptr, qt_ptr, qm_ptr, lg_ptr, m_ptr,
                      H, n_mblk, n_splits, pages_per_split, n_tok, max_batch, sm_scale, softcap, window,
                      skc_p, skc_h, skc_t, sks_p, sks_h, sc_w, sbt,
                      Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                      KBITS: tl.constexpr, PAGE: tl.constexpr, NG: tl.constexpr, KQ: tl.constexpr,
                      SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
                      RS: tl.constexpr, JOIN_K: tl.constexpr, PDL: tl.constexpr, CAUSAL_PAGES: tl.constexpr):
    # Two-pass split, pass 1 (keys only): each page's logits [PAGE, BLOCK_M] in log2 units (masked keys -inf), the
    # first RS columns stored to lg[pid, token, :RS]; the split's max per column to m_ptr. No softmax state but an
    # elementwise max, so the loop has no cross-warp reduction and holds no value accumulators.
    pid, split = tl.program_id(0), tl.program_id(1)
    b, h, qi, g, slot = _query_rows(pid, H, n_mblk, GROUP, BLOCK_M, 1)
    seq_len = tl.load(lens_ptr + b)
    comp = tl.load(lens_ptr + max_batch + b)
    n_sink = tl.load(lens_ptr + 3 * max_batch + b)
    q_index = seq_len - Q_LEN + qi
    part = pid * (n_splits + 1) + split
    NWL: tl.constexpr = DP // 16
    KHI: tl.constexpr = 1 if KBITS == 3 else 2
    t = tl.arange(0, PAGE)
    col = tl.arange(0, BLOCK_M)
    p_lo, p_hi, end, page = _split_pages(bt_ptr, b, sbt, split, pages_per_split, comp, PAGE)
    nk_lo, nk_hi, nks = _page_codes(kc_ptr, ks_ptr, page, h, end - p_lo * PAGE, skc_p, skc_h, skc_t, sc_w, sks_p,
                                    sks_h, D, DP, KBITS, KHI, PAGE, JOIN_K)
    if PDL:
        gdc_wait()
    qt_c, qt_lo, qt_hi = _query_operands(qt_ptr, pid, KQ, NG, DP, KBITS, BLOCK_M)
    logit_unit, q_mean = _logit_units(qm_ptr, pid, sm_scale, SOFTCAP, BLOCK_M)
    lg = lg_ptr + pid.to(tl.int64) * n_tok * RS + col[None, :]  # this block's [token, row] logits
    m_t = tl.full((PAGE, BLOCK_M), float("-inf"), tl.float32)
    for pg in range(p_lo, p_hi):
        k_lo, k_hi, ks = nk_lo, nk_hi, nks
        page = tl.load(bt_ptr + b * sbt + tl.minimum(pg + 1, p_hi - 1))
        nk_lo, nk_hi, nks = _page_codes(kc_ptr, ks_ptr, page, h, end - (pg + 1) * PAGE, skc_p, skc_h, skc_t, sc_w,
                                        sks_p, sks_h, D, DP, KBITS, KHI, PAGE, JOIN_K)
        sk = _key_products(k_lo, k_hi, qt_c, qt_lo, qt_hi, PAGE, NWL, NG, DP, KBITS, KHI, ASM)
        s = sk * (ks * logit_unit)[:, None] + q_mean[None, :]
        if SOFTCAP:
            s = _softcap_log2(s, sm_scale, softcap)
        tok = pg * PAGE + t[:, None]
        seen = tok < end
        if CAUSAL_PAGES or WINDOW:
            seen = seen & _causal(n_sink + tok, q_index[None, :], WINDOW, window)
        s = tl.where(seen, s, float("-inf"))
        m_t = tl.maximum(m_t, s)
        tl.store(lg + tok * RS, s, mask=col[None, :] < RS)
    tl.store(m_ptr + part * BLOCK_M + col, tl.max(m_t, axis=0), mask=col < RS)
    if PDL:
        gdc_launch_dependents()


@triton.jit(do_not_specialize=["sc_w"])  # see _page_words
def _attn_values_kernel(q_ptr, vc_ptr, vs_ptr, bt_ptr, lens_ptr, lg_ptr, fpk_ptr, fpv_ptr, m_ptr, l_ptr, acc_ptr,
                        vg_ptr, H, n_mblk, n_splits, pages_per_split, n_tok, max_batch, sm_scale, softcap, window,
                        sqb, sqt, sqh, svc_p, svc_h, svc_t, svs_p, svs_h, sc_w, sbt, sfb, sfh, sft,
                        Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        VBITS: tl.constexpr, PAGE: tl.constexpr, INV_SQRT_N: tl.constexpr, LOG2DP: tl.constexpr,
                        SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
                        BLOCK_M: tl.constexpr, RS: tl.constexpr, BLOCK_N: tl.constexpr, JOIN_V: tl.constexpr,
                        PDL: tl.constexpr, FP_ONLY: tl.constexpr):
    # Two-pass split, pass 2 (values only): p = 2^(s - m) from pass 1's logits and split max, accumulated against
    # the decoded value pages as in ``_attn_split_kernel``; no running max, so nothing is ever rescaled. FP_ONLY
    # (grid (programs, 1)): only the uncompressed part, beside the Gluon values pass (which takes the pages).
    pid, split = tl.program_id(0), tl.program_id(1)
    if FP_ONLY:
        split = n_splits
    b, h, qi, g, slot = _query_rows(pid, H, n_mblk, GROUP, BLOCK_M, 1)
    seq_len = tl.load(lens_ptr + b)
    comp = tl.load(lens_ptr + max_batch + b)
    n_fp = tl.load(lens_ptr + 2 * max_batch + b)
    n_sink = tl.load(lens_ptr + 3 * max_batch + b)
    q_index = seq_len - Q_LEN + qi
    part = pid * (n_splits + 1) + split
    if split < n_splits:
        NWL: tl.constexpr = DP // 16
        VHI: tl.constexpr = 1 if VBITS == 3 else 2
        t = tl.arange(0, PAGE)
        col = tl.arange(0, BLOCK_M)
        p_lo, p_hi, end, page = _split_pages(bt_ptr, b, sbt, split, pages_per_split, comp, PAGE)
        nv_lo, nv_hi, nvs = _page_codes(vc_ptr, vs_ptr, page, h, end - p_lo * PAGE, svc_p, svc_h, svc_t, sc_w,
                                        svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V)
        if PDL:
            gdc_wait()
        m_r = tl.load(m_ptr + part * BLOCK_M + col, mask=col < RS, other=float("-inf"))
        m_safe = tl.where(m_r == float("-inf"), 0.0, m_r)
        lg = lg_ptr + pid.to(tl.int64) * n_tok * RS + col[None, :]  # pass 1's [token, row] logits
        tok = p_lo * PAGE + t[:, None]
        ns = tl.load(lg + tok * RS, mask=(col[None, :] < RS) & (tok < end), other=float("-inf"))
        l_t = tl.zeros((PAGE, BLOCK_M), tl.float32)
        ls_t = tl.zeros((PAGE, BLOCK_M), tl.float32)
        acc_lo = tl.zeros((DP, BLOCK_M), tl.float32)
        acc_hi = tl.zeros((DP, BLOCK_M), tl.float32)
        for pg in range(p_lo, p_hi):
            v_lo, v_hi, vs, s = nv_lo, nv_hi, nvs, ns
            page = tl.load(bt_ptr + b * sbt + tl.minimum(pg + 1, p_hi - 1))
            nv_lo, nv_hi, nvs = _page_codes(vc_ptr, vs_ptr, page, h, end - (pg + 1) * PAGE, svc_p, svc_h, svc_t,
                                            sc_w, svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V)
            tok = (pg + 1) * PAGE + t[:, None]
            ns = tl.load(lg + tok * RS, mask=(col[None, :] < RS) & (tok < end), other=float("-inf"))
            p = tl.exp2(s - m_safe[None, :])
            l_t += p
            ps = p * vs[:, None]
            ls_t += ps
            acc_lo, acc_hi = _value_products(v_lo, v_hi, ps.to(tl.float16), acc_lo, acc_hi, PAGE, NWL, DP, VBITS,
                                             VHI, ASM)
        keep = ((pid % n_mblk) * BLOCK_M + col) // GROUP < Q_LEN
        x = _values_original(acc_lo, acc_hi, tl.sum(ls_t, axis=0), vg_ptr, BLOCK_M, D, DP, LOG2DP, VBITS, INV_SQRT_N)
        d = tl.arange(0, DP)
        tl.store(acc_ptr + (part * BLOCK_M + col)[:, None] * DP + d[None, :], x, mask=keep[:, None])
        tl.store(l_ptr + part * BLOCK_M + col, tl.sum(l_t, axis=0), mask=keep)
    else:
        _uncompressed_part(q_ptr, fpk_ptr, fpv_ptr, m_ptr, l_ptr, acc_ptr, b, h, qi, g, slot, part, n_fp, n_sink, comp,
                           q_index, sm_scale, softcap, window, sqb, sqt, sqh, sfb, sfh, sft, Q_LEN, GROUP, D, DP,
                           SOFTCAP, WINDOW, DOT, BLOCK_M, BLOCK_N)
    if PDL:
        if FP_ONLY:  # launched while the values pass still runs: done only once it is (what the reduce waits for)
            gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _attn_reduce_kernel(m_ptr, l_ptr, acc_ptr, vmean_ptr, o_ptr, H, n_mblk, n_splits, svmb, svmh, soh_b, soh_t, soh_h,
                        Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        CENTER_V: tl.constexpr, BLOCK_M: tl.constexpr, RB: tl.constexpr, SC: tl.constexpr,
                        OB: tl.constexpr, PDL: tl.constexpr):
    # Output columns OB·j.. of one (batch, KV head, row block): its splits' partials (already in the original basis)
    # with weights 2^(m_s - max), SC splits per step in one [SC, RB, OB] load, so a pass costs a few memory latencies
    # however many splits there are; then the uncompressed part's, the normalisation and the value mean. Small
    # batches spread the columns over programs. Only the first RB rows of a block are read: the rest pad the split
    # kernel's tile.
    pid, cb = tl.program_id(0), tl.program_id(1)
    bh, mb = pid // n_mblk, pid % n_mblk
    b, h = bh // H, bh % H
    cols = cb * OB + tl.arange(0, OB)
    v_mean = tl.zeros((OB,), tl.float32)
    if CENTER_V:  # written before the call: read before the wait
        v_mean = tl.load(vmean_ptr + b * svmb + h * svmh + cols, mask=cols < D, other=0.0)
    if PDL:  # launched before the split kernel ended (``_pdl``): its partials are complete only after this
        gdc_wait()
    rows = tl.arange(0, RB)
    r = mb * BLOCK_M + rows
    qi, g = r // GROUP, r % GROUP
    real = qi < Q_LEN
    base = pid * (n_splits + 1)
    # The uncompressed part's partials first: issued with the first splits' loads, not one memory latency after
    fp_row = (base + n_splits) * BLOCK_M + rows
    m_fp = tl.load(m_ptr + fp_row, mask=real, other=float("-inf"))
    l_fp = tl.load(l_ptr + fp_row, mask=real, other=0.0)
    a_fp = tl.load(acc_ptr + fp_row[:, None] * DP + cols[None, :], mask=real[:, None], other=0.0)
    sc = tl.arange(0, SC)
    m_run = tl.full((RB,), float("-inf"), tl.float32)
    l_comp = tl.zeros((RB,), tl.float32)
    u = tl.zeros((RB, OB), tl.float32)
    for s0 in range(0, n_splits, SC):
        valid = (s0 + sc < n_splits)[:, None] & real[None, :]  # [SC, RB]
        prow = (base + s0 + sc)[:, None] * BLOCK_M + rows[None, :]
        m_s = tl.load(m_ptr + prow, mask=valid, other=float("-inf"))
        l_s = tl.load(l_ptr + prow, mask=valid, other=0.0)
        a_s = tl.load(acc_ptr + prow[:, :, None] * DP + cols[None, None, :], mask=valid[:, :, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_safe)
        w = tl.exp2(m_s - m_safe[None, :])  # 0 past the last split
        l_comp = l_comp * alpha + tl.sum(w * l_s, axis=0)
        u = u * alpha[:, None] + tl.sum(w[:, :, None] * a_s, axis=0)
        m_run = m_new
    m_all = tl.maximum(m_run, m_fp)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    w_comp, w_fp = tl.exp2(m_run - m_safe), tl.exp2(m_fp - m_safe)
    l_comp *= w_comp
    l_sum = l_comp + w_fp * l_fp
    inv_l = 1.0 / tl.where(l_sum > 0.0, l_sum, 1.0)
    # the value mean, once per unit of the compressed tokens' probability mass
    out = ((w_comp * inv_l)[:, None] * u + (w_fp * inv_l)[:, None] * a_fp + (l_comp * inv_l)[:, None] * v_mean[None, :])
    o_row = o_ptr + b * soh_b + qi[:, None] * soh_t + (h * GROUP + g)[:, None] * soh_h
    tl.store(o_row + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=real[:, None] & (cols < D)[None, :])


_PREP_ROWS = 64  # decode-matrix rows per query-prep program
_TORCH_DTYPE = {tl.float16: torch.float16, tl.bfloat16: torch.bfloat16, tl.float32: torch.float32}


@functools.lru_cache(maxsize=None)
def _pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (Hopper and later): the split kernel and the reduce are launched while their
    predecessor still runs, so their launch and prologue overlap it; each waits (``gdc_wait``) before it reads what
    the predecessor wrote. Only these two kernels are launched that way, each right after one of ours, so everything
    launched before the call has finished before they start."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


_GLUON_WARNED = []


def _warn_gluon_unavailable(error: Exception) -> None:
    """Once per process: a config that asks for a Gluon pass on a GPU where it does not import."""
    if _GLUON_WARNED:
        return
    _GLUON_WARNED.append(error)
    warnings.warn(f"nqkernels: the launch config asks for a Gluon pass but it does not import with triton "
                  f"{triton.__version__} ({type(error).__name__}: {error}); the portable kernels run", stacklevel=4)


def _gluon(q: torch.Tensor):
    """The Gluon passes (``attention_gluon``, GPU only) where they can run, else None (the portable kernels run): a
    CUDA device of capability >= 9 and a triton whose Gluon API they compile with (imported lazily, so a triton
    without it is no import error). Which launches each pass covers: ``attention_gluon.supports`` (head_dim
    64/128/256, q_len · group <= 8, pages of a multiple of 16 tokens; the rest take the portable kernels). Chosen
    by the launch config's ``gluon_keys`` / ``gluon_values`` (default off)."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9:
        return None
    try:
        from . import attention_gluon
    except Exception as e:  # noqa: BLE001 - no (or another) Gluon API in this triton: the portable kernel runs
        _warn_gluon_unavailable(e)
        return None
    return attention_gluon


# Decode plans: the launches of a decode_attention call, replayed for the next calls of the same step (every layer
# of a model has the same geometry and lengths) with their own tensors (nqkernels.launch). Keyed by what the scalars
# and the launch config derive from (``_plan_key``: the tensors' signatures among them; a config override changes
# autotune.store.generation). A plan holds its call's workspaces (partials, the two-pass logits): they are reused by the calls that replay it, in
# stream order. Two plans are kept: the current step's and the one before.
_PLANS: dict = {}
_MAX_PLANS = 2


def _plan_key(q, cache: PagedKVCache, scale, softcap, window, num_splits) -> tuple:
    """Everything a recorded plan's launches derive from but the tensors' contents: the tensors' signatures
    (``launch.signature``: dtype, shape, strides, alignment; the cache's are kept by the cache), lengths, options,
    the stream and the config store's generation. Equal keys replay (``LaunchRecord.replay``)."""
    B = q.shape[0]
    rope_end = max(cache.next_positions()[:B]) if cache.codec.rope is not None else None  # RoPE table length
    return (signature(q), q.device, torch.cuda.current_stream(q.device).cuda_stream, cache.codec,
            cache.launch_signature(), tuple(cache.compressed_lens()[:B]), rope_end, scale, softcap, window, num_splits,
            store.generation())


def _call_tensors(q, out, cache: PagedKVCache) -> dict:
    """The tensors a decode_attention call launches on that are its own (the rest are the plan's)."""
    return dict(q=q, out=out, k_codes=cache.k_codes, k_scales=cache.k_scales, v_codes=cache.v_codes,
                v_scales=cache.v_scales, block_table=cache.block_table, lengths=cache.lengths, k_mean=cache.k_mean,
                v_mean=cache.v_mean, fp_k=cache.fp_k, fp_v=cache.fp_v, positions=cache.positions)


def _pdl_options(pdl: bool) -> dict:
    """Launch options of a kernel that waits with ``gdc_wait`` before reading its predecessor's output."""
    return {"launch_pdl": True} if pdl else {}


def _join_runs(bits: int, codes: torch.Tensor) -> bool:
    """Whether a code pool's pages are loaded as joined runs of consecutive words (``_page_codes``): below 4 bits,
    and at 4 bits when a token's stride is not a multiple of 16 words, where Triton does not specialize it as
    aligned and would load the runs one word at a time."""
    return bits < 4 or codes.stride(2) % 16 != 0


def _dot_dtype(q: torch.Tensor):
    """Tensor-core operand type: q's dtype. The interpreter's bf16 dot returns garbage (triton 3.9, CPU), so there
    bf16 operands are widened to fp32 (same math, fp32 products)."""
    if q.dtype == torch.bfloat16:
        return tl.float32 if not q.is_cuda else tl.bfloat16
    return tl.float16


def _deal_order(n_words: int, regs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lattice._deal``'s pair order over n_words words of ``regs`` registers: for each element κ, its word, its
    register within the word and its 16-bit half."""
    c_words = min(4, n_words)
    kappa = torch.arange(2 * n_words * regs)
    p, half = kappa // 2, kappa % 2
    q = p // c_words
    return n_words // c_words * (p % c_words) + q // regs, q % regs, half


def _pair_order(n_words: int, fbits: int) -> torch.Tensor:
    """For each element κ of ``lattice.plane_pairs`` over n_words words of fbits-bit fields: the plane coordinate
    it holds (word j holds coordinates (32/fbits)·j ..; register i = (8/fbits)·sh + k, half h holds field
    i + (16/fbits)·h)."""
    word, i, half = _deal_order(n_words, 16 // fbits)
    return 32 // fbits * word + i + 16 // fbits * half


@functools.lru_cache(maxsize=None)
def _decode_matrix(head_dim: int, bits: int, device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of R (``reference.rotation_matrix``, zero-padded to [DP, DP]) in the order of the decoded operands, with
    each block's weight, fp32: [per-group constants (NG rows: ¼ Σ of the group's 8 rows, ``coset_pairs``) | low
    plane (DP rows, pair order) | high plane (DP rows, pair order, ×4; only for 3 and 4 bits)]. A decoded tile times
    this matrix is Σ_d R[d]·v_d in the original basis (up to ``plane_pairs``' powers of two and 2^-24), and the
    query times its transpose gives the logit weight of each decoded element. Kernels take it in their operand
    dtype (the entries are exact in fp16 and bf16 except at head_dim 96)."""
    rot = rotation(head_dim, "cpu")
    dp = rot.shape[0]
    nwl = dp // 16
    ng = max(16, 2 * nwl)
    coset = torch.zeros(ng, dp)
    groups = rot.reshape(dp // 8, 8, dp).sum(1) * 0.25
    word, reg, half = _deal_order(nwl, ng // (2 * nwl))
    coset[reg == 0] = groups[(2 * word + half)[reg == 0]]  # register 1, if any, is the zero padding
    blocks = [coset, rot[_pair_order(nwl, 2)]]
    if bits > 2:
        hi_bits = 1 if bits == 3 else 2
        blocks.append(rot[_pair_order(dp * hi_bits // 32, hi_bits)] * 4.0)
    return torch.cat(blocks).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _value_gather(head_dim: int, bits: int, device: str) -> torch.Tensor:
    """Where a split's value accumulator holds each storage coordinate j (``_values_original``), fp32 [4, DP]: the
    element of the low plane (pair order over 2-bit fields) and its weight, then those of the high plane (zeros at 2
    bits). A weight undoes its element's power of two (``plane_pairs``) and the subnormals' 2^-24, and carries the
    plane's factor in v = u/2 + 4·hi + OFF (the low plane holds u = 2·lo + c, ``lattice.coset_plane_pairs``)."""
    dp = ref.next_pow2(head_dim)

    def plane(fbits: int, factor: float) -> list:
        kappa = torch.empty(dp, dtype=torch.long)
        kappa[_pair_order(dp * fbits // 32, fbits)] = torch.arange(dp)
        power = fbits * (kappa // 2 // min(4, dp * fbits // 32) % (8 // fbits))  # as in _pair_inv_scale
        return [kappa.double(), factor * 2.0 ** (24 - power.double())]

    rows = plane(2, 0.5) + (plane(1 if bits == 3 else 2, 4.0) if bits > 2 else [torch.zeros(dp)] * 2)
    return torch.stack(rows).float().to(device)


def _check_inputs(q, cache, softmax_scale, softcap, window, num_splits):
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [batch, q_len, q_heads, head_dim], got {describe(q)}")
    B, q_len, Hq, D = q.shape
    if D != cache.codec.head_dim:
        raise ValueError(f"q has head_dim {D}; the cache holds head_dim {cache.codec.head_dim}")
    H = cache.num_kv_heads
    if Hq == 0 or Hq % H:
        # [B, H, T, D] (the layout of attention modules) swaps q_len and q_heads: say so when that reading fits.
        hint = (f"; q {list(q.shape)} looks like [batch, q_heads, q_len, head_dim]: pass q.transpose(1, 2)"
                if q_len and q_len % H == 0 else "")
        raise ValueError(f"q must be [batch, q_len, q_heads, head_dim] with q_heads a positive multiple of the "
                         f"cache's kv_heads ({H}), got q_heads={Hq}{hint}")
    if q.dtype != cache.dtype:
        raise ValueError(f"q is {q.dtype} but the cache holds {cache.dtype} (they must match)")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {cache.device}")
    if B > cache.max_batch:
        raise ValueError(f"batch {B} exceeds the cache's max_batch={cache.max_batch}")
    if q_len < 1:
        raise ValueError("q_len must be >= 1")
    lens = cache.seq_lens()[:B]
    short = [b for b, n in enumerate(lens) if n < q_len]
    if short:
        raise ValueError(f"sequences {short} hold fewer tokens than q_len={q_len}: append the chunk's keys and "
                         f"values to the cache before attending")
    if softmax_scale is not None:
        check_positive_float("softmax_scale", softmax_scale)
    if softcap is not None:
        check_positive_float("softcap", softcap)
    if window is not None and (not is_int(window) or window < 1):
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
    if num_splits is not None and (not is_int(num_splits) or num_splits < 1):
        raise ValueError(f"num_splits must be an int >= 1 or None (automatic), got {num_splits!r}")


def decode_attention(q: torch.Tensor, cache: PagedKVCache, *, softmax_scale: Optional[float] = None,
                     softcap: Optional[float] = None, window: Optional[int] = None,
                     num_splits: Optional[int] = None) -> torch.Tensor:
    """Attention of new queries over a compressed cache (codes decoded in registers; split-K + reduce).

    Args:
        q: ``[B, q_len, q_heads, head_dim]`` fp16/bf16 (the cache's dtype), the queries of the last ``q_len``
            tokens of sequences 0..B-1, whose keys and values were already appended to ``cache``. Causal inside
            the chunk: query i sees the tokens up to its own.
        cache: a ``PagedKVCache``; q_heads must be a multiple of its kv_heads (GQA; all query heads of a KV head
            are served by one program, so codes are read once).
        softmax_scale: default ``head_dim ** -0.5``.
        softcap: logits become ``softcap * tanh(logits / softcap)`` (Gemma-2); default off.
        window: sliding window: a query sees only the last ``window`` tokens (itself included); default off.
        num_splits: splits of the compressed pages per sequence (flash-decoding); default: enough programs to
            fill the GPU. Splits hold whole steps of the launch config's ``pages_per_step``, so a request may
            yield fewer.
    Launch configs come from this GPU's config store (``python -m autotune.tune``). Where it picks ``two_pass``
    (on the H100: long contexts at small batches) a call also allocates a logits workspace of 4 bytes per
    (sequence, KV head, compressed token slot, query row), 17 MB for 8 KV heads × 128K tokens at GQA 4.
    Returns:
        ``[B, q_len, q_heads, head_dim]`` in q's dtype.

    Example:
        >>> from nqkernels import KVCodec, PagedKVCache, decode_attention
        >>> codec = KVCodec(head_dim=128, page_size=16)
        >>> cache = PagedKVCache(codec, num_kv_heads=2, max_batch=1, num_pages=8, device="cpu")
        >>> k = torch.randn(1, 50, 2, 128, dtype=torch.float16)
        >>> cache.append(k, torch.randn_like(k))
        >>> decode_attention(torch.randn(1, 1, 8, 128, dtype=torch.float16), cache).shape
        torch.Size([1, 1, 8, 128])
    """
    _check_inputs(q, cache, softmax_scale, softcap, window, num_splits)
    B, q_len, Hq, D = q.shape
    H = cache.num_kv_heads
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.empty_like(q)
    if B == 0:
        return out
    if not use_triton(q):
        return _reference_attention(q, cache, scale, softcap, window).to(q.dtype)
    record, key, inputs = None, None, None
    if q.is_cuda and not torch.cuda.is_current_stream_capturing():  # a graph replays at no host cost anyway
        key, inputs = _plan_key(q, cache, scale, softcap, window, num_splits), _call_tensors(q, out, cache)
        plan = _PLANS.get(key)
        if plan is not None:  # another layer of this decode step: replay its launches (the key holds the signatures)
            plan.replay(inputs)
            return out
        record = LaunchRecord(inputs)
    launch = launcher(record)
    codec = cache.codec
    group = Hq // H
    rows = q_len * group
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    n_mblk = triton.cdiv(rows, block_m)
    P = codec.page_size
    longest = max(cache.compressed_lens()[:B])
    max_pages = triton.cdiv(longest, P)
    cfg = launch_config("attention", attention_buckets(D, codec.key_bits, codec.value_bits, group, B, longest), q.device)
    # Pages per step: a block of few rows holds several pages' logits side by side (post-RoPE keys only).
    step = 1 if codec.rope is not None else max(1, min(cfg["pages_per_step"], block_m // triton.next_power_of_2(rows)))
    two_pass = cfg["two_pass"] and codec.rope is None  # keys, then values (_attn_keys_kernel; post-RoPE keys only)
    if two_pass:
        step = 1
    if num_splits is None:  # fill the GPU, but give each split a few pages (its prologue and partial cost a page)
        want = triton.cdiv(max_programs(q.device, cfg["programs_per_sm"]), B * H * n_mblk)
        num_splits = min(triton.cdiv(max_pages, cfg["min_pages_per_split"]), max(1, want))
    num_splits = min(int(num_splits), max_pages)
    # Whole steps per split, so no step but the last of the longest sequence has empty slots.
    pages_per_split = triton.cdiv(triton.cdiv(max_pages, num_splits), step) * step if num_splits else 0
    num_splits = triton.cdiv(max_pages, pages_per_split) if num_splits else 0
    DP = ref.next_pow2(D)
    NG = max(16, DP // 8)
    n_parts = num_splits + 1
    m_part = torch.empty(B * H * n_mblk, n_parts, block_m, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * H * n_mblk, n_parts, block_m, DP, dtype=torch.float32, device=q.device)
    dev = str(q.device)
    rot = rotation(D, dev)
    dot = _dot_dtype(q)
    pk = _decode_matrix(D, codec.key_bits, dev, _TORCH_DTYPE[dot])
    rope_half = 0
    cos = sin = rot  # placeholders, never read without RoPE
    positions = cache.k_scales if cache.positions is None else cache.positions  # placeholder without RoPE
    if codec.rope is not None:
        cos, sin = rope_tables(codec, max(cache.next_positions()[:B]), q.device)
        rope_half = (codec.rope.rotary_dim or D) // 2
    inv_sqrt_n = 1.0 / math.sqrt(ref.transform_norm(D))
    KQ = NG + DP * (2 if codec.key_bits > 2 else 1)
    prep = rope_half == 0 and num_splits > 0
    pdl = _pdl(q.device)
    if prep:
        q_t = torch.empty(B * H * n_mblk, step, KQ, block_m, dtype=torch.float16, device=q.device)
        q_mean = torch.empty(B * H * n_mblk, block_m, dtype=torch.float32, device=q.device)
        launch(_query_prep_kernel, (B * H * n_mblk, triton.cdiv(KQ, _PREP_ROWS)),
            q, pk, cache.k_mean, q_t, q_mean, H, n_mblk, *q.stride()[:3], *cache.k_mean.stride()[:2],
            Q_LEN=q_len, GROUP=group, D=D, DP=DP, KBITS=codec.key_bits, NG=NG, KQ=KQ, INV_SQRT_N=inv_sqrt_n,
            CENTER_K=codec.center_keys, DOT=dot, BLOCK_M=block_m, PK=step, QR=_PREP_ROWS, PDL=pdl, num_warps=4)
    else:  # placeholders, never read, but of the operands' dtypes: the kernel compiles its compressed-page branch
        q_t, q_mean = acc_part.new_empty(1, dtype=torch.float16), m_part  # anyway, and fp16 x fp32 is not a product
    rb = min(block_m, triton.next_power_of_2(rows))  # the real rows of a block (the reduce reads only these)
    if two_pass and prep:
        n_tok = max_pages * P  # logits workspace: 4 bytes per (sequence, KV head, token slot, row)
        logits = torch.empty(B * H * n_mblk, n_tok, rb, dtype=torch.float32, device=q.device)
        fast = _gluon(q) if cfg["gluon_keys"] or cfg["gluon_values"] else None
        fast_keys = fast is not None and cfg["gluon_keys"] and fast.supports(D, codec.key_bits, P, rows)
        fast_values = fast is not None and cfg["gluon_values"] and fast.supports(D, codec.value_bits, P, rows)
        if fast_keys:  # the Gluon keys pass (Hopper+): the same logits and split maxima
            fast.keys_pass(cache, q_t, q_mean, logits, m_part, q_len=q_len, group=group, block_m=block_m, rs=rb,
                           num_splits=num_splits, pages_per_split=pages_per_split, n_tok=n_tok, scale=scale,
                           softcap=softcap, window=window, num_warps=cfg["gluon_warps"],
                           prefetch=cfg["gluon_prefetch"], l2_prefetch=cfg["gluon_l2"],
                           maxnreg=cfg["gluon_maxnreg"], launch=launch)
        else:
            launch(_attn_keys_kernel, (B * H * n_mblk, num_splits),
                cache.k_codes, cache.k_scales, cache.block_table, cache.lengths, q_t, q_mean, logits, m_part,
                H, n_mblk, num_splits, pages_per_split, n_tok, cache.max_batch, scale, float(softcap or 1.0),
                int(window or 0), *cache.k_codes.stride()[:3], *cache.k_scales.stride()[:2], cache.k_codes.stride(3),
                cache.block_table.stride(0),
                Q_LEN=q_len, GROUP=group, D=D, DP=DP, KBITS=codec.key_bits, PAGE=P, NG=NG, KQ=KQ,
                SOFTCAP=softcap is not None, WINDOW=window is not None, ASM=q.is_cuda, BLOCK_M=block_m, RS=rb,
                JOIN_K=_join_runs(codec.key_bits, cache.k_codes), PDL=pdl, CAUSAL_PAGES=q_len > 1,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"], **_pdl_options(pdl))
        if fast_values:  # the Gluon values pass (Hopper+) takes the pages; the portable kernel the uncompressed part
            fast.values_pass(cache, logits, m_part, l_part, acc_part, rows=rows, block_m=block_m, rs=rb,
                             num_splits=num_splits, pages_per_split=pages_per_split, n_tok=n_tok,
                             num_warps=cfg["gluon_values_warps"], l2_prefetch=cfg["gluon_l2"],
                             maxnreg=cfg["gluon_maxnreg"], launch=launch)
        launch(_attn_values_kernel, (B * H * n_mblk, 1 if fast_values else n_parts),
            q, cache.v_codes, cache.v_scales, cache.block_table, cache.lengths, logits, cache.fp_k, cache.fp_v,
            m_part, l_part, acc_part, _value_gather(D, codec.value_bits, dev),
            H, n_mblk, num_splits, pages_per_split, n_tok, cache.max_batch, scale, float(softcap or 1.0),
            int(window or 0), *q.stride()[:3], *cache.v_codes.stride()[:3], *cache.v_scales.stride()[:2],
            cache.v_codes.stride(3), cache.block_table.stride(0), *cache.fp_k.stride()[:3],
            Q_LEN=q_len, GROUP=group, D=D, DP=DP, VBITS=codec.value_bits, PAGE=P, INV_SQRT_N=inv_sqrt_n,
            LOG2DP=DP.bit_length() - 1, SOFTCAP=softcap is not None, WINDOW=window is not None, DOT=dot,
            ASM=q.is_cuda, BLOCK_M=block_m, RS=rb, BLOCK_N=cfg["BLOCK_N"],
            JOIN_V=_join_runs(codec.value_bits, cache.v_codes), PDL=pdl, FP_ONLY=fast_values,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"], **_pdl_options(pdl))
    else:
        launch(_attn_split_kernel, (B * H * n_mblk, n_parts),
            q, cache.k_codes, cache.k_scales, cache.v_codes, cache.v_scales, cache.block_table, cache.lengths,
            cache.k_mean, q_t, q_mean, rot, cos, sin, positions, cache.fp_k, cache.fp_v, m_part, l_part, acc_part,
            _value_gather(D, codec.value_bits, dev),
            H, n_mblk, num_splits, pages_per_split, cache.max_batch, scale, float(softcap or 1.0), int(window or 0),
            *q.stride()[:3], *cache.k_codes.stride()[:3], *cache.k_scales.stride()[:2], *cache.v_codes.stride()[:3],
            *cache.v_scales.stride()[:2], cache.k_codes.stride(3),  # word stride, 1 in both (contiguous) code pools
            *positions.stride()[:2], cache.block_table.stride(0),
            *cache.fp_k.stride()[:3], *cache.k_mean.stride()[:2],
            Q_LEN=q_len, GROUP=group, D=D, DP=DP, KBITS=codec.key_bits, VBITS=codec.value_bits, PAGE=P,
            INV_SQRT_N=inv_sqrt_n, NG=NG, KQ=KQ, LOG2DP=DP.bit_length() - 1, ROPE_HALF=rope_half,
            CENTER_K=codec.center_keys,
            SOFTCAP=softcap is not None, WINDOW=window is not None, DOT=dot, ASM=q.is_cuda,
            # Word-by-word page loads at 2-3 bits (1.2-1.3x); at 4 bits they measured 2-7% slower (docs/attention.md), unless
            # a token's words are not a multiple of 16 (head_dim 64/96: 8/12 words): the compiler cannot prove the runs
            # aligned then and loads them one word at a time.
            BLOCK_M=block_m, PK=step, BLOCK_N=cfg["BLOCK_N"], JOIN_K=_join_runs(codec.key_bits, cache.k_codes),
            JOIN_V=_join_runs(codec.value_bits, cache.v_codes), PDL=pdl and prep,
            CAUSAL_PAGES=q_len > 1,  # a single query follows every key; a chunk may start inside the compressed pages
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"], **_pdl_options(pdl and prep))
    # The reduce reads only the real rows of a block; small batches spread its output columns over programs.
    n_bh = B * H * n_mblk
    ob = min(DP, 32) if n_bh < max_programs(q.device, 1) else DP
    launch(_attn_reduce_kernel, (n_bh, DP // ob),
        m_part, l_part, acc_part, cache.v_mean, out, H, n_mblk, num_splits, *cache.v_mean.stride()[:2],
        *out.stride()[:3], Q_LEN=q_len, GROUP=group, D=D, DP=DP, CENTER_V=codec.center_values, BLOCK_M=block_m,
        RB=rb, SC=max(1, min(triton.next_power_of_2(max(num_splits, 1)), 8192 // (rb * ob))), OB=ob, PDL=pdl,
        num_warps=4, **_pdl_options(pdl))
    if record is not None:
        _PLANS[key] = record
        while len(_PLANS) > _MAX_PLANS:  # the oldest step's plan and its workspaces go
            del _PLANS[next(iter(_PLANS))]
    return out


def _reference_attention(q, cache: PagedKVCache, scale, softcap, window) -> torch.Tensor:
    """The oracle path: dequantize the whole cache (``cache.dense``) and run fp32 attention."""
    B, q_len = q.shape[:2]
    K, V, valid = cache.dense(B)
    L = K.shape[1]
    lens = torch.tensor(cache.seq_lens()[:B], device=q.device)
    q_index = lens[:, None] - q_len + torch.arange(q_len, device=q.device)[None]
    k_index = torch.arange(L, device=q.device).expand(B, L)
    return ref.attention(q, K, V, q_index, k_index, valid, scale=scale, softcap=softcap, window=window)
