"""Shared Triton device helpers: fixed-order reductions, Hadamard, RoPE, E8 nearest point, bit (un)packing.

Used by the encode/decode kernels (and by the attention kernels that decode codes in registers). Each helper
mirrors ``nqkernels.reference`` operation for operation, so with ``enable_fp_fusion=False`` (no fused
multiply-add) kernels reproduce the reference's fp32 values, and hence its codes, exactly.

Tiles are ``[BT, DP]``: BT tokens by the head dim padded to a power of two (DP = 128 for head_dim 96).
"""
import triton
import triton.language as tl

# Helmert rows [1,1,1]/√3, [1,-1,0]/√2, [1,1,-2]/√6 (fp32-rounded, as in reference._HELMERT).
HELMERT_C3 = tl.constexpr(0.5773502691896258)
HELMERT_C2 = tl.constexpr(0.7071067811865476)
HELMERT_C6 = tl.constexpr(0.4082482904638631)


@triton.jit
def group8_sum(x, BT: tl.constexpr, G: tl.constexpr):
    """Sum [BT, G, 8] over groups of 8 with the same tree as reference.tree_sum -> [BT, G]."""
    x = tl.sum(tl.reshape(x, (BT, G, 2, 4)), axis=2)
    x = tl.sum(tl.reshape(x, (BT, G, 2, 2)), axis=2)
    return tl.sum(x, axis=2)


@triton.jit
def _butterfly(x, BT: tl.constexpr, DP: tl.constexpr, H: tl.constexpr):
    # One Sylvester stage: within each block of 2H, (a, b) -> (a + b, a - b) with a the first half.
    v = tl.permute(tl.reshape(x, (BT, DP // (2 * H), 2, H)), (0, 1, 3, 2))
    a, b = tl.split(v)
    y = tl.join(a + b, a - b)
    return tl.reshape(tl.permute(y, (0, 1, 3, 2)), (BT, DP))


@triton.jit
def _butterflies(x, BT: tl.constexpr, DP: tl.constexpr, SIZE: tl.constexpr, LOG2SIZE: tl.constexpr):
    for i in tl.static_range(LOG2SIZE):
        x = _butterfly(x, BT, DP, 1 << i)
    return x


@triton.jit
def _split_quarters(x, BT: tl.constexpr):
    # [BT, 128] -> the four 32-wide blocks.
    v = tl.permute(tl.reshape(x, (BT, 2, 2, 32)), (0, 3, 1, 2))
    even, odd = tl.split(v)
    x0, x2 = tl.split(even)
    x1, x3 = tl.split(odd)
    return x0, x1, x2, x3


@triton.jit
def _join_quarters(x0, x1, x2, x3, BT: tl.constexpr):
    v = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    return tl.reshape(tl.permute(v, (0, 2, 3, 1)), (BT, 128))


@triton.jit
def storage_order(y, BT: tl.constexpr, DP: tl.constexpr):
    """reference.storage_order on a [BT, DP] tile: swap index bits 1-2 with bits 3-4 (an involution).

    The lattice groups of 8 are then the coordinates {32p + 8m + 2k + i : m < 4, i < 2} that one thread holds
    in the accumulator layout of a tensor-core product, so the nearest-point search needs no data exchange.
    """
    return tl.reshape(tl.permute(tl.reshape(y, (BT, DP // 32, 4, 4, 2)), (0, 1, 3, 2, 4)), (BT, DP))


@triton.jit
def storage_index(d):
    """For storage slot d, its transform-order coordinate (the same bit swap; gather form of storage_order)."""
    return (d & ~30) | (((d >> 3) & 3) << 1) | (((d >> 1) & 3) << 3)


@triton.jit
def helmert_mix(x, BT: tl.constexpr):
    """reference.helmert_mix on a [BT, 128] tile holding a head_dim-96 vector (the last quarter stays zero)."""
    x0, x1, x2, x3 = _split_quarters(x, BT)
    s01 = x0 + x1
    return _join_quarters((s01 + x2) * HELMERT_C3, (x0 - x1) * HELMERT_C2, (s01 - (x2 + x2)) * HELMERT_C6, x3, BT)


@triton.jit
def rne(x):
    """Round fp32 to the nearest integer, ties to even, for |x| < 2^22 (adding 1.5·2^23 drops the fraction)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def exp2i(k):
    """2^k as fp32 for int32 k in [-126, 127] (reference.exp2i)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def fixed_point(x, FIX_BITS: tl.constexpr):
    """reference.fixed_point on a [BT, DP] fp32 tile -> (x_int fp32 integers, e int32 [BT], ok [BT])."""
    bad = tl.max(((x - x) != 0.0).to(tl.int32), axis=1)  # x - x is NaN exactly for NaN and ±Inf
    m = tl.max(tl.abs(x), axis=1)
    ok = (bad == 0) & (m > 0.0)
    e = tl.minimum(tl.maximum(((m.to(tl.int32, bitcast=True) >> 23) & 255) - 127, -100), 127)
    x = tl.where(ok[:, None], x, 0.0)
    return rne(x * exp2i(FIX_BITS - e)[:, None]), e, ok


@triton.jit
def transform_matrix(D: tl.constexpr, DP: tl.constexpr):
    """The ±1 matrix of reference.transform_matrix as fp16 [M, M], M = min(DP, 128): Sylvester H_M, or
    blockdiag(H32, H32, H32, 0) for head_dim 96 (head_dim 256 applies H128 after one butterfly)."""
    M: tl.constexpr = min(DP, 128)
    SIZE: tl.constexpr = 32 if D == 96 else M
    j = tl.arange(0, M)
    a = j[:, None] & j[None, :] & (SIZE - 1)
    a = a ^ (a >> 4)
    a = a ^ (a >> 2)
    a = a ^ (a >> 1)
    h = 1.0 - 2.0 * (a & 1).to(tl.float32)  # (-1)^popcount(j & k)
    if D == 96:
        h = tl.where(((j[:, None] // 32) == (j[None, :] // 32)) & (j < 96)[:, None], h, 0.0)
    return h.to(tl.float16)


@triton.jit
def _exact_dot(u, tm):
    # u: fp32 integers |u| <= 2^16. Split u = 256·hi + lo (both exact in fp16); ±1 products are exact. The lo
    # product accumulates onto 256·(hi product) in one accumulator (one live tile, not two): every partial sum is an
    # integer below 2^24 (|256·Σhi| <= 2^23, |Σlo| <= 2^15 at 128 terms), so the fp32 accumulation is exact in
    # any order.
    hi = tl.floor(u * (1.0 / 256))
    lo = u - hi * 256.0
    return tl.dot(lo.to(tl.float16), tm, acc=tl.dot(hi.to(tl.float16), tm) * 256.0)


@triton.jit
def integer_transform(x_int, tm, BT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
    """reference.integer_transform: y = T x_int on a [BT, DP] tile of fixed-point integers, exact."""
    if DP == 256:
        # H256 = [[H128, H128], [H128, -H128]]: one butterfly across the halves, then H128 on each.
        a, b = tl.split(tl.permute(tl.reshape(x_int, (BT, 2, 128)), (0, 2, 1)))
        y = tl.join(_exact_dot(a + b, tm), _exact_dot(a - b, tm))
        y = tl.reshape(tl.permute(y, (0, 2, 1)), (BT, 256))
    else:
        y = _exact_dot(x_int, tm)
        if D == 96:
            y = rne(helmert_mix(y, BT))
    return y


@triton.jit
def inverse_hadamard(y, BT: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, LOG2DP: tl.constexpr):
    """Tᵀ y / n (reference.inverse_hadamard)."""
    if D == 96:
        y0, y1, y2, y3 = _split_quarters(y, BT)
        z0, z1, z2 = y0 * HELMERT_C3, y1 * HELMERT_C2, y2 * HELMERT_C6
        y = _join_quarters(z0 + z1 + z2, z0 - z1 + z2, z0 - (z2 + z2), y3 * 0.0, BT)
        y = _butterflies(y, BT, DP, 32, 5) * (1.0 / 32)
    else:
        y = _butterflies(y, BT, DP, D, LOG2DP) * (1.0 / D)
    return y


@triton.jit
def rope_rows(cos_ptr, sin_ptr, pos_ptr, offs, tmask, d, ROPE_HALF: tl.constexpr):
    """cos/sin of each token's position expanded to [BT, DP] (1 and 0 outside the rotary dims), and the rotary mask.

    The tile's positions are at pos_ptr + offs ([BT]); the tables are [n_pos, R/2] fp32.
    """
    return rope_rows_at(cos_ptr, sin_ptr, tl.load(pos_ptr + offs, mask=tmask, other=0), tmask, d, ROPE_HALF)


@triton.jit
def rope_rows_at(cos_ptr, sin_ptr, pos, tmask, d, ROPE_HALF: tl.constexpr):
    """rope_rows for positions given as a [BT] int tensor."""
    rmask = tmask[:, None] & (d < 2 * ROPE_HALF)[None, :]
    cidx = pos[:, None] * ROPE_HALF + (d % ROPE_HALF)[None, :]
    return tl.load(cos_ptr + cidx, mask=rmask, other=1.0), tl.load(sin_ptr + cidx, mask=rmask, other=0.0), rmask


@triton.jit
def rope_partner_index(d, ROPE_HALF: tl.constexpr):
    """The split-half partner of each channel: j <-> j ± R/2 inside the rotary dims, itself outside."""
    return tl.where(d < ROPE_HALF, d + ROPE_HALF, tl.where(d < 2 * ROPE_HALF, d - ROPE_HALF, d))


@triton.jit
def rope_partner(x, d, ROPE_HALF: tl.constexpr):
    """For a [BT, DP] tile, the partner column of each channel (a register gather)."""
    return tl.gather(x, tl.broadcast_to(rope_partner_index(d, ROPE_HALF)[None, :], x.shape), 1)


@triton.jit
def rope_rotate(x, xp, d, cos, sin, ROPE_HALF: tl.constexpr, UNDO: tl.constexpr):
    """Rotate split-half pairs; xp is each channel's partner, cos/sin are [BT, DP] tiles already expanded to
    the channel of each column.

    undo:  x1' = x1 cos + x2 sin,  x2' = x2 cos - x1 sin   (reference.rope_undo)
    apply: x1' = x1 cos - x2 sin,  x2' = x2 cos + x1 sin   (reference.rope_apply)
    """
    first = d < ROPE_HALF
    if UNDO:
        r = tl.where(first[None, :], x * cos + xp * sin, x * cos - xp * sin)
    else:
        r = tl.where(first[None, :], x * cos - xp * sin, x * cos + xp * sin)
    return tl.where((d < 2 * ROPE_HALF)[None, :], r, x)


@triton.jit
def _coset_nearest(t, lane, OFF: tl.constexpr, TOP: tl.constexpr, BT: tl.constexpr, G: tl.constexpr):
    # Nearest point of one coset in index space; t [BT, G, 8]. Returns (indices as float, squared distance).
    z = t + OFF
    r = tl.minimum(tl.maximum(tl.floor(z + 0.5), 0.0), TOP)
    e = z - r
    dist = group8_sum(e * e, BT, G)
    odd = (tl.sum(r.to(tl.int32), axis=2) & 1) == 1
    alt = tl.where(e > 0, r + 1.0, r - 1.0)
    alt = tl.where(alt > TOP, r - 1.0, alt)
    alt = tl.where(alt < 0.0, r + 1.0, alt)
    ea = z - alt
    delta = ea * ea - e * e
    best = tl.min(delta, axis=2)
    j = tl.min(tl.where(delta == best[:, :, None], lane, 8), axis=2)
    fix = odd[:, :, None] & (lane == j[:, :, None])
    return tl.where(fix, alt, r), tl.where(odd, dist + best, dist)


@triton.jit
def e8_nearest(t, BT: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr):
    """reference.e8_nearest on a [BT, DP] tile -> (stored indices int32 [BT, DP], lattice values fp32)."""
    G: tl.constexpr = DP // 8
    HALF: tl.constexpr = 1 << (BITS - 1)
    TOP: tl.constexpr = (1 << BITS) - 1
    lane = tl.arange(0, 8)[None, None, :]
    g = tl.reshape(t, (BT, G, 8))
    r0, d0 = _coset_nearest(g, lane, HALF - 0.25, TOP, BT, G)
    r1, d1 = _coset_nearest(g, lane, HALF - 0.75, TOP, BT, G)
    c = d1 < d0
    r = tl.where(c[:, :, None], r1, r0)
    cf = c.to(tl.float32)[:, :, None]
    v = r - HALF + 0.25 + 0.5 * cf
    idx = r.to(tl.int32)
    idx = tl.where(lane == 7, (idx & -2) | c.to(tl.int32)[:, :, None], idx)
    return tl.reshape(idx, (BT, DP)), tl.reshape(v, (BT, DP))


@triton.jit
def fields_slots(d):
    """The "fields" layout (3-bit codes at head_dim 128; ``reference.fields_slots``, docs/format.md "Codes"): the
    word and bit of stored coordinate d's whole index, and the word and bit of its group's coset flag."""
    c = d // 32
    r = d % 32
    j = 8 * (r // 16) + r % 8
    word = tl.where(j < 5, 2 * c, tl.where(j < 10, 2 * c + 1, tl.where(j < 15, 8 + c, 12)))
    bit = tl.where(j == 15, 3 * c, 3 * (j % 5)) + 16 * ((r // 8) % 2)
    g = d // 8
    return word, bit, 2 * (g // 4) + (g // 2) % 2, 15 + 16 * (g % 2)


@triton.jit
def nibble_slots(d):
    """The "fields" layout at 4 bits (``reference.nibble_slots``): the word and bit of stored coordinate d's index,
    d = 16m + 8h + 4k + j at bit 16h + 4j of word 2m + k."""
    return 2 * (d // 16) + (d // 4) % 2, 16 * ((d // 8) % 2) + 4 * (d % 4)


@triton.jit
def pack_nibbles(idx, BT: tl.constexpr, DP: tl.constexpr):
    """Stored 4-bit indices [BT, DP] (the coset flag in each group's eighth index's low bit) -> the "fields" layout at
    4 bits, words [BT, DP / 8] (``nibble_slots``): a word is a sum of disjoint nibbles."""
    x = tl.reshape(idx, (BT, DP // 16, 2, 2, 4))  # (m, h, k, j)
    h = tl.arange(0, 2)[None, None, :, None, None]
    j = tl.arange(0, 4)[None, None, None, None, :]
    return tl.reshape(tl.sum(tl.sum(x << (16 * h + 4 * j), axis=4), axis=2), (BT, DP // 8))


@triton.jit
def _low_pairs(x):
    """The low 2 bits of each nibble of x, nibble j of half h moved to bits 16h + 2j (bits 8-15 of each half zero)."""
    x = x & 0x33333333
    x = (x | (x >> 2)) & 0x0F0F0F0F
    return (x | (x >> 4)) & 0x00FF00FF


@triton.jit
def nibble_planes(w, BT: tl.constexpr, N: tl.constexpr):
    """Words [BT, 2N] of the "fields" layout at 4 bits (``nibble_slots``) -> the same codes as bit planes: low-plane
    words [BT, N] and high-plane words [BT, N] (word m from words 2m, 2m + 1: coordinate 16m + 8h + 4k + j's low
    bits at bit 2·(8h + 4k + j)), so a portable kernel decodes them as it decodes planes."""
    a, b = tl.split(tl.reshape(w, (BT, N, 2)))
    return _low_pairs(a) | (_low_pairs(b) << 8), _low_pairs(a >> 2) | (_low_pairs(b >> 2) << 8)


@triton.jit
def pack_fields(idx, BT: tl.constexpr):
    """Stored 3-bit indices [BT, 128] (``e8_nearest``'s: each group's coset flag in its eighth index's low bit) ->
    the "fields" layout: (words 0-7 [BT, 8], words 8-11 [BT, 4], word 12 [BT]). Each index whole (its implied parity
    bit restored), the flags at bits 15 and 31 of words 0-7 (``fields_slots``); a word is a sum of disjoint fields."""
    g = tl.reshape(idx, (BT, 16, 8))
    lane = tl.arange(0, 8)[None, None, :]
    c = tl.sum(tl.where(lane == 7, g & 1, 0), axis=2)
    par = tl.sum(tl.where(lane < 7, g, 0), axis=2) & 1
    full = tl.reshape(tl.where(lane == 7, (g & -2) | par[:, :, None], g), (BT, 4, 32))
    # Per thread column c (32 coordinates): field j of r = 16·jb + 8·h + m is 8·jb + m, in word slot k = j // 5.
    col = tl.arange(0, 4)[:, None]
    r = tl.arange(0, 32)[None, :]
    j = 8 * (r // 16) + r % 8
    k = tl.where(j < 15, j // 5, 3)
    x = full << (tl.where(j == 15, 3 * col, 3 * (j % 5)) + 16 * ((r // 8) % 2))[None, :, :]
    w0 = tl.sum(tl.where((k == 0)[None, :, :], x, 0), axis=2)
    w1 = tl.sum(tl.where((k == 1)[None, :, :], x, 0), axis=2)
    w2 = tl.sum(tl.where((k == 2)[None, :, :], x, 0), axis=2)
    w3 = tl.sum(tl.sum(tl.where((k == 3)[None, :, :], x, 0), axis=2), axis=1)
    # Coset flags: group 4c + 2i + h at bit 15 + 16·h of word 2c + i.
    f = tl.sum(tl.reshape(c, (BT, 4, 2, 2)) << (15 + 16 * tl.arange(0, 2))[None, None, None, :], axis=3)
    f0, f1 = tl.split(f)
    return tl.reshape(tl.join(w0 + f0, w1 + f1), (BT, 8)), w2, w3


@triton.jit
def load_e8_doubled(row, tmask, D: tl.constexpr, DP: tl.constexpr, BITS: tl.constexpr, BT: tl.constexpr,
                    FIELDS: tl.constexpr = False):
    """BT tokens of packed codes -> u = 2·index + coset, int32 [BT, DP] in storage order, so the lattice value is
    v = u/2 - 2^(BITS-1) + 1/4 (reference.e8_values). ``row`` is [BT, 1] pointers to each token's first word;
    coordinates past D read as u = 0. ``FIELDS``: codes in the "fields" layout (``fields_slots`` at 3 bits,
    ``nibble_slots`` at 4), else bit planes.

    Planes work on whole words: a group of 8 is one 16-bit half of a low-plane word, the parity of its first seven
    indices is the xor of their low bits (bits 0, 2, ..., 12 of the half, folded by three shift-xors) and replaces
    bit 14 (index 7's low bit, where the coset flag is stored); the flag is then spread to the group's 8 fields.
    Fields hold every index whole: one (cached) word load per coordinate, a shift and a mask (at 4 bits the parity
    then restored per group, as for the planes).
    """
    if FIELDS and BITS == 4:
        word, bit = nibble_slots(tl.arange(0, DP))
        g = (tl.load(row + word[None, :], mask=tmask[:, None], other=0) >> bit[None, :]) & 15
        g = tl.reshape(g, (BT, DP // 8, 8))
        lane = tl.arange(0, 8)[None, None, :]
        c = tl.sum(tl.where(lane == 7, g & 1, 0), axis=2)
        par = tl.sum(tl.where(lane < 7, g, 0), axis=2) & 1
        g = tl.where(lane == 7, (g & -2) | par[:, :, None], g)
        u = tl.reshape((g << 1) | c[:, :, None], (BT, DP))
    elif FIELDS:
        word, bit, c_word, c_bit = fields_slots(tl.arange(0, DP))
        m = tmask[:, None]
        full = (tl.load(row + word[None, :], mask=m, other=0) >> bit[None, :]) & 7
        u = (full << 1) | ((tl.load(row + c_word[None, :], mask=m, other=0) >> c_bit[None, :]) & 1)
    else:
        w16 = tl.arange(0, DP // 16)
        m16 = tmask[:, None] & (w16 < D // 16)[None, :]
        lo = tl.load(row + w16[None, :], mask=m16, other=0)
        x = lo & 0x15551555
        x ^= x >> 8
        x ^= x >> 4
        x ^= x >> 2
        coset = (lo >> 14) & 0x00010001
        lo = (lo & -0x40004001) | ((x & 0x00010001) << 14)  # -0x40004001 == ~0x40004000
        u = (unpack_plane(lo, BT, DP, 2) << 1) | unpack_plane(coset * 0x5555, BT, DP, 2)
        if BITS == 3:
            w32 = tl.arange(0, DP // 32)
            hi = tl.load(row + D // 16 + w32[None, :], mask=tmask[:, None] & (w32 < D // 32)[None, :], other=0)
            u = u | (unpack_plane(hi, BT, DP, 1) << 3)
        if BITS == 4:
            u = u | (unpack_plane(tl.load(row + D // 16 + w16[None, :], mask=m16, other=0), BT, DP, 2) << 3)
    return u


@triton.jit
def load_words(row, tmask, FIRST: tl.constexpr, N: tl.constexpr, NP: tl.constexpr):
    """Words FIRST..FIRST+N-1 of each token's codes (``row``: [BT, 1] pointers), zero-padded to NP columns; masked
    tokens read as zero."""
    w = tl.arange(0, NP)
    return tl.load(row + FIRST + w[None, :], mask=tmask[:, None] & (w < N)[None, :], other=0)


@triton.jit
def pack_plane(p, BT: tl.constexpr, DP: tl.constexpr, PBITS: tl.constexpr):
    """[BT, DP] values of PBITS bits -> [BT, DP*PBITS/32] int32 words, coordinate k of a word at bit k*PBITS."""
    PER: tl.constexpr = 32 // PBITS
    shifts = (tl.arange(0, PER) * PBITS)[None, None, :]
    return tl.sum(tl.reshape(p, (BT, DP // PER, PER)) << shifts, axis=2)


@triton.jit
def unpack_plane(w, BT: tl.constexpr, DP: tl.constexpr, PBITS: tl.constexpr):
    """Inverse of pack_plane: [BT, DP*PBITS/32] int32 -> [BT, DP] int32."""
    PER: tl.constexpr = 32 // PBITS
    shifts = (tl.arange(0, PER) * PBITS)[None, None, :]
    return tl.reshape((w[:, :, None] >> shifts) & ((1 << PBITS) - 1), (BT, DP))


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even on every backend (the interpreter truncates to bfloat16)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


# Codes as tensor-core operands without int->float conversions. A 16-bit half whose set bits all lie in bits 0..9 is
# an fp16 subnormal worth (its integer value)·2^-24, so masking a word leaves two fp16 operands per instruction:
# field values times a power of two times 2^-24, exact. Products with fp16 queries/probabilities are exact in the
# fp32 accumulator, which the kernel multiplies by 2^24 once. Each mask takes one field per 16-bit half (the
# field pair k, k + 16/FBITS of a word), after an optional byte shift, so a word of 32/FBITS fields becomes
# R = 16/FBITS registers of two fp16 each.
#
# The order of the decoded elements ("pair order", ``attention._pair_order`` is the host-side map) is chosen so that
# every register already sits where a 64-row tensor-core product wants its A operand: there, the thread of lane c
# (mod 4) of a row holds the element pairs p ≡ c (mod 4) (pair p = elements 2p, 2p + 1). So the words of a token are
# dealt in runs of J = NW / C (C = min(4, NW)): word J·c + jl feeds the pairs p = C·(R·jl + i) + c, i < R, and a
# thread that loads its own run of words (``attention._page_words``) decodes them in place, with no exchange.
SUBNORMAL_UNIT = tl.constexpr(16777216.0)  # 2^24


@triton.jit
def fp16_halves(z, ASM: tl.constexpr):
    """int32 [...] -> fp16 [..., 2]: the low and the high 16-bit half of each word, reinterpreted (no arithmetic).
    With ASM a register move (pairs stay packed in one register); otherwise portable bit operations."""
    if ASM:
        # Two outputs per word and a join, not one packed output: the join's layout is then Triton's to keep.
        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [z], dtype=(tl.float16, tl.float16),
                                           is_pure=True, pack=1)
        return tl.join(lo, hi)
    else:
        lo = (z & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        hi = ((z >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.join(lo, hi)


@triton.jit
def _deal(z, BT: tl.constexpr, NW: tl.constexpr, R: tl.constexpr, ASM: tl.constexpr):
    """z [BT, NW, R] int32 (R registers per word) -> fp16 [BT, 2·NW·R] in pair order: word J·c + jl, register i
    becomes pair C·(R·jl + i) + c, its low half the even element."""
    C: tl.constexpr = min(4, NW)
    z = tl.permute(tl.reshape(z, (BT, C, (NW // C) * R)), (0, 2, 1))
    return tl.reshape(fp16_halves(tl.reshape(z, (BT, NW * R)), ASM), (BT, 2 * NW * R))


@triton.jit
def plane_pairs(w, BT: tl.constexpr, NW: tl.constexpr, FBITS: tl.constexpr, ASM: tl.constexpr):
    """[BT, NW] words of FBITS-bit fields (field k of a word at bits FBITS·k) -> fp16 subnormals [BT, NW·32/FBITS]
    in pair order (see above). Register i = (8/FBITS)·sh + k of a word holds, in its 16-bit half h, field
    (8/FBITS)·sh + k + (16/FBITS)·h times 2^(FBITS·k) · 2^-24 (sh: byte shift, k: field within the byte)."""
    # tl.join stacks along a new last axis, so the outermost join picks the lowest bit of the field index k.
    x = tl.join(w, w >> 8)
    if FBITS == 2:
        z = tl.join(tl.join(x & 0x00030003, x & 0x00300030), tl.join(x & 0x000C000C, x & 0x00C000C0))
    else:
        z = tl.join(tl.join(tl.join(x & 0x00010001, x & 0x00100010), tl.join(x & 0x00040004, x & 0x00400040)),
                    tl.join(tl.join(x & 0x00020002, x & 0x00200020), tl.join(x & 0x00080008, x & 0x00800080)))
    return _deal(tl.reshape(z, (BT, NW, 16 // FBITS)), BT, NW, 16 // FBITS, ASM)


@triton.jit
def _stack16(x):
    """16 tensors [...] -> [..., 2, 2, 2, 2], x[r] at flattened index r (a join's new axis is its lowest bit)."""
    t = ()
    for k in tl.static_range(8):
        t = t + (tl.join(x[k], x[k + 8]),)
    u = ()
    for k in tl.static_range(4):
        u = u + (tl.join(t[k], t[k + 4]),)
    return tl.join(tl.join(u[0], u[2]), tl.join(u[1], u[3]))


@triton.jit
def fields_pairs(lo, hi, BT: tl.constexpr, ASM: tl.constexpr):
    """3-bit codes at head_dim 128 in the "fields" layout (``fields_slots``) -> fp16 subnormals [BT, 128] in the
    pair order and with the powers of two of ``plane_pairs(restore_parity(low plane), FBITS=2)`` (8 words), each
    element holding the whole index of its coordinate: one product covers the low and the high plane's. ``lo``:
    words 0-7 [BT, 8]; ``hi``: [BT, 8] with word 8 + c at column 2c and word 12 at column 2c + 1 (c < 4).

    Low-plane word w = 2c + jb, register i holds coordinates 16w + i, 16w + i + 8 times 4^(i mod 4); in the fields
    layout they are field j = 8·jb + i of column c: bits 3·(j mod 5) of words 2c, 2c + 1, 8 + c, or 3c of word 12."""
    e, o = tl.split(tl.reshape(lo, (BT, 4, 2)))
    m, last = tl.split(tl.reshape(hi, (BT, 4, 2)))
    last = last >> (3 * tl.arange(0, 4))[None, :]
    src = (e, e, e, e, e, o, o, o, o, o, m, m, m, m, m, last)
    regs = ()
    for r in tl.static_range(16):
        regs = regs + ((((src[r] >> (3 * (r % 5) if r < 15 else 0)) & 0x00070007) << (2 * (r % 4))),)
    return _deal(tl.reshape(_stack16(regs), (BT, 8, 8)), BT, 8, 8, ASM)


@triton.jit
def coset_pairs(w, BT: tl.constexpr, NW: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr, ASM: tl.constexpr,
                FLAG: tl.constexpr = 14):
    """Low-plane words [BT, NW] (before ``restore_parity``; or words 0-7 of the "fields" layout, FLAG = 15: the
    coset flag's bit in each 16-bit half) -> fp16 subnormals e·2^-24 [BT, NG], one per lattice group,
    with e = 2c − (2^(BITS+1) − 1) = 4·(c/2 + OFF) for the group's coset flag c and the codebook offset
    OFF = ¼ − 2^(BITS−1): the part of v that is constant across the group. Pair order with one register per word
    (the two groups of a word are a pair); with NG > 2·NW the pairs past 2·NW are zero. (|e| = M xor 2c for
    M = 2^(BITS+1) − 1; the sign bit is set.)"""
    M: tl.constexpr = (1 << (BITS + 1)) - 1
    SIGNED_M: tl.constexpr = (0x8000 | M) * 0x10001 - (1 << 32)  # both halves, as an int32 literal
    z = ((w >> (FLAG - 1)) & 0x00020002) ^ SIGNED_M
    if NG > 2 * NW:
        z = tl.join(z, tl.zeros_like(z))
    else:
        z = tl.expand_dims(z, 2)
    return _deal(z, BT, NW, NG // (2 * NW), ASM)


@triton.jit
def coset_plane_pairs(w, BT: tl.constexpr, NW: tl.constexpr, ASM: tl.constexpr):
    """Low-plane words [BT, NW] (before ``restore_parity``) -> fp16 subnormals [BT, NW·16] holding 2·lo + c: each
    2-bit index field doubled, plus its group's coset flag c. Same pair order and powers of two as
    ``plane_pairs(restore_parity(w), FBITS=2)``, so with u = 2·lo + c a value is v = u/2 + 4·hi + OFF and needs no
    separate product for the coset constants: the flag (bit 14 of a half, one group of 8) is spread to bit 2k, below
    field k shifted up by one, and each register is one mask-or."""
    c = (w >> 14) & 0x00010001  # each half's coset flag at its bit 0
    r = restore_parity(w)
    x = tl.join(r << 1, r >> 7)  # byte 0 (1) of each half: field k at bits 2k+1, 2k+2
    c = tl.join(c, c)
    z = tl.join(tl.join((x & 0x00060006) | c, (x & 0x00600060) | (c << 4)),
                tl.join((x & 0x00180018) | (c << 2), (x & 0x01800180) | (c << 6)))
    return _deal(tl.reshape(z, (BT, NW, 8)), BT, NW, 8, ASM)


@triton.jit
def restore_parity(w):
    """Low-plane words: put each group's implied index bit back in bit 14 (resp. 30), where the coset flag is stored.
    The bit is the parity of the low bits of the group's first seven indices (bits 0, 2, ..., 12 of the half)."""
    y = (w << 2) ^ (w << 4) ^ (w << 6)  # bit 14: b12 ^ b10 ^ b8
    z = y ^ (y << 6) ^ (w << 14)        # bit 14: ... ^ b6 ^ b4 ^ b2 ^ b0 (and likewise bit 30 for the high half)
    return (w & -0x40004001) | (z & 0x40004000)  # -0x40004001 == ~0x40004000
