"""A call shaped like FlashAttention's ``flash_attn_with_kvcache``, over a compressed ``PagedKVCache``.

A serving loop that calls ``flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=...,
block_table=..., softmax_scale=..., causal=True, window_size=..., softcap=...)`` swaps that one call for this one,
with the compressed cache in place of ``k_cache``/``v_cache``. The mapping:

==========================  =====================================================================================
flash_attn_with_kvcache      here
==========================  =====================================================================================
``q`` [B, Sq, Hq, D]         same (fp16/bf16, the cache's dtype)
``k_cache``, ``v_cache``     ``cache``: one ``PagedKVCache`` (codes, scales, fp16 sinks/window, its own pages)
``k``, ``v`` [B, Sk, H, D]   same: appended to the cache before attending (post-RoPE keys, as the model made them)
``cache_seqlens``            optional check: the tokens each sequence held *before* ``k``/``v`` are appended. The
                             cache keeps its own lengths (the compressed pages cannot be rewritten from outside),
                             so a value that disagrees raises instead of being obeyed.
``block_table``              optional check: must equal ``cache.block_table`` (the cache allocates its pages).
``softmax_scale``            same (default ``D ** -0.5``)
``causal``                   ``True`` (query i sees keys up to its own position). ``False`` is the same thing
                             when Sq == 1 and is refused otherwise.
``window_size=(l, r)``       ``(-1, -1)``: off; ``(l, 0)`` or ``(l, -1)``: a query sees itself and the ``l``
                             tokens before it (``decode_attention(window=l + 1)``). ``r > 0`` is refused.
``softcap``                  same (0.0: off)
``num_splits``               same (0: chosen to fill the GPU)
``rotary_cos/sin``,          not taken: apply RoPE to q and k before the call (keys stored with RoPE undone are
``cache_batch_idx``,         handled by the codec), slots are 0..B-1, and ALiBi is not supported.
``alibi_slopes``, ...
==========================  =====================================================================================
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from nqkernels import PagedKVCache, decode_attention


def flash_attn_with_kvcache(q: torch.Tensor, cache: PagedKVCache, k: Optional[torch.Tensor] = None,
                            v: Optional[torch.Tensor] = None, *,
                            cache_seqlens: Union[None, int, Sequence[int], torch.Tensor] = None,
                            block_table: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = True, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            num_splits: int = 0) -> torch.Tensor:
    """Append ``k``/``v`` (if given) to ``cache``, then attend ``q`` over everything the cache holds.

    Args:
        q: ``[B, Sq, Hq, D]`` queries of the last Sq tokens of sequences (slots) 0..B-1; Hq a multiple of the
            cache's KV heads (GQA).
        cache: the compressed ``PagedKVCache`` of this layer.
        k, v: ``[B, Sk, H, D]`` new keys (post-RoPE) and values, appended before attending; both or neither.
        cache_seqlens: the tokens each sequence held before the append, as flash-attn takes it; checked against
            the cache.
        block_table: checked against ``cache.block_table``.
        softmax_scale, softcap, num_splits: as in flash-attn (0 means off / automatic).
        causal, window_size: see the module docstring.
    Returns:
        ``[B, Sq, Hq, D]`` in q's dtype.

    Example:
        >>> import torch
        >>> from nqkernels import KVCodec, PagedKVCache
        >>> from integrations.flash import flash_attn_with_kvcache
        >>> cache = PagedKVCache(KVCodec(head_dim=64, page_size=16), num_kv_heads=2, max_batch=1, num_pages=8,
        ...                      device="cpu")
        >>> k = torch.randn(1, 40, 2, 64, dtype=torch.float16)
        >>> q = torch.randn(1, 1, 4, 64, dtype=torch.float16)
        >>> flash_attn_with_kvcache(q, cache, k, torch.randn_like(k), cache_seqlens=0).shape
        torch.Size([1, 1, 4, 64])
    """
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache (in place of k_cache/v_cache), got {type(cache).__name__}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both left out")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [batch, seqlen_q, q_heads, head_dim], got "
                         f"{getattr(q, 'shape', type(q).__name__)}")
    B, q_len = q.shape[:2]
    if not causal and q_len > 1:
        raise ValueError(f"causal=False with seqlen_q={q_len} > 1 is not supported: the new queries always see "
                         f"the keys up to their own position")
    window = _window(window_size)
    if cache_seqlens is not None:
        _check_seqlens(cache_seqlens, cache, B)
    if block_table is not None and not _same_table(block_table, cache, B):
        raise ValueError("block_table differs from cache.block_table: the compressed cache allocates its own pages; "
                         "pass cache.block_table or leave block_table out")
    if softcap is None or softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 is off), got {softcap!r}")
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 is automatic), got {num_splits!r}")
    if k is not None:
        cache.append(k, v)
    return decode_attention(q, cache, softmax_scale=softmax_scale, softcap=softcap or None, window=window,
                            num_splits=num_splits or None)


def _window(window_size) -> Optional[int]:
    try:
        left, right = (int(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if right > 0:
        raise ValueError(f"window_size right={right} > 0 looks at future tokens; only causal windows "
                         f"(right 0 or -1) are supported")
    if left < -1:
        raise ValueError(f"window_size left must be -1 (off) or >= 0, got {left}")
    return None if left == -1 else left + 1


def _check_seqlens(cache_seqlens, cache: PagedKVCache, B: int) -> None:
    if isinstance(cache_seqlens, int):
        want = [cache_seqlens] * B
    elif isinstance(cache_seqlens, torch.Tensor):
        want = [int(x) for x in cache_seqlens.reshape(-1).tolist()]
    else:
        want = [int(x) for x in cache_seqlens]
    held = cache.seq_lens()[:B]
    if want != held:
        raise ValueError(f"cache_seqlens {want} disagree with the tokens the cache holds {held}: the compressed cache "
                         f"keeps its own lengths (append through this call or cache.append, reset finished slots)")


def _same_table(block_table: torch.Tensor, cache: PagedKVCache, B: int) -> bool:
    if block_table is cache.block_table:
        return True
    mine = cache.block_table[:B]
    if block_table.dim() != 2 or block_table.shape[0] != B:
        return False
    n = min(block_table.shape[1], mine.shape[1])
    used = max(cache.compressed_lens()[:B], default=0) // cache.codec.page_size  # pages are always full
    return n >= used and torch.equal(block_table[:, :used].to(mine), mine[:, :used])
