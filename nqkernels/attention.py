"""Decode attention over a paged HOT cache (``PagedKVCache``): split-K partial kernel + reduce kernel.

Math. A stored token decodes as x = Rᵀ v · s / √n (R = σ·T, ``reference.rotation_matrix``), so
    q·k   = (R q / √n) · v_k · s_k + q·mean_k           (keys stored post-RoPE)
    Σ p v = Rᵀ (Σ p s_v v_v + (Σ p) · R mean_v / √n) / √n
The query is rotated once per program, keys are never rotated back, and values are accumulated in the rotated
domain and rotated once, in the reduce. Codes become fp16/bf16 lattice values in registers (exact: multiples of
¼ below 8) and go straight into tensor-core products; fp16 K/V never reach memory. Keys stored with RoPE undone
are decoded to the original basis per tile (one product with R) so RoPE can be re-applied at each key's position.

Grid: (batch · kv_heads · row blocks, splits + 1). Programs 0..splits-1 each take a run of pages; the last one
takes the uncompressed sinks and window. Each writes (running max, sum, accumulator); the reduce combines them.
Rows are (query position, query head of the group) pairs, so the codes of a KV head are read once for all its
query heads (GQA) and all positions of a chunk (q_len > 1, causal inside the chunk).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from autotune import lookup

from . import reference as ref
from .codec import _max_programs, _rope_tables, _rotation, _use_triton
from .lattice import load_e8_doubled, rope_partner, rope_rotate, rope_rows_at
from .paged import PagedKVCache


@triton.jit
def _online_softmax(s, seen, m_i, l_i, sm_scale, SOFTCAP: tl.constexpr, softcap):
    """Fold one tile of raw logits s = q·k [BM, BN] into the running max m_i and sum l_i (log2 domain).
    Returns the probabilities p [BM, BN], the factor alpha [BM] for the accumulator, and the new m_i, l_i."""
    if SOFTCAP:
        # softcap · tanh(s · scale / softcap), with tanh(y) = 1 - 2 / (exp(2y) + 1)
        s = softcap * (1.0 - 2.0 / (tl.exp(s * (2.0 * sm_scale / softcap)) + 1.0)) * 1.4426950408889634
    else:
        s = s * (sm_scale * 1.4426950408889634)
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked row keeps p = 0, alpha = 0
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _visible(valid, k_index, q_index, WINDOW: tl.constexpr, window):
    """[BM, BN] mask: key valid, not after the query (causal) and, with WINDOW, less than ``window`` tokens before."""
    seen = valid[None, :] & (k_index[None, :] <= q_index[:, None])
    if WINDOW:
        seen = seen & (k_index[None, :] > q_index[:, None] - window)
    return seen


@triton.jit
def _attn_split_kernel(q_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, bt_ptr, lens_ptr, kmean_ptr, vmean_ptr, rot_ptr,
                       cos_ptr, sin_ptr, fpk_ptr, fpv_ptr, m_ptr, l_ptr, acc_ptr,
                       H, n_mblk, n_splits, pages_per_split, max_batch, sm_scale, softcap, window,
                       sqb, sqt, sqh, skc_p, skc_h, skc_t, sks_p, sks_h, svc_p, svc_h, svc_t, svs_p, svs_h,
                       sbt, sfb, sfh, sft, smb, smh, svmb, svmh,
                       Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                       KBITS: tl.constexpr, VBITS: tl.constexpr, PAGE: tl.constexpr, INV_SQRT_N: tl.constexpr,
                       ROPE_HALF: tl.constexpr, CENTER_K: tl.constexpr, CENTER_V: tl.constexpr,
                       SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    bh, mb = pid // n_mblk, pid % n_mblk
    b, h = bh // H, bh % H
    r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    qi, g = r // GROUP, r % GROUP
    rmask = qi < Q_LEN
    d = tl.arange(0, DP)
    dmask = d < D
    q = tl.load(q_ptr + b * sqb + qi[:, None] * sqt + (h * GROUP + g)[:, None] * sqh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(DOT)
    seq_len = tl.load(lens_ptr + b)
    comp = tl.load(lens_ptr + max_batch + b)
    n_fp = tl.load(lens_ptr + 2 * max_batch + b)
    n_sink = tl.load(lens_ptr + 3 * max_batch + b)
    q_index = seq_len - Q_LEN + qi  # each row's token index in its sequence

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DP), tl.float32)
    if split < n_splits:
        # rot[i, j] = R[i, j]: i a stored (rotated) coordinate, j an original one; zero-padded to DP x DP. Its
        # entries are ±1 (times the Helmert constants at head_dim 96), exact in fp16/bf16 but for those constants.
        rot = tl.load(rot_ptr + d[:, None] * DP + d[None, :]).to(DOT)
        # Codes arrive as u = 2·index + coset (load_e8_doubled): v = u/2 + K_OFF, so q·v = (q/2)·u + K_OFF·Σq.
        K_OFF: tl.constexpr = 0.25 - (1 << (KBITS - 1))
        V_OFF: tl.constexpr = 0.25 - (1 << (VBITS - 1))
        if ROPE_HALF == 0:
            q_rot = (tl.dot(q, tl.trans(rot)) * (0.5 * INV_SQRT_N)).to(DOT)
            q_off = tl.sum(q_rot.to(tl.float32), axis=1) * (2.0 * K_OFF)
            if CENTER_K:
                q_mean = tl.sum(q.to(tl.float32) * tl.load(kmean_ptr + b * smb + h * smh + d, mask=dmask,
                                                           other=0.0)[None, :], axis=1)
            else:
                q_mean = tl.zeros((BLOCK_M,), tl.float32)
        else:
            k_mean = tl.zeros((DP,), tl.float32)
            rot_sum = tl.sum(rot.to(tl.float32), axis=0) * K_OFF  # Rᵀ(K_OFF·1): the offset in the original basis
            if CENTER_K:
                k_mean = tl.load(kmean_ptr + b * smb + h * smh + d, mask=dmask, other=0.0)
        t = tl.arange(0, PAGE)
        l_v = tl.zeros((BLOCK_M,), tl.float32)
        p_lo = split * pages_per_split
        p_hi = tl.minimum(p_lo + pages_per_split, tl.cdiv(comp, PAGE))
        for pg in range(p_lo, p_hi):
            page = tl.load(bt_ptr + b * sbt + pg)
            tok = pg * PAGE + t
            tvalid = tok < comp
            k_index = n_sink + tok
            uk = load_e8_doubled(kc_ptr + page * skc_p + h * skc_h + t[:, None] * skc_t, tvalid, D, DP, KBITS,
                                 PAGE).to(DOT)
            ks = tl.load(ks_ptr + page * sks_p + h * sks_h + t, mask=tvalid, other=0.0).to(tl.float32)
            if ROPE_HALF == 0:
                s = (tl.dot(q_rot, tl.trans(uk)) + q_off[:, None]) * ks[None, :] + q_mean[:, None]
            else:
                # Back to the original basis, add the mean, re-apply RoPE at each key's position.
                k = (tl.dot(uk, rot) * 0.5 + rot_sum[None, :]) * (ks * INV_SQRT_N)[:, None] + k_mean[None, :]
                cos, sin, _ = rope_rows_at(cos_ptr, sin_ptr, k_index, tvalid, d, ROPE_HALF)
                k = rope_rotate(k, rope_partner(k, d, ROPE_HALF), d, cos, sin, ROPE_HALF, False)
                s = tl.dot(q, tl.trans(k.to(DOT)))
            seen = _visible(tvalid, k_index, q_index, WINDOW, window)
            p, alpha, m_i, l_i = _online_softmax(s, seen, m_i, l_i, sm_scale, SOFTCAP, softcap)
            uv = load_e8_doubled(vc_ptr + page * svc_p + h * svc_h + t[:, None] * svc_t, tvalid, D, DP, VBITS,
                                 PAGE).to(DOT)
            vs = tl.load(vs_ptr + page * svs_p + h * svs_h + t, mask=tvalid, other=0.0).to(tl.float32)
            pv = (p * vs[None, :]).to(DOT)
            acc = acc * alpha[:, None] + tl.dot(pv, uv)
            l_v = l_v * alpha + tl.sum(pv.to(tl.float32), axis=1)  # the same rounded weights as in the product
        # Σ p s v = ½ Σ p s u + V_OFF Σ p s
        acc = acc * 0.5 + (l_v * V_OFF)[:, None]
        if CENTER_V:  # the value mean, rotated (R mean_v / √n), once per unit of probability mass
            acc += l_i[:, None] * tl.load(vmean_ptr + b * svmb + h * svmh + d)[None, :]
    else:
        # The uncompressed sinks and window, in the original basis.
        j = tl.arange(0, BLOCK_N)
        for j0 in range(0, n_fp, BLOCK_N):
            jj = j0 + j
            jvalid = jj < n_fp
            k_index = tl.where(jj < n_sink, jj, comp + jj)
            row = b * sfb + h * sfh + jj[:, None] * sft + d[None, :]
            kv_mask = jvalid[:, None] & dmask[None, :]
            s = tl.dot(q, tl.trans(tl.load(fpk_ptr + row, mask=kv_mask, other=0.0).to(DOT)))
            seen = _visible(jvalid, k_index, q_index, WINDOW, window)
            p, alpha, m_i, l_i = _online_softmax(s, seen, m_i, l_i, sm_scale, SOFTCAP, softcap)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), tl.load(fpv_ptr + row, mask=kv_mask, other=0.0).to(DOT))
    part = pid * (n_splits + 1) + split
    tl.store(m_ptr + part * BLOCK_M + tl.arange(0, BLOCK_M), m_i)
    tl.store(l_ptr + part * BLOCK_M + tl.arange(0, BLOCK_M), l_i)
    tl.store(acc_ptr + (part * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * DP + d[None, :], acc)


@triton.jit
def _attn_reduce_kernel(m_ptr, l_ptr, acc_ptr, rot_ptr, o_ptr, H, n_mblk, n_splits, soh_b, soh_t, soh_h,
                        Q_LEN: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        INV_SQRT_N: tl.constexpr, BLOCK_M: tl.constexpr, RC: tl.constexpr):
    # Combine the splits of one (batch, KV head, row block): weights 2^(m_s - max), then one rotation back.
    pid = tl.program_id(0)
    bh, mb = pid // n_mblk, pid % n_mblk
    b, h = bh // H, bh % H
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, DP)
    base = pid * (n_splits + 1)
    m_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for s in range(n_splits + 1):
        m_max = tl.maximum(m_max, tl.load(m_ptr + (base + s) * BLOCK_M + rows))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc_rot = tl.zeros((BLOCK_M, DP), tl.float32)
    for s in range(n_splits):
        w = tl.exp2(tl.load(m_ptr + (base + s) * BLOCK_M + rows) - m_safe)
        l_sum += w * tl.load(l_ptr + (base + s) * BLOCK_M + rows)
        acc_rot += w[:, None] * tl.load(acc_ptr + ((base + s) * BLOCK_M + rows)[:, None] * DP + d[None, :])
    w_fp = tl.exp2(tl.load(m_ptr + (base + n_splits) * BLOCK_M + rows) - m_safe)
    l_sum += w_fp * tl.load(l_ptr + (base + n_splits) * BLOCK_M + rows)
    inv_l = 1.0 / tl.where(l_sum > 0.0, l_sum, 1.0)
    # Rotate back once: the fp16 hi and lo parts of the normalised accumulator against the ±1 matrix keep ~22 bits.
    u = acc_rot * (inv_l * INV_SQRT_N)[:, None]
    hi = u.to(tl.float16)
    lo = (u - hi.to(tl.float32)).to(tl.float16)
    r = mb * BLOCK_M + rows
    qi, g = r // GROUP, r % GROUP
    o_row = o_ptr + b * soh_b + qi[:, None] * soh_t + (h * GROUP + g)[:, None] * soh_h
    c = tl.arange(0, RC)
    for c0 in tl.static_range(0, DP, RC):  # column blocks keep the rotation operand within shared memory
        out = w_fp[:, None] * inv_l[:, None] * tl.load(acc_ptr + ((base + n_splits) * BLOCK_M + rows)[:, None] * DP
                                                        + (c0 + c)[None, :])
        if n_splits > 0:
            rot = tl.load(rot_ptr + d[:, None] * DP + (c0 + c)[None, :]).to(tl.float16)
            out += tl.dot(hi, rot) + tl.dot(lo, rot)
        tl.store(o_row + (c0 + c)[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(qi < Q_LEN)[:, None] & (c0 + c < D)[None, :])


def _dot_dtype(q: torch.Tensor):
    """Tensor-core operand type: q's dtype. The interpreter's bf16 dot returns garbage (triton 3.9, CPU), so there
    bf16 operands are widened to fp32 (same math, fp32 products)."""
    if q.dtype == torch.bfloat16:
        return tl.float32 if not q.is_cuda else tl.bfloat16
    return tl.float16


# Untuned defaults: one stage (the code tiles are small; staging them only costs shared memory) and 8 warps from
# head_dim 96 up (at 4 warps the key/value tiles spill registers, and head_dim 256 with RoPE re-applied overflows
# shared memory).
_DEFAULTS = {"attention": {"BLOCK_N": 64, "num_warps": 8, "num_stages": 1, "programs_per_sm": 2},
             "attention_d64": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "programs_per_sm": 2}}


def _check_inputs(q, cache, softmax_scale, softcap, window):
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [batch, q_len, q_heads, head_dim], got "
                         f"{getattr(q, 'shape', type(q).__name__)}")
    B, q_len, Hq, D = q.shape
    if D != cache.codec.head_dim:
        raise ValueError(f"q has head_dim {D}; the cache holds head_dim {cache.codec.head_dim}")
    if Hq % cache.num_kv_heads:
        raise ValueError(f"q_heads ({Hq}) must be a multiple of the cache's kv_heads ({cache.num_kv_heads})")
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
    if softmax_scale is not None and not (softmax_scale > 0 and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite float or None, got {softcap!r}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be an int >= 1 or None, got {window!r}")


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
            fill the GPU.
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
    _check_inputs(q, cache, softmax_scale, softcap, window)
    B, q_len, Hq, D = q.shape
    H = cache.num_kv_heads
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.empty_like(q)
    if B == 0:
        return out
    if not _use_triton(q):
        return _reference_attention(q, cache, scale, softcap, window).to(q.dtype)
    codec = cache.codec
    group = Hq // H
    rows = q_len * group
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    n_mblk = triton.cdiv(rows, block_m)
    default = _DEFAULTS["attention_d64" if D == 64 else "attention"]
    cfg = {**default, **lookup("attention", f"d{D}_k{codec.key_bits}v{codec.value_bits}", default, q.device)}
    P = codec.page_size
    max_pages = triton.cdiv(max(cache.compressed_lens()[:B]), P)
    if num_splits is None:
        want = triton.cdiv(_max_programs(q.device, cfg["programs_per_sm"]), B * H * n_mblk)
        num_splits = min(max_pages, max(1, want))
    num_splits = min(int(num_splits), max_pages)
    pages_per_split = triton.cdiv(max_pages, num_splits) if num_splits else 0
    num_splits = triton.cdiv(max_pages, pages_per_split) if num_splits else 0
    DP = ref.next_pow2(D)
    n_parts = num_splits + 1
    m_part = torch.empty(B * H * n_mblk, n_parts, block_m, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * H * n_mblk, n_parts, block_m, DP, dtype=torch.float32, device=q.device)
    rot = _rotation(D, str(q.device))
    rope_half = 0
    cos = sin = rot  # placeholders, never read without RoPE
    if codec.rope is not None:
        cos, sin = _rope_tables(codec, max(cache.seq_lens()[:B]), q.device)
        rope_half = (codec.rope.rotary_dim or D) // 2
    inv_sqrt_n = 1.0 / math.sqrt(ref.transform_norm(D))
    _attn_split_kernel[(B * H * n_mblk, n_parts)](
        q, cache.k_codes, cache.k_scales, cache.v_codes, cache.v_scales, cache.block_table, cache.lengths,
        cache.k_mean, cache.v_mean_rot, rot, cos, sin, cache.fp_k, cache.fp_v, m_part, l_part, acc_part,
        H, n_mblk, num_splits, pages_per_split, cache.max_batch, scale, float(softcap or 1.0), int(window or 0),
        *q.stride()[:3], *cache.k_codes.stride()[:3], *cache.k_scales.stride()[:2], *cache.v_codes.stride()[:3],
        *cache.v_scales.stride()[:2], cache.block_table.stride(0), *cache.fp_k.stride()[:3],
        *cache.k_mean.stride()[:2], *cache.v_mean_rot.stride()[:2],
        Q_LEN=q_len, GROUP=group, D=D, DP=DP, KBITS=codec.key_bits, VBITS=codec.value_bits, PAGE=P,
        INV_SQRT_N=inv_sqrt_n, ROPE_HALF=rope_half, CENTER_K=codec.center_keys, CENTER_V=codec.center_values,
        SOFTCAP=softcap is not None, WINDOW=window is not None, DOT=_dot_dtype(q), BLOCK_M=block_m,
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _attn_reduce_kernel[(B * H * n_mblk,)](
        m_part, l_part, acc_part, rot, out, H, n_mblk, num_splits, *out.stride()[:3],
        Q_LEN=q_len, GROUP=group, D=D, DP=DP, INV_SQRT_N=inv_sqrt_n, BLOCK_M=block_m, RC=min(DP, 128),
        num_warps=4)
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
