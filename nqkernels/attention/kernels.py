"""The portable Triton kernels of decode attention (any GPU, and the interpreter): query prep, the split kernel (one
pass), the two-pass keys and values kernels, the reduce, and their device helpers. Launched by
``nqkernels.attention.launcher``; docs/attention.md describes them."""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..lattice import (SUBNORMAL_UNIT, coset_pairs, coset_plane_pairs, fields_pairs, inverse_hadamard, load_e8_doubled,
                       nibble_planes, plane_pairs, restore_parity, rope_partner, rope_rotate, rope_rows_at,
                       storage_order)

LOG2E = tl.constexpr(1.4426950408889634)


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
                BITS: tl.constexpr, HB: tl.constexpr, PAGE: tl.constexpr, JOIN: tl.constexpr,
                FIELDS: tl.constexpr = False):
    """One page of one head: low-plane words [PAGE, DP/16], high-plane words [PAGE, DP·HB/32] (the low ones again
    when BITS == 2, unused) and fp32 scales [PAGE]; tokens from ``lim`` on read as zero. ``FIELDS`` (the "fields"
    layout): at 3 bits words 0-7, and [PAGE, 8] with word 8 + c at column 2c, word 12 at 2c + 1
    (``lattice.fields_pairs``); at 4 bits the nibble words converted to planes (``lattice.nibble_planes``)."""
    page = page.to(tl.int64)  # large pools overflow 32-bit offsets
    row0 = c_ptr + page * sc_p + h * sc_h
    if FIELDS and BITS == 4:  # thread column c loads words 4c..4c+3: its low- and high-plane words 2c, 2c + 1
        lo, hi = nibble_planes(_page_words(row0, lim, sc_t, sc_w, 0, D // 8, DP // 8, PAGE, JOIN), PAGE, DP // 16)
    else:
        lo = _page_words(row0, lim, sc_t, sc_w, 0, D // 16, DP // 16, PAGE, JOIN)
        hi = lo
    if FIELDS and BITS == 3:  # thread column c loads word 8 + c, and word 12 (word stride 0: every column reads it)
        hi = tl.reshape(tl.join(_page_words(row0, lim, sc_t, sc_w, 8, 4, 4, PAGE, JOIN),
                                _page_words(row0 + 12 * sc_w, lim, sc_t, sc_w * 0, 0, 4, 4, PAGE, JOIN)), (PAGE, 8))
    elif BITS > 2 and not FIELDS:
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
    load-product-store chain (one program for the whole operand was slower: docs/attention.md, "One call: three
    kernels")."""
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
                  DP: tl.constexpr, KBITS: tl.constexpr, KHI: tl.constexpr, ASM: tl.constexpr,
                  FIELDS: tl.constexpr = False):
    """A page's raw logits [PAGE, BLOCK_M] in pair order: its coset flags, low plane and (3-4 bits) high plane, each
    times the prep's query operand; the key scales and mean are applied by the caller. ``FIELDS`` at 3 bits: whole
    indices in the low plane's order (``lattice.fields_pairs``), no high-plane product (at 4 bits ``_page_codes``
    gave planes)."""
    if FIELDS and KBITS == 3:
        sk = tl.dot(coset_pairs(k_lo, PAGE, NWL, NG, KBITS, ASM, 15), qt_c)
        sk = tl.dot(fields_pairs(k_lo, k_hi, PAGE, ASM), qt_lo, sk)
    else:
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
def _uncompressed_part(q_ptr, fpk_ptr, fpv_ptr, m_ptr, l_ptr, acc_ptr, b, h, qi, g, slot, part, fp_part, fp_per_part,
                       n_fp, n_sink, comp, q_index, sm_scale, softcap, window, sqb, sqt, sqh, sfb, sfh, sft,
                       Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Uncompressed part ``fp_part`` of a (sequence, KV head, row block): its sinks-and-window tokens [j_lo, j_hi),
    j_lo = fp_part · fp_per_part (the parts follow the compressed splits), in the original basis (columns 0..DP-1 of
    the part; with pages per step > 1 the slots repeat the rows, and slot 0's are written). An empty range writes
    the empty partial (max -inf, sum 0)."""
    j_lo = fp_part * fp_per_part
    j_hi = tl.minimum(n_fp, j_lo + fp_per_part)
    d = tl.arange(0, DP)
    dmask = d < D
    rows = part * BLOCK_M + tl.arange(0, BLOCK_M)
    real = (qi < Q_LEN) & (slot == 0)
    q = _query_load(q_ptr, b, h, qi, g, sqb, sqt, sqh, Q_LEN, GROUP, D, DP, DOT)
    m_f = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_f = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DP), tl.float32)
    j = tl.arange(0, BLOCK_N)
    base = b.to(tl.int64) * sfb + h * sfh + j_lo.to(tl.int64) * sft  # long windows pass 2^31
    for j0 in range(0, j_hi - j_lo, BLOCK_N):
        jj = j0 + j  # from the part's first token
        jvalid = jj < j_hi - j_lo
        k_index = tl.where(j_lo + jj < n_sink, j_lo + jj, comp + j_lo + jj)
        row = base + jj[:, None] * sft + d[None, :]
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
                       H, n_mblk, n_splits, pages_per_split, n_parts, fp_per_part, max_batch, sm_scale, softcap,
                       window, sqb, sqt, sqh, skc_p, skc_h, skc_t, sks_p, sks_h, svc_p, svc_h, svc_t, svs_p, svs_h,
                       sc_w, spos_p, spos_h, sbt, sfb, sfh, sft, smb, smh,
                       Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       KBITS: tl.constexpr, VBITS: tl.constexpr, PAGE: tl.constexpr, INV_SQRT_N: tl.constexpr,
                       NG: tl.constexpr, KQ: tl.constexpr, LOG2DP: tl.constexpr, ROPE_HALF: tl.constexpr,
                       CENTER_K: tl.constexpr,
                       SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
                       BLOCK_M: tl.constexpr, PK: tl.constexpr, BLOCK_N: tl.constexpr, JOIN_K: tl.constexpr,
                       JOIN_V: tl.constexpr, PDL: tl.constexpr, CAUSAL_PAGES: tl.constexpr, KFIELDS: tl.constexpr,
                       VFIELDS: tl.constexpr):
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
    part = pid * n_parts + split  # the compressed splits, then the uncompressed parts
    # A part's partials are its first RS rows (slot 0's columns); rows past the chunk pad the tile and are neither
    # written nor read.
    if split < n_splits:
        # Compressed pages, keys along axis 0: logitsᵀ [PAGE, BLOCK_M] = (decoded codes) · (query blocks)ᵀ, and
        # accᵀ [pairs, BLOCK_M] = (decoded value codes)ᵀ · (p·s)ᵀ, all in the rotated domain and pair order.
        # v = lo + 4·hi + (c/2 + OFF) per coordinate (index planes lo/hi; c the coset flag of its group of 8). Keys
        # take c/2 + OFF as a product of its own; values fold c into the low plane (u = 2·lo + c,
        # ``coset_plane_pairs``) and OFF into Σ p·s, not a transposed product of 16 coset columns (docs/attention.md,
        # "Tried and dropped").
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
                                        sks_h, D, DP, KBITS, KHI, PAGE, JOIN_K, KFIELDS)
        if PK == 1:  # one page per step: its values too are loaded a page ahead (a step start is too late at batch 1)
            nv_lo, nv_hi, nvs = _page_codes(vc_ptr, vs_ptr, page, h, end - p_lo * PAGE, svc_p, svc_h, svc_t, sc_w,
                                            svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V, VFIELDS)
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
                                                   svc_t, sc_w, svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V,
                                                   VFIELDS),)
            for k in tl.static_range(PK):
                k_lo, k_hi, ks = nk_lo, nk_hi, nks
                if k + 1 < PK:
                    page = pages[k + 1]
                else:  # the next step's first page
                    page = tl.load(bt_ptr + b * sbt + tl.minimum(pg0 + PK, p_hi - 1))
                nk_lo, nk_hi, nks = _page_codes(kc_ptr, ks_ptr, page, h, end - (pg0 + k + 1) * PAGE, skc_p, skc_h,
                                                skc_t, sc_w, sks_p, sks_h, D, DP, KBITS, KHI, PAGE, JOIN_K, KFIELDS)
                if PK == 1:
                    nv_lo, nv_hi, nvs = _page_codes(vc_ptr, vs_ptr, page, h, end - (pg0 + 1) * PAGE, svc_p, svc_h,
                                                    svc_t, sc_w, svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V, VFIELDS)
                if ROPE_HALF == 0:
                    sk = _key_products(k_lo, k_hi, qt_c[k], qt_lo[k], qt_hi[k], PAGE, NWL, NG, DP, KBITS, KHI, ASM,
                                       KFIELDS)
                    if k == 0:
                        s = sk * (ks * logit_unit)[:, None] + q_mean[None, :]
                    else:
                        s += sk * (ks * logit_unit)[:, None]
                else:
                    tvalid = pg0 * PAGE + t < end
                    krow = kc_ptr + pages[0].to(tl.int64) * skc_p + h * skc_h + t[:, None] * skc_t
                    uk = load_e8_doubled(krow, tvalid, D, DP, KBITS, PAGE, KFIELDS).to(DOT)
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
        _uncompressed_part(q_ptr, fpk_ptr, fpv_ptr, m_ptr, l_ptr, acc_ptr, b, h, qi, g, slot, part, split - n_splits,
                           fp_per_part, n_fp, n_sink, comp, q_index, sm_scale, softcap, window, sqb, sqt, sqh, sfb,
                           sfh, sft, Q_LEN, GROUP, D, DP, SOFTCAP, WINDOW, DOT, BLOCK_M, BLOCK_N)
    if PDL:  # the reduce may launch now; it waits for this grid to end before it reads
        gdc_launch_dependents()


@triton.jit(do_not_specialize=["sc_w"])  # see _page_words
def _attn_keys_kernel(kc_ptr, ks_ptr, bt_ptr, lens_ptr, qt_ptr, qm_ptr, lg_ptr, m_ptr,
                      H, n_mblk, n_splits, pages_per_split, n_parts, n_tok, max_batch, sm_scale, softcap, window,
                      skc_p, skc_h, skc_t, sks_p, sks_h, sc_w, sbt,
                      Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                      KBITS: tl.constexpr, PAGE: tl.constexpr, NG: tl.constexpr, KQ: tl.constexpr,
                      SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
                      RS: tl.constexpr, JOIN_K: tl.constexpr, PDL: tl.constexpr, CAUSAL_PAGES: tl.constexpr,
                      KFIELDS: tl.constexpr):
    # Two-pass split, pass 1 (keys only): each page's logits [PAGE, BLOCK_M] in log2 units (masked keys -inf), the
    # first RS columns stored to lg[pid, token, :RS]; the split's max per column to m_ptr. No softmax state but an
    # elementwise max, so the loop has no cross-warp reduction and holds no value accumulators.
    pid, split = tl.program_id(0), tl.program_id(1)
    b, h, qi, g, slot = _query_rows(pid, H, n_mblk, GROUP, BLOCK_M, 1)
    seq_len = tl.load(lens_ptr + b)
    comp = tl.load(lens_ptr + max_batch + b)
    n_sink = tl.load(lens_ptr + 3 * max_batch + b)
    q_index = seq_len - Q_LEN + qi
    part = pid * n_parts + split
    NWL: tl.constexpr = DP // 16
    KHI: tl.constexpr = 1 if KBITS == 3 else 2
    t = tl.arange(0, PAGE)
    col = tl.arange(0, BLOCK_M)
    p_lo, p_hi, end, page = _split_pages(bt_ptr, b, sbt, split, pages_per_split, comp, PAGE)
    nk_lo, nk_hi, nks = _page_codes(kc_ptr, ks_ptr, page, h, end - p_lo * PAGE, skc_p, skc_h, skc_t, sc_w, sks_p,
                                    sks_h, D, DP, KBITS, KHI, PAGE, JOIN_K, KFIELDS)
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
                                        sks_p, sks_h, D, DP, KBITS, KHI, PAGE, JOIN_K, KFIELDS)
        sk = _key_products(k_lo, k_hi, qt_c, qt_lo, qt_hi, PAGE, NWL, NG, DP, KBITS, KHI, ASM, KFIELDS)
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
                        vg_ptr, H, n_mblk, n_splits, pages_per_split, n_parts, fp_per_part, n_tok, max_batch,
                        sm_scale, softcap, window,
                        sqb, sqt, sqh, svc_p, svc_h, svc_t, svs_p, svs_h, sc_w, sbt, sfb, sfh, sft,
                        Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        VBITS: tl.constexpr, PAGE: tl.constexpr, INV_SQRT_N: tl.constexpr, LOG2DP: tl.constexpr,
                        SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
                        BLOCK_M: tl.constexpr, RS: tl.constexpr, BLOCK_N: tl.constexpr, JOIN_V: tl.constexpr,
                        PDL: tl.constexpr, FP_ONLY: tl.constexpr, VFIELDS: tl.constexpr):
    # Two-pass split, pass 2 (values only): p = 2^(s - m) from pass 1's logits and split max, accumulated against
    # the decoded value pages as in ``_attn_split_kernel``; no running max, so nothing is ever rescaled. FP_ONLY
    # (grid (programs, uncompressed parts)): only the uncompressed parts, beside a Gluon pass (which takes the pages).
    pid, split = tl.program_id(0), tl.program_id(1)
    if FP_ONLY:
        split += n_splits
    b, h, qi, g, slot = _query_rows(pid, H, n_mblk, GROUP, BLOCK_M, 1)
    seq_len = tl.load(lens_ptr + b)
    comp = tl.load(lens_ptr + max_batch + b)
    n_fp = tl.load(lens_ptr + 2 * max_batch + b)
    n_sink = tl.load(lens_ptr + 3 * max_batch + b)
    q_index = seq_len - Q_LEN + qi
    part = pid * n_parts + split
    compressed = split < n_splits
    if FP_ONLY:  # a constant, so the page branch is not compiled in
        compressed = False
    if compressed:
        NWL: tl.constexpr = DP // 16
        VHI: tl.constexpr = 1 if VBITS == 3 else 2
        t = tl.arange(0, PAGE)
        col = tl.arange(0, BLOCK_M)
        p_lo, p_hi, end, page = _split_pages(bt_ptr, b, sbt, split, pages_per_split, comp, PAGE)
        nv_lo, nv_hi, nvs = _page_codes(vc_ptr, vs_ptr, page, h, end - p_lo * PAGE, svc_p, svc_h, svc_t, sc_w,
                                        svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V, VFIELDS)
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
                                            sc_w, svs_p, svs_h, D, DP, VBITS, VHI, PAGE, JOIN_V, VFIELDS)
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
        _uncompressed_part(q_ptr, fpk_ptr, fpv_ptr, m_ptr, l_ptr, acc_ptr, b, h, qi, g, slot, part, split - n_splits,
                           fp_per_part, n_fp, n_sink, comp, q_index, sm_scale, softcap, window, sqb, sqt, sqh, sfb,
                           sfh, sft, Q_LEN, GROUP, D, DP, SOFTCAP, WINDOW, DOT, BLOCK_M, BLOCK_N)
    if PDL:
        if FP_ONLY:  # launched while the values pass still runs: done only once it is (what the reduce waits for)
            gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _load_parts(m_ptr, l_ptr, acc_ptr, first, n, rows, cols, real, BLOCK_M: tl.constexpr, DP: tl.constexpr,
                SC: tl.constexpr):
    """Parts first .. first + min(n, SC) - 1 of one row block: max and sum [SC, RB], accumulators [SC, RB, OB]
    (max -inf, zero past n)."""
    sc = tl.arange(0, SC)
    valid = (sc < n)[:, None] & real[None, :]
    prow = (first + sc)[:, None] * BLOCK_M + rows[None, :]
    m_s = tl.load(m_ptr + prow, mask=valid, other=float("-inf"))
    l_s = tl.load(l_ptr + prow, mask=valid, other=0.0)
    a_s = tl.load(acc_ptr + prow[:, :, None] * DP + cols[None, None, :], mask=valid[:, :, None], other=0.0)
    return m_s, l_s, a_s


@triton.jit
def _merge_parts(m_run, l_run, u, m_s, l_s, a_s):
    """The running (max, sum, accumulators) of a row block merged with SC more parts, each weighted 2^(m_s - max)."""
    m_new = tl.maximum(m_run, tl.max(m_s, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_run - m_safe)
    w = tl.exp2(m_s - m_safe[None, :])  # 0 for an empty part
    return m_new, l_run * alpha + tl.sum(w * l_s, axis=0), u * alpha[:, None] + tl.sum(w[:, :, None] * a_s, axis=0)


@triton.jit
def _attn_reduce_kernel(m_ptr, l_ptr, acc_ptr, vmean_ptr, o_ptr, H, n_mblk, n_splits, n_parts, svmb, svmh, soh_b,
                        soh_t, soh_h, Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        CENTER_V: tl.constexpr, BLOCK_M: tl.constexpr, RB: tl.constexpr, SC: tl.constexpr,
                        SCF: tl.constexpr, OB: tl.constexpr, PDL: tl.constexpr):
    # Output columns OB·j.. of one (batch, KV head, row block): its parts' partials (already in the original basis:
    # the n_splits compressed splits, then the uncompressed parts) with weights 2^(m_s - max), SC splits per step in
    # one [SC, RB, OB] load, so a pass costs a few memory latencies however many splits there are; then the
    # uncompressed parts', the normalisation and the value mean (once per unit of the compressed tokens'
    # probability mass). Small batches spread the columns over programs. Only the first RB rows of a block are
    # read: the rest pad the split kernel's tile.
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
    base = pid * n_parts
    # The first SCF uncompressed parts (all of them unless the window is long): issued with the first splits'
    # loads, not one memory latency after.
    m_f, l_f, a_f = _load_parts(m_ptr, l_ptr, acc_ptr, base + n_splits, n_parts - n_splits, rows, cols, real,
                                BLOCK_M, DP, SCF)
    m_run = tl.full((RB,), float("-inf"), tl.float32)
    l_comp = tl.zeros((RB,), tl.float32)
    u = tl.zeros((RB, OB), tl.float32)
    for s0 in range(0, n_splits, SC):
        m_s, l_s, a_s = _load_parts(m_ptr, l_ptr, acc_ptr, base + s0, n_splits - s0, rows, cols, real, BLOCK_M, DP,
                                    SC)
        m_run, l_comp, u = _merge_parts(m_run, l_comp, u, m_s, l_s, a_s)
    m_fp, l_fp, u_fp = _merge_parts(tl.full((RB,), float("-inf"), tl.float32), tl.zeros((RB,), tl.float32),
                                    tl.zeros((RB, OB), tl.float32), m_f, l_f, a_f)
    for f0 in range(n_splits + SCF, n_parts, SCF):
        m_s, l_s, a_s = _load_parts(m_ptr, l_ptr, acc_ptr, base + f0, n_parts - f0, rows, cols, real, BLOCK_M, DP,
                                    SCF)
        m_fp, l_fp, u_fp = _merge_parts(m_fp, l_fp, u_fp, m_s, l_s, a_s)
    m_all = tl.maximum(m_run, m_fp)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    w_comp, w_fp = tl.exp2(m_run - m_safe), tl.exp2(m_fp - m_safe)
    l_comp *= w_comp
    l_sum = l_comp + w_fp * l_fp
    inv_l = 1.0 / tl.where(l_sum > 0.0, l_sum, 1.0)
    # the value mean, once per unit of the compressed tokens' probability mass
    out = ((w_comp * inv_l)[:, None] * u + (w_fp * inv_l)[:, None] * u_fp + (l_comp * inv_l)[:, None] * v_mean[None, :])
    o_row = o_ptr + b * soh_b + qi[:, None] * soh_t + (h * GROUP + g)[:, None] * soh_h
    tl.store(o_row + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=real[:, None] & (cols < D)[None, :])
