"""Fused encode (K/V -> HOT codes + scales) and decode (HOT -> fp16/bf16/fp32) kernels and their launchers.

encode, one pass per tile of tokens of one (batch, head):
    x -> [RoPE undo] -> [- mean] -> per-token fixed point -> T (Hadamard, exact on tensor cores)
      -> step s = alpha·rms -> E8 nearest point -> [scale refit: least-squares or unbiased] -> bit-plane packing;
    writes only codes and scales.
decode: the inverse, for callers that want dense K/V (attention kernels decode in registers instead).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import reference as ref
from .config import KVCodec, describe
from .lattice import e8_nearest, exp2i, fixed_point, integer_transform, inverse_hadamard, load_e8_doubled, \
    pack_fields, pack_nibbles, pack_plane, rope_partner, rope_partner_index, rope_rotate, rope_rows, round_to, \
    storage_index, storage_order, transform_matrix
from .runtime import FIXED, codec_id, codec_of, launch_config, max_programs, rope_tables, use_triton


class EncodedKV(NamedTuple):
    """HOT codes of one K or V tensor.

    codes: int32 ``[B, T, H, W]`` (W = ``KVCodec.words_per_token``: 13 for 3-bit keys at head_dim 128); scales:
    ``[B, T, H]`` (codec.scale_dtype); mean: fp32 ``[B, H, D]`` subtracted before the rotation, or None. (The paged cache and the kernels take the
    ``[B, H, T, ...]`` transpose of these views: any strides.)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    mean: Optional[torch.Tensor]


@triton.jit
def _load_rope_undone(x_ptr, t, tmask, d, dmask, sxt, sxd, cos_ptr, sin_ptr, pos_ptr, spt, ROPE_HALF: tl.constexpr):
    """The [BT, DP] fp32 tile of tokens t of one (batch, head), RoPE undone when ROPE_HALF > 0."""
    xrow = x_ptr + t[:, None] * sxt
    x = tl.load(xrow + d[None, :] * sxd, mask=tmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if ROPE_HALF > 0:
        cos, sin, rmask = rope_rows(cos_ptr, sin_ptr, pos_ptr, t * spt, tmask, d, ROPE_HALF)
        # The split-half partner of each channel, re-read (from L1) rather than shuffled in registers.
        xp = tl.load(xrow + rope_partner_index(d, ROPE_HALF)[None, :] * sxd, mask=rmask, other=0.0)
        x = rope_rotate(x, xp.to(tl.float32), d, cos, sin, ROPE_HALF, True)
    return x


@triton.jit
def finite_rows_sum(x, tmask):
    """(sum over the rows of the [BT, DP] tile x that are tokens (``tmask``) holding no NaN or Inf, those rows):
    reference.finite_mean's numerator, one tile at a time. x - x is NaN exactly for NaN and ±Inf."""
    keep = tmask & (tl.max(((x - x) != 0.0).to(tl.int32), axis=1) == 0)
    return tl.sum(tl.where(keep[:, None], x, 0.0), axis=0), keep


@triton.jit
def _encode_kernel(x_ptr, codes_ptr, scales_ptr, cos_ptr, sin_ptr, pos_ptr, mean_ptr, dest_ptr, T, H, n_tiles,
                   sxb, sxh, sxt, sxd, scb, sch, sct, ssb, ssh, sst, spb, spt, smb, smh,
                   D: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr, ALPHA: tl.constexpr,
                   SQRT_N: tl.constexpr, DN: tl.constexpr, FIX_BITS: tl.constexpr, FIT: tl.constexpr,
                   ROPE_HALF: tl.constexpr, CENTER: tl.constexpr, DEST: tl.constexpr, FIELDS: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    # Persistent: each program builds the ±1 transform matrix once and loops over (batch·head, token block) tiles.
    # DEST: batch row b is written at row dest[b] of the outputs (a page of a pool), and not at all where dest[b] < 0.
    tm = transform_matrix(D, DP)
    d = tl.arange(0, DP)
    dmask = d < D
    n_tblk = tl.cdiv(T, BLOCK_T)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        pid_bh, pid_t = tile // n_tblk, tile % n_tblk
        b, h = pid_bh // H, pid_bh % H
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < T
        ob = b
        if DEST:
            ob = tl.load(dest_ptr + b).to(tl.int64)  # a page of a pool: offsets past 2^31 words
        if ob >= 0:  # DEST: a row whose dest is < 0 costs one load (static mode's steps where no window filled)
            x = _load_rope_undone(x_ptr + b * sxb + h * sxh, t, tmask, d, dmask, sxt, sxd, cos_ptr, sin_ptr,
                                  pos_ptr + b * spb, spt, ROPE_HALF)
            if CENTER:
                x = x - tl.load(mean_ptr + b * smb + h * smh + d, mask=dmask, other=0.0)[None, :]

            # Fixed point (quantum q = 2^(e-14)), then y = T x_int exactly on tensor cores.
            x_int, e, ok = fixed_point(x, FIX_BITS)
            y = storage_order(integer_transform(x_int, tm, BLOCK_T, D, DP), BLOCK_T, DP)
            yi = y.to(tl.int32)
            sq = tl.sum(yi.to(tl.int64) * yi, axis=1)
            rms_q = tl.sqrt_rn(tl.math.div_rn(sq.to(tl.float32), tl.full(sq.shape, DN, tl.float32)))
            q = exp2i(e - FIX_BITS)
            s = round_to((rms_q * ALPHA) * q, scales_ptr.dtype.element_ty).to(tl.float32)
            ok = ok & (s > 0.0) & ((s - s) == 0.0)
            s_q = tl.where(ok, s, 1.0) * exp2i(FIX_BITS - e)
            inv = tl.math.div_rn(tl.full(s_q.shape, 1.0, tl.float32), s_q)
            inv = tl.math.div_rn(inv, tl.full(s_q.shape, SQRT_N, tl.float32))
            idx, v = e8_nearest(y * inv[:, None], BLOCK_T, DP, BITS)
            if FIT > 0:
                # Refit from exact integer sums (4v is an odd integer): least squares <y,v>/<v,v> (FIT 1) or
                # unbiased <y,y>/<y,v> (FIT 2).
                v4 = tl.where(dmask[None, :], v * 4.0, 0.0).to(tl.int32)
                yv = tl.sum((yi * v4).to(tl.int64), axis=1)
                if FIT == 1:
                    num, den = yv, tl.sum(v4 * v4, axis=1)
                else:
                    num, den = sq, yv
                s_fit = tl.math.div_rn(num.to(tl.float32) * 4.0, den.to(tl.float32) * SQRT_N) * q
                s = tl.where(s_fit > 0.0, s_fit, s)
            idx = tl.where(ok[:, None], idx, 0)
            tl.store(scales_ptr + ob * ssb + h * ssh + t * sst,
                     round_to(tl.where(ok, s, 0.0), scales_ptr.dtype.element_ty), mask=tmask)

            row = codes_ptr + ob * scb + h * sch + t[:, None] * sct
            if FIELDS and BITS == 4:  # whole 4-bit indices, four per 16-bit half (docs/format.md, "Codes")
                w8 = tl.arange(0, DP // 8)
                tl.store(row + w8[None, :], pack_nibbles(idx, BLOCK_T, DP), mask=tmask[:, None])
            elif FIELDS:  # whole 3-bit indices, five per 16-bit half
                pairs, mid, last = pack_fields(idx, BLOCK_T)
                tl.store(row + tl.arange(0, 8)[None, :], pairs, mask=tmask[:, None])
                tl.store(row + 8 + tl.arange(0, 4)[None, :], mid, mask=tmask[:, None])
                tl.store(codes_ptr + ob * scb + h * sch + t * sct + 12, last, mask=tmask)
            else:
                # Bit planes: D/16 words of the low 2 bits, then the high bits (1 bit at 3 bits/coord, 2 at 4).
                w16 = tl.arange(0, DP // 16)
                tl.store(row + w16[None, :], pack_plane(idx & 3, BLOCK_T, DP, 2),
                         mask=tmask[:, None] & (w16 < D // 16)[None, :])
                if BITS == 3:
                    w32 = tl.arange(0, DP // 32)
                    tl.store(row + D // 16 + w32[None, :], pack_plane(idx >> 2, BLOCK_T, DP, 1),
                             mask=tmask[:, None] & (w32 < D // 32)[None, :])
                if BITS == 4:
                    tl.store(row + D // 16 + w16[None, :], pack_plane(idx >> 2, BLOCK_T, DP, 2),
                             mask=tmask[:, None] & (w16 < D // 16)[None, :])


@triton.jit
def _mean_partial_kernel(x_ptr, part_ptr, count_ptr, cos_ptr, sin_ptr, pos_ptr, T, H, tiles_per_split,
                         sxb, sxh, sxt, sxd, spb, spt, D: tl.constexpr, DP: tl.constexpr,
                         ROPE_HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    # Over one split of the tokens of one (batch, head), after the RoPE undo, the sum of the finite tokens (no NaN or
    # Inf; reference.finite_mean) part[bh, split, :] and their number count[bh, split].
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    d = tl.arange(0, DP)
    dmask = d < D
    acc = tl.zeros((DP,), tl.float32)
    n = tl.zeros((BLOCK_T,), tl.int32)
    for i in range(tiles_per_split):
        t = (split * tiles_per_split + i) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < T
        x = _load_rope_undone(x_ptr + b * sxb + h * sxh, t, tmask, d, dmask, sxt, sxd, cos_ptr, sin_ptr,
                              pos_ptr + b * spb, spt, ROPE_HALF)
        s, keep = finite_rows_sum(x, tmask)
        acc += s
        n += keep.to(tl.int32)
    at = pid_bh * tl.num_programs(1) + split
    tl.store(part_ptr + at * DP + d, acc)
    tl.store(count_ptr + at, tl.sum(n, axis=0))


@triton.jit
def _decode_kernel(codes_ptr, scales_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, mean_ptr, T, H,
                   scb, sch, sct, ssb, ssh, sst, sob, soh, sot, spb, spt, smb, smh,
                   D: tl.constexpr, DP: tl.constexpr, LOG2DP: tl.constexpr, BITS: tl.constexpr, SQRT_N: tl.constexpr,
                   ROPE_HALF: tl.constexpr, CENTER: tl.constexpr, FIELDS: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, DP)
    tmask = t < T
    dmask = d < D
    s = tl.load(scales_ptr + b * ssb + h * ssh + t * sst, mask=tmask, other=0.0).to(tl.float32)
    row = codes_ptr + b * scb + h * sch + t[:, None] * sct
    u = load_e8_doubled(row, tmask, D, DP, BITS, BLOCK_T, FIELDS)
    v = tl.where(dmask[None, :], u.to(tl.float32) * 0.5 + (0.25 - (1 << (BITS - 1))), 0.0)
    v = tl.gather(v, tl.broadcast_to(storage_index(d)[None, :], v.shape), 1)  # to transform order
    x = inverse_hadamard(v, BLOCK_T, D, DP, LOG2DP) * (s * SQRT_N)[:, None]
    if CENTER:
        x = x + tl.load(mean_ptr + b * smb + h * smh + d, mask=dmask, other=0.0)[None, :]
    if ROPE_HALF > 0:
        cos, sin, _ = rope_rows(cos_ptr, sin_ptr, pos_ptr + b * spb, t * spt, tmask, d, ROPE_HALF)
        x = rope_rotate(x, rope_partner(x, d, ROPE_HALF), d, cos, sin, ROPE_HALF, False)
    tl.store(out_ptr + b * sob + h * soh + t[:, None] * sot + d[None, :], x.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & dmask[None, :])


def _check_positions(positions, B, T, device) -> torch.Tensor:
    if positions is None:
        return torch.arange(T, device=device, dtype=torch.int32).expand(B, T)
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an int tensor [batch, tokens] = {[B, T]}, got {type(positions).__name__}")
    if positions.shape != (B, T):
        raise ValueError(f"positions must have shape [batch, tokens] = {[B, T]}, got {list(positions.shape)}")
    if positions.dtype not in (torch.int32, torch.int64) or positions.device != device:
        raise ValueError(f"positions must be an int32/int64 tensor on {device}, got {positions.dtype} on "
                         f"{positions.device}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError("positions must be >= 0")
    return positions


def _prepare(codec: KVCodec, kind: str, B: int, T: int, device, positions):
    bits = codec.bits_for(kind)
    use_rope = kind == "key" and codec.rope is not None
    center = codec.center_keys if kind == "key" else codec.center_values
    pos = cos = sin = None
    if use_rope:
        pos = _check_positions(positions, B, T, device)
        need = int(pos.max()) + 1 if (positions is not None and pos.numel()) else T
        cos, sin = rope_tables(codec, need, device)
    return bits, use_rope, center, pos, cos, sin


def _rope_args(codec: KVCodec, use_rope: bool, cos, sin, pos, dummy):
    """Kernel arguments for the RoPE tables: (cos, sin, positions, position strides, ROPE_HALF); ROPE_HALF = 0 and
    placeholder pointers (never read) when RoPE is off."""
    if not use_rope:
        return dummy, dummy, dummy, (0, 0), 0
    return cos, sin, pos, pos.stride(), (codec.rope.rotary_dim or codec.head_dim) // 2


def _per_token(cos, sin, pos):
    """cos/sin rows of each token's position, ``[B, T, R/2]`` (the reference path's input); None without RoPE."""
    if cos is None:
        return None, None
    return cos[pos.long()], sin[pos.long()]


def _check_codec(codec) -> None:
    if not isinstance(codec, KVCodec):
        raise TypeError(f"codec must be a KVCodec, got {type(codec).__name__} {codec!r}")


def _check_x(x, codec: KVCodec):
    _check_codec(codec)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [batch, tokens, heads, head_dim], got {describe(x)}")
    if x.shape[-1] != codec.head_dim:
        raise ValueError(f"x has head_dim {x.shape[-1]} but the codec has head_dim {codec.head_dim}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")


def _check_mean(mean, shape, device) -> None:
    if not isinstance(mean, torch.Tensor) or mean.shape != shape or mean.device != device:
        raise ValueError(f"mean must be a [batch, heads, head_dim] = {list(shape)} tensor on {device}, got "
                         f"{describe(mean)}")


def centering_mean(x: torch.Tensor, codec: KVCodec, kind: str = "key",
                   positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mean over tokens that ``encode_kv`` subtracts: fp32 ``[B, H, D]`` of x ``[B, T, H, D]`` (keys with RoPE
    undone first when ``codec.rope`` is set). Tokens holding a NaN/Inf are left out (``reference.finite_mean``), so
    they cannot shift the offset of every other token; zero where no token is finite. One read of x on the GPU (a
    Triton kernel writes partial sums and counts over token splits, summed in a fixed order), so it is
    deterministic; on CPU the torch reference.

    Example:
        >>> codec = KVCodec(head_dim=128)
        >>> k = torch.randn(1, 100, 8, 128)
        >>> torch.allclose(centering_mean(k, codec, "key"), k.mean(1), atol=1e-6)
        True
    """
    _check_x(x, codec)
    return _centering_mean(x.transpose(1, 2), codec, kind, positions)


def _centering_mean(x: torch.Tensor, codec: KVCodec, kind: str, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """``centering_mean`` of x ``[B, H, T, D]`` (any strides; checked by the caller)."""
    B, H, T, D = x.shape
    _, use_rope, _, pos, cos, sin = _prepare(codec, kind, B, T, x.device, positions)
    if T == 0 or B * H == 0:
        return torch.zeros(B, H, D, device=x.device)
    if not use_triton(x):
        xf = x.float()
        if use_rope:
            c, s_ = _per_token(cos, sin, pos)
            xf = ref.rope_undo(xf, c[:, None], s_[:, None])
        return ref.finite_mean(xf.transpose(1, 2))  # x is [B, H, T, D] here
    cfg = FIXED["mean"]
    DP, BLOCK_T = ref.next_pow2(D), cfg.BLOCK
    n_tiles = triton.cdiv(T, BLOCK_T)
    # Enough programs to fill the GPU, each over a run of whole tiles.
    n_split = max(1, min(n_tiles, triton.cdiv(max_programs(x.device, cfg.programs_per_sm), B * H)))
    tiles_per_split = triton.cdiv(n_tiles, n_split)
    n_split = triton.cdiv(n_tiles, tiles_per_split)
    part = torch.empty(B * H, n_split, DP, dtype=torch.float32, device=x.device)
    count = torch.empty(B * H, n_split, dtype=torch.int32, device=x.device)
    cos_a, sin_a, pos_a, pos_strides, rope_half = _rope_args(codec, use_rope, cos, sin, pos, part)
    _mean_partial_kernel[(B * H, n_split)](
        x, part, count, cos_a, sin_a, pos_a, T, H, tiles_per_split, *x.stride(), *pos_strides, D=D, DP=DP,
        ROPE_HALF=rope_half, BLOCK_T=BLOCK_T, num_warps=cfg.num_warps)
    return (part.sum(1)[:, :D] / count.sum(1, keepdim=True).clamp(min=1)).view(B, H, D)


def encode_kv(x: torch.Tensor, codec: KVCodec, kind: str = "key", positions: Optional[torch.Tensor] = None,
              mean: Optional[torch.Tensor] = None) -> EncodedKV:
    """Encode K or V into the HOT format (fixed-rate E8 codes + one scale per token per head).

    Args:
        x: ``[B, T, H, D]`` fp16/bf16/fp32, any strides (keys post-RoPE, as the model produced them).
        codec: the ``KVCodec``; ``kind`` ("key" or "value") picks bits, RoPE undo and centering.
        positions: ``[B, T]`` int token positions for the RoPE undo (default ``0..T-1``).
        mean: fp32 ``[B, H, D]`` centering offset; default: ``centering_mean`` of x (after the RoPE undo).
    Returns:
        ``EncodedKV(codes int32 [B, T, H, W], scales [B, T, H], mean fp32 [B, H, D] or None)``, W =
        ``codec.words_per_token(kind)``.
        Tokens with a NaN/Inf value get codes 0 and scale 0 (zero in the centered basis: they decode to the mean,
        RoPE re-applied for keys, or to zero without centering) and are left out of the default mean, so other
        tokens are unaffected. Under torch.compile the encode is one custom op (``nqkernels::encode_kv``).

    Example:
        >>> codec = KVCodec(head_dim=128, key_bits=3, value_bits=2)
        >>> k = torch.randn(1, 100, 8, 128, dtype=torch.float16)
        >>> enc = encode_kv(k, codec, "key")
        >>> enc.codes.shape, enc.scales.shape  # 3-bit keys at head_dim 128: 13 words ("fields" layout)
        (torch.Size([1, 100, 8, 13]), torch.Size([1, 100, 8]))
    """
    _check_x(x, codec)
    center = codec.center_keys if kind == "key" else codec.center_values
    if mean is not None and not center:  # never silently ignored (decode_kv refuses it the same way)
        raise ValueError(f"mean is given but the codec does not center {kind}s (center_{kind}s=False)")
    if torch.compiler.is_compiling():  # one custom op in the traced graph (_encode_op)
        codes, scales, made = _encode_op(x, codec_id(codec), kind == "key", positions, mean)
        if not center:
            return EncodedKV(codes, scales, None)
        return EncodedKV(codes, scales, made if mean is None else mean.float().contiguous())
    enc = _encode(x.transpose(1, 2), codec, kind, positions, mean, token_major=True)
    return EncodedKV(enc.codes.transpose(1, 2), enc.scales.transpose(1, 2), enc.mean)


def _encode(x: torch.Tensor, codec: KVCodec, kind: str, positions: Optional[torch.Tensor],
            mean: Optional[torch.Tensor], token_major: bool = False, into: Optional[tuple] = None) -> EncodedKV:
    """``encode_kv`` of x ``[B, H, T, D]`` (any strides; checked by the caller) into ``[B, H, T, ...]`` codes and
    scales, stored token-major (``[B, T, H, ...]`` in memory) when ``token_major``. ``into``: (dest int32 ``[B]``, codes
    ``[N, H, T, W]``, scales ``[N, H, T]``): row b is written at row dest[b] of those (a page of a pool: static mode's
    page fills), nothing where dest[b] < 0; returns them."""
    B, H, T, D = x.shape
    bits, use_rope, center, pos, cos, sin = _prepare(codec, kind, B, T, x.device, positions)
    if center and mean is None:
        mean = _centering_mean(x, codec, kind, positions)
    if center:
        _check_mean(mean, (B, H, D), x.device)
        mean = mean.float().contiguous()
    else:
        mean = None
    alpha, fit = codec.alpha[bits], codec.scale_fit
    W = codec.words_per_token(kind)
    layout = codec.layout(kind)
    dest = None
    if into is not None:
        dest, codes, scales = into
    elif token_major:
        codes = torch.empty(B, T, H, W, dtype=torch.int32, device=x.device).transpose(1, 2)
        scales = torch.empty(B, T, H, dtype=codec.scale_dtype, device=x.device).transpose(1, 2)
    else:
        codes = torch.empty(B, H, T, W, dtype=torch.int32, device=x.device)
        scales = torch.empty(B, H, T, dtype=codec.scale_dtype, device=x.device)
    if T == 0 or B * H == 0:
        return EncodedKV(codes, scales, mean)
    if not use_triton(x):
        c, s_ = _per_token(cos, sin, pos)
        ref_codes, ref_scales = ref.encode_reference(x.transpose(1, 2), bits, alpha=alpha, fit=fit,
                                                     scale_dtype=codec.scale_dtype, cos=c, sin=s_, mean=mean,
                                                     layout=layout)
        if dest is not None:
            rows = dest >= 0
            codes[dest[rows].long()] = ref_codes.transpose(1, 2)[rows]
            scales[dest[rows].long()] = ref_scales.transpose(1, 2)[rows]
            return EncodedKV(codes, scales, mean)
        codes.copy_(ref_codes.transpose(1, 2))  # [B, H, T, ...] views here
        scales.copy_(ref_scales.transpose(1, 2))
        return EncodedKV(codes, scales, mean)
    cfg = launch_config("encode", f"d{D}_b{bits}", x.device)
    dummy = codes  # never read when the feature is off
    cos_a, sin_a, pos_a, pos_strides, rope_half = _rope_args(codec, use_rope, cos, sin, pos, dummy)
    n_tiles = B * H * triton.cdiv(T, cfg.BLOCK_T)
    _encode_kernel[(min(n_tiles, max_programs(x.device, cfg.programs_per_sm)),)](
        x, codes, scales, cos_a, sin_a, pos_a, mean if center else dummy, dummy if dest is None else dest, T, H,
        n_tiles, *x.stride(),
        *codes.stride()[:3], *scales.stride(), *pos_strides, *(mean.stride()[:2] if center else (0, 0)),
        D=D, DP=ref.next_pow2(D), BITS=bits, ALPHA=alpha, SQRT_N=math.sqrt(ref.transform_norm(D)),
        DN=float(D * ref.transform_norm(D)), FIX_BITS=ref.FIX_BITS, FIT=ref.FITS.index(fit),
        ROPE_HALF=rope_half, CENTER=center, DEST=dest is not None, FIELDS=layout == "fields",
        BLOCK_T=cfg.BLOCK_T, num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    return EncodedKV(codes, scales, mean)


def decode_kv(enc: EncodedKV, codec: KVCodec, kind: str = "key", positions: Optional[torch.Tensor] = None,
              dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dequantize HOT codes (``EncodedKV``: codes ``[B, T, H, W]``, scales ``[B, T, H]``, mean) back to dense
    ``[B, T, H, D]`` in ``dtype`` (RoPE re-applied to keys at ``positions`` ``[B, T]``, default ``0..T-1``; mean added
    back). Under torch.compile it is one custom op (``nqkernels::decode_kv``).

    Example:
        >>> codec = KVCodec(head_dim=128, key_bits=3, value_bits=2)
        >>> v = torch.randn(1, 100, 8, 128)
        >>> v_hat = decode_kv(encode_kv(v, codec, "value"), codec, "value", dtype=torch.float32)
        >>> bool(((v_hat - v).pow(2).mean() / v.pow(2).mean()) < 0.15)
        True
    """
    _check_codec(codec)
    if not isinstance(enc, tuple) or len(enc) != 3:
        raise TypeError(f"enc must be an EncodedKV (codes, scales, mean) as encode_kv returns, got "
                        f"{type(enc).__name__}")
    codes, scales, mean = enc
    if not isinstance(codes, torch.Tensor) or codes.dim() != 4 or codes.dtype != torch.int32:
        raise ValueError(f"codes must be int32 [batch, tokens, heads, words], got {describe(codes)}")
    if not isinstance(scales, torch.Tensor) or scales.shape != codes.shape[:3] or not scales.is_floating_point() \
            or scales.device != codes.device:
        raise ValueError(f"scales must be a float tensor {list(codes.shape[:3])} on {codes.device} (the codes' "
                         f"batch, tokens, heads and device), got {describe(scales)}")
    if torch.compiler.is_compiling():  # one custom op in the traced graph (_decode_op)
        return _decode_op(codes, scales, mean, positions, codec_id(codec), kind == "key", dtype)
    out = _decode(EncodedKV(codes.transpose(1, 2), scales.transpose(1, 2), mean), codec, kind, positions, dtype,
                  token_major=True)
    return out.transpose(1, 2)


def _decode(enc: EncodedKV, codec: KVCodec, kind: str, positions: Optional[torch.Tensor], dtype: torch.dtype,
            token_major: bool = False) -> torch.Tensor:
    """``decode_kv`` of ``[B, H, T, ...]`` codes and scales (any strides) into ``[B, H, T, D]``, stored token-major
    (``[B, T, H, D]`` in memory) when ``token_major``. The caller checked the codec, codes and scales."""
    codes, scales, mean = enc
    B, H, T, W = codes.shape
    D = codec.head_dim
    bits, use_rope, center, pos, cos, sin = _prepare(codec, kind, B, T, codes.device, positions)
    layout = codec.layout(kind)
    if W != codec.words_per_token(kind):
        raise ValueError(f"codes have {W} words per token; {kind}s at {bits} bits, head_dim {D} ({layout!r} layout) "
                         f"need {codec.words_per_token(kind)}")
    if center != (mean is not None):
        raise ValueError(f"the codec {'centers' if center else 'does not center'} {kind}s but mean is "
                         f"{'missing' if center else 'given'}")
    if center:
        _check_mean(mean, (B, H, D), codes.device)
        mean = mean.float().contiguous()  # the kernel reads it with unit stride over head_dim
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")
    if token_major:
        out = torch.empty(B, T, H, D, dtype=dtype, device=codes.device).transpose(1, 2)
    else:
        out = torch.empty(B, H, T, D, dtype=dtype, device=codes.device)
    if T == 0 or B * H == 0:
        return out
    if not use_triton(codes):
        c, s_ = _per_token(cos, sin, pos)
        return out.copy_(ref.decode_reference(codes.transpose(1, 2), scales.transpose(1, 2), bits, D, cos=c, sin=s_,
                                              mean=mean, dtype=dtype, layout=layout).transpose(1, 2))  # [B, H, T, ...]
    cfg = launch_config("decode", f"d{D}_b{bits}", codes.device)
    dummy = codes
    cos_a, sin_a, pos_a, pos_strides, rope_half = _rope_args(codec, use_rope, cos, sin, pos, dummy)
    grid = (triton.cdiv(T, cfg.BLOCK_T), B * H)
    _decode_kernel[grid](
        codes, scales, out, cos_a, sin_a, pos_a, mean if center else dummy, T, H, *codes.stride()[:3],
        *scales.stride(), *out.stride()[:3], *pos_strides, *(mean.stride()[:2] if center else (0, 0)),
        D=D, DP=ref.next_pow2(D), LOG2DP=ref.next_pow2(D).bit_length() - 1, BITS=bits,
        SQRT_N=math.sqrt(ref.transform_norm(D)), ROPE_HALF=rope_half, CENTER=center, FIELDS=layout == "fields",
        BLOCK_T=cfg.BLOCK_T, num_warps=cfg.num_warps)
    return out


# torch.compile: encode_kv and decode_kv are one custom op each while a compile traces them (their launchers are
# Python: checks, config lookups, the Triton launch), with shape-only fake implementations, so a compiled function
# that encodes or decodes has no graph break. The codec travels as its codec_id.

@torch.library.custom_op("nqkernels::encode_kv", mutates_args=())
def _encode_op(x: torch.Tensor, codec: int, key: bool, positions: Optional[torch.Tensor],
               mean: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``encode_kv`` of x ``[B, T, H, D]``: (codes, scales, the centering mean it computed, or an empty tensor where
    the codec does not center this kind or the caller gave the mean: an output may not alias an input)."""
    enc = _encode(x.transpose(1, 2), codec_of(codec), "key" if key else "value", positions, mean, token_major=True)
    made = enc.mean if enc.mean is not None and mean is None else x.new_empty(0, dtype=torch.float32)
    return enc.codes.transpose(1, 2), enc.scales.transpose(1, 2), made


@_encode_op.register_fake
def _(x, codec, key, positions, mean):
    c = codec_of(codec)
    B, T, H, D = x.shape
    center = c.center_keys if key else c.center_values
    made = x.new_empty((B, H, D) if center and mean is None else (0,), dtype=torch.float32)
    return (x.new_empty(B, T, H, c.words_per_token("key" if key else "value"), dtype=torch.int32),
            x.new_empty(B, T, H, dtype=c.scale_dtype), made)


@torch.library.custom_op("nqkernels::decode_kv", mutates_args=())
def _decode_op(codes: torch.Tensor, scales: torch.Tensor, mean: Optional[torch.Tensor],
               positions: Optional[torch.Tensor], codec: int, key: bool, dtype: torch.dtype) -> torch.Tensor:
    """``decode_kv`` of codes ``[B, T, H, W]`` and scales ``[B, T, H]``: ``[B, T, H, D]`` in ``dtype``."""
    out = _decode(EncodedKV(codes.transpose(1, 2), scales.transpose(1, 2), mean), codec_of(codec),
                  "key" if key else "value", positions, dtype, token_major=True)
    return out.transpose(1, 2)


@_decode_op.register_fake
def _(codes, scales, mean, positions, codec, key, dtype):
    B, T, H, _ = codes.shape
    return codes.new_empty(B, T, H, codec_of(codec).head_dim, dtype=dtype)
