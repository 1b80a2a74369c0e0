"""Delta + zigzag + byte-shuffle of HOT codes and scales along the token axis: the lossless filter in front of zstd
(the COLD format, ``nqkernels.cold``).

A token's *record* is its code words (little-endian bytes, ``4·W`` of them) followed by the two bytes of its scale:
``RB = 4·W + 2`` bytes. A stream (one sequence, one KV head, K or V) of T records is cut into chunks of ``chunk``
tokens, each filtered on its own (so the inverse runs in parallel over chunks), in one of three modes per stream:

    0  RAW      the records as they are, token-major ``[len, RB]``: zstd's matches find repeated tokens
                (layer-0 values and RoPE-undone keys depend on the token id alone);
    1  SHUFFLE  byte-transposed ``[RB, len]`` (Blosc's shuffle with the record as the element): bytes of equal
                significance of all tokens are adjacent, so zstd's entropy stage sees each column's own statistics;
    2  DELTA    per coordinate, the lattice index minus the previous token's (mod 2^bits), zigzagged so small
                changes of either sign become small numbers; the scale's 16 bits likewise; then SHUFFLE.
                The first token of a chunk is coded against zero.

Every step is a bijection on the bits, so the inverse restores the HOT codes bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference as ref
from .reference import DELTA, MODES, RAW, SHUFFLE, filter_reference, record_bytes, unfilter_reference  # noqa: F401 (MODES: the
# modes' home for nqkernels.cold; the constants and the references live in reference.py)
from .runtime import launch_config, use_triton
from .config import SUPPORTED_BITS, SUPPORTED_HEAD_DIMS, describe, is_int
from .lattice import load_words, pack_plane, unpack_plane

DEFAULT_CHUNK = 1024


def _layout(head_dim: int, bits: int) -> dict:
    """The kernels' constexprs: W words per token, WL of them in the low plane, both planes' widths padded to
    powers of two (WLP, WHP), RB record bytes."""
    dp = ref.next_pow2(head_dim)
    return dict(D=head_dim, DP=dp, BITS=bits, W=head_dim * bits // 32, WL=head_dim // 16, WLP=dp // 16,
                WHP=dp * (bits - 2) // 32 if bits > 2 else 1, RB=record_bytes(head_dim, bits))


# ---------------------------------------------------------------------------------------------------------------
# Device helpers: zigzag of b-bit residues, the record's bytes and where each lands.

@triton.jit
def _zigzag(r, B: tl.constexpr):
    """A residue r mod 2^B read as a signed number s in [-2^(B-1), 2^(B-1)) -> 2s (s >= 0) or -2s-1 (s < 0)."""
    return ((r << 1) ^ (0 - (r >> (B - 1)))) & ((1 << B) - 1)


@triton.jit
def _unzigzag(z, B: tl.constexpr):
    return ((z >> 1) ^ (0 - (z & 1))) & ((1 << B) - 1)


@triton.jit
def _word_bytes(w, BT: tl.constexpr, NW: tl.constexpr):
    """[BT, NW] int32 words -> [BT, 4·NW] bytes, byte k of word j in column 4j + k (little-endian)."""
    b0, b1, b2, b3 = w & 255, (w >> 8) & 255, (w >> 16) & 255, (w >> 24) & 255
    return tl.reshape(tl.join(tl.join(b0, b2), tl.join(b1, b3)), (BT, 4 * NW))


@triton.jit
def _offsets(tc, col, chunk_len, RB: tl.constexpr, MODE_RAW):
    """Byte offsets inside a chunk of token tc (in-chunk index, [BT, 1]) and record column col ([1, N])."""
    return tl.where(MODE_RAW, tc * RB + col, col * chunk_len + tc)


@triton.jit
def _store_record(out, tc, tmask, chunk_len, lo, hi, sc, MODE_RAW, BT: tl.constexpr, W: tl.constexpr,
                  WL: tl.constexpr, WLP: tl.constexpr, WHP: tl.constexpr, RB: tl.constexpr):
    """Store the bytes of [BT] records: low-plane words lo [BT, WLP], high-plane words hi [BT, WHP], scales sc [BT]."""
    col = tl.arange(0, 4 * WLP)[None, :]
    tl.store(out + _offsets(tc, col, chunk_len, RB, MODE_RAW), _word_bytes(lo, BT, WLP).to(tl.uint8),
             mask=tmask & (col < 4 * WL))
    if W > WL:
        col = tl.arange(0, 4 * WHP)[None, :]
        tl.store(out + _offsets(tc, 4 * WL + col, chunk_len, RB, MODE_RAW), _word_bytes(hi, BT, WHP).to(tl.uint8),
                 mask=tmask & (col < 4 * (W - WL)))
    for k in tl.static_range(2):
        tl.store(out + _offsets(tc, 4 * W + k, chunk_len, RB, MODE_RAW), ((sc[:, None] >> (8 * k)) & 255).to(tl.uint8),
                 mask=tmask)


@triton.jit
def _record_words(src, tc, tmask, chunk_len, FIRST: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                RB: tl.constexpr, MODE_RAW):
    """Words FIRST..FIRST+N-1 of [BT] records from their bytes -> [BT, NP] int32 (zero-padded)."""
    j = tl.arange(0, NP)[None, :]
    w = tl.zeros((tc.shape[0], NP), dtype=tl.int32)
    for k in tl.static_range(4):
        b = tl.load(src + _offsets(tc, 4 * (FIRST + j) + k, chunk_len, RB, MODE_RAW), mask=tmask & (j < N), other=0)
        w = w | (b.to(tl.int32) << (8 * k))
    return w


@triton.jit
def _indices(lo, hi, BT: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr):
    """Bit-plane words -> per-coordinate indices [BT, DP] (as stored: the 8th low bit of a group is the coset)."""
    idx = unpack_plane(lo, BT, DP, 2)
    if BITS > 2:
        idx = idx | (unpack_plane(hi, BT, DP, BITS - 2) << 2)
    return idx


@triton.jit
def _planes(idx, BT: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr):
    lo = pack_plane(idx & 3, BT, DP, 2)
    hi = lo
    if BITS > 2:
        hi = pack_plane(idx >> 2, BT, DP, BITS - 2)
    return lo, hi


# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _filter_kernel(codes_ptr, scales_ptr, modes_ptr, out_ptr, T, chunk, sc_s, sc_t, ss_s, ss_t,
                   D: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, WL: tl.constexpr,
                   WLP: tl.constexpr, WHP: tl.constexpr, RB: tl.constexpr, BT: tl.constexpr):
    """Grid (streams, token blocks): each program filters BT tokens of one stream into out [S, T·RB] (uint8)."""
    s = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    tmask = t < T
    mode = tl.load(modes_ptr + s)
    c0 = t // chunk * chunk  # first token of each token's chunk
    has_prev = (t > c0) & tmask & ((t * 0 + mode) == 2)  # (scalar bool & tensor upsets the interpreter)
    row = codes_ptr + s * sc_s + t[:, None] * sc_t
    lo = load_words(row, tmask, 0, WL, WLP)
    lo_p = load_words(row - sc_t, has_prev, 0, WL, WLP)
    hi = lo
    hi_p = lo_p
    if BITS > 2:
        hi = load_words(row, tmask, WL, W - WL, WHP)
        hi_p = load_words(row - sc_t, has_prev, WL, W - WL, WHP)
    sc = tl.load(scales_ptr + s * ss_s + t * ss_t, mask=tmask, other=0).to(tl.int32) & 0xFFFF
    sc_p = tl.load(scales_ptr + s * ss_s + (t - 1) * ss_t, mask=has_prev, other=0).to(tl.int32) & 0xFFFF
    if mode == 2:
        # Subtracting the previous token's indices (zero at a chunk start) and zigzagging are bijections mod 2^BITS.
        d = _zigzag((_indices(lo, hi, BT, DP, BITS) - _indices(lo_p, hi_p, BT, DP, BITS)) & ((1 << BITS) - 1), BITS)
        lo, hi = _planes(d, BT, DP, BITS)
        sc = _zigzag((sc - sc_p) & 0xFFFF, 16)
    chunk_len = tl.minimum(T - c0, chunk)[:, None]
    out = out_ptr + s * T * RB + c0[:, None].to(tl.int64) * RB
    _store_record(out, (t - c0)[:, None], tmask[:, None], chunk_len, lo, hi, sc, mode == 0, BT, W, WL, WLP, WHP, RB)


@triton.jit
def _unfilter_kernel(src_ptr, modes_ptr, codes_ptr, scales_ptr, T, chunk, sc_s, sc_t, ss_s, ss_t,
                     D: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr, W: tl.constexpr, WL: tl.constexpr,
                     WLP: tl.constexpr, WHP: tl.constexpr, RB: tl.constexpr, BT: tl.constexpr):
    """Grid (streams, chunks): each program restores one chunk block by block; deltas are summed along tokens
    (a prefix sum inside the block plus the previous block's last row as carry)."""
    s = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * chunk
    mode = tl.load(modes_ptr + s)
    chunk_len = tl.minimum(T - c0, chunk)
    src = src_ptr + s * T * RB + c0.to(tl.int64) * RB
    carry = tl.zeros((DP,), dtype=tl.int32)
    carry_sc = 0
    last = tl.arange(0, BT)[:, None] == BT - 1
    for b0 in range(0, chunk_len, BT):
        tc = b0 + tl.arange(0, BT)
        tmask = tc < chunk_len
        lo = _record_words(src, tc[:, None], tmask[:, None], chunk_len, 0, WL, WLP, RB, mode == 0)
        hi = lo
        if BITS > 2:
            hi = _record_words(src, tc[:, None], tmask[:, None], chunk_len, WL, W - WL, WHP, RB, mode == 0)
        sc = tl.zeros((BT,), dtype=tl.int32)
        for k in tl.static_range(2):
            b = tl.load(src + _offsets(tc, 4 * W + k, chunk_len, RB, mode == 0), mask=tmask, other=0)
            sc = sc | (b.to(tl.int32) << (8 * k))
        if mode == 2:
            d = tl.where(tmask[:, None], _unzigzag(_indices(lo, hi, BT, DP, BITS), BITS), 0)
            idx = (tl.cumsum(d, axis=0) + carry[None, :]) & ((1 << BITS) - 1)
            carry = tl.sum(tl.where(last, idx, 0), axis=0)
            lo, hi = _planes(idx, BT, DP, BITS)
            ds = tl.where(tmask, _unzigzag(sc, 16), 0)
            sc = (tl.cumsum(ds, axis=0) + carry_sc) & 0xFFFF
            carry_sc = tl.sum(tl.where(tl.arange(0, BT) == BT - 1, sc, 0), axis=0)
        t = c0 + tc
        row = codes_ptr + s * sc_s + t[:, None] * sc_t
        jl = tl.arange(0, WLP)[None, :]
        tl.store(row + jl, lo, mask=tmask[:, None] & (jl < WL))
        if BITS > 2:
            jh = tl.arange(0, WHP)[None, :]
            tl.store(row + WL + jh, hi, mask=tmask[:, None] & (jh < W - WL))
        tl.store(scales_ptr + s * ss_s + t * ss_t, ((sc << 16) >> 16).to(tl.int16), mask=tmask)


# ---------------------------------------------------------------------------------------------------------------

def _check_layout(head_dim: int, bits: int, chunk: int) -> None:
    if not is_int(bits) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an int in {SUPPORTED_BITS}, got {bits!r}")
    if not is_int(head_dim) or head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim must be an int in {SUPPORTED_HEAD_DIMS}, got {head_dim!r}")
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")


def _check_modes(modes: torch.Tensor, S: int, device: torch.device) -> None:
    if not isinstance(modes, torch.Tensor) or modes.shape != (S,) or modes.dtype != torch.int32:
        raise ValueError(f"modes must be an int32 tensor [streams] = {[S]}, got {describe(modes)}")
    if modes.device != device:
        raise ValueError(f"modes are on {modes.device} but the codes on {device}: they must be on one device")
    if modes.numel() and (int(modes.min()) < 0 or int(modes.max()) > 2):
        raise ValueError(f"modes must each be 0 (RAW), 1 (SHUFFLE) or 2 (DELTA), got {modes.unique().tolist()}")


def filter_codes(codes: torch.Tensor, scales: torch.Tensor, modes: torch.Tensor, head_dim: int, bits: int,
                 chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Filter HOT codes and scales of S streams for an entropy coder (see the module docstring).

    Args:
        codes: int32 ``[S, T, W]`` (W = head_dim·bits/32; any strides with unit word stride), one stream per row.
        scales: ``[S, T]`` fp16/bf16 (or int16).
        modes: int32 ``[S]``, each RAW (0), SHUFFLE (1) or DELTA (2).
        head_dim, bits: the codec's.
        chunk: tokens per independently filtered chunk.
    Returns:
        uint8 ``[S, T·RB]`` (RB = ``record_bytes(head_dim, bits)``).

    Example:
        >>> codes = torch.randint(-2**31, 2**31 - 1, (2, 100, 12), dtype=torch.int32)
        >>> scales = torch.rand(2, 100).half()
        >>> modes = torch.tensor([0, 2], dtype=torch.int32)
        >>> out = filter_codes(codes, scales, modes, 128, 3, chunk=64)
        >>> c, s = unfilter_codes(out, modes, 128, 3, chunk=64, scale_dtype=torch.float16)
        >>> torch.equal(c, codes) and torch.equal(s, scales)
        True
    """
    _check_layout(head_dim, bits, chunk)
    W = head_dim * bits // 32
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype != torch.int32 or codes.shape[-1] != W:
        raise ValueError(f"codes must be int32 [streams, tokens, {W}] (head_dim {head_dim} at {bits} bits), got "
                         f"{describe(codes)}")
    if not isinstance(scales, torch.Tensor) or scales.shape != codes.shape[:2] or scales.element_size() != 2:
        raise ValueError(f"scales must be a 16-bit tensor [streams, tokens] = {list(codes.shape[:2])}, got "
                         f"{describe(scales)}")
    if scales.device != codes.device:
        raise ValueError(f"scales are on {scales.device} but the codes on {codes.device}: they must be on one device")
    _check_modes(modes, codes.shape[0], codes.device)
    S, T = codes.shape[:2]
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    sc16 = scales.view(torch.int16)
    if not use_triton(codes) or S * T == 0:
        return filter_reference(codes, sc16, modes, head_dim, bits, chunk)
    out = torch.empty(S, T * record_bytes(head_dim, bits), dtype=torch.uint8, device=codes.device)
    cfg = launch_config("filter", f"d{head_dim}_b{bits}", codes.device)
    _filter_kernel[(S, triton.cdiv(T, cfg.BT))](codes, sc16, modes, out, T, chunk, codes.stride(0),
                                                  codes.stride(1), sc16.stride(0), sc16.stride(1),
                                                  **_layout(head_dim, bits), BT=cfg.BT, num_warps=cfg.num_warps)
    return out


def unfilter_codes(data: torch.Tensor, modes: torch.Tensor, head_dim: int, bits: int, chunk: int = DEFAULT_CHUNK,
                   scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``filter_codes``: uint8 ``[S, T·RB]`` -> (codes int32 ``[S, T, W]``, scales ``[S, T]``)."""
    _check_layout(head_dim, bits, chunk)
    RB = record_bytes(head_dim, bits)
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype != torch.uint8 or data.shape[1] % RB:
        raise ValueError(f"data must be uint8 [streams, tokens * {RB}], got {describe(data)}")
    if scale_dtype not in (torch.float16, torch.bfloat16, torch.int16):
        raise ValueError(f"scale_dtype must be torch.float16, torch.bfloat16 or torch.int16, got {scale_dtype!r}")
    _check_modes(modes, data.shape[0], data.device)
    S, T = data.shape[0], data.shape[1] // RB
    W = head_dim * bits // 32
    codes = torch.empty(S, T, W, dtype=torch.int32, device=data.device)
    scales = torch.empty(S, T, dtype=torch.int16, device=data.device)
    data = data.contiguous()
    if not use_triton(data) or S * T == 0:
        codes, scales = unfilter_reference(data, modes, head_dim, bits, chunk)
    else:
        cfg = launch_config("unfilter", f"d{head_dim}_b{bits}", data.device)
        _unfilter_kernel[(S, triton.cdiv(T, chunk))](data, modes, codes, scales, T, chunk, codes.stride(0),
                                                    codes.stride(1), scales.stride(0), scales.stride(1),
                                                    **_layout(head_dim, bits), BT=cfg.BT,
                                                    num_warps=cfg.num_warps)
    return codes, scales.view(scale_dtype)
