"""Pure-torch reference of every codec stage: the test oracle and the CPU fallback.

The encoder is exact by construction where order could matter: the transform and every sum across a token run
on a per-token fixed-point grid in integers (any order gives the same result, so kernels may use tensor cores and
their own reduction trees); the remaining float steps are elementwise or pairwise (fp32, no fused multiply-add,
groups of 8 summed as a fixed tree), so the kernels reproduce these codes and scales bit for bit.

Shapes: ``x`` is ``[..., D]`` (tokens in the leading dims); codes are ``[..., W]`` int32 (W = D · bits / 32 in
the "planes" layout and the 4-bit "fields" layout, 13 in the 3-bit "fields" layout: ``config.code_words``); scales
``[...]``.

The lattice: E8 = D8 ∪ (D8 + ½), shifted by -¼ so a cube of 2^b values per coordinate is symmetric.
Coordinate value for index i (0 <= i < 2^b) in coset c is ``v = i - 2^(b-1) + ¼ + c/2``; in both cosets a
point of E8 has an even index sum, so the lowest bit of the 8th index of a group is implied by the other
seven and its place stores the coset flag: exactly 8b bits per 8 coordinates.
"""
from __future__ import annotations

import math

import torch

from .config import code_words

F32 = torch.float32


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def transform_norm(head_dim: int) -> int:
    """n with TᵀT = n·I for the unnormalised rotation T (Sylvester Hadamard; Helmert ⊗ H32 for 96)."""
    return 32 if head_dim == 96 else head_dim


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (zero-padded to a power of two) as a fixed tree: x[:n/2] + x[n/2:], repeated."""
    n = x.shape[-1]
    p = next_pow2(n)
    if p != n:
        x = torch.nn.functional.pad(x, (0, p - n))
    while p > 1:
        p //= 2
        x = x[..., :p] + x[..., p:]
    return x[..., 0]


def _butterflies(x: torch.Tensor, size: int) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard on consecutive blocks of ``size``: stages of stride 1, 2, 4, ..."""
    shape = x.shape
    h = 1
    while h < size:
        v = x.reshape(*shape[:-1], shape[-1] // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(shape)
        h *= 2
    return x


_HELMERT = (F32, 1 / math.sqrt(3), 1 / math.sqrt(2), 1 / math.sqrt(6))


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """y = T x in fp32 (unnormalised: ||y||² = n ||x||², n = transform_norm(D)).

    D in {64, 128, 256}: Sylvester Hadamard. D = 96: H32 on each third, then the orthonormal Helmert
    matrix [[1,1,1]/√3, [1,-1,0]/√2, [1,1,-2]/√6] across the thirds (T = Helmert ⊗ H32).
    """
    d = x.shape[-1]
    x = x.to(F32)
    if d != 96:
        return _butterflies(x, d)
    return helmert_mix(_butterflies(x, 32))


def inverse_hadamard(y: torch.Tensor) -> torch.Tensor:
    """x = Tᵀ y / n (the exact inverse of ``hadamard`` up to rounding)."""
    d = y.shape[-1]
    y = y.to(F32)
    if d == 96:
        c3, c2, c6 = (torch.tensor(c, dtype=F32) for c in _HELMERT[1:])
        z0, z1, z2 = y[..., :32] * c3, y[..., 32:64] * c2, y[..., 64:] * c6
        y = torch.cat((z0 + z1 + z2, z0 - z1 + z2, z0 - (z2 + z2)), dim=-1)
        return _butterflies(y, 32) * (1.0 / 32)
    return _butterflies(y, d) * (1.0 / d)


def rope_undo(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate split-half pairs back by -angle. x ``[..., D]`` fp32; cos/sin ``[..., R/2]`` (R <= D rotary dims)."""
    h = cos.shape[-1]
    x1, x2, rest = x[..., :h], x[..., h:2 * h], x[..., 2 * h:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rope_undo``: the model's rotation ``x * cos + rotate_half(x) * sin``."""
    h = cos.shape[-1]
    x1, x2, rest = x[..., :h], x[..., h:2 * h], x[..., 2 * h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def _coset_nearest(t: torch.Tensor, off: float, top: int):
    """Nearest point of one coset in index space. t ``[..., 8]`` fp32 -> (indices float, squared distance)."""
    z = t + torch.tensor(off, dtype=F32)
    r = torch.floor(z + 0.5).clamp(0, top)
    e = z - r
    dist = tree_sum(e * e)
    odd = (r.sum(-1).to(torch.int64) & 1).bool()
    # Fix the parity by moving one coordinate to its second-nearest index (inwards at the cube's faces).
    alt = torch.where(e > 0, r + 1, r - 1)
    alt = torch.where(alt > top, r - 1, alt)
    alt = torch.where(alt < 0, r + 1, alt)
    ea = z - alt
    delta = ea * ea - e * e
    best = delta.min(-1, keepdim=True).values
    lane = torch.arange(8, device=t.device)
    j = torch.where(delta == best, lane, 8).min(-1, keepdim=True).values
    fix = odd[..., None] & (lane == j)
    return torch.where(fix, alt, r), torch.where(odd, dist + best[..., 0], dist)


def e8_nearest(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest point of the cube-truncated shifted E8 codebook to t ``[..., D]`` (D % 8 == 0).

    Returns stored indices int64 ``[..., D]`` in [0, 2^bits): the eighth index of each group carries the
    coset flag in its lowest bit.
    """
    half, top = 1 << (bits - 1), (1 << bits) - 1
    g = t.reshape(*t.shape[:-1], t.shape[-1] // 8, 8)
    r0, d0 = _coset_nearest(g, half - 0.25, top)
    r1, d1 = _coset_nearest(g, half - 0.75, top)
    c = d1 < d0
    idx = torch.where(c[..., None], r1, r0).to(torch.int64)
    idx[..., 7] = (idx[..., 7] & ~1) | c.to(torch.int64)
    return idx.reshape(t.shape)


def e8_values(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Lattice coordinates (index units, fp32) of stored indices: restores each group's implied parity bit."""
    g = idx.reshape(*idx.shape[:-1], idx.shape[-1] // 8, 8).to(torch.int64)
    c = g[..., 7] & 1
    par = g[..., :7].sum(-1) & 1
    g = g.clone()
    g[..., 7] = (g[..., 7] & ~1) | par
    v = g.to(F32) - (1 << (bits - 1)) + 0.25 + 0.5 * c[..., None].to(F32)
    return v.reshape(idx.shape)


def _pack_plane(p: torch.Tensor, pbits: int) -> torch.Tensor:
    per = 32 // pbits
    g = p.reshape(*p.shape[:-1], p.shape[-1] // per, per)
    shifts = torch.arange(per, device=p.device, dtype=torch.int64) * pbits
    return _signed32((g << shifts).sum(-1))


def _unpack_plane(w: torch.Tensor, pbits: int) -> torch.Tensor:
    per = 32 // pbits
    shifts = torch.arange(per, device=w.device, dtype=torch.int64) * pbits
    v = (w.to(torch.int64)[..., None] >> shifts) & ((1 << pbits) - 1)
    return v.reshape(*w.shape[:-1], w.shape[-1] * per)


def fields_slots(device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "fields" layout (3-bit codes at head_dim 128, 13 words; docs/format.md, "Codes"): (word, bit) of each
    stored coordinate's full index, int64 ``[128]``, and (word, bit) of each group's coset flag, ``[16]``.

    Coordinate d = 32c + 16·jb + 8·h + m (c = 0..3 the thread column of the attention kernel's operand) is field
    j = 8·jb + m of column c, in half h of its word: word 2c (j < 5), 2c + 1 (j < 10), 8 + c (j < 15) at bit
    3·(j mod 5) + 16·h, or the shared word 12 at bit 3c + 16·h (j = 15). Group g = 4c + 2i + h's coset flag is bit
    15 + 16·h of word 2c + i, the spare top bit of each half."""
    d = torch.arange(128, device=device)
    c, r = d // 32, d % 32
    j = 8 * (r // 16) + r % 8
    word = torch.where(j < 5, 2 * c, torch.where(j < 10, 2 * c + 1, torch.where(j < 15, 8 + c, 12)))
    bit = torch.where(j == 15, 3 * c, 3 * (j % 5)) + 16 * ((r // 8) % 2)
    g = torch.arange(16, device=device)
    return word, bit, 2 * (g // 4) + (g // 2) % 2, 15 + 16 * (g % 2)


def nibble_slots(head_dim: int = 128, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The "fields" layout at 4 bits (docs/format.md, "Codes"): (word, bit) of each stored coordinate's index, int64
    ``[head_dim]``. Coordinate d = 16m + 8h + 4k + j is nibble j of half h of word 2m + k: word 2m + k holds the
    low-plane word m's registers 4k..4k+3 (the same coordinate pairs), and half h of words 2m, 2m + 1 group 2m + h.
    The coset flag stays where ``e8_nearest`` puts it, in the eighth index's low bit (bit 12 + 16h of word 2m + 1),
    so the parity is implied as in the planes."""
    d = torch.arange(head_dim, device=device)
    m, h, k, j = d // 16, (d // 8) % 2, (d // 4) % 2, d % 4
    return 2 * m + k, 16 * h + 4 * j


def _signed32(w: torch.Tensor) -> torch.Tensor:
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def pack_codes(idx: torch.Tensor, bits: int, layout: str = "planes") -> torch.Tensor:
    """Stored indices ``[..., D]`` (``e8_nearest``'s: each group's coset flag in its eighth index's lowest bit) ->
    int32 ``[..., W]`` (``config.code_words``).

    ``"planes"``: D/16 words of the low 2 bits (16 coordinates per word, coordinate k of a word at bit 2k), then the
    high bits: 1 bit per coordinate (32 per word) at 3 bits, 2 bits (16 per word) at 4 bits. ``"fields"`` (D = 128):
    at 3 bits every index whole, its implied parity bit restored, and the coset flags apart (``fields_slots``); at 4
    bits every index a nibble as stored (``nibble_slots``)."""
    W = code_words(idx.shape[-1], bits, layout)
    if layout == "fields" and bits == 4:
        word, bit = nibble_slots(idx.shape[-1], idx.device)
        w = torch.zeros(*idx.shape[:-1], W, dtype=torch.int64, device=idx.device)
        w.scatter_add_(-1, word.expand(idx.shape), idx.to(torch.int64) << bit)
        return _signed32(w)
    if layout == "fields":
        word, bit, c_word, c_bit = fields_slots(idx.device)
        g = idx.reshape(*idx.shape[:-1], 16, 8).to(torch.int64)
        c = g[..., 7] & 1
        full = g.clone()
        full[..., 7] = (g[..., 7] & ~1) | (g[..., :7].sum(-1) & 1)
        w = torch.zeros(*idx.shape[:-1], W, dtype=torch.int64, device=idx.device)
        w.scatter_add_(-1, word.expand(*idx.shape[:-1], 128), full.reshape(idx.shape) << bit)
        w.scatter_add_(-1, c_word.expand(*idx.shape[:-1], 16), c << c_bit)
        return _signed32(w)
    lo = _pack_plane(idx & 3, 2)
    if bits == 2:
        return lo
    return torch.cat((lo, _pack_plane(idx >> 2, bits - 2)), dim=-1)


def unpack_codes(words: torch.Tensor, bits: int, head_dim: int, layout: str = "planes") -> torch.Tensor:
    """Inverse of ``pack_codes``: int32 ``[..., W]`` -> stored indices int64 ``[..., D]``."""
    W = code_words(head_dim, bits, layout)
    if words.shape[-1] != W:
        raise ValueError(f"codes have {words.shape[-1]} words per token; {layout!r} at {bits} bits, head_dim "
                         f"{head_dim} has {W}")
    if layout == "fields" and bits == 4:
        word, bit = nibble_slots(head_dim, words.device)
        return ((words.to(torch.int64) & 0xFFFFFFFF)[..., word] >> bit) & 15
    if layout == "fields":
        word, bit, c_word, c_bit = fields_slots(words.device)
        w = words.to(torch.int64) & 0xFFFFFFFF
        idx = (w[..., word] >> bit) & 7
        c = (w[..., c_word] >> c_bit) & 1
        g = idx.reshape(*idx.shape[:-1], 16, 8).clone()
        g[..., 7] = (g[..., 7] & ~1) | c
        return g.reshape(idx.shape)
    n_lo = head_dim // 16
    idx = _unpack_plane(words[..., :n_lo], 2)
    if bits > 2:
        idx = idx | (_unpack_plane(words[..., n_lo:], bits - 2) << 2)
    return idx


def relayout(codes: torch.Tensor, bits: int, head_dim: int, src: str, dst: str, block: int = 8192) -> torch.Tensor:
    """Codes ``[..., W]`` packed in layout ``src`` -> the same codes in layout ``dst`` (lossless both ways: COLD files
    hold bit planes, ``nqkernels.cold``), ``block`` tokens at a time (the indices are int64 on the way)."""
    if src == dst:
        return codes
    flat = codes.reshape(-1, codes.shape[-1])
    out = torch.empty(flat.shape[0], code_words(head_dim, bits, dst), dtype=torch.int32, device=codes.device)
    for i in range(0, flat.shape[0], block):
        out[i:i + block] = pack_codes(unpack_codes(flat[i:i + block], bits, head_dim, src), bits, dst)
    return out.view(*codes.shape[:-1], out.shape[-1])


FITS = ("none", "lsq", "unbiased")  # how the stored scale is fitted to the chosen lattice points (quantize)
FIX_BITS = 14  # fixed-point grid: |x_int| <= 2^(FIX_BITS+1), so every transform sum is an exact fp32 integer


def exp2i(k: torch.Tensor) -> torch.Tensor:
    """2^k as fp32 for int32 k in [-126, 127], built from the exponent bits (exact)."""
    return ((k.to(torch.int32) + 127) << 23).view(F32)


def fixed_point(x: torch.Tensor):
    """Per-token power-of-two fixed point. x fp32 ``[..., D]`` -> (x_int, e, ok).

    e = floor(log2 max|x|) (clamped to [-100, 127]); x_int = round-half-even(x · 2^(14-e)) is an fp32 integer
    with |x_int| <= 2^15, so any sum of up to 256 of them is exact in fp32 whatever its order: the kernels may
    use tensor cores or any reduction tree and still reproduce these values bit for bit. The grid step is
    2^-14 of the token's largest entry (relative error <= 2^-15, far below fp16 input precision).
    ok is False for tokens that are all zero or hold a NaN/Inf; their x_int is zero.
    """
    m = x.abs().amax(-1)
    ok = torch.isfinite(m) & (m > 0)
    e = (((m.view(torch.int32) >> 23) & 255) - 127).clamp(-100, 127)
    x_int = torch.round(torch.where(ok[..., None], x, 0.0) * exp2i(FIX_BITS - e)[..., None])
    return x_int, e, ok


def transform_matrix(head_dim: int) -> torch.Tensor:
    """The integer part of T as an fp64 ``[D, D]`` matrix (symmetric): Sylvester H_D, or blockdiag(H32 x 3)
    for head_dim 96 (whose Helmert mixing across thirds follows in ``helmert_mix``)."""
    size = 32 if head_dim == 96 else head_dim
    j = torch.arange(head_dim)
    a = j[:, None] & j[None, :] & (size - 1)
    parity = torch.zeros_like(a)
    while bool(a.any()):
        parity ^= a & 1
        a = a >> 1
    h = 1.0 - 2.0 * parity.double()
    return torch.where((j[:, None] // size) == (j[None, :] // size), h, 0.0)


def helmert_mix(z: torch.Tensor) -> torch.Tensor:
    """Helmert rows [1,1,1]/√3, [1,-1,0]/√2, [1,1,-2]/√6 across the thirds of a head_dim-96 vector (fp32)."""
    c3, c2, c6 = (torch.tensor(c, dtype=F32) for c in _HELMERT[1:])
    z0, z1, z2 = z[..., :32], z[..., 32:64], z[..., 64:]
    s01 = z0 + z1
    return torch.cat(((s01 + z2) * c3, (z0 - z1) * c2, (s01 - (z2 + z2)) * c6), dim=-1)


def storage_order(y: torch.Tensor) -> torch.Tensor:
    """Permute rotated coordinates between transform order and storage order (an involution): swap bits 1-2
    of the index with bits 3-4, so lattice group g = 4p + k holds coordinates {32p + 8m + 2k + i}."""
    c = torch.arange(y.shape[-1], device=y.device)
    sigma = (c & ~0b11110) | (((c >> 3) & 3) << 1) | (((c >> 1) & 3) << 3)
    return y[..., sigma]


def integer_transform(x_int: torch.Tensor) -> torch.Tensor:
    """y = T x_int on the fixed-point grid, as exact fp32 integers (head_dim 96: the Helmert part rounded)."""
    d = x_int.shape[-1]
    y = (x_int.double() @ transform_matrix(d).to(x_int.device)).to(F32)
    return torch.round(helmert_mix(y)) if d == 96 else y


def quantize(x: torch.Tensor, bits: int, alpha: float, fit: str, scale_dtype: torch.dtype):
    """Quantize fp32 vectors x ``[..., D]`` (RoPE undone and centered). Returns (stored indices int64, scales).

    On the fixed-point grid (``fixed_point``, quantum q = 2^(e-14)): y = T x_int exactly; the step is
    s = alpha · rms, rms = q·sqrt(Σ y² / (D·n)) (the rms of x; Σ y² an exact integer sum), rounded to
    scale_dtype;
    t = y / (s_q·√n) with s_q = s/q. Then ``fit`` picks the stored scale for the chosen points v (``FITS``):
    "none" keeps s; "lsq" stores the least-squares scale q·<y, v> / (<v, v>·√n), which minimises the error but
    shrinks the reconstruction (its projection on x is x·cos²θ); "unbiased" stores q·<y, y> / (<y, v>·√n), whose
    projection on x is exactly x, so attention logits q·k are not shrunk towards zero. Sums are exact integers
    (4v is an integer). Tokens with a non-finite value (or all zeros) get codes 0 and scale 0, so they decode to
    a zero vector.
    """
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    d = x.shape[-1]
    sqrt_n = torch.tensor(math.sqrt(transform_norm(d)), dtype=F32)
    x_int, e, ok = fixed_point(x.to(F32))
    y = storage_order(integer_transform(x_int))
    q = exp2i(e - FIX_BITS)
    sq = (y.to(torch.int64) ** 2).sum(-1)
    rms_q = torch.sqrt(sq.to(F32) / torch.tensor(float(d * transform_norm(d)), dtype=F32))
    s = ((rms_q * torch.tensor(alpha, dtype=F32)) * q).to(scale_dtype).to(F32)
    ok = ok & (s > 0) & torch.isfinite(s)
    s_q = torch.where(ok, s, 1.0) * exp2i(FIX_BITS - e)
    inv = 1.0 / s_q / sqrt_n  # two roundings, as the kernel does
    idx = e8_nearest(y * inv[..., None], bits)
    if fit != "none":
        v4 = (e8_values(idx, bits) * 4).to(torch.int64)  # 4v: odd integers
        yv = (y.to(torch.int64) * v4).sum(-1)
        num, den = (yv, (v4 * v4).sum(-1)) if fit == "lsq" else (sq, yv)
        s_fit = (num.to(F32) * 4.0) / (den.to(F32) * sqrt_n) * q
        s = torch.where(s_fit > 0, s_fit, s)
    idx = torch.where(ok[..., None], idx, 0)
    scale = torch.where(ok, s, 0.0).to(scale_dtype)
    return idx, scale


def dequantize(idx: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``quantize`` up to the quantization error, returned in the original basis (fp32)."""
    sqrt_n = math.sqrt(transform_norm(idx.shape[-1]))
    return inverse_hadamard(storage_order(e8_values(idx, bits))) * (scale.to(F32) * sqrt_n)[..., None]


def finite_mean(x: torch.Tensor) -> torch.Tensor:
    """The centering mean: x ``[B, T, H, D]`` fp32 -> ``[B, H, D]``, the mean over the tokens that hold no NaN/Inf.

    A non-finite token encodes to zero (``quantize``), so it is left out of the mean too: otherwise its NaN/Inf
    would reach every token through the shared offset. Zero where no token is finite.
    """
    finite = torch.isfinite(x).all(-1, keepdim=True)
    return torch.where(finite, x, 0.0).sum(1) / finite.sum(1).clamp(min=1)


def encode_reference(x, bits, *, alpha, fit, scale_dtype=torch.float16, cos=None, sin=None, mean=None,
                     layout="planes"):
    """Reference of the fused encode (``encode_kv``): x ``[B, T, H, D]`` -> (codes int32 ``[B, T, H, W]``, scales
    ``[B, T, H]``).

    cos/sin ``[B, T, R/2]`` undo RoPE on keys (rows for each token's position); mean ``[B, H, D]`` fp32 is
    subtracted after the RoPE undo; ``layout`` packs the codes (``pack_codes``).
    """
    xf = x.to(F32)
    if cos is not None:
        xf = rope_undo(xf, cos[:, :, None].to(F32), sin[:, :, None].to(F32))
    if mean is not None:
        xf = xf - mean.to(F32)[:, None]
    idx, scale = quantize(xf, bits, alpha, fit, scale_dtype)
    return pack_codes(idx, bits, layout), scale


def decode_reference(codes, scales, bits, head_dim, *, cos=None, sin=None, mean=None, dtype=torch.float16,
                     layout="planes"):
    """Reference of the decode (``decode_kv``, dequantize): codes ``[B, T, H, W]``, scales ``[B, T, H]`` ->
    ``[B, T, H, head_dim]``, the inverse of ``encode_reference`` up to quantization error."""
    x = dequantize(unpack_codes(codes, bits, head_dim, layout), scales, bits)
    if mean is not None:
        x = x + mean.to(F32)[:, None]
    if cos is not None:
        x = rope_apply(x, cos[:, :, None].to(F32), sin[:, :, None].to(F32))
    return x.to(dtype)


def rotation_matrix(head_dim: int) -> torch.Tensor:
    """R = σ·T as fp32 ``[D, D]`` (rows: stored coordinates in storage order, columns: the original basis).

    A token decodes as x = Rᵀ v · s / √n (``dequantize``), so attention needs no per-token inverse transform:
    q·x = (R q / √n)·v · s, and Σ p_j x_j = Rᵀ (Σ p_j s_j v_j) / √n. RᵀR = n·I.
    """
    return inverse_hadamard(storage_order(torch.eye(head_dim, dtype=F32))) * transform_norm(head_dim)


def attention(q, k, v, q_index, k_index, k_valid, *, scale: float, softcap=None, window=None) -> torch.Tensor:
    """Dense fp32 attention with GQA and masks: the oracle of ``decode_attention``.

    q ``[B, M, Hq, D]``; k, v ``[B, N, Hk, D]`` (Hq a multiple of Hk); q_index ``[B, M]`` and k_index ``[B, N]`` are
    the tokens' indices in their sequence, k_valid ``[B, N]`` bool. A key is seen by a query when it is valid, not
    after it (k_index <= q_index) and, with ``window``, less than ``window`` tokens before it. ``softcap``:
    logits become softcap·tanh(logits / softcap). Rows that see no key return zeros.
    """
    B, M, Hq, D = q.shape
    group = Hq // k.shape[2]
    k = k.to(F32).repeat_interleave(group, dim=2)
    v = v.to(F32).repeat_interleave(group, dim=2)
    logits = torch.einsum("bmhd,bnhd->bhmn", q.to(F32), k) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    seen = k_valid[:, None, :] & (k_index[:, None, :] <= q_index[:, :, None])
    if window is not None:
        seen = seen & (k_index[:, None, :] > q_index[:, :, None] - window)
    logits = logits.masked_fill(~seen[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhmn,bnhd->bmhd", p, v)


def paged_attention(q, cache, scale: float, softcap=None, window=None) -> torch.Tensor:
    """The oracle of ``decode_attention`` over a ``PagedKVCache``: the whole cache dequantized (``cache.dense``) and
    fp32 ``attention`` of q ``[B, q_len, q_heads, head_dim]`` (the last q_len tokens of sequences 0..B-1, causal
    inside the chunk); returns fp32 ``[B, q_len, q_heads, head_dim]``."""
    B, q_len = q.shape[:2]
    K, V, valid = cache.dense(B)
    L = K.shape[1]
    lens = torch.tensor(cache.seq_lens()[:B], device=q.device)
    q_index = lens[:, None] - q_len + torch.arange(q_len, device=q.device)[None]
    k_index = torch.arange(L, device=q.device).expand(B, L)
    return attention(q, K, V, q_index, k_index, valid, scale=scale, softcap=softcap, window=window)


def window_scores(q, k, seq_lens, *, scale: float, aggregate: str) -> torch.Tensor:
    """Observation-window token scores: the oracle of ``score_tokens`` (before pooling).

    q ``[B, W, Hq, D]`` (row w is the query at position seq_lens[b] - W + w), k ``[B, T, Hk, D]``, seq_lens ``[B]``.
    Softmax over the keys each query sees (causal, inside its sequence, finite logits), then sum/mean/max over
    the (window position, query head) rows of each KV group. Returns fp32 ``[B, Hk, T]``.
    """
    B, W, Hq, D = q.shape
    T, Hk = k.shape[1], k.shape[2]
    group = Hq // Hk
    logits = torch.einsum("bwhd,bthd->bhwt", q.to(F32), k.to(F32).repeat_interleave(group, dim=2)) * scale
    lens = seq_lens.to(q.device).long()
    qpos = lens[:, None] - W + torch.arange(W, device=q.device)[None]
    t = torch.arange(T, device=q.device)
    seen = (t[None, None] <= qpos[:, :, None]) & (qpos[:, :, None] >= 0) & (t[None, None] < lens[:, None, None])
    seen = seen[:, None] & torch.isfinite(logits)
    p = torch.softmax(logits.masked_fill(~seen, float("-inf")), dim=-1).nan_to_num(0.0)
    p = p.reshape(B, Hk, group, W, T)
    if aggregate == "max":
        return p.amax(dim=(2, 3))
    total = p.sum(dim=(2, 3))
    if aggregate == "mean":
        total = total / (group * torch.clamp(lens, max=W)).to(F32)[:, None, None]
    return total


# ---------------------------------------------------------------------------------------------------------------
# The COLD filters (nqkernels.delta): records of a head's tokens, filtered per chunk in one of three modes.

RAW, SHUFFLE, DELTA = 0, 1, 2  # records token-major; bytes of a position grouped; index deltas, then grouped
MODES = (RAW, SHUFFLE, DELTA)


def record_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one token's record: its code words and its 16-bit scale."""
    return head_dim * bits // 8 + 2


def _zigzag_ref(r: torch.Tensor, b: int) -> torch.Tensor:
    return ((r << 1) ^ -(r >> (b - 1))) & ((1 << b) - 1)


def _unzigzag_ref(z: torch.Tensor, b: int) -> torch.Tensor:
    return ((z >> 1) ^ -(z & 1)) & ((1 << b) - 1)


def _records(codes: torch.Tensor, sc16: torch.Tensor) -> torch.Tensor:
    """[S, T, W] int32 + [S, T] int16 -> [S, T, RB] uint8 (little-endian)."""
    shifts = torch.arange(4, device=codes.device) * 8
    cb = (codes.to(torch.int64)[..., None] >> shifts) & 255
    sb = (sc16.to(torch.int64)[..., None] >> shifts[:2]) & 255
    return torch.cat((cb.flatten(-2), sb), dim=-1).to(torch.uint8)


def _chunk_views(T: int, chunk: int):
    return [(c0, min(T, c0 + chunk)) for c0 in range(0, T, chunk)]


def filter_reference(codes, sc16, modes, head_dim: int, bits: int, chunk: int) -> torch.Tensor:
    """``delta.filter_codes``' oracle: codes int32 ``[S, T, W]`` and 16-bit scales ``[S, T]`` -> uint8 ``[S, T·RB]``."""
    S, T, W = codes.shape
    idx = unpack_codes(codes, bits, head_dim)  # [S, T, D] int64
    sc = sc16.to(torch.int64) & 0xFFFF
    prev, prev_sc = torch.zeros_like(idx), torch.zeros_like(sc)
    prev[:, 1:], prev_sc[:, 1:] = idx[:, :-1], sc[:, :-1]
    prev[:, ::chunk], prev_sc[:, ::chunk] = 0, 0  # each chunk starts against zero
    delta = pack_codes(_zigzag_ref((idx - prev) & ((1 << bits) - 1), bits), bits)
    delta_sc = _zigzag_ref((sc - prev_sc) & 0xFFFF, 16)
    rec = _records(codes, sc16)
    rec_delta = _records(delta, delta_sc.to(torch.int16))
    out = []
    for s in range(S):
        r = rec_delta[s] if int(modes[s]) == DELTA else rec[s]
        parts = [r[a:b] if int(modes[s]) == RAW else r[a:b].T for a, b in _chunk_views(T, chunk)]
        out.append(torch.cat([p.reshape(-1) for p in parts]) if parts else r.reshape(-1))
    return torch.stack(out) if out else torch.empty(0, T * (4 * W + 2), dtype=torch.uint8, device=codes.device)


def unfilter_reference(data, modes, head_dim: int, bits: int, chunk: int):
    """``delta.unfilter_codes``' oracle: the inverse of ``filter_reference`` -> (codes int32, scales int16)."""
    RB = record_bytes(head_dim, bits)
    S, T = data.shape[0], data.shape[1] // RB
    rec = torch.empty(S, T, RB, dtype=torch.uint8, device=data.device)
    for s in range(S):
        pos = 0
        for a, b in _chunk_views(T, chunk):
            part = data[s, pos:pos + (b - a) * RB]
            rec[s, a:b] = part.view(b - a, RB) if int(modes[s]) == RAW else part.view(RB, b - a).T
            pos += (b - a) * RB
    shifts = torch.arange(4, device=data.device) * 8
    r = rec.to(torch.int64)
    words = (r[..., :RB - 2].reshape(S, T, (RB - 2) // 4, 4) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    sc = r[..., RB - 2] | (r[..., RB - 1] << 8)
    for s in range(S):
        if int(modes[s]) != DELTA:
            continue
        d = _unzigzag_ref(unpack_codes(words[s], bits, head_dim), bits)
        ds = _unzigzag_ref(sc[s], 16)
        for a, b in _chunk_views(T, chunk):
            d[a:b] = d[a:b].cumsum(0) & ((1 << bits) - 1)
            ds[a:b] = ds[a:b].cumsum(0) & 0xFFFF
        words[s] = pack_codes(d, bits).to(torch.int64)
        sc[s] = ds
    sc = torch.where(sc >= 2**15, sc - 2**16, sc)
    return words.to(torch.int32), sc.to(torch.int16)
