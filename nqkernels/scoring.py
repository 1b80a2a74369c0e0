"""Token importance for eviction: the attention an observation window of prompt queries pays to every key, plus
key-norm and random baselines.

Math. For the last W queries of a sequence of length L (positions L-W .. L-1, post-RoPE as the model made them)
and its keys k_t, p_{r,t} = softmax_t(scale · q_r·k_t) over the keys row r sees (t <= its position); rows r are the
(window position, query head) pairs of one KV head's group. A token's score reduces p over those rows: sum, mean
or max. Two passes, so no attention matrix ever reaches memory:
  1. ``_window_stats_kernel``: per row and split of the keys, the running max m and sum l of exp2 (log2 domain);
  2. ``_window_scores_kernel``: per tile of keys, fold the splits' (m, l) into each row's log-sum-exp, recompute
     the logits of every row against the tile and reduce p = exp2(s - lse) over the rows.
Both passes cost 2·W·Hq·L·D FLOPs and read K once (plus the small query block per tile). A key or query with
NaN/Inf takes no part in any softmax (its logits are masked), so it cannot corrupt other tokens' scores.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference as ref
from .runtime import FIXED, dot_dtype, launch_config, max_programs, use_triton
from .config import check_positive_float, describe, is_int

AGGREGATES = {"sum": 0, "mean": 1, "max": 2}
POOLS = ("max", "avg")
MAX_SPLITS = 64  # pass 1 splits of the keys; pass 2 folds them in one [SPLITS, BLOCK_M] tile


@triton.jit
def _window_rows(q_ptr, b, h, mb, W, seq_len, sqb, sqt, sqh, sqd, GROUP: tl.constexpr, D: tl.constexpr,
                 DP: tl.constexpr, BLOCK_M: tl.constexpr, DOT: tl.constexpr):
    """Row block mb of KV head h: rows r = w·GROUP + g (window position w, query head h·GROUP + g). Returns the
    query block, each row's token position (L - W + w) and whether the row exists (w < W, position >= 0)."""
    r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    w, g = r // GROUP, r % GROUP
    qpos = seq_len - W + w
    rmask = (w < W) & (qpos >= 0)
    d = tl.arange(0, DP)
    q = tl.load(q_ptr + b * sqb + w[:, None] * sqt + (h * GROUP + g)[:, None] * sqh + d[None, :] * sqd,
                mask=rmask[:, None] & (d < D)[None, :], other=0.0)
    return q.to(DOT), qpos, rmask


@triton.jit
def _window_logits(q, k_ptr, b, h, t, tmask, qpos, rmask, sm_scale, skb, skt, skh, skd, D: tl.constexpr,
                   DP: tl.constexpr, DOT: tl.constexpr):
    """log2-domain logits [BLOCK_M, BLOCK_N] of the row block against key tile t, and which of them count:
    the key exists, is not after the row's position, and the logit is finite."""
    d = tl.arange(0, DP)
    k = tl.load(k_ptr + b * skb + t[:, None] * skt + h * skh + d[None, :] * skd,
                mask=tmask[:, None] & (d < D)[None, :], other=0.0).to(DOT)
    s = tl.dot(q, tl.trans(k)) * (sm_scale * 1.4426950408889634)
    seen = rmask[:, None] & tmask[None, :] & (t[None, :] <= qpos[:, None]) & (tl.abs(s) < float("inf"))
    return tl.where(seen, s, float("-inf")), seen


@triton.jit
def _window_stats_kernel(q_ptr, k_ptr, lens_ptr, m_ptr, l_ptr, H, W, n_mblk, n_splits, keys_per_split, sm_scale,
                         sqb, sqt, sqh, sqd, skb, skt, skh, skd,
                         GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    bh, mb = pid // n_mblk, pid % n_mblk
    b, h = bh // H, bh % H
    seq_len = tl.load(lens_ptr + b)
    q, qpos, rmask = _window_rows(q_ptr, b, h, mb, W, seq_len, sqb, sqt, sqh, sqd, GROUP, D, DP, BLOCK_M, DOT)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, seq_len)
    for start in range(lo, hi, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        s, _ = _window_logits(q, k_ptr, b, h, t, t < hi, qpos, rmask, sm_scale, skb, skt, skh, skd, D, DP, DOT)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    rows = (pid * n_splits + split) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(m_ptr + rows, m_i)
    tl.store(l_ptr + rows, l_i)


@triton.jit
def _window_scores_kernel(q_ptr, k_ptr, lens_ptr, m_ptr, l_ptr, out_ptr, H, W, T, n_mblk, n_splits, sm_scale,
                          sqb, sqt, sqh, sqd, skb, skt, skh, skd, sob, soh,
                          GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, AGG: tl.constexpr, DOT: tl.constexpr):
    bh, tb = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    seq_len = tl.load(lens_ptr + b)
    t = tb * BLOCK_N + tl.arange(0, BLOCK_N)
    tmask = t < seq_len
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for mb in range(n_mblk):
        q, qpos, rmask = _window_rows(q_ptr, b, h, mb, W, seq_len, sqb, sqt, sqh, sqd, GROUP, D, DP, BLOCK_M, DOT)
        # Each row's log2-sum-exp2 over all its keys, from the splits of pass 1 (one [SPLITS, BLOCK_M] load).
        sp = tl.arange(0, SPLITS)
        at = ((bh * n_mblk + mb) * n_splits + sp[:, None]) * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        m_s = tl.load(m_ptr + at, mask=(sp < n_splits)[:, None], other=float("-inf"))
        l_s = tl.load(l_ptr + at, mask=(sp < n_splits)[:, None], other=0.0)
        m_r = tl.max(m_s, axis=0)
        m_safe = tl.where(m_r == float("-inf"), 0.0, m_r)
        l_r = tl.sum(l_s * tl.exp2(m_s - m_safe[None, :]), axis=0)
        live = l_r > 0  # rows that see at least one finite logit
        lse = tl.where(live, m_safe + tl.log2(tl.where(live, l_r, 1.0)), 0.0)
        s, seen = _window_logits(q, k_ptr, b, h, t, tmask, qpos, rmask & live, sm_scale, skb, skt, skh, skd, D, DP,
                                 DOT)
        p = tl.where(seen, tl.exp2(s - lse[:, None]), 0.0)
        if AGG == 2:
            acc = tl.maximum(acc, tl.max(p, axis=0))
        else:
            acc += tl.sum(p, axis=0)
    if AGG == 1:
        acc = acc / (GROUP * tl.minimum(W, seq_len)).to(tl.float32)
    tl.store(out_ptr + b * sob + h * soh + t, acc, mask=t < T)


@triton.jit
def _pool_kernel(x_ptr, lens_ptr, out_ptr, H, T, sxb, sxh, POOL: tl.constexpr, MAX: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Max or average over POOL neighbouring scores (the window clipped at the ends for max, zero-padded and divided
    by POOL for the average, as torch's pooling does), zero at or after the sequence's length."""
    bh, tb = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    t = tb * BLOCK + tl.arange(0, BLOCK)
    row = x_ptr + b * sxb + h * sxh
    acc = tl.full((BLOCK,), float("-inf") if MAX else 0.0, tl.float32)
    for j in tl.static_range(POOL):
        u = t + (j - POOL // 2)
        inside = (u >= 0) & (u < T)
        if MAX:
            acc = tl.maximum(acc, tl.load(row + u, mask=inside, other=float("-inf")))
        else:
            acc += tl.load(row + u, mask=inside, other=0.0)
    if not MAX:
        acc = acc / POOL
    acc = tl.where(t < tl.load(lens_ptr + b), acc, 0.0)
    tl.store(out_ptr + b * sxb + h * sxh + t, acc, mask=t < T)


# ----------------------------------------------------------------------------------------------------------------
def _seq_lens(seq_lens, B: int, T: int, device) -> torch.Tensor:
    if seq_lens is None:
        return torch.full((B,), T, dtype=torch.int32, device=device)
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens
    if not isinstance(lens, (list, tuple)) or len(lens) != B or not all(is_int(n) and 1 <= n <= T for n in lens):
        raise ValueError(f"seq_lens must be a list or 1-D int tensor of {B} ints in [1, {T}] (tokens of each "
                         f"sequence), got {seq_lens!r}")
    return torch.tensor(lens, dtype=torch.int32, device=device)


def _check_keys(k: torch.Tensor) -> None:
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise ValueError(f"k must be a 4-D tensor [batch, tokens, kv_heads, head_dim], got {describe(k)}")
    if k.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"k must be float16, bfloat16 or float32, got {k.dtype}")
    if k.shape[1] < 1:
        raise ValueError("k must hold at least one token")


def _check_inputs(q, k, aggregate, pool, pool_mode, softmax_scale):
    _check_keys(k)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [batch, window, q_heads, head_dim], got {describe(q)}")
    if q.dtype != k.dtype:
        raise ValueError(f"q is {q.dtype} but k is {k.dtype} (they must match)")
    if q.device != k.device:
        raise ValueError(f"q is on {q.device} but k is on {k.device}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} must agree on batch and head_dim")
    if not 1 <= q.shape[3] <= 256:
        raise ValueError(f"head_dim must be in [1, 256], got {q.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"q_heads ({q.shape[2]}) must be a positive multiple of kv_heads ({k.shape[2]}): q is "
                         f"[batch, window, q_heads, head_dim] and k [batch, tokens, kv_heads, head_dim] (from "
                         f"[batch, heads, tokens, head_dim] tensors pass .transpose(1, 2))")
    if q.shape[1] < 1:
        raise ValueError("the observation window q must hold at least one query")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {tuple(AGGREGATES)}, got {aggregate!r}")
    if not is_int(pool) or pool < 0 or (pool > 1 and pool % 2 == 0):
        raise ValueError(f"pool must be 0 (off) or an odd int kernel size, got {pool!r}")
    if pool_mode not in POOLS:
        raise ValueError(f"pool_mode must be one of {POOLS}, got {pool_mode!r}")
    if softmax_scale is not None:
        check_positive_float("softmax_scale", softmax_scale)


def pool_scores(scores: torch.Tensor, lens: torch.Tensor, pool: int, pool_mode: str) -> torch.Tensor:
    """Smooth scores ``[B, H, T]`` over ``pool`` neighbouring tokens (max or average, zero outside each sequence),
    so the neighbours of an important token survive with it."""
    if pool <= 1:
        return scores
    B, H, T = scores.shape
    if use_triton(scores):
        out = torch.empty_like(scores)
        block = FIXED["pool"].BLOCK
        _pool_kernel[(B * H, triton.cdiv(T, block))](scores, lens, out, H, T, *scores.stride()[:2], POOL=pool,
                                                      MAX=pool_mode == "max", BLOCK=block)
        return out
    x = scores.reshape(B * H, 1, T)
    if pool_mode == "max":
        x = F.max_pool1d(x, pool, stride=1, padding=pool // 2)
    else:
        x = F.avg_pool1d(x, pool, stride=1, padding=pool // 2)
    inside = torch.arange(T, device=scores.device)[None, :] < lens[:, None].to(scores.device)
    return x.reshape(B, H, T) * inside[:, None, :]


def score_tokens(q: torch.Tensor, k: torch.Tensor, *, seq_lens: Optional[Union[torch.Tensor, Sequence[int]]] = None,
                 aggregate: str = "mean", pool: int = 0, pool_mode: str = "max",
                 softmax_scale: Optional[float] = None) -> torch.Tensor:
    """Importance of every key from the attention of an observation window (Triton, two passes, no attention
    matrix in memory).

    Args:
        q: ``[B, W, q_heads, head_dim]`` the queries of the last W tokens of each sequence (post-RoPE, as the model
            computed them), right-aligned: row w of sequence b is the query at position ``seq_lens[b] - W + w``
            (rows before position 0 are ignored).
        k: ``[B, T, kv_heads, head_dim]`` keys before compression (post-RoPE), any strides, same dtype as q
            (fp16, bf16 or fp32); q_heads must be a multiple of kv_heads (GQA).
        seq_lens: tokens of each sequence (default T); keys at or after a sequence's length are ignored.
        aggregate: how the window's attention probabilities are reduced over the rows of a KV group (window
            positions × query heads): ``"sum"``, ``"mean"`` (default) or ``"max"``.
        pool: odd kernel size of a max/avg pooling over neighbouring tokens after aggregation (0: off).
        pool_mode: ``"max"`` (default) or ``"avg"``.
        softmax_scale: default ``head_dim ** -0.5``.
    Returns:
        fp32 ``[B, kv_heads, T]``; higher is more important; 0 at or after each sequence's length.

    Example:
        >>> import torch
        >>> from nqkernels import score_tokens
        >>> k = torch.randn(2, 100, 2, 64)
        >>> q = torch.randn(2, 8, 4, 64)
        >>> score_tokens(q, k, seq_lens=[100, 37]).shape
        torch.Size([2, 2, 100])
    """
    _check_inputs(q, k, aggregate, pool, pool_mode, softmax_scale)
    B, W, Hq, D = q.shape
    T, H = k.shape[1], k.shape[2]
    lens = _seq_lens(seq_lens, B, T, k.device)
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not use_triton(k) or B == 0:  # the torch reference (an empty batch has no kernel to launch)
        scores = ref.window_scores(q, k, lens, scale=scale, aggregate=aggregate)
        return pool_scores(scores, lens, pool, pool_mode)
    group = Hq // H
    rows = W * group
    block_m = max(16, min(64, triton.next_power_of_2(rows)))
    n_mblk = triton.cdiv(rows, block_m)
    DP = max(16, ref.next_pow2(D))
    cfg = launch_config("scoring", f"d{D}_g{group}", k.device, BLOCK_N=64 if DP <= 128 else 32)
    block_n = cfg.BLOCK_N
    # Pass 1 splits the keys so that B · H · row blocks · splits programs fill the GPU.
    want = triton.cdiv(max_programs(k.device, cfg.programs_per_sm), B * H * n_mblk)
    n_splits = max(1, min(triton.cdiv(T, block_n), want, MAX_SPLITS))
    keys_per_split = triton.cdiv(triton.cdiv(T, n_splits), block_n) * block_n
    n_splits = triton.cdiv(T, keys_per_split)
    m_part = torch.empty(B * H * n_mblk * n_splits * block_m, dtype=torch.float32, device=k.device)
    l_part = torch.empty_like(m_part)
    out = torch.empty(B, H, T, dtype=torch.float32, device=k.device)
    dot = dot_dtype(q) if q.dtype != torch.float32 else tl.float32
    common = dict(GROUP=group, D=D, DP=DP, BLOCK_M=block_m, BLOCK_N=block_n, DOT=dot, num_warps=cfg.num_warps)
    _window_stats_kernel[(B * H * n_mblk, n_splits)](
        q, k, lens, m_part, l_part, H, W, n_mblk, n_splits, keys_per_split, scale, *q.stride(), *k.stride(), **common)
    _window_scores_kernel[(B * H, triton.cdiv(T, block_n))](
        q, k, lens, m_part, l_part, out, H, W, T, n_mblk, n_splits, scale, *q.stride(), *k.stride(),
        *out.stride()[:2], SPLITS=triton.next_power_of_2(n_splits), AGG=AGGREGATES[aggregate], **common)
    return pool_scores(out, lens, pool, pool_mode)


def key_norm_scores(k: torch.Tensor, *, seq_lens=None) -> torch.Tensor:
    """Baseline (Knorm): keys with a small L2 norm draw more attention, so the score is ``-‖k_t‖``.
    k ``[B, T, kv_heads, head_dim]`` → fp32 ``[B, kv_heads, T]``, ``-inf`` at or after each sequence's length."""
    _check_keys(k)
    lens = _seq_lens(seq_lens, k.shape[0], k.shape[1], k.device)
    scores = -torch.linalg.vector_norm(k.float(), dim=-1).transpose(1, 2)
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    inside = torch.arange(k.shape[1], device=k.device)[None, :] < lens[:, None]
    return scores.masked_fill(~inside[:, None, :], float("-inf"))


def random_scores(k: torch.Tensor, *, seq_lens=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Baseline: uniform random scores ``[B, kv_heads, T]`` (fp32, in [0, 1); 0 at or after each length)."""
    _check_keys(k)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    B, T, H, _ = k.shape
    lens = _seq_lens(seq_lens, B, T, k.device)
    scores = torch.rand(B, H, T, generator=generator, device=generator.device if generator else "cpu").to(k.device)
    inside = torch.arange(T, device=k.device)[None, :] < lens[:, None]
    return scores * inside[:, None, :]
