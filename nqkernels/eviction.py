"""Which tokens a compressed cache keeps: selection from importance scores, with sinks and a recent window always
kept, and budgets per sequence, per layer (uniform or pyramid) or from a byte budget.

Kept tokens are gathered in their original order with their positions (``Selection.gather``), then appended to a
``PagedKVCache`` with those positions (``PagedKVCache.append(..., positions=...)``): evicted tokens are never
encoded, and RoPE stays right in both key modes (keys stored post-RoPE carry their rotation; keys stored with
RoPE undone are re-rotated at their stored positions).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .config import KVCodec, describe, is_int, is_real
from .scoring import _seq_lens

SCHEDULES = ("uniform", "pyramid")


class Selection(NamedTuple):
    """Kept tokens of each sequence and KV head.

    indices: int64 ``[B, H, K]`` token indices in ascending order, K the largest budget of the batch; entries at or
        after ``counts[b]`` repeat sequence b's last kept index (padding).
    counts: int32 ``[B]`` tokens kept per sequence (the same for each of its heads).
    """
    indices: torch.Tensor
    counts: torch.Tensor

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The kept tokens of ``x`` ``[B, T, H, D]`` (keys or values) → ``[B, K, H, D]``, in token order."""
        B, H, K = self.indices.shape
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or (x.shape[0], x.shape[2]) != (B, H):
            raise ValueError(f"x must be a 4-D tensor [batch, tokens, kv_heads, head_dim] with batch {B} and "
                             f"kv_heads {H} (the scores'), got {describe(x)}")
        if K and x.shape[1] <= int(self.indices.max()):
            raise ValueError(f"x holds {x.shape[1]} tokens but the selection keeps token {int(self.indices.max())}: "
                             f"pass the tensor the scores were computed for, [batch, tokens, kv_heads, head_dim]")
        idx = self.indices.to(x.device).transpose(1, 2)  # [B, K, H]
        return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))

    @property
    def positions(self) -> torch.Tensor:
        """int32 ``[B, H, K]`` positions of the kept tokens (their index in the uncompressed sequence)."""
        return self.indices.to(torch.int32)


def _budgets(lens: list[int], evict, keep) -> list[int]:
    if (evict is None) == (keep is None):
        raise ValueError("give exactly one of evict (a fraction of tokens to drop) or keep (tokens to keep)")
    if evict is not None:
        if not (is_real(evict) and 0.0 <= evict < 1.0):
            raise ValueError(f"evict must be a fraction in [0, 1), got {evict!r}")
        return [n - int(evict * n + 1e-9) for n in lens]
    counts = [keep] * len(lens) if is_int(keep) else list(keep) if isinstance(keep, (list, tuple)) else None
    if counts is None or len(counts) != len(lens) or not all(is_int(c) and c >= 1 for c in counts):
        raise ValueError(f"keep must be an int >= 1 or a list of {len(lens)} such ints (one per sequence), got "
                         f"{keep!r}")
    return [min(c, n) for c, n in zip(counts, lens)]


def select_tokens(scores: torch.Tensor, *, seq_lens: Optional[Union[torch.Tensor, Sequence[int]]] = None,
                  evict: Optional[float] = None, keep: Optional[Union[int, Sequence[int]]] = None, sinks: int = 4,
                  recent: int = 32, per_head: bool = True) -> Selection:
    """Keep the highest-scoring tokens of each sequence, always including its first ``sinks`` and last ``recent``.

    Args:
        scores: ``[B, H, T]`` (``score_tokens``, ``key_norm_scores``, ``random_scores``); higher is kept first.
            NaN counts as lowest.
        seq_lens: tokens of each sequence (default T); tokens at or after a length are never kept.
        evict: fraction of each sequence's tokens to drop: sequence b keeps ``L_b - floor(evict · L_b)``; or
        keep: tokens to keep per sequence (an int, or one int per sequence; at most its length).
        sinks / recent: tokens at the start / end of each sequence that are always kept. A budget smaller than
            ``min(L_b, sinks + recent)`` is raised to it; otherwise every budget is met exactly.
        per_head: each KV head keeps its own tokens (default); ``False`` keeps one set for all heads, chosen by
            the scores summed over heads.
    Returns:
        a ``Selection`` (indices ``[B, H, K]`` ascending, counts ``[B]``).

    Example:
        >>> import torch
        >>> from nqkernels import select_tokens
        >>> sel = select_tokens(torch.rand(1, 2, 100), evict=0.5, sinks=4, recent=8)
        >>> sel.counts.tolist(), sel.indices.shape
        ([50], torch.Size([1, 2, 50]))
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3 or not scores.is_floating_point():
        raise ValueError(f"scores must be a float tensor [batch, kv_heads, tokens], got {describe(scores)}")
    for name, value in (("sinks", sinks), ("recent", recent)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(per_head, bool):
        raise TypeError(f"per_head must be a bool, got {per_head!r}")
    B, H, T = scores.shape
    if T == 0:
        raise ValueError("scores must hold at least one token")
    dev = scores.device
    lens_t = _seq_lens(seq_lens, B, T, dev)
    lens = lens_t.tolist()
    counts = [max(c, min(n, sinks + recent)) for c, n in zip(_budgets(lens, evict, keep), lens)]
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    if not per_head:
        s = s.sum(dim=1, keepdim=True).expand(B, H, T)
    t = torch.arange(T, device=dev)[None, :]
    L = lens_t[:, None].long()
    protected = (t < sinks) | ((t >= L - recent) & (t < L))
    s = torch.where(protected[:, None], float("inf"), s)
    s = torch.where((t >= L)[:, None], float("-inf"), s)
    K = max(counts, default=0)  # 0 for an empty batch
    top = s.topk(K, dim=-1, sorted=True).indices  # best first; sequence b takes its first counts[b]
    counts_t = torch.tensor(counts, dtype=torch.long, device=dev)
    taken = torch.arange(K, device=dev)[None, None, :] < counts_t[:, None, None]
    idx = torch.where(taken, top, T).sort(dim=-1).values
    last = idx.gather(-1, (counts_t - 1)[:, None, None].expand(B, H, 1))
    idx = torch.where(idx == T, last, idx)
    return Selection(idx, counts_t.to(torch.int32))


def layer_budgets(num_layers: int, keep: float, schedule: str = "uniform", slope: float = 0.5) -> list[float]:
    """Fraction of tokens each layer keeps, averaging exactly ``keep``.

    ``"uniform"``: every layer keeps ``keep``. ``"pyramid"`` (PyramidKV): a linear ramp from more tokens in the
    first layer to fewer in the last, ``keep · (1 + γ·(1 - 2l/(n-1)))`` with ``γ = min(slope, (1-keep)/keep)`` so
    no layer exceeds 1.
    """
    if not is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if not (is_real(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (is_real(slope) and slope >= 0):
        raise ValueError(f"slope must be a float >= 0, got {slope!r}")
    if schedule == "uniform" or num_layers == 1:
        return [keep] * num_layers
    gamma = min(slope, (1.0 - keep) / keep)
    return [keep * (1.0 + gamma * (1.0 - 2.0 * l / (num_layers - 1))) for l in range(num_layers)]


def keep_for_bytes(budget: int, codec: KVCodec, num_kv_heads: int, *, num_layers: int = 1, fp_tokens: int = 0,
                   fp_bytes: int = 2) -> int:
    """Tokens per sequence whose cache fits ``budget`` bytes: ``fp_tokens`` uncompressed (sinks + window, at
    ``fp_bytes`` per element) plus as many HOT tokens (codes + scales of K and V) as the rest allows, over
    ``num_layers`` layers of ``num_kv_heads`` heads. Raises if the uncompressed tokens alone exceed the budget."""
    if not isinstance(codec, KVCodec):
        raise TypeError(f"codec must be a KVCodec, got {type(codec).__name__}")
    if not (is_real(budget) and 0 <= budget < math.inf):
        raise ValueError(f"budget must be a finite number of bytes >= 0, got {budget!r}")
    for name, value, low in (("num_kv_heads", num_kv_heads, 1), ("num_layers", num_layers, 1),
                             ("fp_tokens", fp_tokens, 0), ("fp_bytes", fp_bytes, 1)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    per_head_layer = num_kv_heads * num_layers
    fp_cost = fp_tokens * per_head_layer * 2 * codec.head_dim * fp_bytes
    hot = per_head_layer * (codec.bytes_per_token("key") + codec.bytes_per_token("value"))
    if budget < fp_cost:
        raise ValueError(f"budget of {budget} bytes is below the {fp_cost} bytes of the {fp_tokens} uncompressed "
                         f"tokens")
    return fp_tokens + math.floor((budget - fp_cost) / hot)
