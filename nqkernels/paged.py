"""A paged KV cache of one layer in the HOT format, with uncompressed sink tokens and a recent window.

Each sequence (a batch slot) holds, in token order:
    sinks   the first ``sink_tokens`` tokens, kept in the cache dtype;
    pages   HOT codes + scales of the tokens after them, ``page_size`` tokens per page, found through the
            sequence's row of ``block_table``;
    window  the most recent tokens, kept in the cache dtype: between ``recent_tokens`` and
            ``recent_tokens + page_size - 1`` of them once the sequence is long enough. Whenever the window
            reaches ``recent_tokens + page_size`` tokens, its oldest full pages are encoded (one ``encode_kv`` call)
            and moved to freshly allocated pages.
Sinks and window share one buffer per sequence, ``fp_k`` / ``fp_v`` ``[max_batch, H, S + R + P, D]``.

Positions. Tokens may be appended with explicit positions (per sequence, or per sequence and head after an
eviction, ``eviction.Selection``); by default each sequence continues one past its last position. Keys stored
post-RoPE carry their rotation, so positions are not stored; a cache whose codec undoes RoPE stores each token's
position (int32 ``positions`` ``[num_pages, H, P]`` and ``fp_pos``), undoes RoPE at it on encode and re-applies it
in attention.

The centering means (per sequence and KV head) are taken from the first tokens a sequence compresses (its prompt,
minus sinks and window, when the prompt is appended in one call) and reused for every later page, so every key of
a sequence carries the same offset (attention is invariant to it) and values get it back exactly.
"""
from __future__ import annotations

import copy
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from .codec import EncodedKV, _centering_mean, _decode, _encode, _load_rope_undone, finite_rows_sum
from .runtime import FIXED, codec_id, codec_of, use_triton
from .config import KVCodec, code_words, is_int
from .launch import signature
from .reference import relayout


# The tensors of a cache that the static-mode custom ops take, in their argument order (``PagedKVCache.op_tensors``).
_OP_TENSORS = ("fp_k", "fp_v", "lengths", "k_codes", "k_scales", "v_codes", "v_scales", "k_mean", "v_mean",
               "block_table")


class SlotState(NamedTuple):
    """One sequence's content in token order, detached from pages (``PagedKVCache.export_slot``): what is saved,
    offloaded and restored. H heads, C compressed tokens, F uncompressed tokens (sinks then window)."""
    k_codes: torch.Tensor   # int32 [H, C, W_k]
    k_scales: torch.Tensor  # [H, C]
    v_codes: torch.Tensor   # int32 [H, C, W_v]
    v_scales: torch.Tensor  # [H, C]
    fp_k: torch.Tensor      # [H, F, D] in the cache dtype
    fp_v: torch.Tensor      # [H, F, D]
    k_mean: torch.Tensor    # fp32 [H, D]
    v_mean: torch.Tensor    # fp32 [H, D]
    sinks: int              # of the F uncompressed tokens, how many are sinks (the rest is the window)
    next_position: int      # position the next appended token gets
    positions: Optional[torch.Tensor] = None     # int32 [H, C]: positions of the compressed tokens (RoPE undone)
    fp_positions: Optional[torch.Tensor] = None  # int32 [H, F]: positions of the uncompressed tokens (RoPE undone)
    layouts: Optional[tuple] = None  # (keys', values') code layouts (KVCodec.layout); None: the importing cache's

    @property
    def length(self) -> int:
        return self.k_codes.shape[1] + self.fp_k.shape[1]

    def to(self, device, pin_memory: bool = False) -> "SlotState":
        def move(t):
            if t is None:
                return None
            if pin_memory:
                return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            return t.to(device, non_blocking=True)
        return SlotState(*(move(t) for t in self[:8]), self.sinks, self.next_position, move(self.positions),
                         move(self.fp_positions), self.layouts)


class PagedKVCache:
    """One layer's compressed KV cache: pages of HOT codes, a block table per sequence, fp sinks and window.

    Args:
        codec: the ``KVCodec`` (bits, head_dim, key mode: ``codec.rope`` set stores keys with RoPE undone).
        num_kv_heads: KV heads of the layer.
        max_batch: batch slots; sequence ``b`` of every call is slot ``b``.
        num_pages: pages in the pool, shared by all slots.
        max_pages_per_seq: width of ``block_table`` (default ``num_pages``).
        sink_tokens: first tokens of each sequence kept uncompressed (default 0).
        recent_tokens: most recent tokens always kept uncompressed (default ``codec.page_size``).
        dtype: dtype of the uncompressed tokens (float16 or bfloat16); queries must match it.

    Tensors (read by ``decode_attention``): ``k_codes``/``v_codes`` int32 ``[num_pages, H, P, W]`` (W =
    ``codec.words_per_token(kind)``),
    ``k_scales``/``v_scales`` ``[num_pages, H, P]``, ``block_table`` int32 ``[max_batch, max_pages_per_seq]``,
    ``lengths`` int32 ``[4, max_batch]`` (rows: tokens, compressed tokens, uncompressed tokens, sinks),
    ``fp_k``/``fp_v``, ``k_mean``/``v_mean`` fp32 ``[max_batch, H, D]``.

    Example:
        >>> from nqkernels import KVCodec, PagedKVCache, decode_attention
        >>> codec = KVCodec(head_dim=128, key_bits=3, value_bits=2, page_size=16)
        >>> cache = PagedKVCache(codec, num_kv_heads=2, max_batch=1, num_pages=8, device="cpu")
        >>> k = torch.randn(1, 40, 2, 128, dtype=torch.float16)
        >>> cache.append(k, torch.randn_like(k))
        >>> cache.seq_lens(), cache.compressed_lens()
        ([40], [16])
    """

    def __init__(self, codec: KVCodec, num_kv_heads: int, max_batch: int, num_pages: int, *,
                 max_pages_per_seq: Optional[int] = None, sink_tokens: int = 0,
                 recent_tokens: Optional[int] = None, dtype: torch.dtype = torch.float16,
                 device: Union[str, torch.device] = "cuda"):
        if not isinstance(codec, KVCodec):
            raise TypeError(f"codec must be a KVCodec, got {type(codec).__name__}")
        for name, value, low in (("num_kv_heads", num_kv_heads, 1), ("max_batch", max_batch, 1),
                                 ("num_pages", num_pages, 1), ("sink_tokens", sink_tokens, 0)):
            if not is_int(value) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        recent_tokens = codec.page_size if recent_tokens is None else recent_tokens
        if not is_int(recent_tokens) or recent_tokens < 0:
            raise ValueError(f"recent_tokens must be an int >= 0, got {recent_tokens!r}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        max_pages_per_seq = num_pages if max_pages_per_seq is None else max_pages_per_seq
        if not is_int(max_pages_per_seq) or max_pages_per_seq < 1:
            raise ValueError(f"max_pages_per_seq must be an int >= 1, got {max_pages_per_seq!r}")
        self.codec, self.num_kv_heads, self.max_batch = codec, num_kv_heads, max_batch
        self.sink_tokens, self.recent_tokens, self.dtype = sink_tokens, recent_tokens, dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} (the default is 'cuda') but this torch sees no CUDA GPU: pass "
                             f"device='cpu' (the torch reference, or the Triton interpreter with TRITON_INTERPRET=1)")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        P, D, H = codec.page_size, codec.head_dim, num_kv_heads
        dev = self.device
        self.k_codes = torch.zeros(num_pages, H, P, codec.words_per_token("key"), dtype=torch.int32,
                                   device=dev)
        self.v_codes = torch.zeros(num_pages, H, P, codec.words_per_token("value"), dtype=torch.int32,
                                   device=dev)
        self.k_scales = torch.zeros(num_pages, H, P, dtype=codec.scale_dtype, device=dev)
        self.v_scales = torch.zeros(num_pages, H, P, dtype=codec.scale_dtype, device=dev)
        self.block_table = torch.zeros(max_batch, max_pages_per_seq, dtype=torch.int32, device=dev)
        self.lengths = torch.zeros(4, max_batch, dtype=torch.int32, device=dev)
        cap = sink_tokens + recent_tokens + P
        self.fp_k = torch.zeros(max_batch, H, cap, D, dtype=dtype, device=dev)
        self.fp_v = torch.zeros(max_batch, H, cap, D, dtype=dtype, device=dev)
        self.k_mean = torch.zeros(max_batch, H, D, dtype=torch.float32, device=dev)
        self.v_mean = torch.zeros(max_batch, H, D, dtype=torch.float32, device=dev)
        self.positions = self.fp_pos = None
        if codec.rope is not None:
            self.positions = torch.zeros(num_pages, H, P, dtype=torch.int32, device=dev)
            self.fp_pos = torch.zeros(max_batch, H, cap, dtype=torch.int32, device=dev)
        # Host mirrors of the bookkeeping, so appends and launches never wait on the device.
        self._len = [0] * max_batch
        self._comp = [0] * max_batch
        self._fp = [0] * max_batch
        self._sink = [0] * max_batch
        self._next = [0] * max_batch
        self._pages: list[list[int]] = [[] for _ in range(max_batch)]
        self._free = list(range(num_pages - 1, -1, -1))
        self._signature = None  # launch_signature
        # The codec as the custom ops take it (``runtime.codec_id``): an int that a trace reads, so caches of equal
        # codecs share a compiled step.
        self.codec_id = codec_id(codec)
        # Static mode (make_static): pages each slot has reserved beyond its used ones, and the reserved capacity in
        # pages per slot (None: off).
        self._reserved: list[list[int]] = [[] for _ in range(max_batch)]
        self.static_pages: Optional[int] = None

    # ----------------------------------------------------------------------------------------------------------
    def seq_lens(self) -> list[int]:
        """Tokens held per slot (in static mode read from the device: one sync)."""
        return self._device_row(0) if self.static_pages is not None else list(self._len)

    def launch_signature(self) -> tuple:
        """Dtype, shape, strides and 16-byte alignment of every tensor a kernel launch takes from this cache
        (``nqkernels.launch``): equal for caches that compiled kernels can be replayed on. Kept until ``grow``."""
        if self._signature is None:
            self._signature = tuple(signature(t) for t in (
                self.k_codes, self.k_scales, self.v_codes, self.v_scales, self.block_table, self.lengths, self.k_mean,
                self.v_mean, self.fp_k, self.fp_v, self.positions) if t is not None)
        return self._signature

    def op_tensors(self) -> tuple:
        """The tensors the static-mode custom ops take from this cache, in their argument order (fp_k, fp_v, lengths,
        k_codes, k_scales, v_codes, v_scales, k_mean, v_mean, block_table)."""
        return tuple(getattr(self, name) for name in _OP_TENSORS)

    @classmethod
    def static_view(cls, codec: KVCodec, tensors: tuple, sink_tokens: int, recent_tokens: int,
                    static_pages: int) -> "PagedKVCache":
        """A cache in static mode over ``tensors`` (``op_tensors`` order) with no host bookkeeping: what the
        static-mode custom ops run on. They take the tensors and these numbers only (functionalization may hand an op
        copies of the tensors it writes), so a compiled step names no cache object and serves every cache of its
        geometry."""
        view = cls.__new__(cls)
        for name, t in zip(_OP_TENSORS, tensors):
            setattr(view, name, t)
        view.codec, view.codec_id, view.sink_tokens, view.recent_tokens = codec, codec_id(codec), sink_tokens, \
            recent_tokens
        view.max_batch, view.num_kv_heads = view.fp_k.shape[:2]
        view.dtype, view.device = view.fp_k.dtype, view.fp_k.device
        view.positions = view.fp_pos = view._signature = None
        view.static_pages = static_pages
        return view

    def compressed_lens(self) -> list[int]:
        """Tokens held in HOT pages per slot (in static mode read from the device: one sync)."""
        return self._device_row(1) if self.static_pages is not None else list(self._comp)

    def free_pages(self) -> int:
        return len(self._free)

    def next_positions(self) -> list[int]:
        """Position the next appended token of each slot gets by default (in static mode: one sync)."""
        if self.static_pages is not None:
            return [n + now - then for n, now, then in zip(self._next, self._device_row(0), self._len)]
        return list(self._next)

    def nbytes(self) -> int:
        """Bytes allocated by this cache's tensors (codes, scales, fp buffers, means, positions, tables)."""
        return sum(t.nbytes for t in (self.k_codes, self.v_codes, self.k_scales, self.v_scales, self.block_table,
                                      self.lengths, self.fp_k, self.fp_v, self.k_mean, self.v_mean, self.positions,
                                      self.fp_pos) if t is not None)

    def pages_needed(self, new_tokens: Sequence[int]) -> tuple[int, int]:
        """(pages the pool must still gain, widest block-table row needed) for appending ``new_tokens[b]`` tokens
        to slot b: what ``grow`` takes before an append that would otherwise run out of pages."""
        P, S, R = self.codec.page_size, self.sink_tokens, self.recent_tokens
        total, widest = 0, self.block_table.shape[1]
        for b, n in enumerate(new_tokens):
            compressible = max(0, self._len[b] + n - min(S, self._len[b] + n) - R)  # beyond sinks and window
            pages = compressible // P
            total += max(0, pages - len(self._pages[b]))
            widest = max(widest, pages)
        return max(0, total - len(self._free)), widest

    def grow(self, extra_pages: int, max_pages_per_seq: Optional[int] = None) -> None:
        """Add ``extra_pages`` free pages to the pool and widen ``block_table`` to ``max_pages_per_seq`` (existing
        pages keep their numbers, so block tables stay valid). Copies the pool once: grow in large steps."""
        self._host_mode("grow")
        if not isinstance(extra_pages, int) or extra_pages < 0:
            raise ValueError(f"extra_pages must be an int >= 0, got {extra_pages!r}")
        old = self.k_codes.shape[0]
        if extra_pages:
            for name in ("k_codes", "v_codes", "k_scales", "v_scales", "positions"):
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, torch.cat((t, t.new_zeros(extra_pages, *t.shape[1:]))))
            self._free[:0] = range(old + extra_pages - 1, old - 1, -1)  # popped from the end: old free pages first
        width = self.block_table.shape[1]
        if max_pages_per_seq is not None and max_pages_per_seq > width:
            self.block_table = torch.cat((self.block_table, self.block_table.new_zeros(
                self.max_batch, max_pages_per_seq - width)), dim=1)
        self._signature = None

    def crop(self, tokens: int) -> None:
        """Drop the last ``tokens`` tokens of every non-empty slot (rejected speculative tokens). They must still be
        uncompressed (in the recent window; at most ``recent_tokens`` are guaranteed to be); compressed pages are
        never rewritten."""
        self._host_mode("crop")
        if not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"tokens must be an int >= 0, got {tokens!r}")
        if tokens == 0:
            return
        held = [b for b in range(self.max_batch) if self._len[b]]
        short = [b for b in held if self._fp[b] - self._sink[b] < tokens]
        if short:
            raise ValueError(f"cannot crop {tokens} tokens: slots {short} hold fewer uncompressed recent tokens "
                             f"(the last {self.recent_tokens} always are; compressed pages are never rewritten)")
        for b in held:
            self._fp[b] -= tokens
            self._len[b] -= tokens
            self._next[b] -= tokens
        self._sync_lengths()

    def reset(self, slots: Optional[Sequence[int]] = None) -> None:
        """Empty the given slots (default all) and return their pages to the pool."""
        self._host_mode("reset")
        for b in range(self.max_batch) if slots is None else slots:
            self._check_slot(b)
            self._free.extend(reversed(self._pages[b]))
            self._pages[b] = []
            self._len[b] = self._comp[b] = self._fp[b] = self._sink[b] = self._next[b] = 0
        self._sync_lengths()

    # -- static mode: capture-safe decode steps ----------------------------------------------------------------
    def make_static(self, max_tokens: int) -> None:
        """Prepare for decode steps replayed from a CUDA graph (``torch.compile(mode="reduce-overhead")``, or a graph
        captured by hand): every slot's pages up to ``max_tokens`` tokens are reserved now (the pool and the block
        table grow if needed), and from here on one-token appends keep the bookkeeping on the device only.

        In static mode, ``append`` takes one token per sequence (``[B, 1, H, D]``, no ``lengths``/``positions``): it
        writes the token at its window's end and, in each sequence whose window fills, encodes the window's oldest
        page into the slot's next reserved page, with fixed shapes and no host sync (docs/hf.md, "The
        compiled decode path"). ``decode_attention`` sizes its launch for ``static_pages`` pages per sequence
        (splits past a sequence's end exit at once). ``seq_lens`` and ``compressed_lens`` read the device (one
        sync); the host-side operations (``crop``, ``reset``, ``grow``, ``export_slot``, ...) need ``sync_host``
        first, which ends static mode. A sequence must not grow past ``max_tokens`` in static mode (a device-side
        assert stops it rather than let it write past its pages). Post-RoPE keys only (``codec.rope`` None).

        Example:
            >>> from nqkernels import KVCodec, PagedKVCache, decode_attention
            >>> cache = PagedKVCache(KVCodec(head_dim=64, page_size=16), num_kv_heads=1, max_batch=1, num_pages=4,
            ...                      device="cpu")
            >>> k = torch.randn(1, 40, 1, 64, dtype=torch.float16)
            >>> cache.append(k, k)
            >>> cache.make_static(100)
            >>> for _ in range(30):
            ...     t = torch.randn(1, 1, 1, 64, dtype=torch.float16)
            ...     cache.append(t, t)
            >>> cache.sync_host()
            >>> cache.seq_lens(), cache.compressed_lens()
            ([70], [48])
        """
        if self.codec.rope is not None:
            raise ValueError("make_static needs a cache of post-RoPE keys (codec.rope=None): the RoPE tables of "
                             "keys stored with RoPE undone depend on the host-side positions")
        if not is_int(max_tokens) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
        if self.static_pages is not None:
            self.sync_host()
        P, S, R = self.codec.page_size, self.sink_tokens, self.recent_tokens
        if any(n > max_tokens for n in self._len):
            raise ValueError(f"max_tokens={max_tokens} is below the longest sequence held ({max(self._len)})")
        # A window holds R..R+P-1 tokens after each step; a slot may hold more pages already (after a crop).
        pages = max(max(0, max_tokens - S - R) // P, max(len(p) for p in self._pages))
        want = sum(pages - len(p) for p in self._pages)
        self.grow(max(0, want - len(self._free)), max(pages, 1))
        for b in range(self.max_batch):
            used = len(self._pages[b])
            self._reserved[b] = [self._free.pop() for _ in range(pages - used)]
            if self._reserved[b]:
                self.block_table[b, used:pages] = torch.tensor(self._reserved[b], dtype=torch.int32)
        self.static_pages = pages
        self._signature = None
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs of a compiled step write them in place
            for t in self.op_tensors():
                torch._dynamo.mark_static_address(t)
        if self.device.type == "cuda":  # the attention's constant tables, before any graph's memory pool could own them
            from .attention.launcher import make_tables
            make_tables(self)

    def sync_host(self) -> None:
        """End static mode (``make_static``): read the lengths the device kept (one sync), move the pages the static
        steps filled from the slots' reservations to their pages and return the rest to the pool. A no-op outside
        static mode."""
        if self.static_pages is None:
            return
        rows = self.lengths.tolist()
        P = self.codec.page_size
        for b in range(self.max_batch):
            filled = rows[1][b] // P - len(self._pages[b])
            self._pages[b] += self._reserved[b][:filled]
            self._free.extend(reversed(self._reserved[b][filled:]))
            self._reserved[b] = []
            self._next[b] += rows[0][b] - self._len[b]
            self._len[b], self._comp[b], self._fp[b], self._sink[b] = (r[b] for r in rows)
        self.static_pages = None

    def _host_mode(self, what: str) -> None:
        if self.static_pages is not None:
            raise ValueError(f"PagedKVCache.{what}: the cache is in static mode (make_static), where only one-token "
                             f"appends and decode_attention run; call sync_host() first")

    def _device_row(self, row: int) -> list[int]:
        return self.lengths[row].tolist()

    def _append_step(self, k: torch.Tensor, v: torch.Tensor, static_pages: int) -> None:
        """Static mode's append of one token per sequence, k, v ``[B, 1, H, D]``: every length and index stays on
        the device, so the step can be captured in a CUDA graph. Each sequence b: the token goes to
        ``fp[b, :, n_fp[b]]`` (a sink while its sinks are incomplete); where the window then holds R + P tokens, its
        oldest P are encoded into page ``block_table[b, n_comp[b] / P]`` and the rest move down by P. The encode
        launches cover every sequence (fixed shapes); those whose window did not fill are masked off."""
        B = k.shape[0]
        P, S = self.codec.page_size, self.sink_tokens
        self._write_window(k, v, 1)
        full, dest, first = self._advance_lengths(B, static_pages)
        self._first_page_means(B, first)
        for kind, fp, codes, scales, mean, center in (
                ("key", self.fp_k, self.k_codes, self.k_scales, self.k_mean, self.codec.center_keys),
                ("value", self.fp_v, self.v_codes, self.v_scales, self.v_mean, self.codec.center_values)):
            x = fp[:B, :, S:S + P]  # [B, H, P, D]: each window's oldest page
            _encode(x, self.codec, kind, None, mean[:B] if center else None, into=(dest, codes, scales))
        self._shift_windows(full)

    def _first_page_means(self, B: int, first: torch.Tensor) -> None:
        """The centering means of the sequences whose first page a static step encodes (``first`` [B] != 0): those
        of its tokens (``codec.centering_mean``), as the host path takes them from a sequence's first compressed
        chunk; one launch for keys and values, programs of other sequences exit at once."""
        P, S, D = self.codec.page_size, self.sink_tokens, self.codec.head_dim
        center = (self.codec.center_keys, self.codec.center_values)
        if not any(center):
            return
        if use_triton(self.fp_k):
            _first_page_means_kernel[(B, self.num_kv_heads)](
                self.fp_k, self.fp_v, self.k_mean, self.v_mean, first, S, P, *self.fp_k.stride()[:3],
                *self.k_mean.stride()[:2], D=D, DP=triton.next_power_of_2(D), CENTER_K=center[0],
                CENTER_V=center[1], BLOCK_T=FIXED["mean"].BLOCK, num_warps=FIXED["mean"].num_warps)
            return
        for fp, mean, on, kind in ((self.fp_k, self.k_mean, center[0], "key"),
                                   (self.fp_v, self.v_mean, center[1], "value")):
            if on:
                x = fp[:B, :, S:S + P]
                mean[:B] = torch.where(first[:, None, None] != 0, _centering_mean(x, self.codec, kind, None),
                                       mean[:B])

    def _advance_lengths(self, B: int, static_pages: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bookkeeping of a static step for sequences 0..B-1 (after the window write), on the device: lengths
        advanced (sinks first; where the window reached R + P tokens, one page moves to the compressed count), and
        per sequence (window filled, its page or -1, the sequence's first page: int32 [B] each)."""
        P, S, R = self.codec.page_size, self.sink_tokens, self.recent_tokens
        flags = torch.empty(4, B, dtype=torch.int32, device=self.device)
        cap = static_pages * P + S + R + P - 1
        if use_triton(self.lengths):
            _advance_lengths_kernel[(B,)](self.lengths, self.block_table, flags, self.max_batch,
                                          self.block_table.stride(0), self.block_table.shape[1], S, R, P, cap,
                                          num_warps=1)
        else:
            L = self.lengths[:, :B]
            comp = L[1].clone()
            L[3] += (L[3] < S).to(torch.int32)  # the token was a sink (sinks fill first, the window is empty then)
            L[0] += 1
            L[2] += 1
            full = (L[2] - L[3]) >= R + P
            col = (comp // P).long().clamp_(max=self.block_table.shape[1] - 1)
            page = self.block_table[torch.arange(B, device=self.device), col]
            flags[0], flags[1] = full.to(torch.int32), torch.where(full, page, -1)
            flags[2], flags[3] = (full & (comp == 0)).to(torch.int32), (L[0] <= cap).to(torch.int32)
            L[1] += full.to(torch.int32) * P
            L[2] -= full.to(torch.int32) * P
        torch._assert_async(flags[3].bool().all(), "PagedKVCache: a sequence grew past the max_tokens given to "
                                                   "make_static")
        return flags[0], flags[1], flags[2]

    # ----------------------------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: Optional[Sequence[int]] = None,
               positions: Optional[torch.Tensor] = None) -> None:
        """Append new tokens: k, v ``[B, T, H, D]`` (post-RoPE keys, as the model made them) for slots 0..B-1.

        ``lengths`` (default T for every sequence): how many of the T tokens are real for each sequence (the rest
        is padding and ignored). ``positions``: int ``[B, T]`` or, when each head kept its own tokens
        (``Selection.positions``), ``[B, H, T]``: the tokens' positions in the uncompressed sequence; default: each
        sequence continues one past its last position. Full pages of the window are encoded as they fill. Tokens
        containing NaN/Inf are stored as zeros, so they cannot corrupt other tokens.
        """
        B, T = self._check_new(k, v)
        if self.static_pages is not None:
            if T != 1 or lengths is not None or positions is not None:
                raise ValueError(f"in static mode (make_static) append takes one token per sequence and no lengths "
                                 f"or positions, got {T} tokens{' and lengths' if lengths is not None else ''}"
                                 f"{' and positions' if positions is not None else ''}; call sync_host() first")
            if torch.compiler.is_compiling():  # one custom op in the traced graph
                return _append_step_op(k, v, *self.op_tensors(), self.codec_id, self.sink_tokens,
                                       self.recent_tokens, self.static_pages)
            return self._append_step(k, v, self.static_pages)
        counts = self._check_lengths(lengths, B, T)
        pos, last = self._check_positions(positions, B, T, counts)
        if self._window_only(counts, T):  # the decode-step case: one batched write, no page fills
            self._append_window(k, v, pos, last, T)
            return
        need, widest = self.pages_needed(counts)  # before anything changes: a failed append leaves the cache as it was
        if need:
            raise RuntimeError(f"PagedKVCache is out of pages: the append needs {need} more than the "
                               f"{len(self._free)} free of {self.k_codes.shape[0]} (raise num_pages, grow, or reset "
                               f"finished slots)")
        if widest > self.block_table.shape[1]:
            raise RuntimeError(f"a slot would hold {widest} pages, more than max_pages_per_seq="
                               f"{self.block_table.shape[1]} (grow with a wider max_pages_per_seq)")
        for b in range(B):
            n = counts[b]
            if n:
                p = None  # positions are needed only where they are stored (keys with RoPE undone)
                if self.positions is not None:
                    p = (torch.arange(self._next[b], self._next[b] + n, device=self.device, dtype=torch.int32)
                         .expand(self.num_kv_heads, n) if pos is None else pos[b, :, :n])
                self._append_one(b, _zero_nonfinite(k[b, :n].transpose(0, 1).to(self.dtype)),
                                 _zero_nonfinite(v[b, :n].transpose(0, 1).to(self.dtype)), p)
                self._next[b] = self._next[b] + n if pos is None else last[b] + 1
        self._sync_lengths()

    def _window_only(self, counts: list, T: int) -> bool:
        """Every slot takes all T > 0 new tokens (no padding) into its window: sinks complete, no page fills."""
        P, S, R = self.codec.page_size, self.sink_tokens, self.recent_tokens
        return T > 0 and all(n == T and self._sink[b] == S and self._fp[b] - S + T < R + P
                             for b, n in enumerate(counts))

    def _append_window(self, k: torch.Tensor, v: torch.Tensor, pos: Optional[torch.Tensor], last, T: int) -> None:
        B = k.shape[0]
        self._write_window(k, v, T)
        if self.positions is not None:
            if pos is None:
                nxt = torch.tensor(self._next[:B], device=self.device, dtype=torch.int32)
                pos = (nxt[:, None] + torch.arange(T, device=self.device, dtype=torch.int32)[None])[:, None]
            rows, at = self._window_slots(B, T)
            self.fp_pos[rows, :, at] = pos.expand(B, self.num_kv_heads, T).transpose(1, 2)
        for b in range(B):
            self._next[b] = self._next[b] + T if last is None else last[b] + 1
            self._fp[b] += T
            self._len[b] += T
        self._sync_lengths()

    def _window_slots(self, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where T new tokens of sequences 0..B-1 go, [B, T] each: (sequence, index in its fp buffer), read from the
        device's lengths (n_fp: lengths[2])."""
        return (torch.arange(B, device=self.device)[:, None].expand(B, T),
                self.lengths[2, :B].long()[:, None] + torch.arange(T, device=self.device)[None])

    def _write_window(self, k: torch.Tensor, v: torch.Tensor, T: int) -> None:
        # k, v [B, T, H, D] written at each slot's window end (fp_k[b, :, n_fp[b] + t]), read from the device lengths.
        B = k.shape[0]
        if use_triton(k):  # one launch instead of ~10 small ones: a decode step runs this once per layer
            D = self.codec.head_dim
            _window_write_kernel[(B * T, self.num_kv_heads)](
                k, v, self.fp_k, self.fp_v, self.lengths, self.max_batch, T, *k.stride()[:3], *v.stride()[:3],
                *self.fp_k.stride()[:3], D=D, DP=triton.next_power_of_2(D), num_warps=FIXED["window"].num_warps)
        else:
            rows, at = self._window_slots(B, T)
            self.fp_k[rows, :, at] = _zero_nonfinite(k.to(self.dtype))
            self.fp_v[rows, :, at] = _zero_nonfinite(v.to(self.dtype))

    def _shift_windows(self, full: torch.Tensor) -> None:
        """In each sequence b with ``full[b]`` != 0, move the window's last R tokens down by P (over the P just
        encoded)."""
        S, R, P = self.sink_tokens, self.recent_tokens, self.codec.page_size
        B = full.shape[0]
        if R == 0:
            return
        if use_triton(self.fp_k):
            D = self.codec.head_dim
            _window_shift_kernel[(B, self.num_kv_heads)](
                self.fp_k, self.fp_v, full, *self.fp_k.stride()[:3], S, P, R=R, RP=triton.next_power_of_2(R), D=D,
                DP=triton.next_power_of_2(D), num_warps=FIXED["window"].num_warps)
        else:
            keep = full[:, None, None, None] != 0
            for fp in (self.fp_k, self.fp_v):
                fp[:B, :, S:S + R] = torch.where(keep, fp[:B, :, S + P:S + P + R], fp[:B, :, S:S + R])

    def _append_one(self, b: int, k: torch.Tensor, v: torch.Tensor, pos: Optional[torch.Tensor]) -> None:
        # k, v: [H, n, D] of one sequence; pos: int32 [H, n], or None when the cache stores no positions.
        P, S, R = self.codec.page_size, self.sink_tokens, self.recent_tokens
        n = k.shape[1]
        take = min(S - self._sink[b], n)
        if take > 0:  # sinks fill first; the window is empty until they are complete
            self._put_fp(b, self._fp[b], k[:, :take], v[:, :take], None if pos is None else pos[:, :take])
            self._sink[b] += take
            self._fp[b] += take
            self._len[b] += take
            k, v, n = k[:, take:], v[:, take:], n - take
            pos = None if pos is None else pos[:, take:]
        if n == 0:
            return
        sink, win = self._sink[b], self._fp[b] - self._sink[b]
        n_flush = (win + n - R) // P * P if win + n >= R + P else 0
        if n_flush == 0:
            self._put_fp(b, self._fp[b], k, v, pos)
            self._fp[b] += n
            self._len[b] += n
            return
        # Window + new tokens; the oldest n_flush go to pages, the rest stays in the window.
        all_k = torch.cat((self.fp_k[b, :, sink:sink + win], k), dim=1)
        all_v = torch.cat((self.fp_v[b, :, sink:sink + win], v), dim=1)
        all_p = None if pos is None else torch.cat((self.fp_pos[b, :, sink:sink + win], pos), dim=1)
        self._compress(b, all_k[:, :n_flush], all_v[:, :n_flush], None if pos is None else all_p[:, :n_flush])
        rest = all_k.shape[1] - n_flush
        self._put_fp(b, sink, all_k[:, n_flush:], all_v[:, n_flush:], None if pos is None else all_p[:, n_flush:])
        self._fp[b] = sink + rest
        self._len[b] += n

    def _put_fp(self, b: int, at: int, k: torch.Tensor, v: torch.Tensor, pos: Optional[torch.Tensor]) -> None:
        n = k.shape[1]
        self.fp_k[b, :, at:at + n] = k
        self.fp_v[b, :, at:at + n] = v
        if pos is not None:
            self.fp_pos[b, :, at:at + n] = pos

    def _compress(self, b: int, k: torch.Tensor, v: torch.Tensor, pos: Optional[torch.Tensor]) -> None:
        # Encode [H, n, D] (n a multiple of the page size; positions [H, n] or None) into new pages of slot b. Heads
        # are the batch of the encode call ([H, 1, n, D]), so each head may carry its own positions.
        P, H = self.codec.page_size, self.num_kv_heads
        n_pages = k.shape[1] // P
        if n_pages > len(self._free):
            raise RuntimeError(f"PagedKVCache is out of pages: slot {b} needs {n_pages}, {len(self._free)} free "
                               f"of {self.k_codes.shape[0]} (raise num_pages or reset finished slots)")
        if len(self._pages[b]) + n_pages > self.block_table.shape[1]:
            raise RuntimeError(f"slot {b} would hold {len(self._pages[b]) + n_pages} pages, more than "
                               f"max_pages_per_seq={self.block_table.shape[1]}")
        first = self._comp[b] == 0
        enc_k = _encode(k[:, None], self.codec, "key", pos, None if first else self.k_mean[b, :, None])
        enc_v = _encode(v[:, None], self.codec, "value", None, None if first else self.v_mean[b, :, None])
        if first:
            if enc_k.mean is not None:
                self.k_mean[b] = enc_k.mean[:, 0]
            if enc_v.mean is not None:
                self.v_mean[b] = enc_v.mean[:, 0]
        pages = [self._free.pop() for _ in range(n_pages)]
        idx = torch.tensor(pages, device=self.device, dtype=torch.long)
        for enc, codes, scales in ((enc_k, self.k_codes, self.k_scales), (enc_v, self.v_codes, self.v_scales)):
            codes[idx] = enc.codes[:, 0].reshape(H, n_pages, P, -1).transpose(0, 1)
            scales[idx] = enc.scales[:, 0].reshape(H, n_pages, P).transpose(0, 1)
        if self.positions is not None:
            self.positions[idx] = pos.reshape(H, n_pages, P).transpose(0, 1)
        used = len(self._pages[b])
        self.block_table[b, used:used + n_pages] = idx.to(torch.int32)
        self._pages[b].extend(pages)
        self._comp[b] += k.shape[1]

    def _sync_lengths(self) -> None:
        # From pinned memory and asynchronous: a copy from pageable memory would wait for the stream (one device sync
        # per layer per decode step). PyTorch's pinned-memory cache keeps the block until the copy has run.
        pinned = self.device.type == "cuda"
        host = torch.tensor([self._len, self._comp, self._fp, self._sink], dtype=torch.int32, pin_memory=pinned)
        self.lengths.copy_(host, non_blocking=pinned)

    def _check_new(self, k, v):
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor [batch, tokens, kv_heads, head_dim], got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device} but the cache is on {self.device}")
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
        B, T, H, D = k.shape
        if H != self.num_kv_heads or D != self.codec.head_dim:
            raise ValueError(f"k has {H} heads of dim {D}; the cache holds {self.num_kv_heads} heads of dim "
                             f"{self.codec.head_dim}")
        if B > self.max_batch:
            raise ValueError(f"batch {B} exceeds the cache's max_batch={self.max_batch}")
        return B, T

    def _check_positions(self, positions, B: int, T: int, counts: list[int]):
        """(positions as int32 [B, H, T] on the cache's device, each sequence's last position), or (None, None):
        continue each sequence. One host sync for the checks."""
        if positions is None:
            return None, None
        H = self.num_kv_heads
        if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int32, torch.int64) or \
                tuple(positions.shape) not in ((B, T), (B, H, T)):
            raise ValueError(f"positions must be an int32/int64 tensor [batch, tokens] = {[B, T]} or [batch, "
                             f"kv_heads, tokens] = {[B, H, T]}, got {getattr(positions, 'dtype', None)} "
                             f"{list(getattr(positions, 'shape', []))}")
        pos = positions.to(self.device, torch.int32)
        pos = pos[:, None].expand(B, H, T) if pos.dim() == 2 else pos
        n_real = torch.tensor(counts, device=self.device)[:, None, None]
        real = torch.arange(T, device=self.device)[None, None, :] < n_real
        lo = torch.where(real, pos, torch.iinfo(torch.int32).max).amin(dim=(1, 2))
        hi = torch.where(real, pos, -1).amax(dim=(1, 2))
        lo, hi = torch.stack((lo, hi)).tolist()
        bad = [b for b, (n, m) in enumerate(zip(counts, lo)) if n and m < 0]
        if bad:
            raise ValueError(f"positions of sequences {bad} must be >= 0")
        return pos, hi

    @staticmethod
    def _check_lengths(lengths, B, T) -> list[int]:
        if lengths is None:
            return [T] * B
        raw = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
        if len(raw) != B or any(not isinstance(c, numbers.Integral) or isinstance(c, bool) or not 0 <= c <= T
                                for c in raw):
            raise ValueError(f"lengths must hold {B} ints in [0, {T}] (one per sequence), got {raw}")
        counts = [int(c) for c in raw]
        return counts

    # ----------------------------------------------------------------------------------------------------------
    def export_slot(self, b: int) -> SlotState:
        """Slot b's content in token order (codes gathered from its pages), on the cache's device."""
        self._host_mode("export_slot")
        self._check_slot(b)
        fp = self._fp[b]
        has_pos = self.positions is not None
        return SlotState(*(self._stream(t, b) for t in (self.k_codes, self.k_scales, self.v_codes, self.v_scales)),
                         self.fp_k[b, :, :fp].clone(), self.fp_v[b, :, :fp].clone(), self.k_mean[b].clone(),
                         self.v_mean[b].clone(), self._sink[b], self._next[b],
                         self._stream(self.positions, b) if has_pos else None,
                         self.fp_pos[b, :, :fp].clone() if has_pos else None,
                         (self.codec.layout("key"), self.codec.layout("value")))

    def _stream(self, t: torch.Tensor, b: int, n_pages: Optional[int] = None) -> torch.Tensor:
        """Slot b's first n_pages pages (default: all it holds) of a per-page tensor ``[num_pages, H, P, ...]`` as one
        token stream ``[H, n_pages·P, ...]``, found through its block-table row."""
        n = len(self._pages[b]) if n_pages is None else n_pages
        x = t[self.block_table[b, :n].long()].transpose(0, 1)
        return x.reshape(self.num_kv_heads, n * self.codec.page_size, *t.shape[3:]).contiguous()

    def import_slot(self, b: int, state: SlotState) -> None:
        """Fill the empty slot b with ``state`` (from ``export_slot``, ``offload`` or ``load_cache``), on fresh
        pages; codes in other layouts than this cache's (``state.layouts``, as ``export_slot`` records them) are
        converted (``reference.relayout``, lossless). Raises before changing anything if the state does not fit."""
        self._host_mode("import_slot")
        self._check_slot(b)
        if self._len[b]:
            raise ValueError(f"slot {b} holds {self._len[b]} tokens; reset it before importing into it")
        P, H, D = self.codec.page_size, self.num_kv_heads, self.codec.head_dim
        layouts = (self.codec.layout("key"), self.codec.layout("value"))
        if state.layouts is not None and tuple(state.layouts) != layouts:  # the same codes in this cache's layouts
            for name, bits, src in (("k_codes", self.codec.key_bits, state.layouts[0]),
                                    ("v_codes", self.codec.value_bits, state.layouts[1])):
                if getattr(state, name).shape[-1] != code_words(D, bits, src):
                    raise ValueError(f"state.{name} has {getattr(state, name).shape[-1]} words per token, not the "
                                     f"{code_words(D, bits, src)} of {bits}-bit codes at head_dim {D} in the "
                                     f"{src!r} layout (state.layouts): it is not of this cache's codec")
            state = state._replace(layouts=layouts, **{
                name: relayout(getattr(state, name), bits, D, src, dst) for name, bits, src, dst in (
                    ("k_codes", self.codec.key_bits, state.layouts[0], layouts[0]),
                    ("v_codes", self.codec.value_bits, state.layouts[1], layouts[1]))})
        C, F = state.k_codes.shape[1], state.fp_k.shape[1]
        want = {"k_codes": (H, C, self.k_codes.shape[-1]), "k_scales": (H, C), "v_codes": (H, C, self.v_codes.shape[-1]),
                "v_scales": (H, C), "fp_k": (H, F, D), "fp_v": (H, F, D), "k_mean": (H, D), "v_mean": (H, D)}
        has_pos = self.positions is not None
        if has_pos:
            want.update(positions=(H, C), fp_positions=(H, F))
        if (state.positions is not None) != has_pos or (state.fp_positions is not None) != has_pos:
            raise ValueError("state and cache disagree on token positions: a cache that undoes RoPE needs "
                             "state.positions and state.fp_positions, a post-RoPE cache takes none")
        for name, shape in want.items():
            if tuple(getattr(state, name).shape) != shape:
                raise ValueError(f"state.{name} has shape {list(getattr(state, name).shape)}; this cache needs "
                                 f"{list(shape)}" + (f" (its keys in the {self.codec.layout('key')!r} layout: "
                                                     "KVCodec.key_layout, reference.relayout converts)"
                                                     if name == "k_codes" else ""))
        if C % P or F > self.fp_k.shape[2] or state.sinks > min(F, self.sink_tokens):
            raise ValueError(f"state does not fit: {C} compressed tokens (a multiple of page_size={P} is needed), "
                             f"{F} uncompressed of which {state.sinks} sinks (this cache holds at most "
                             f"{self.fp_k.shape[2]} uncompressed, {self.sink_tokens} sinks)")
        n_pages = C // P
        if n_pages > len(self._free) or n_pages > self.block_table.shape[1]:
            raise RuntimeError(f"PagedKVCache is out of pages: slot {b} needs {n_pages}, {len(self._free)} free "
                               f"(max_pages_per_seq={self.block_table.shape[1]})")
        pages = [self._free.pop() for _ in range(n_pages)]
        if n_pages:
            idx = torch.tensor(pages, device=self.device, dtype=torch.long)
            pairs = [(state.k_codes, self.k_codes), (state.k_scales, self.k_scales),
                     (state.v_codes, self.v_codes), (state.v_scales, self.v_scales)]
            if has_pos:
                pairs.append((state.positions, self.positions))
            for src, dst in pairs:
                src = src.to(self.device, non_blocking=True)
                dst[idx] = src.reshape(H, n_pages, P, *src.shape[2:]).transpose(0, 1).to(dst.dtype)
            self.block_table[b, :n_pages] = idx.to(torch.int32)
        self.fp_k[b, :, :F] = state.fp_k.to(self.device, non_blocking=True)
        self.fp_v[b, :, :F] = state.fp_v.to(self.device, non_blocking=True)
        self.k_mean[b] = state.k_mean.to(self.device, non_blocking=True)
        self.v_mean[b] = state.v_mean.to(self.device, non_blocking=True)
        if has_pos:
            self.fp_pos[b, :, :F] = state.fp_positions.to(self.device, non_blocking=True)
        self._pages[b] = pages
        self._len[b], self._comp[b], self._fp[b], self._sink[b] = C + F, C, F, state.sinks
        self._next[b] = state.next_position
        self._sync_lengths()

    def offload(self, slots: Sequence[int]) -> list[SlotState]:
        """Move the given slots to pinned host memory and free their pages; ``restore`` brings them back."""
        states = [self.export_slot(b).to("cpu", pin_memory=self.device.type == "cuda") for b in slots]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.reset(slots)
        return states

    def restore(self, states: Sequence[SlotState], slots: Sequence[int]) -> None:
        """Import offloaded states into the given (empty) slots."""
        if len(states) != len(slots):
            raise ValueError(f"got {len(states)} states for {len(slots)} slots")
        for state, b in zip(states, slots):
            self.import_slot(b, state)

    def _check_slot(self, b: int) -> None:
        if not isinstance(b, int) or not 0 <= b < self.max_batch:
            raise ValueError(f"slot {b!r} is out of range [0, {self.max_batch})")

    # ----------------------------------------------------------------------------------------------------------
    def dense(self, batch: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cache as dense fp32 K, V ``[B, L, H, D]`` in token order (pages decoded, RoPE re-applied to keys
        stored without it) and each token's validity ``[B, L]`` bool, L the longest sequence: what attention sees.
        For tests and debugging (in static mode it reads the lengths from the device); attention kernels decode in
        registers instead."""
        B = self.max_batch if batch is None else batch
        H, D = self.num_kv_heads, self.codec.head_dim
        lens, comps, fps, sinks = self.lengths.tolist() if self.static_pages is not None else \
            (self._len, self._comp, self._fp, self._sink)
        L = max(lens[:B], default=0)
        K = torch.zeros(B, L, H, D, device=self.device)
        V = torch.zeros(B, L, H, D, device=self.device)
        valid = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        for b in range(B):
            sink, comp, fp = sinks[b], comps[b], fps[b]
            K[b, :sink] = self.fp_k[b, :, :sink].transpose(0, 1).float()
            V[b, :sink] = self.fp_v[b, :, :sink].transpose(0, 1).float()
            if comp:
                K[b, sink:sink + comp] = self._decode_pages(b, comp, "key")
                V[b, sink:sink + comp] = self._decode_pages(b, comp, "value")
            K[b, sink + comp:lens[b]] = self.fp_k[b, :, sink:fp].transpose(0, 1).float()
            V[b, sink + comp:lens[b]] = self.fp_v[b, :, sink:fp].transpose(0, 1).float()
            valid[b, :lens[b]] = True
        return K, V, valid

    def _decode_pages(self, b: int, comp: int, kind: str) -> torch.Tensor:
        # Heads are the batch of the decode call ([H, 1, C, ...]), so each head may carry its own positions.
        codes, scales = (self.k_codes, self.k_scales) if kind == "key" else (self.v_codes, self.v_scales)
        center = self.codec.center_keys if kind == "key" else self.codec.center_values
        mean = (self.k_mean if kind == "key" else self.v_mean)[b, :, None] if center else None
        n = comp // self.codec.page_size
        positions = self._stream(self.positions, b, n) if self.positions is not None and kind == "key" else None
        enc = EncodedKV(self._stream(codes, b, n)[:, None], self._stream(scales, b, n)[:, None], mean)
        return _decode(enc, self.codec, kind, positions, torch.float32)[:, 0].transpose(0, 1)


@triton.jit
def _finite_row(src, out, dst, d, dmask):
    # One row cast to the cache dtype, stored as zeros if any element is NaN/Inf after the cast.
    x = tl.load(src + d, mask=dmask, other=0.0).to(out.dtype.element_ty)
    y = x.to(tl.float32)
    finite = tl.min(((y - y) == 0.0).to(tl.int32), axis=0)  # inf - inf and NaN - NaN are NaN
    tl.store(out + dst, tl.where(finite == 1, x, 0.0).to(out.dtype.element_ty), mask=dmask)


@triton.jit
def _window_write_kernel(k_ptr, v_ptr, fpk_ptr, fpv_ptr, lens_ptr, max_batch, T, skb, skt, skh, svb, svt, svh,
                         sfb, sfh, sft, D: tl.constexpr, DP: tl.constexpr):
    # One (sequence b, new token t, KV head h) per program: its key and value rows go to the end of b's window,
    # fp[b, h, n_fp[b] + t] (n_fp: lengths[2]); a row holding NaN/Inf cannot corrupt other tokens.
    pid, h = tl.program_id(0), tl.program_id(1)
    b, t = pid // T, pid % T
    d = tl.arange(0, DP)
    dmask = d < D
    at = tl.load(lens_ptr + 2 * max_batch + b) + t
    dst = b.to(tl.int64) * sfb + h * sfh + at.to(tl.int64) * sft + d
    _finite_row(k_ptr + b.to(tl.int64) * skb + t * skt + h * skh, fpk_ptr, dst, d, dmask)
    _finite_row(v_ptr + b.to(tl.int64) * svb + t * svt + h * svh, fpv_ptr, dst, d, dmask)


@triton.jit
def _window_shift_kernel(fpk_ptr, fpv_ptr, full_ptr, sfb, sfh, sft, S, P, R: tl.constexpr, RP: tl.constexpr,
                         D: tl.constexpr, DP: tl.constexpr):
    # One (sequence b, KV head h) per program: where full[b], rows S + P .. S + P + R - 1 of b's fp buffers move to
    # S .. S + R - 1. The ranges overlap when R > P: every row is loaded before any is stored (the barrier).
    b, h = tl.program_id(0), tl.program_id(1)
    if tl.load(full_ptr + b) != 0:
        r = tl.arange(0, RP)
        d = tl.arange(0, DP)
        m = (r < R)[:, None] & (d < D)[None, :]
        base = b.to(tl.int64) * sfb + h * sfh + d[None, :]
        src = base + (S + P + r).to(tl.int64)[:, None] * sft
        dst = base + (S + r).to(tl.int64)[:, None] * sft
        k = tl.load(fpk_ptr + src, mask=m)
        v = tl.load(fpv_ptr + src, mask=m)
        tl.debug_barrier()
        tl.store(fpk_ptr + dst, k, mask=m)
        tl.store(fpv_ptr + dst, v, mask=m)


@triton.jit
def _page_mean(fp_ptr, mean_ptr, b, h, S, P, sfb, sfh, sft, smb, smh, D: tl.constexpr, DP: tl.constexpr,
               BLOCK_T: tl.constexpr):
    # The mean of the finite tokens S .. S + P - 1 of (b, h)'s fp buffer into mean[b, h]: codec._mean_partial_kernel's
    # tile sums added in order, divided correctly rounded. It equals the host path's centering_mean bit for bit where
    # that adds at most two partial sums (pages of up to 2 · BLOCK_T tokens, 64); larger pages may differ in the last
    # bit (the host splits the tiles among programs by the GPU's size).
    d = tl.arange(0, DP)
    dmask = d < D
    acc = tl.zeros((DP,), tl.float32)
    n = tl.zeros((BLOCK_T,), tl.int32)
    page = fp_ptr + b.to(tl.int64) * sfb + h * sfh + S * sft
    for i in range(tl.cdiv(P, BLOCK_T)):
        t = i * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < P
        x = _load_rope_undone(page, t, tmask, d, dmask, sft, 1, fp_ptr, fp_ptr, fp_ptr, 0, 0)  # (no RoPE here)
        s, keep = finite_rows_sum(x, tmask)
        acc += s
        n += keep.to(tl.int32)
    cnt = tl.full((DP,), 1.0, tl.float32) * tl.maximum(tl.sum(n, axis=0), 1).to(tl.float32)
    tl.store(mean_ptr + b * smb + h * smh + d, tl.math.div_rn(acc, cnt), mask=dmask)


@triton.jit
def _first_page_means_kernel(fpk_ptr, fpv_ptr, kmean_ptr, vmean_ptr, first_ptr, S, P, sfb, sfh, sft, smb, smh,
                             D: tl.constexpr, DP: tl.constexpr, CENTER_K: tl.constexpr, CENTER_V: tl.constexpr,
                             BLOCK_T: tl.constexpr):
    # One (sequence b, KV head h) per program; where first[b], the centering means of b's first page (its fp tokens
    # S .. S + P - 1) go to k_mean[b, h] / v_mean[b, h].
    b, h = tl.program_id(0), tl.program_id(1)
    if tl.load(first_ptr + b) != 0:
        if CENTER_K:
            _page_mean(fpk_ptr, kmean_ptr, b, h, S, P, sfb, sfh, sft, smb, smh, D, DP, BLOCK_T)
        if CENTER_V:
            _page_mean(fpv_ptr, vmean_ptr, b, h, S, P, sfb, sfh, sft, smb, smh, D, DP, BLOCK_T)


@triton.jit
def _advance_lengths_kernel(lens_ptr, bt_ptr, flags_ptr, max_batch, sbt, width, S, R, P, cap):
    # One sequence b per program: a static step's bookkeeping after the window write (PagedKVCache._advance_lengths).
    # lengths rows: tokens, compressed, uncompressed (sinks + window), sinks; flags rows: the window filled, its page
    # (block_table[b, compressed / P]) or -1, the sequence's first page, within the capacity.
    b = tl.program_id(0)
    n = tl.load(lens_ptr + b)
    comp = tl.load(lens_ptr + max_batch + b)
    fp = tl.load(lens_ptr + 2 * max_batch + b) + 1
    sink = tl.load(lens_ptr + 3 * max_batch + b)
    sink = sink + (sink < S).to(tl.int32)  # sinks fill first (the window is empty until they are complete)
    full = (fp - sink) >= R + P
    page = tl.load(bt_ptr + b * sbt + tl.minimum(comp // P, width - 1))
    nb = tl.num_programs(0)  # flags is [4, B]
    tl.store(flags_ptr + b, full.to(tl.int32))
    tl.store(flags_ptr + nb + b, tl.where(full, page, -1))
    tl.store(flags_ptr + 2 * nb + b, (full & (comp == 0)).to(tl.int32))
    tl.store(flags_ptr + 3 * nb + b, (n + 1 <= cap).to(tl.int32))
    tl.store(lens_ptr + b, n + 1)
    tl.store(lens_ptr + max_batch + b, comp + full.to(tl.int32) * P)
    tl.store(lens_ptr + 2 * max_batch + b, fp - full.to(tl.int32) * P)
    tl.store(lens_ptr + 3 * max_batch + b, sink)


def _zero_nonfinite(x: torch.Tensor) -> torch.Tensor:
    bad = ~torch.isfinite(x).all(dim=-1, keepdim=True)
    return torch.where(bad, torch.zeros((), dtype=x.dtype, device=x.device), x)


# torch.compile: static mode's append is one custom op while a compile traces it, with the cache tensors it writes
# declared (so the compiler orders it before the attention that reads them, and CUDA graphs keep their addresses:
# make_static marks them static). The cache travels as its tensors and numbers (PagedKVCache.static_view), so a graph
# traced with another capacity is traced again rather than replayed.

@torch.library.custom_op("nqkernels::paged_append_step",
                         mutates_args=("fp_k", "fp_v", "lengths", "k_codes", "k_scales", "v_codes", "v_scales",
                                       "k_mean", "v_mean"))
def _append_step_op(k: torch.Tensor, v: torch.Tensor, fp_k: torch.Tensor, fp_v: torch.Tensor, lengths: torch.Tensor,
                    k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor,
                    k_mean: torch.Tensor, v_mean: torch.Tensor, block_table: torch.Tensor, codec: int,
                    sink_tokens: int, recent_tokens: int, static_pages: int) -> None:
    """``PagedKVCache.append`` of one token per sequence in static mode, k, v ``[B, 1, H, D]``."""
    tensors = (fp_k, fp_v, lengths, k_codes, k_scales, v_codes, v_scales, k_mean, v_mean, block_table)
    view = PagedKVCache.static_view(codec_of(codec), tensors, sink_tokens, recent_tokens, static_pages)
    view._append_step(k, v, static_pages)


@_append_step_op.register_fake
def _(k, v, fp_k, fp_v, lengths, k_codes, k_scales, v_codes, v_scales, k_mean, v_mean, block_table, codec, sink_tokens,
      recent_tokens, static_pages):
    return None
