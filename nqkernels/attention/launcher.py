"""Decode attention's host side: launch configs per shape bucket, decode plans (recorded launches replayed per layer),
input checks, the operand tables the kernels take, ``decode_attention`` and the reference path."""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import store

from .. import reference as ref
from ..runtime import (FIXED, AttentionConfig, codec_of, dot_dtype, launch_config, max_programs, rope_tables, rotation,
                       use_triton)
from ..config import check_positive_float, describe, is_int
from ..launch import LaunchRecord, current_stream, launcher, signature
from ..paged import PagedKVCache
from .kernels import (_attn_keys_kernel, _attn_reduce_kernel, _attn_split_kernel, _attn_values_kernel,
                      _query_prep_kernel)

# Shape buckets of the config store (autotune): ranges of the longest compressed sequence and of the batch, upper
# bounds inclusive (None: unbounded). The split count that fills the GPU, and so the best launch, depends on both.
CONTEXT_RANGES = {"t4k": 4096, "t32k": 32768, "tmax": None}
BATCH_RANGES = {"b1": 1, "b16": 16, "bmax": None}


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


def call_config(cfg: AttentionConfig, batch: int, context: int) -> AttentionConfig:
    """The launch config in effect for ``batch`` sequences of up to ``context`` tokens: the bucket's, or the untuned
    defaults where it holds only from more tokens than the call has (``min_tokens``)."""
    if batch * context < cfg.min_tokens:
        return AttentionConfig()
    return cfg


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
    """The Gluon passes (``attention.gluon``, GPU only) where they can run, else None (the portable kernels run): a
    CUDA device of capability >= 9 and a triton whose Gluon API they compile with (imported lazily, so a triton
    without it is no import error). Which launches each pass covers: ``gluon.supports`` (head_dim
    64/128/256, q_len · group <= 8, pages of a multiple of 16 tokens; the rest take the portable kernels) and
    ``gluon.supports_fused``. Chosen by the launch config's ``gluon_keys`` / ``gluon_values`` / ``gluon_fused``
    (default off)."""
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] < 9:
        return None
    try:
        return _import_gluon()
    except Exception as e:  # noqa: BLE001 - no (or another) Gluon API in this triton: the portable kernel runs
        _warn_gluon_unavailable(e)
        return None


def _import_gluon():
    from . import gluon
    return gluon


# Decode plans: the launches of a decode_attention call, replayed for the next calls of the same step (every layer
# of a model has the same geometry and lengths) with their own tensors (nqkernels.launch). Keyed by what the scalars
# and the launch config derive from (``_plan_key``: the tensors' signatures among them; a config override changes
# nqkernels.store.generation). A plan holds its call's workspaces (partials, the two-pass logits): they are reused by the calls that replay it, in
# stream order. Two plans are kept: the current step's and the one before.
_PLANS: dict = {}
_MAX_PLANS = 2


def _plan_key(q, cache: PagedKVCache, scale, softcap, window, num_splits) -> tuple:
    """Everything a recorded plan's launches derive from but the tensors' contents: the tensors' signatures
    (``launch.signature``: dtype, shape, strides, alignment; the cache's are kept by the cache), lengths, options,
    the stream and the config store's generation. Equal keys replay (``LaunchRecord.replay``)."""
    B = q.shape[0]
    rope_end = max(cache.next_positions()[:B]) if cache.codec.rope is not None else None  # RoPE table length
    lens = ("static", cache.static_pages) if cache.static_pages is not None else tuple(cache.compressed_lens()[:B])
    return (signature(q), q.device, current_stream(q.device), cache.codec, cache.launch_signature(), lens, rope_end,
            scale, softcap, window, num_splits, store.generation())


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
    if q_len < 1 or (cache.static_pages is not None and q_len != 1):
        raise ValueError(f"q_len must be >= 1 (and 1 in static mode, make_static), got {q_len}")
    short = [] if cache.static_pages is not None else [b for b, n in enumerate(cache.seq_lens()[:B]) if n < q_len]
    if short:  # (in static mode the lengths are on the device: appends there take one token, q_len must be 1)
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
    if q.stride(-1) != 1:  # the kernels read a query row as head_dim consecutive elements
        q = q.contiguous()
    B, q_len, Hq, D = q.shape
    H = cache.num_kv_heads
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    if torch.compiler.is_compiling():  # one custom op in the traced graph (static mode: make_static)
        if cache.static_pages is None:
            raise ValueError("decode_attention under torch.compile needs the cache in static mode "
                             "(cache.make_static(max_tokens)): otherwise its launch depends on host-side lengths")
        return _attention_op(q, *cache.op_tensors(), cache.codec_id, cache.sink_tokens, cache.recent_tokens,
                             cache.static_pages, scale, softcap, window, num_splits)
    out = torch.empty_like(q)
    if B == 0:
        return out
    if not use_triton(q):
        return ref.paged_attention(q, cache, scale, softcap, window).to(q.dtype)
    record, key, inputs = None, None, None
    # Plans are for eager calls: a graph replays at no host cost anyway, and static mode (make_static) is for graphs,
    # whose memory pools must not see a plan's workspaces outlive the call.
    if q.is_cuda and cache.static_pages is None and not torch.cuda.is_current_stream_capturing():
        key, inputs = _plan_key(q, cache, scale, softcap, window, num_splits), _call_tensors(q, out, cache)
        plan = _PLANS.get(key)
        if plan is not None:  # another layer of this decode step: replay its launches (the key holds the signatures)
            plan.replay(inputs, key[2])  # on the key's stream
            return out
        record = LaunchRecord(inputs)
    launch = launcher(record)
    codec = cache.codec
    group = Hq // H
    rows = q_len * group
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    n_mblk = triton.cdiv(rows, block_m)
    P = codec.page_size
    # Static mode sizes the launch for the reserved capacity: the lengths are on the device only.
    longest = cache.static_pages * P if cache.static_pages is not None else max(cache.compressed_lens()[:B])
    max_pages = triton.cdiv(longest, P)
    cfg = call_config(launch_config("attention", attention_buckets(D, codec.key_bits, codec.value_bits, group, B,
                                                                   longest), q.device), B, longest)
    # Pages per step: a block of few rows holds several pages' logits side by side (post-RoPE keys only).
    step = 1 if codec.rope is not None else max(1, min(cfg.pages_per_step, block_m // triton.next_power_of_2(rows)))
    two_pass = cfg.two_pass and codec.rope is None  # keys, then values (_attn_keys_kernel; post-RoPE keys only)
    fast = _gluon(q) if codec.rope is None and (cfg.gluon_keys or cfg.gluon_values or cfg.gluon_fused) else None
    # The fused Gluon pass (keys and values in one loop) where it covers the launch; it takes precedence over both
    fused = fast is not None and cfg.gluon_fused and fast.supports_fused(D, codec.key_bits, codec.value_bits, P, rows)
    if two_pass or fused:
        step = 1
    want = triton.cdiv(max_programs(q.device, cfg.programs_per_sm), B * H * n_mblk)  # programs per row block
    if num_splits is None:  # fill the GPU, but give each split a few pages (its prologue and partial cost a page)
        num_splits = min(triton.cdiv(max_pages, cfg.min_pages_per_split), max(1, want))
    num_splits = min(int(num_splits), max_pages)
    # Whole steps per split, so no step but the last of the longest sequence has empty slots.
    pages_per_split = triton.cdiv(triton.cdiv(max_pages, num_splits), step) * step if num_splits else 0
    num_splits = triton.cdiv(max_pages, pages_per_split) if num_splits else 0
    # The uncompressed tokens (sinks and window, at most the buffer's capacity) in parts of whole tiles after the
    # splits: at least uncompressed_per_split tokens each, and no more parts than fill the GPU (as the splits). One
    # part for the usual window of a page or two; a long window is spread over programs.
    if not is_int(cfg.uncompressed_per_split) or cfg.uncompressed_per_split < 1:
        raise ValueError(f"launch config 'attention': uncompressed_per_split must be an int >= 1, got "
                         f"{cfg.uncompressed_per_split!r}")
    fp_cap = cache.fp_k.shape[2]
    fp_parts = min(triton.cdiv(fp_cap, cfg.uncompressed_per_split), want)
    fp_per_part = triton.cdiv(triton.cdiv(fp_cap, fp_parts), cfg.BLOCK_N) * cfg.BLOCK_N
    fp_parts = triton.cdiv(fp_cap, fp_per_part)
    DP = ref.next_pow2(D)
    NG = max(16, DP // 8)
    n_parts = num_splits + fp_parts
    m_part = torch.empty(B * H * n_mblk, n_parts, block_m, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(B * H * n_mblk, n_parts, block_m, DP, dtype=torch.float32, device=q.device)
    dev = str(q.device)
    rot = rotation(D, dev)
    dot = dot_dtype(q)
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
    # The fused pass makes its query operand itself where the config asks and it can (no prep kernel before it)
    q_in_pass = (fused and prep and cfg.gluon_query_in_pass
                 and fast.supports_query_in_pass(D, codec.key_bits, codec.layout("key")))
    if prep and not q_in_pass:
        q_t = torch.empty(B * H * n_mblk, step, KQ, block_m, dtype=torch.float16, device=q.device)
        q_mean = torch.empty(B * H * n_mblk, block_m, dtype=torch.float32, device=q.device)
        launch(_query_prep_kernel, (B * H * n_mblk, triton.cdiv(KQ, FIXED["prep"].BLOCK)),
            q, pk, cache.k_mean, q_t, q_mean, H, n_mblk, *q.stride()[:3], *cache.k_mean.stride()[:2],
            Q_LEN=q_len, GROUP=group, D=D, DP=DP, KBITS=codec.key_bits, NG=NG, KQ=KQ, INV_SQRT_N=inv_sqrt_n,
            CENTER_K=codec.center_keys, DOT=dot, BLOCK_M=block_m, PK=step, QR=FIXED["prep"].BLOCK, PDL=pdl,
            num_warps=FIXED["prep"].num_warps)
    elif q_in_pass:  # the fused pass makes them
        q_t = q_mean = None
    else:  # placeholders, never read, but of the operands' dtypes: the kernel compiles its compressed-page branch
        q_t, q_mean = acc_part.new_empty(1, dtype=torch.float16), m_part  # anyway, and fp16 x fp32 is not a product
    rb = min(block_m, triton.next_power_of_2(rows))  # the real rows of a block (the reduce reads only these)
    if fused and prep:  # the compressed splits in one Gluon pass; the uncompressed part as in two passes
        n_tok, logits, fast_values = 0, m_part, True  # no logits workspace (a placeholder the FP_ONLY kernel never reads)
        fast.fused_pass(cache, q, q_t, q_mean, m_part, l_part, acc_part, q_len=q_len, group=group, block_m=block_m,
                        rs=rb, num_splits=num_splits, pages_per_split=pages_per_split, scale=scale, softcap=softcap,
                        window=window, num_warps=cfg.gluon_fused_warps, l2_prefetch=cfg.gluon_l2,
                        maxnreg=cfg.gluon_maxnreg, launch=launch)
    elif two_pass and prep:
        n_tok = max_pages * P  # logits workspace: 4 bytes per (sequence, KV head, token slot, row)
        logits = torch.empty(B * H * n_mblk, n_tok, rb, dtype=torch.float32, device=q.device)
        fast_keys = fast is not None and cfg.gluon_keys and fast.supports(D, codec.key_bits, P, rows) \
            and codec.layout("key") == "planes"  # the Gluon keys pass reads bit planes; fields keys: the fused pass
        fast_values = fast is not None and cfg.gluon_values and fast.supports(D, codec.value_bits, P, rows)
        if fast_keys:  # the Gluon keys pass (Hopper+): the same logits and split maxima
            fast.keys_pass(cache, q_t, q_mean, logits, m_part, q_len=q_len, group=group, block_m=block_m, rs=rb,
                           num_splits=num_splits, pages_per_split=pages_per_split, n_tok=n_tok, scale=scale,
                           softcap=softcap, window=window, num_warps=cfg.gluon_warps,
                           prefetch=cfg.gluon_prefetch, l2_prefetch=cfg.gluon_l2,
                           maxnreg=cfg.gluon_maxnreg, launch=launch)
        else:
            launch(_attn_keys_kernel, (B * H * n_mblk, num_splits),
                cache.k_codes, cache.k_scales, cache.block_table, cache.lengths, q_t, q_mean, logits, m_part,
                H, n_mblk, num_splits, pages_per_split, n_parts, n_tok, cache.max_batch, scale,
                float(softcap or 1.0), int(window or 0), *cache.k_codes.stride()[:3], *cache.k_scales.stride()[:2],
                cache.k_codes.stride(3), cache.block_table.stride(0),
                Q_LEN=q_len, GROUP=group, D=D, DP=DP, KBITS=codec.key_bits, PAGE=P, NG=NG, KQ=KQ,
                SOFTCAP=softcap is not None, WINDOW=window is not None, ASM=q.is_cuda, BLOCK_M=block_m, RS=rb,
                JOIN_K=_join_runs(codec.key_bits, cache.k_codes), PDL=pdl, CAUSAL_PAGES=q_len > 1,
                KFIELDS=codec.layout("key") == "fields",
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, **_pdl_options(pdl))
        if fast_values:  # the Gluon values pass (Hopper+) takes the pages; the portable kernel the uncompressed part
            fast.values_pass(cache, logits, m_part, l_part, acc_part, rows=rows, block_m=block_m, rs=rb,
                             num_splits=num_splits, pages_per_split=pages_per_split, n_tok=n_tok,
                             num_warps=cfg.gluon_values_warps, l2_prefetch=cfg.gluon_l2,
                             maxnreg=cfg.gluon_maxnreg, launch=launch)
    if (fused or two_pass) and prep:
        launch(_attn_values_kernel, (B * H * n_mblk, fp_parts if fast_values else n_parts),
            q, cache.v_codes, cache.v_scales, cache.block_table, cache.lengths, logits, cache.fp_k, cache.fp_v,
            m_part, l_part, acc_part, _value_gather(D, codec.value_bits, dev),
            H, n_mblk, num_splits, pages_per_split, n_parts, fp_per_part, n_tok, cache.max_batch, scale,
            float(softcap or 1.0),
            int(window or 0), *q.stride()[:3], *cache.v_codes.stride()[:3], *cache.v_scales.stride()[:2],
            cache.v_codes.stride(3), cache.block_table.stride(0), *cache.fp_k.stride()[:3],
            Q_LEN=q_len, GROUP=group, D=D, DP=DP, VBITS=codec.value_bits, PAGE=P, INV_SQRT_N=inv_sqrt_n,
            LOG2DP=DP.bit_length() - 1, SOFTCAP=softcap is not None, WINDOW=window is not None, DOT=dot,
            ASM=q.is_cuda, BLOCK_M=block_m, RS=rb, BLOCK_N=cfg.BLOCK_N,
            JOIN_V=_join_runs(codec.value_bits, cache.v_codes), PDL=pdl, FP_ONLY=fast_values,
            VFIELDS=codec.layout("value") == "fields",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, **_pdl_options(pdl))
    else:
        launch(_attn_split_kernel, (B * H * n_mblk, n_parts),
            q, cache.k_codes, cache.k_scales, cache.v_codes, cache.v_scales, cache.block_table, cache.lengths,
            cache.k_mean, q_t, q_mean, rot, cos, sin, positions, cache.fp_k, cache.fp_v, m_part, l_part, acc_part,
            _value_gather(D, codec.value_bits, dev),
            H, n_mblk, num_splits, pages_per_split, n_parts, fp_per_part, cache.max_batch, scale,
            float(softcap or 1.0), int(window or 0), *q.stride()[:3], *cache.k_codes.stride()[:3],
            *cache.k_scales.stride()[:2], *cache.v_codes.stride()[:3], *cache.v_scales.stride()[:2],
            cache.k_codes.stride(3),  # word stride, 1 in both (contiguous) code pools
            *positions.stride()[:2], cache.block_table.stride(0),
            *cache.fp_k.stride()[:3], *cache.k_mean.stride()[:2],
            Q_LEN=q_len, GROUP=group, D=D, DP=DP, KBITS=codec.key_bits, VBITS=codec.value_bits, PAGE=P,
            INV_SQRT_N=inv_sqrt_n, NG=NG, KQ=KQ, LOG2DP=DP.bit_length() - 1, ROPE_HALF=rope_half,
            CENTER_K=codec.center_keys,
            SOFTCAP=softcap is not None, WINDOW=window is not None, DOT=dot, ASM=q.is_cuda,
            # Word-by-word page loads at 2-3 bits; at 4 bits plain loads, unless a token's words are not a multiple of 16
            # (head_dim 64/96: 8/12 words): the compiler cannot prove the runs aligned then and loads them one word at
            # a time (docs/attention.md, "Loads: the join rule").
            BLOCK_M=block_m, PK=step, BLOCK_N=cfg.BLOCK_N, JOIN_K=_join_runs(codec.key_bits, cache.k_codes),
            JOIN_V=_join_runs(codec.value_bits, cache.v_codes), PDL=pdl and prep,
            CAUSAL_PAGES=q_len > 1,  # a single query follows every key; a chunk may start inside the compressed pages
            KFIELDS=codec.layout("key") == "fields", VFIELDS=codec.layout("value") == "fields",
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, **_pdl_options(pdl and prep))
    # The reduce reads only the real rows of a block; small batches spread its output columns over programs.
    n_bh = B * H * n_mblk
    ob = min(DP, 32) if n_bh < max_programs(q.device, 1) else DP
    launch(_attn_reduce_kernel, (n_bh, DP // ob),
        m_part, l_part, acc_part, cache.v_mean, out, H, n_mblk, num_splits, n_parts, *cache.v_mean.stride()[:2],
        *out.stride()[:3], Q_LEN=q_len, GROUP=group, D=D, DP=DP, CENTER_V=codec.center_values, BLOCK_M=block_m,
        RB=rb, SC=max(1, min(triton.next_power_of_2(max(num_splits, 1)), 8192 // (rb * ob))),
        SCF=max(1, min(triton.next_power_of_2(fp_parts), 2048 // (rb * ob))), OB=ob, PDL=pdl,
        num_warps=FIXED["reduce"].num_warps, **_pdl_options(pdl))
    if record is not None:
        _PLANS[key] = record
        while len(_PLANS) > _MAX_PLANS:  # the oldest step's plan and its workspaces go
            del _PLANS[next(iter(_PLANS))]
    return out


def make_tables(cache: PagedKVCache) -> None:
    """Make the constant tables decode_attention over ``cache`` reads (cached per device: the rotation, the decode
    matrix, the value gather, the Gluon fragment index: its passes take one block of 16 rows). ``PagedKVCache.make_static`` calls it,
    so none is first made inside a captured step, where the graph's memory pool would own it."""
    codec, dev = cache.codec, str(cache.device)
    D = codec.head_dim
    rotation(D, dev)
    _decode_matrix(D, codec.key_bits, dev, _TORCH_DTYPE[dot_dtype(cache.fp_k)])
    _value_gather(D, codec.value_bits, dev)
    probe = cache.fp_k[:1, :1, :1]
    fast = _gluon(probe) if codec.rope is None else None
    if fast is not None and fast.supports(D, codec.key_bits, codec.page_size, 1):
        fast.fragment_index(D, codec.key_bits, 16, dev)


# torch.compile: decode_attention over a cache in static mode is one custom op while a compile traces it (the launcher
# is Python: checks, plans, config lookups, Triton launches), reading the cache tensors it takes. The cache travels as
# its tensors and numbers (PagedKVCache.static_view); a CUDA graph of the compiled step replays its launches, sized for
# the reserved capacity.

@torch.library.custom_op("nqkernels::decode_attention", mutates_args=())
def _attention_op(q: torch.Tensor, fp_k: torch.Tensor, fp_v: torch.Tensor, lengths: torch.Tensor,
                  k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
                  k_mean: torch.Tensor, v_mean: torch.Tensor, block_table: torch.Tensor, codec: int, sink_tokens: int,
                  recent_tokens: int, static_pages: int, scale: float, softcap: Optional[float],
                  window: Optional[int], num_splits: Optional[int]) -> torch.Tensor:
    """``decode_attention`` of q ``[B, 1, q_heads, head_dim]`` over a static-mode cache given as its tensors and
    numbers (``PagedKVCache.static_view``), sized for ``static_pages`` pages per sequence."""
    tensors = (fp_k, fp_v, lengths, k_codes, k_scales, v_codes, v_scales, k_mean, v_mean, block_table)
    view = PagedKVCache.static_view(codec_of(codec), tensors, sink_tokens, recent_tokens, static_pages)
    return decode_attention(q, view, softmax_scale=scale, softcap=softcap, window=window, num_splits=num_splits)


@_attention_op.register_fake
def _(q, fp_k, fp_v, lengths, k_codes, k_scales, v_codes, v_scales, k_mean, v_mean, block_table, codec, sink_tokens,
      recent_tokens, static_pages, scale, softcap, window, num_splits):
    return torch.empty_like(q)
