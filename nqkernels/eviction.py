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

from .config import KVCodec
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
        if not (isinstance(evict, (int, float)) and 0.0 <= evict < 1.0):
            raise ValueError(f"evict must be a fraction in [0, 1), got {evict!r}")
        return [n - int(evict * n + 1e-9) for n in lens]
    counts = [keep] * len(lens) if isinstance(keep, int) else [int(x) for x in keep]
    if len(counts) != len(lens) or any(c < 1 for c in counts):
        raise ValueError(f"keep must be an int >= 1 or {len(lens)} such ints (one per sequence), got {keep!r}")
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
        raise ValueError(f"scores must be a float tensor [batch, kv_heads, tokens], got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    for name, value in (("sinks", sinks), ("recent", recent)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    B, H, T = scores.shape
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
    K = max(counts)
    top = s.topk(K, dim=-1, sorted=True).indices  # best first; sequence b takes its first counts[b]
    counts_t = torch.tensor(counts, device=dev)
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
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "uniform" or num_layers == 1:
        return [keep] * num_layers
    gamma = min(slope, (1.0 - keep) / keep)
    return [keep * (1.0 + gamma * (1.0 - 2.0 * l / (num_layers - 1))) for l in range(num_layers)]


def keep_for_bytes(budget: int, codec: KVCodec, num_kv_heads: int, *, num_layers: int = 1, fp_tokens: int = 0,
                   fp_bytes: int = 2) -> int:
    """Tokens per sequence whose cache fits ``budget`` bytes: ``fp_tokens`` uncompressed (sinks + window, at
    ``fp_bytes`` per element) plus as many HOT tokens (codes + scales of K and V) as the rest allows, over
    ``num_layers`` layers of ``num_kv_heads`` heads. Raises if the uncompressed tokens alone exceed the budget."""
    per_head_layer = num_kv_heads * num_layers
    fp_cost = fp_tokens * per_head_layer * 2 * codec.head_dim * fp_bytes
    hot = per_head_layer * (codec.bytes_per_token(codec.key_bits) + codec.bytes_per_token(codec.value_bits))
    if budget < fp_cost:
        raise ValueError(f"budget of {budget} bytes is below the {fp_cost} bytes of the {fp_tokens} uncompressed "
                         f"tokens")
    return fp_tokens + math.floor((budget - fp_cost) / hot)
