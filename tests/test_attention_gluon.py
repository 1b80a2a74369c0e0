"""The Gluon keys and values passes (nqkernels/attention/gluon.py, GPU only).

On CPU: (1) its fragment maps, by a pure-torch emulation of the kernel's registers and of the mma.sync m16n8k16
fragment layout against the reference lattice values; (2) the kernel compiled for sm_90 (GluonASTSource, no GPU):
no local memory, no shared memory in the loop, and (where nvdisasm runs) the expected number of HMMA per 16-token
unit. On a CUDA GPU of capability >= 9: the logits workspace and split maxima against the portable
``_attn_keys_kernel``, and the whole two-pass attention against the torch reference."""
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import triton

from nqkernels import store
from nqkernels import KVCodec, PagedKVCache, decode_attention
from nqkernels import reference as R
from nqkernels.config import code_layout
from nqkernels.attention.launcher import _decode_matrix
from nqkernels.runtime import rotation

try:
    from nqkernels.attention import gluon as G
except Exception:  # noqa: BLE001 - a triton without the Gluon API
    G = None

needs_gluon = pytest.mark.skipif(G is None, reason="no Gluon API in this triton")


# ------------------------------------------------------------------------------------------- CPU: fragment maps

def _u32(x):
    return x & 0xFFFFFFFF


def _regs2(w):  # attention_gluon._regs2 on unsigned words (int64)
    x = w >> 8
    return [w & (0x00030003 << 2 * j) for j in range(4)] + [x & (0x00030003 << 2 * j) for j in range(4)]


def _regs1(w, n):
    x = w >> 8
    return ([w & (0x00010001 << j) for j in range(8)] + [x & (0x00010001 << j) for j in range(8)])[:n]


def _parity_fold(w0, w1):
    f = (w0 & 0x15551555) | ((w1 & 0x15551555) << 1)
    f = _u32(f ^ (f << 8))
    f = _u32(f ^ (f << 4))
    return _u32(f ^ (f << 2))


def _with_parity(w, f):
    return (w & 0xBFFFBFFF) | (f & 0x40004000)


def _thread_regs(words, c, d, bits):
    """attention_gluon._token_words + _token_regs for thread column c: registers [tokens, NREG] (unsigned), and the
    constant registers of ``_coset_const`` [NREG] (-(2^(b+1) - 1)·2^-24 per half on the real coset registers)."""
    lw = d // 64
    lo = [words[:, c * lw + i] for i in range(lw)]
    cs, lr = [], []
    for i in range(0, lw, 2):
        w0, w1 = lo[i], lo[i + 1] if i + 1 < lw else torch.zeros_like(lo[i])
        f = _parity_fold(w0, w1)
        cs += [(w >> 13) & 0x00020002 for w in lo[i:i + 2]]
        lr += _regs2(_with_parity(w0, f)) + (_regs2(_with_parity(w1, f >> 1)) if i + 1 < lw else [])
    cs += [torch.zeros_like(lo[0])] * max(0, 2 - lw)
    hr = []
    if bits == 3:
        if d >= 128:
            hr = [r for i in range(d // 128) for r in _regs1(words[:, d // 16 + c * (d // 128) + i], 16)]
        else:
            hr = _regs1(words[:, d // 16 + c // 2] >> (8 * (c % 2)), 8)
    elif bits == 4:
        hr = [r for i in range(lw) for r in _regs2(words[:, d // 16 + c * lw + i])]
    regs = torch.stack(cs + lr + hr, dim=1)
    m = (1 << (bits + 1)) - 1
    const = torch.zeros(regs.shape[1], dtype=torch.long)
    const[:lw] = (0x8000 | m) * 0x10001
    return regs, const


def _halves(regs):
    """Registers (unsigned 32-bit in int64) -> their two fp16 halves as float64 [..., 2]."""
    lo = (regs & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.float16)
    hi = ((regs >> 16) & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.float16)
    return torch.stack((lo, hi), dim=-1).double()


def _prep_operand(q, d, bits, block_m=16):
    """``_query_prep_kernel``'s q_t [KQ, block_m] for one program, in float64 (no fp16 rounding)."""
    dp = R.next_pow2(d)
    pk = _decode_matrix(d, bits, "cpu").double()
    kq = pk.shape[0]
    ng = max(16, dp // 8)
    kappa = torch.arange(kq)

    def inv(k, fb):
        return 2.0 ** -(fb * ((k >> 1) // min(4, dp * fb // 32) % (8 // fb))).double()

    scale = torch.where(kappa < ng + dp, inv(kappa - ng, 2), inv(kappa - ng - dp, 1 if bits == 3 else 2))
    scale = torch.where(kappa < ng, 1.0, scale)
    qp = torch.zeros(q.shape[0], dp, dtype=torch.float64)
    qp[:, :d] = q.double()
    qb = (qp @ pk.T) / math.sqrt(R.transform_norm(d)) * scale
    qt = torch.zeros(kq, block_m, dtype=torch.float64)
    qt[:, :q.shape[0]] = qb.T
    return qt


@needs_gluon
@pytest.mark.parametrize("d", (64, 128, 256))
@pytest.mark.parametrize("bits", (2, 3, 4))
def test_fragment_maps_match_reference(d, bits):
    """Emulate one 16-token unit: A fragments from the kernel's masks (lane 4g + c: tokens g, g + 8; a0..a3 =
    registers 2t, 2t + 1 of each token), B fragments from the prep operand through ``fragment_index``, and the
    m16n8k16 contraction (A column 2c + h (+8) meets B row 2c + h (+8) of the lane with the same c). Times 2^24 the
    logits must be q̃ · v for the reference lattice values v (q̃ = R q / √n), to float64 rounding."""
    torch.manual_seed(d + bits)
    idx = R.e8_nearest(torch.randn(16, d) * (1 << bits) / 2.5, bits)
    words = _u32(R.pack_codes(idx, bits).long())
    q = torch.randn(8, d)
    qt = _prep_operand(q, d, bits)
    qf = qt.flatten()[G.fragment_index(d, bits, 16, "cpu").long()].view(-1, 32, 2)  # [NREG, lane, half]
    assert qf.shape[0] == G.num_regs(d, bits)
    got = torch.zeros(16, 8, dtype=torch.float64)
    for c in range(4):
        regs, const = _thread_regs(words, c, d, bits)
        b = qf[:, c::4]  # lanes 4g' + c: [NREG, g', 2]
        got += torch.einsum("trh,rgh->tg", _halves(regs), b) + torch.einsum("rh,rgh->g", _halves(const), b)
    values = R.e8_values(idx, bits).double()
    want = values @ rotation(d, "cpu")[:d].double() @ torch.nn.functional.pad(q.double(), (0, R.next_pow2(d) - d)).T
    want /= math.sqrt(R.transform_norm(d))
    torch.testing.assert_close(got * 2.0 ** 24, want, rtol=1e-12, atol=1e-9)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@needs_gluon
@pytest.mark.parametrize("bits", (2, 3, 4))
def test_query_in_pass_matches_prep_operand(bits):
    """``_query_in_pass`` (the fused pass's own query operand at head_dim 128), emulated in float64 as the kernel
    computes it: thread (g, c) loads q'_32c+i = q_σ(32c+i) of row g, transforms over i in registers and over c across
    lanes (Sylvester, natural order), and forms its coset and low-plane registers. They must equal the prep's operand
    gathered through ``fragment_index`` (registers 0-17; the high plane's are unused at head_dim 128)."""
    torch.manual_seed(bits)
    d = 128
    q = torch.randn(8, d, dtype=torch.float64)
    qf = _prep_operand(q, d, bits).flatten()[G.fragment_index(d, bits, 16, "cpu").long()].view(-1, 32, 2)
    inv = 1.0 / math.sqrt(R.transform_norm(d))
    sigma = [(i & ~30) | (((i >> 3) & 3) << 1) | (((i >> 1) & 3) << 3) for i in range(32)]
    got = torch.zeros(18, 32, 2, dtype=torch.float64)
    for g in range(8):
        y = torch.stack([q[g, 32 * c + torch.tensor(sigma)] for c in range(4)])  # [c, i]
        y = _sylvester(4) @ (y @ _sylvester(32))  # registers (i), then lanes (c)
        for c in range(4):
            lane = 4 * g + c
            for r in range(2):
                got[r, lane] = torch.stack([y[c, 16 * r:16 * r + 8].sum(), y[c, 16 * r + 8:16 * r + 16].sum()]) \
                    * 0.25 * inv
            for k in range(16):
                i0 = 16 * (k // 8) + k % 8
                got[2 + k, lane] = torch.stack([y[c, i0], y[c, i0 + 8]]) * inv / 4 ** (k % 4)
    assert G.supports_query_in_pass(d, bits, code_layout("key", bits, d))
    torch.testing.assert_close(got, qf[:18], rtol=1e-12, atol=1e-12)


def _nibble_pair(w0, w1):  # attention_gluon._nibble_pair on unsigned words (int64)
    f = (w0 ^ w1) & 0x11111111
    f = f ^ (f >> 8)
    f = f ^ (f >> 4)
    return w1 ^ ((f << 12) & 0x10001000), (w1 >> 11) & 0x00020002


def _nibbles(w):
    x = w >> 8
    return [w & 0x000F000F, w & 0x00F000F0, x & 0x000F000F, x & 0x00F000F0]


def _fields_scale(qf, bits):
    """``_fields_query``: the low-plane rows j of the B registers times 4^(j % 4) / 2^pos_j (float64)."""
    qf = qf.clone()
    for j in range(16):
        pos = 4 * (j % 2) if bits == 4 else (0 if j == 15 else 3 * (j % 5) % 9)
        qf[2 + j] *= 2.0 ** (2 * (j % 4) - pos)
    return qf


@needs_gluon
def test_nibble_key_fragments_match_reference():
    """The fused pass's 4-bit keys in the "fields" layout (``_word_offsets``, ``_nibble_regs``, ``_fields_query``),
    emulated as ``test_fragment_maps_match_reference`` does the planes: thread column c's words 4c .. 4c + 3, each
    group's eighth index made whole, one mask per register, the query scaled instead; no high-plane registers."""
    torch.manual_seed(4)
    d, bits = 128, 4
    idx = R.e8_nearest(torch.randn(16, d) * (1 << bits) / 2.5, bits)
    words = _u32(R.pack_codes(idx, bits, "fields").long())
    q = torch.randn(8, d)
    qf = _fields_scale(_prep_operand(q, d, bits).flatten()[G.fragment_index(d, bits, 16, "cpu").long()]
                       .view(-1, 32, 2), bits)
    got = torch.zeros(16, 8, dtype=torch.float64)
    m = (1 << (bits + 1)) - 1
    for c in range(4):
        w = [words[:, 4 * c + i] for i in range(4)]
        w1, c0 = _nibble_pair(w[0], w[1])
        w3, c1 = _nibble_pair(w[2], w[3])
        regs = torch.stack([c0, c1] + _nibbles(w[0]) + _nibbles(w1) + _nibbles(w[2]) + _nibbles(w3)
                           + [torch.zeros_like(c0)] * 16, dim=1)  # the high-plane B rows meet nothing
        const = torch.zeros(regs.shape[1], dtype=torch.long)
        const[:2] = (0x8000 | m) * 0x10001
        b = qf[:, c::4]
        got += torch.einsum("trh,rgh->tg", _halves(regs), b) + torch.einsum("rh,rgh->g", _halves(const), b)
    values = R.e8_values(idx, bits).double()
    want = values @ rotation(d, "cpu")[:d].double() @ q.double().T / math.sqrt(R.transform_norm(d))
    torch.testing.assert_close(got * 2.0 ** 24, want, rtol=1e-12, atol=1e-9)


@needs_gluon
def test_nibble_value_fragments_match_reference():
    """4-bit values in the "fields" layout (``_value_spans``, ``_nibble_value_products``, ``_store_values_partial``),
    emulated as ``test_value_fragment_maps_match_reference`` does the planes: lane 4g + c's pair words of nibble
    words 2g, 2g + 1, register r = coordinate r of its span times 16^(r % 2), one accumulator chain."""
    torch.manual_seed(5)
    d, bits = 128, 4
    idx = R.e8_nearest(torch.randn(16, d) * (1 << bits) / 2.5, bits)
    words = _u32(R.pack_codes(idx, bits, "fields").long())
    w = torch.rand(16, 8, dtype=torch.float64)
    ct = d // 8
    got = torch.zeros(d, 8, dtype=torch.float64)

    def field(reg, h):
        return float((reg >> 16 * h) & 0xFFFF)

    for g in range(8):
        acc = torch.zeros(ct, 8, dtype=torch.float64)
        acc_c = torch.zeros(2, 8, dtype=torch.float64)
        for c in range(4):
            for base in (2 * c, 2 * c + 8):
                ta, tb = base, base + 1
                lo = [_prmt(int(words[ta, 2 * g]), int(words[tb, 2 * g]), s) for s in (0x5410, 0x7632)]
                hi = [_prmt(int(words[ta, 2 * g + 1]), int(words[tb, 2 * g + 1]), s) for s in (0x5410, 0x7632)]
                regs, cos = [], []
                for i in range(2):
                    w1, f = _nibble_pair(lo[i], hi[i])
                    regs += _nibbles(lo[i]) + _nibbles(w1)
                    cos.append(f)
                for h in range(2):
                    for r in range(ct):
                        acc[r] += field(regs[r], h) * w[base + h]
                    for i, x in enumerate(cos):
                        acc_c[i] += field(x, h) * w[base + h]
        ls = w.sum(0)
        for r in range(ct):
            got[g * ct + r] = acc[r] / 16 ** (r % 2) + acc_c[r // 8] * 0.25 + ls * (0.25 - (1 << (bits - 1)))
    torch.testing.assert_close(got, R.e8_values(idx, bits).double().T @ w, rtol=1e-12, atol=1e-9)


def _prmt(a, b, sel):
    """prmt.b32 (default mode) on unsigned 32-bit ints."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    return sum(src[(sel >> 4 * i) & 7] << 8 * i for i in range(4))


def _value_thread(words, g, c, d, bits):
    """attention_gluon's values pass for lane 4g + c of one 16-token unit (words: [16, W] unsigned): per plane its
    A registers for token pairs (2c, 2c + 1) and (2c + 8, 2c + 9), and the low plane's coset registers."""
    def plane(first, fbits, low):
        tb = d // 8 * fbits  # the thread's bits per token
        nwt = max(1, tb // 32)
        w0 = first + (g * tb // 32 if tb >= 32 else (g >> 1 if tb == 16 else g >> 2))
        sel = 0x5410 + (g & 1) * 0x2222 if tb == 16 else (g & 3) * 0x1111 + 0x4400
        pairs = []
        for ta, tb_ in ((2 * c, 2 * c + 1), (2 * c + 8, 2 * c + 9)):
            wa = [int(words[ta, w0 + i]) for i in range(nwt)]
            wb = [int(words[tb_, w0 + i]) for i in range(nwt)]
            if tb >= 32:
                pairs.append([p for i in range(nwt) for p in (_prmt(wa[i], wb[i], 0x5410), _prmt(wa[i], wb[i], 0x7632))])
            else:
                pairs.append([_prmt(wa[0], wb[0], sel)])
        regs, cos = [], []
        for k, pw in enumerate(pairs):
            if low:
                cos.append([(p >> 13) & 0x00020002 for p in pw])
                r = []
                if len(pw) == 1:  # head_dim 64: folded with the other pair's word
                    f = _parity_fold(pairs[0][0], pairs[1][0])
                    r = _regs2(_with_parity(pw[0], f >> k))
                for i in range(0, len(pw) - 1, 2):
                    f = _parity_fold(pw[i], pw[i + 1])
                    r += _regs2(_with_parity(pw[i], f)) + _regs2(_with_parity(pw[i + 1], f >> 1))
                regs.append(r)
            else:
                regs.append([x for p in pw for x in (_regs2(p) if fbits == 2 else _regs1(p, min(16, tb)))])
        return regs, cos

    lo, cos = plane(0, 2, True)
    hi = plane(d // 16, bits - 2, False)[0] if bits > 2 else None
    return lo, hi, cos


@needs_gluon
@pytest.mark.parametrize("d", (64, 128, 256))
@pytest.mark.parametrize("bits", (2, 3, 4))
def test_value_fragment_maps_match_reference(d, bits):
    """Emulate one 16-token unit of the values pass: each lane's A registers (pair words, parity, masks), the
    m16n8k16 contraction (row g of tile t: the thread's coordinate 2t, row g + 8: 2t + 1; A column 2c + h (+8) is
    token 2c + h (+8), B's row of the same token), and the epilogue's weights. Must give Σ_t w[t, n]·v[t, j] for the
    reference lattice values v, to float64 rounding."""
    torch.manual_seed(10 * d + bits)
    idx = R.e8_nearest(torch.randn(16, d) * (1 << bits) / 2.5, bits)
    words = _u32(R.pack_codes(idx, bits).long())
    w = torch.rand(16, 8, dtype=torch.float64)  # p·s per (token, row)
    ct = d // 8
    got = torch.zeros(d, 8, dtype=torch.float64)

    def field(reg, h):
        return float((reg >> 16 * h) & 0xFFFF)  # the fp16 subnormal's value, in units of 2^-24

    for g in range(8):
        acc_lo = torch.zeros(ct, 8, dtype=torch.float64)
        acc_hi = torch.zeros(ct, 8, dtype=torch.float64)
        acc_c = torch.zeros(max(2, d // 64), 8, dtype=torch.float64)
        for c in range(4):
            lo, hi, cos = _value_thread(words, g, c, d, bits)
            for k, base in ((0, 2 * c), (1, 2 * c + 8)):  # token pairs
                for h in range(2):
                    for r in range(ct):
                        acc_lo[r] += field(lo[k][r], h) * w[base + h]
                        if hi is not None:
                            acc_hi[r] += field(hi[k][r], h) * w[base + h]
                    for i, x in enumerate(cos[k]):
                        acc_c[i] += field(x, h) * w[base + h]
        ls = w.sum(0)
        for r in range(ct):  # the kernel's epilogue, in units of 2^-24 already
            y = acc_lo[r] / 4 ** (r % 4)
            if bits == 3:
                y = y + acc_hi[r] * 4.0 / 2 ** (r % 8)
            elif bits == 4:
                y = y + acc_hi[r] * 4.0 / 4 ** (r % 4)
            y = y + acc_c[r // 8] * 0.25 + ls * (0.25 - (1 << (bits - 1)))
            got[g * ct + r] = y
    want = R.e8_values(idx, bits).double().T @ w  # [coordinate (storage order), row]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    # the epilogue's rotation: Sylvester H over g·CT + r (H_8 across lanes ⊗ H_CT in registers), element j of H y
    # stored at σ(j), times 1/√D; against Rᵀ y / √n
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    j = torch.arange(d)
    sigma = (j & ~30) | (((j >> 3) & 3) << 1) | (((j >> 1) & 3) << 3)
    x = torch.empty_like(got)
    x[sigma] = h @ got / math.sqrt(d)
    x_ref = (got.T @ rotation(d, "cpu").double()).T / math.sqrt(R.transform_norm(d))
    torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-9)


# -------------------------------------------------------------------------------- CPU: compiled for sm_90

# Compiled in a process without TRITON_INTERPRET (as test_attention.test_pdl_paths_compile_for_hopper): each variant's
# resource usage, and the SASS of its page loop (the largest backward branch's body).
_COMPILE = r"""
import inspect, json, os, re, subprocess, sys, tempfile
import triton
from nqkernels.config import code_layout
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from nqkernels.attention import gluon as G
from autotune.sass import loop_bodies, loop_body, tool

out = []
for v in json.loads(sys.argv[1]):
    if v.get("fused"):
        kb, vb = v["bits"]
        consts = G.fused_constants(head_dim=v["d"], key_bits=kb, value_bits=vb, page_size=v.get("page", 64),
                                   q_len=v.get("q_len", 1), group=v.get("group", 4), block_m=16, rs=v.get("rs", 4),
                                   num_warps=v["nw"], softcap=v.get("softcap", False), window=v.get("window", False),
                                   off64=v.get("off64", False), vec_k=v.get("vec", True), vec_v=v.get("vec", True),
                                   l2_prefetch=v.get("l2", 0), query_in_pass=v.get("qin", False),
                                   center_keys=v.get("center", False))
        ptrs = dict(kc_ptr="*i32", ks_ptr=v.get("scale", "*fp16"), vc_ptr="*i32", vs_ptr=v.get("scale", "*fp16"),
                    bt_ptr="*i32", lens_ptr="*i32", qt_ptr="*fp16", fidx_ptr="*i32", qm_ptr="*fp32", m_ptr="*fp32",
                    l_ptr="*fp32", acc_ptr="*fp32", q_ptr=v.get("scale", "*fp16"), kmean_ptr="*fp32",
                    sm_scale="fp32", softcap="fp32")
        fn = G._gluon_fused_kernel
    elif v.get("values"):
        consts = dict(ROWS=v.get("rs", 4), D=v["d"], VBITS=v["bits"], PAGE=v.get("page", 64), BLOCK_M=16,
                      RS=v.get("rs", 4), NW=v["nw"], W=v["d"] * v["bits"] // 32, OFF64=v.get("off64", False),
                      VEC=v.get("vec", True), L2PF=v.get("l2", 0), OUT_SCALE=v["d"] ** -0.5,
                      LOG2CT=(v["d"] // 8).bit_length() - 1,
                      VFIELDS=code_layout("value", v["bits"], v["d"]) == "fields")
        ptrs = dict(vc_ptr="*i32", vs_ptr=v.get("scale", "*fp16"), bt_ptr="*i32", lens_ptr="*i32", lg_ptr="*fp32",
                    m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32")
        fn = G._gluon_values_kernel
    else:
        consts = dict(Q_LEN=v.get("q_len", 1), GROUP=v.get("group", 4), D=v["d"], KBITS=v["bits"],
                      PAGE=v.get("page", 64), SOFTCAP=v.get("softcap", False), WINDOW=v.get("window", False),
                      BLOCK_M=16, RS=v.get("rs", 4), CAUSAL_PAGES=v.get("q_len", 1) > 1, NW=v["nw"],
                      W=v["d"] * v["bits"] // 32, KQ=max(16, v["d"] // 8) + v["d"] * (2 if v["bits"] > 2 else 1),
                      OFF64=v.get("off64", False), VEC=v.get("vec", True), PF=v.get("pf", 1), L2PF=v.get("l2", 0))
        ptrs = dict(kc_ptr="*i32", ks_ptr=v.get("scale", "*fp16"), bt_ptr="*i32", lens_ptr="*i32", qt_ptr="*fp16",
                    fidx_ptr="*i32", qm_ptr="*fp32", lg_ptr="*fp32", m_ptr="*fp32", sm_scale="fp32", softcap="fp32")
        fn = G._gluon_keys_kernel
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in inspect.signature(fn.fn).parameters}
    k = triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=v["nw"]))
    ptx = k.asm["ptx"]
    try:  # registers per thread: known once the kernel is loaded (a GPU)
        k._init_handles()
    except Exception:
        pass
    row = dict(v, local_ptx=len(re.findall(r"\b(ld|st)\.local", ptx)), n_regs=getattr(k, "n_regs", None),
               shared=k.metadata.shared, sass=None)
    if os.path.exists(tool("nvdisasm")):
        with tempfile.TemporaryDirectory() as d:
            open(f"{d}/k.cubin", "wb").write(k.asm["cubin"])
            sass = subprocess.run([tool("nvdisasm"), "-c", f"{d}/k.cubin"], capture_output=True, text=True)
            if sass.returncode == 0:
                def stats(body):
                    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body]
                    return dict(loop=len(body), hmma=ops.count("HMMA"),
                                loop_shared=sum(ops.count(o) for o in ("LDS", "STS", "BAR", "LDSM")),
                                ops={o: ops.count(o) for o in sorted(set(ops))})
                # the largest loop, and every loop in address order (the fused pass: unmasked pages, then the last)
                row["sass"] = dict(stats(loop_body(sass.stdout)), loops=[stats(b) for b in loop_bodies(sass.stdout)],
                                   local=len(re.findall(r"\b(LDL|STL)\b", sass.stdout)))
    out.append(row)
print(json.dumps(out))
"""

VARIANTS = [dict(d=128, bits=3, nw=4), dict(d=128, bits=3, nw=1, l2=2), dict(d=128, bits=3, nw=2, page=32, pf=2, l2=1),
            dict(d=128, bits=2, nw=4, vec=False), dict(d=128, bits=4, nw=4, scale="*bf16"),
            dict(d=64, bits=3, nw=4, rs=8, group=8),
            dict(d=256, bits=3, nw=4, rs=1, group=1, pf=2),
            dict(d=128, bits=3, nw=4, softcap=True, window=True, q_len=2, group=4, rs=8, off64=True)]


def compile_variants(variants=VARIANTS) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    run = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(variants)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


VALUE_VARIANTS = [dict(values=True, d=128, bits=2, nw=2, l2=2), dict(values=True, d=128, bits=3, nw=1),
                  dict(values=True, d=128, bits=4, nw=4, scale="*bf16", off64=True), dict(values=True, d=128, bits=4,
                                                                                          nw=2, l2=2),
                  dict(values=True, d=64, bits=2, nw=2, rs=8, vec=False), dict(values=True, d=64, bits=3, nw=4),
                  dict(values=True, d=256, bits=2, nw=2, rs=1, page=32), dict(values=True, d=256, bits=3, nw=2, l2=1)]


def value_hmma_per_unit(d: int, bits: int) -> int:
    """m16n8k16 products per 16-token unit of the values pass: one per 16 coordinates and plane (one plane in the
    "fields" layout), and the coset flags' (one per 16 groups, at least one)."""
    planes = 2 if bits > 2 and code_layout("value", bits, d) == "planes" else 1
    return d // 16 * planes + max(1, d // 128)


@needs_gluon
def test_values_kernel_compiles_for_hopper():
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend")
    for r in compile_variants(VALUE_VARIANTS):
        assert r["local_ptx"] == 0, r  # no spills
        s = r["sass"]
        if s is None:
            continue
        assert s["local"] == 0 and s["loop_shared"] == 0, r
        units = r.get("page", 64) // 16 // r["nw"]
        assert s["hmma"] == units * value_hmma_per_unit(r["d"], r["bits"]), r
        if r["d"] == 128 and r["bits"] == 2:  # the budget: ~160 instructions per 16-token unit, ~180 with the
            assert s["loop"] <= 190 * units, s  # L2 prefetch (triton 3.9)


FUSED_VARIANTS = [dict(fused=True, d=128, bits=(3, 2), nw=2, l2=2), dict(fused=True, d=128, bits=(2, 2), nw=1),
                  dict(fused=True, d=64, bits=(2, 2), nw=2, rs=8, group=8, vec=False),
                  dict(fused=True, d=256, bits=(3, 2), nw=4, scale="*bf16", off64=True, l2=1),
                  dict(fused=True, d=128, bits=(3, 3), nw=2, page=32, softcap=True, window=True, q_len=2, group=4,
                       rs=8),
                  dict(fused=True, d=128, bits=(4, 4), nw=2, l2=2), dict(fused=True, d=128, bits=(4, 2), nw=2),
                  dict(fused=True, d=128, bits=(2, 4), nw=2, q_len=2, group=4, rs=8, window=True),
                  # the query operand made in the pass (head_dim 128: no prep kernel)
                  dict(fused=True, d=128, bits=(3, 2), nw=2, l2=2, qin=True, center=True),
                  dict(fused=True, d=128, bits=(2, 2), nw=1, qin=True, scale="*bf16"),
                  dict(fused=True, d=128, bits=(4, 4), nw=2, q_len=2, group=4, rs=8, qin=True, center=True)]
# (K2V4 with one warp, q_len 2 and a window spills 23 words with triton 3.9, none with 3.6: 2 warps here.)


@needs_gluon
def test_fused_kernel_compiles_for_hopper():
    """The fused pass: no spills, no shared memory in the loop, the keys' and the values' products per unit."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend")
    for r in compile_variants(FUSED_VARIANTS):
        assert r["local_ptx"] == 0, r
        if r["nw"] == 1:
            assert r["shared"] == 0, r  # one warp: nothing to merge across warps
        s = r["sass"]
        if s is None:
            continue
        assert s["local"] == 0, r
        kb, vb = r["bits"]
        units = r.get("page", 64) // 16 // r["nw"]
        # keys in the "fields" layout (3-4 bits, head_dim 128): one product chain, as 2-bit keys
        kh = G.hmma_per_unit(r["d"], 2 if code_layout("key", kb, r["d"]) == "fields" else kb)
        # Two page loops with 2+ warps (the pages before the end unmasked, then the split's last page), one with 1.
        assert len(s["loops"]) == (2 if r["nw"] > 1 else 1), s["loops"]
        for lp in s["loops"]:
            assert lp["loop_shared"] == 0, r
            assert lp["hmma"] == units * (kh + value_hmma_per_unit(r["d"], vb)), r
            assert lp["ops"].get("MOVM", 0) == 2 * units, r  # one transpose per 8 tokens
        if r["d"] == 128 and r["bits"] == [3, 2]:  # fields keys: 266.5 per unit (triton 3.6 and 3.9; planes: 333)
            assert s["loops"][0]["loop"] <= 280 * units, s["loops"][0]["loop"]  # the unmasked loop
        if r["d"] == 128 and r["bits"] == [4, 4]:  # 4-bit fields: 302.5-304 per unit (planes: 404.5-407)
            assert s["loops"][0]["loop"] <= 320 * units, s["loops"][0]["loop"]


@needs_gluon
@pytest.mark.parametrize("d,bits,q_len,qin", [(128, (3, 2), 1, False), (64, (2, 2), 2, False), (256, (4, 2), 1, False),
                                            (128, (4, 4), 1, False), (128, (3, 2), 1, True), (128, (2, 2), 2, True)])
def test_fused_pass_launch_arguments(d, bits, q_len, qin):
    """``fused_pass``'s launch, captured on the CPU instead of run: the kernel's every parameter is given, its
    constexprs as ``fused_constants`` computes them from the cache and the prep's operand (``qin``: none, the pass
    makes it from q)."""
    import inspect
    codec = KVCodec(head_dim=d, key_bits=bits[0], value_bits=bits[1])
    cache = PagedKVCache(codec, num_kv_heads=2, max_batch=2, num_pages=4, device="cpu")
    kq = max(16, d // 8) + d * (2 if bits[0] > 2 else 1)
    progs, splits = 2 * 2, 3
    q_t = torch.zeros(progs, 1, kq, 16, dtype=torch.float16)
    m_part = torch.zeros(progs, splits + 2, 16)  # the splits, then two uncompressed parts
    seen = {}

    def launch(kernel, grid, *args, **kw):
        seen.update(kernel=kernel, grid=grid, args=args, kw=kw)

    q = torch.zeros(2, q_len, 8, d, dtype=torch.float16)
    G.fused_pass(cache, q, None if qin else q_t, None if qin else m_part[:, 0], m_part, m_part,
                 m_part[..., None].expand(-1, -1, -1, d), q_len=q_len,
                 group=4, block_m=16, rs=4 * q_len, num_splits=splits, pages_per_split=2, scale=d ** -0.5,
                 softcap=None, window=7, num_warps=2, l2_prefetch=2, launch=launch)
    params = list(inspect.signature(G._gluon_fused_kernel.fn).parameters)
    consts = {n for n, p in inspect.signature(G._gluon_fused_kernel.fn).parameters.items()
              if "constexpr" in str(p.annotation)}
    assert seen["grid"] == (progs, splits)
    assert len(seen["args"]) + len(consts) == len(params) and consts <= set(seen["kw"]), sorted(consts - set(seen["kw"]))
    assert seen["args"][params.index("n_parts")] == splits + 2  # the partials' stride per program
    kw = seen["kw"]
    assert (kw["D"], kw["KBITS"], kw["VBITS"], kw["Q_LEN"], kw["ROWS"], kw["WINDOW"], kw["SOFTCAP"]) == \
        (d, bits[0], bits[1], q_len, 4 * q_len, True, False)
    assert kw["NW"] == kw["num_warps"] == G.fused_warps(2, d, bits[0], codec.page_size)
    assert (kw["KFIELDS"], kw["WK"]) == (codec.layout("key") == "fields", cache.k_codes.shape[-1])
    assert (kw["VFIELDS"], kw["WV"]) == (codec.layout("value") == "fields", cache.v_codes.shape[-1])
    assert (kw["QIN"], kw["CENTER_K"]) == (qin, qin and codec.center_keys)
    if not G.supports_query_in_pass(d, bits[0], codec.layout("key")):  # the prep's operand is needed there
        with pytest.raises(ValueError, match="q_t is needed"):
            G.fused_pass(cache, q, None, None, m_part, m_part, m_part[..., None].expand(-1, -1, -1, d),
                         q_len=q_len, group=4, block_m=16, rs=4 * q_len, num_splits=splits, pages_per_split=2,
                         scale=d ** -0.5, softcap=None, window=7, num_warps=2, l2_prefetch=2, launch=launch)


@needs_gluon
def test_keys_kernel_compiles_for_hopper():
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend")
    rows = compile_variants()
    for r in rows:
        assert r["local_ptx"] == 0, r  # no spills
        if r["nw"] == 1:
            assert r["shared"] == 0, r  # one warp: no cross-warp max, so no shared memory at all
        s = r["sass"]
        if s is None:
            continue  # no nvdisasm: PTX-level checks only
        assert s["local"] == 0 and s["loop_shared"] == 0, r
        units = r.get("page", 64) // 16 // r["nw"]  # units per warp per page (the loop body)
        assert s["hmma"] == units * G.hmma_per_unit(r["d"], r["bits"]), r
    main = rows[0]["sass"]
    if main is not None:  # head_dim 128, K3, 4 warps: 17 HMMA per 16-token unit; the budget of the M1 loop
        assert main["hmma"] == 17 and main["loop"] <= 260, main


# --------------------------------------------------------------------------------------------------------- GPU

def _gpu_ok() -> bool:
    return G is not None and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


needs_gpu = pytest.mark.skipif(not _gpu_ok(), reason="needs a CUDA GPU of capability >= 9 and Gluon")


class _Spy:
    """Wraps ``attention_gluon.keys_pass``: runs the portable ``_attn_keys_kernel`` into NaN-filled copies of the
    workspace, then the Gluon pass into the real (NaN-filled) ones, and records both (the Gluon results go on to the
    values pass)."""

    def __init__(self):
        self.calls = []
        self.real = G.keys_pass

    def __call__(self, cache, q_t, q_mean, logits, m_part, **kw):
        from nqkernels.attention import kernels as A
        from nqkernels.attention.launcher import _join_runs

        codec = cache.codec
        D, kb = codec.head_dim, codec.key_bits
        DP = R.next_pow2(D)
        NG = max(16, DP // 8)
        logits.fill_(float("nan"))
        m_part.fill_(float("nan"))
        lg_ref, m_ref = logits.clone(), m_part.clone()
        A._attn_keys_kernel[(q_t.shape[0], kw["num_splits"])](
            cache.k_codes, cache.k_scales, cache.block_table, cache.lengths, q_t, q_mean, lg_ref, m_ref,
            cache.num_kv_heads, 1, kw["num_splits"], kw["pages_per_split"], m_ref.shape[1], kw["n_tok"],
            cache.max_batch, kw["scale"],
            float(kw["softcap"] or 1.0), int(kw["window"] or 0), *cache.k_codes.stride()[:3],
            *cache.k_scales.stride()[:2], cache.k_codes.stride(3), cache.block_table.stride(0),
            Q_LEN=kw["q_len"], GROUP=kw["group"], D=D, DP=DP, KBITS=kb, PAGE=codec.page_size, NG=NG,
            KQ=NG + DP * (2 if kb > 2 else 1), SOFTCAP=kw["softcap"] is not None, WINDOW=kw["window"] is not None,
            ASM=True, BLOCK_M=kw["block_m"], RS=kw["rs"], JOIN_K=_join_runs(kb, cache.k_codes), PDL=False,
            CAUSAL_PAGES=kw["q_len"] > 1, KFIELDS=False, num_warps=4)  # (the keys pass reads planes only)
        self.real(cache, q_t, q_mean, logits, m_part, **kw)
        self.calls.append((logits.clone(), lg_ref, m_part.clone(), m_ref))


def _compare_keys(calls):
    assert calls, "the Gluon keys pass did not run"
    for lg, lg_ref, m, m_ref in calls:
        for got, want in ((lg, lg_ref), (m, m_ref)):
            assert torch.equal(torch.isnan(got), torch.isnan(want)), "written elements differ"
            assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "masked elements differ"
            fin = torch.isfinite(want)
            scale = want[fin].abs().max().clamp(min=1.0) if fin.any() else 1.0
            err = (got[fin] - want[fin]).abs().max().item() if fin.any() else 0.0
            assert err <= 1e-5 * scale, f"logits differ by {err} (scale {scale})"


def _gpu_cache(d, bits, kv_heads, lengths, page, sinks, recent, dtype):
    codec = KVCodec(head_dim=d, key_bits=bits[0], value_bits=bits[1], page_size=page)
    pages = sum(n // page + 2 for n in lengths) + 4
    cache = PagedKVCache(codec, num_kv_heads=kv_heads, max_batch=len(lengths), num_pages=pages, sink_tokens=sinks,
                         recent_tokens=recent, dtype=dtype, device="cuda")
    k = (torch.randn(len(lengths), max(lengths), kv_heads, d, device="cuda") + 0.3).to(dtype)
    cache.append(k, torch.randn_like(k), lengths=lengths)
    return cache


CASES = [  # d, bits, group, q_len, lengths, page, sinks, recent, dtype, softcap, window, num_splits
    (128, (3, 2), 4, 1, [1500, 777, 130], 64, 4, None, torch.float16, None, None, None),
    (128, (3, 2), 1, 1, [900, 65], 64, 0, None, torch.float16, None, None, 3),
    (128, (3, 2), 2, 1, [1000, 333, 17], 64, 2, 8, torch.bfloat16, None, None, None),
    (128, (3, 2), 8, 1, [2000, 1, 640], 64, 4, None, torch.float16, None, None, 5),
    (128, (3, 2), 4, 1, [1200, 300], 64, 4, None, torch.float16, 30.0, 500, None),
    (128, (3, 2), 8, 1, [700, 300], 16, 0, None, torch.bfloat16, 20.0, None, 4),
    (128, (3, 2), 4, 2, [800, 129], 32, 4, None, torch.float16, None, 300, None),  # q_len 2 x group 4 = 8 rows
    (128, (3, 2), 4, 1, [3, 700], 64, 4, None, torch.float16, None, None, None),  # empty compressed part (seq 0)
    (128, (2, 2), 4, 1, [1500, 200], 64, 4, None, torch.float16, None, None, None),
    (128, (4, 4), 8, 1, [1100, 500], 64, 4, None, torch.bfloat16, None, 400, None),
    (64, (3, 2), 4, 1, [1300, 90], 64, 4, None, torch.float16, None, None, None),
    (64, (2, 2), 2, 1, [600, 250], 32, 0, None, torch.bfloat16, 30.0, None, None),
    (64, (4, 4), 1, 1, [640, 641], 64, 4, None, torch.float16, None, None, 2),
    (256, (3, 2), 4, 1, [1000, 300], 64, 4, None, torch.float16, None, None, None),
    (256, (2, 2), 8, 1, [500, 70], 16, 4, None, torch.bfloat16, None, 200, None),
    (256, (4, 4), 2, 1, [800, 800], 64, 0, None, torch.float16, 25.0, None, None),
]


@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}_k{c[1][0]}v{c[1][1]}_g{c[2]}_q{c[3]}_p{c[5]}_"
                                                     f"{str(c[8]).split('.')[-1]}_sc{c[9]}_w{c[10]}_s{c[11]}")
def test_gluon_keys_pass_matches_portable_and_reference(case, monkeypatch):
    d, bits, group, q_len, lengths, page, sinks, recent, dtype, softcap, window, splits = case
    torch.manual_seed(0)
    kv_heads = 2
    cache = _gpu_cache(d, bits, kv_heads, lengths, page, sinks, recent, dtype)
    q = torch.randn(len(lengths), q_len, kv_heads * group, d, device="cuda", dtype=dtype)
    spy = _Spy()
    monkeypatch.setattr(G, "keys_pass", spy)
    warps, prefetch, l2 = ((4, 1, 0), (1, 2, 2), (2, 1, 2), (4, 2, 1), (1, 1, 0), (2, 1, 0), (4, 1, 2), (2, 1, 4),
                           (1, 1, 2))[CASES.index(case) % 9]  # launch variants
    with store.override("attention", {"two_pass": True, "gluon_keys": True, "gluon_warps": warps,
                                      "gluon_prefetch": prefetch, "gluon_l2": l2}):
        out = decode_attention(q, cache, softcap=softcap, window=window, num_splits=splits)
    if cache.codec.layout("key") == "fields":  # the keys pass reads bit planes: fields keys take the portable one
        assert not spy.calls
    else:
        _compare_keys(spy.calls)
    with store.override("attention", {"two_pass": True, "gluon_keys": False}):
        portable = decode_attention(q, cache, softcap=softcap, window=window, num_splits=splits)
    ref = R.paged_attention(q, cache, d ** -0.5, softcap, window)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    err = (out.float() - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max error {err} vs the reference"
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    rel_portable = ((portable.float() - ref).norm() / ref.norm()).item()
    assert rel <= rel_portable * 1.05 + 1e-4, (rel, rel_portable)  # within the portable path's error bar


class _Against:
    """A case's cache and queries, the torch reference and the portable two-pass path's error: calling it with a
    launch config checks that config's output within the portable kernel's bar (3e-3 fp16, 2e-2 bf16 of the largest
    output) and within 5% of the portable path's relative error."""

    def __init__(self, case, seed: int):
        d, bits, group, q_len, lengths, page, sinks, recent, dtype, softcap, window, splits = case
        torch.manual_seed(seed)
        kv_heads = 2
        self.cache = _gpu_cache(d, bits, kv_heads, lengths, page, sinks, recent, dtype)
        self.q = torch.randn(len(lengths), q_len, kv_heads * group, d, device="cuda", dtype=dtype)
        self.kw = dict(softcap=softcap, window=window, num_splits=splits)
        self.ref = R.paged_attention(self.q, self.cache, d ** -0.5, softcap, window)
        with store.override("attention", {"two_pass": True, "gluon_keys": False}):
            portable = decode_attention(self.q, self.cache, **self.kw)
        self.rel_portable = ((portable.float() - self.ref).norm() / self.ref.norm()).item()
        self.tol = 2e-2 if dtype == torch.bfloat16 else 3e-3

    def __call__(self, config: dict) -> None:
        with store.override("attention", config):
            out = decode_attention(self.q, self.cache, **self.kw)
        err = (out.float() - self.ref).abs().max().item()
        assert err <= self.tol * max(1.0, self.ref.abs().max().item()), f"max error {err} vs the reference ({config})"
        rel = ((out.float() - self.ref).norm() / self.ref.norm()).item()
        assert rel <= self.rel_portable * 1.05 + 1e-4, (config, rel, self.rel_portable)


@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}_k{c[1][0]}v{c[1][1]}_g{c[2]}_q{c[3]}_p{c[5]}_"
                                                     f"{str(c[8]).split('.')[-1]}_sc{c[9]}_w{c[10]}_s{c[11]}")
def test_gluon_values_pass_matches_reference(case):
    """Both Gluon passes (keys and values; each values split rotates its partial back to the original basis itself)
    against the torch reference, within the portable two-pass path's error bar; the same with the portable keys
    pass."""
    check = _Against(case, seed=1)
    i = CASES.index(case)
    for keys in (True, False):
        warps, l2 = ((2, 2), (1, 0), (4, 2), (2, 0), (1, 2), (4, 0))[(i + keys) % 6]  # launch variants
        check({"two_pass": True, "gluon_keys": keys, "gluon_values": True, "gluon_values_warps": warps,
               "gluon_l2": l2})


@needs_gpu
@pytest.mark.parametrize("config", [{"two_pass": True, "gluon_keys": True, "gluon_values": True},
                                    {"gluon_fused": True}, {"gluon_fused": True, "gluon_query_in_pass": True}],
                         ids=["two_passes", "fused", "fused_query_in_pass"])
def test_gluon_nan_token_and_plan_replay(config):
    """A NaN value token stays in its own sequence (the codec keeps it finite); a second call replays the recorded
    plan (reduce included) to the same output."""
    codec = KVCodec(head_dim=128, key_bits=3, value_bits=2)
    cache = PagedKVCache(codec, num_kv_heads=2, max_batch=2, num_pages=40, device="cuda")
    k = torch.randn(2, 900, 2, 128, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    v[0, 100] = float("nan")
    cache.append(k, v)
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=torch.float16)
    with store.override("attention", config):
        out1 = decode_attention(q, cache)
        out2 = decode_attention(q, cache)
    assert torch.isfinite(out1).all()
    assert torch.equal(out1, out2)
    ref = R.paged_attention(q, cache, 128 ** -0.5, None, None)
    assert (out1.float() - ref).abs().max().item() <= 3e-3 * max(1.0, ref.abs().max().item())


@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}_k{c[1][0]}v{c[1][1]}_g{c[2]}_q{c[3]}_p{c[5]}_"
                                                     f"{str(c[8]).split('.')[-1]}_sc{c[9]}_w{c[10]}_s{c[11]}")
def test_gluon_fused_pass_matches_reference(case):
    """The fused Gluon pass (keys and values in one loop, online softmax) against the torch reference, within the
    portable path's error bar, in two launch variants per case."""
    d, bits, group, q_len, lengths, page = case[:6]
    check = _Against(case, seed=2)
    i = CASES.index(case)
    calls = []
    real = G.fused_pass
    G.fused_pass = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for qin, (warps, l2) in enumerate((((1, 2), (2, 0), (4, 2), (1, 0), (2, 2), (4, 0))[i % 6],
                                           ((4, 1), (1, 1), (2, 1))[i % 3])):  # the second: the query operand made
            check({"gluon_fused": True, "gluon_fused_warps": warps, "gluon_l2": l2,  # in the pass where it can be
                   "gluon_query_in_pass": bool(qin)})
    finally:
        G.fused_pass = real
    covered = G.supports_fused(d, bits[0], bits[1], page, q_len * group) and max(check.cache.compressed_lens()) > 0
    assert len(calls) == (2 if covered else 0)


@needs_gpu
def test_more_than_8_rows_fall_back():
    cache = _gpu_cache(128, (3, 2), 2, [600, 300], 64, 4, None, torch.float16)
    q = torch.randn(2, 3, 8, 128, device="cuda", dtype=torch.float16)  # q_len 3 x group 4 = 12 rows
    calls = []
    real = G.keys_pass
    G.keys_pass = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with store.override("attention", {"two_pass": True, "gluon_keys": True}):
            out = decode_attention(q, cache)
    finally:
        G.keys_pass = real
    assert not calls
    ref = R.paged_attention(q, cache, 128 ** -0.5, None, None)
    assert (out.float() - ref).abs().max().item() <= 3e-3 * max(1.0, ref.abs().max().item())


def test_a_gluon_pass_that_does_not_import_is_said_once(monkeypatch):
    """A config asking for the Gluon keys pass on a triton without its API falls back loudly, once per process."""
    from nqkernels.attention import launcher as A
    monkeypatch.setattr(A, "_GLUON_WARNED", [])
    with pytest.warns(UserWarning, match="does not import with triton"):
        A._warn_gluon_unavailable(ImportError("no gluon"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A._warn_gluon_unavailable(ImportError("no gluon"))  # not again


@needs_gluon
def test_the_launcher_imports_this_module():
    """``launcher._gluon`` (run on CUDA only) imports the Gluon passes through ``_import_gluon``: the same module."""
    from nqkernels.attention import launcher
    assert launcher._import_gluon() is G
