"""A transformers ``Cache`` whose layers hold HOT pages (``PagedKVCache``) after the prompt.

Life of a compressed layer (``CompressedLayer``):
    prefill   the first forward stores K/V like ``DynamicLayer`` and the model's own attention runs over them.
              Then the layer is compressed: left padding dropped per sequence, tokens encoded into a
              ``PagedKVCache`` (fp16 sinks and recent window, HOT pages in between), fp16 K/V freed. Quantization
              only: each layer right after its attention (the prompt's peak memory is one layer's fp16 K/V above
              the compressed rest). Eviction: every layer keeps its last ``window`` queries, and after the last
              compressed layer ``NQCache`` scores the tokens (window attention averaged over layers), selects per
              sequence and compresses all layers (the peak is the whole fp16 cache, as with ``DynamicCache``).
    decode    every later forward (one token, a speculative chunk, a new turn) appends its K/V to the pages and
              attends with ``decode_attention``. Pages are never compressed twice; rejected speculative tokens are
              cropped from the fp16 window.
Layers left uncompressed (by policy, sliding-window layers by default) are transformers' own layers.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, StaticCache

from nqkernels import PagedKVCache, decode_attention, score_tokens, select_tokens
from nqkernels import reference as ref
from nqkernels.config import is_int

from .policy import LayerPlan, Policy, plan_layers, resolve

# The layer whose ``update`` ran last on this thread and the key tensor it returned: transformers calls the
# attention function right after ``update`` with that tensor, which is how the function finds its layer.
_last_update = threading.local()


def take_layer(key: torch.Tensor) -> Optional["CompressedLayer"]:
    """The ``CompressedLayer`` that returned ``key`` from its last ``update`` (once), or None."""
    layer = getattr(_last_update, "layer", None)
    if layer is None or _last_update.key is not key:
        return None
    _last_update.layer = _last_update.key = None
    return layer


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's cache: dense during the prompt, then ``hot`` (a ``PagedKVCache`` over the compressed KV
    heads) plus, with ``keep_heads``, the uncompressed heads' fp K/V."""

    is_croppable = True

    def __init__(self, cache: "NQCache", index: int, plan: LayerPlan):
        super().__init__()
        self.cache, self.index, self.plan = cache, index, plan
        self.is_sliding = plan.sliding
        self.seen = 0             # tokens fed by the model (padding included): what transformers sees as length
        self.hot: Optional[PagedKVCache] = None
        self.queries = None       # [B, W, Hq, D] last prompt queries (eviction scoring) and their softmax scale
        self.scale = None
        self.kept_k = self.kept_v = None  # [B, Hk, capacity, D] keep_heads tokens, left-aligned per sequence
        self.kept_lens: list = []
        self.seen_t: Optional[torch.Tensor] = None  # static: ``seen`` as a device scalar (no recompile per step)

    @property
    def is_compileable(self) -> bool:
        return self.cache.policy.static

    @property
    def static(self) -> bool:
        """Whether decode steps run in static mode now (policy ``static``, prompt compressed)."""
        return self.hot is not None and self.cache.policy.static

    # -- the CacheLayerMixin API ---------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        B, H, _, D = key_states.shape
        self.keys, self.values = key_states.new_empty(B, H, 0, D), value_states.new_empty(B, H, 0, D)
        if self.cache.policy.static:
            self.seen_t = torch.zeros((), dtype=torch.long, device=self.device)
            torch._dynamo.mark_static_address(self.seen_t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states ``[B, H, T, D]`` (post-RoPE). Before compression: returns all K/V (the model's
        attention runs on them); after: appends to the pages and returns the new tokens."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.hot is None:
            self.keys = torch.cat((self.keys, key_states), dim=-2)
            self.values = torch.cat((self.values, value_states), dim=-2)
            out = (self.keys, self.values)
        else:
            self._append(key_states, value_states)
            out = (key_states, value_states)
        if self.seen_t is not None:
            self.seen_t.add_(key_states.shape[-2])
        if not self.static:  # a compiled step reads no host-side count (it would be a constant of the graph)
            self.seen += key_states.shape[-2]
        _last_update.layer, _last_update.key = self, out[0]
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Static: the mask of a fixed shape, as transformers' StaticLayer (attention over pages ignores it).
        return (self.cache.max_tokens, 0) if self.static else (self.seen + query_length, 0)

    def get_seq_length(self):
        return self.seen_t if self.static else self.seen

    def get_max_length(self) -> int:
        return self.cache.max_tokens if self.cache.policy.static else -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last tokens (negative: that many; positive: keep that many, the transformers < 5.18 form)."""
        if self.static:  # (first: seen is stale while static)
            raise ValueError("crop is not available on the compiled decode path (static=True): decode steps keep "
                             "their lengths on the device")
        tokens_to_remove = int(tokens_to_remove)  # transformers < 5.18 passes a 0-d tensor
        n = -tokens_to_remove if tokens_to_remove <= 0 else max(0, self.seen - tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return
        if self.hot is None:
            self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        else:
            self.hot.crop(n)
            self.kept_lens = [x - n for x in self.kept_lens]
        self.seen -= n

    def reset(self) -> None:
        self.keys = self.values = self.hot = self.queries = self.kept_k = self.kept_v = self.seen_t = None
        self.kept_lens, self.seen, self.is_initialized = [], 0, False

    def reorder_cache(self, *args):
        # Beams would share and fork pages (reference counts, copy-on-write); generate refuses beam search before
        # it starts (patch.py), this guards direct calls.
        raise ValueError("the compressed cache does not reorder or repeat its sequences (beam search, contrastive "
                         "search): each sequence owns its pages")

    batch_repeat_interleave = batch_select_indices = reorder_cache

    # -- attention -----------------------------------------------------------------------------------------------
    def attend(self, module, query, key, value, attention_mask, base, kwargs):
        """Attention of ``query`` ``[B, Hq, T, D]``; returns ``([B, T, Hq, D], None)`` as transformers' functions
        do. Before compression: the model's own attention (``base``), then compression after the last layer."""
        if self.hot is None:
            out = base(module, query, key, value, attention_mask, **kwargs)
            if not self.cache.policy.evict:  # quantization only: each layer compresses at once (lower peak)
                self.cache.compress([self])
                return out
            self.queries = query[:, :, -self.cache.policy.window:].transpose(1, 2).clone()  # not a view of all
            self.scale = kwargs.get("scaling")
            if self.index == self.cache.last_compressed:  # eviction: one selection from every layer's scores
                self.cache.compress()
            return out
        q = query.transpose(1, 2)
        opts = dict(softmax_scale=kwargs.get("scaling"), softcap=kwargs.get("softcap") or None,
                    window=kwargs.get("sliding_window") or None)
        if not self.plan.keep_heads:
            out = decode_attention(q.to(self.hot.dtype), self.hot, **opts).to(query.dtype)
            if self.cache.policy.static and self.hot.static_pages is None:  # after a new turn's chunk
                self.hot.make_static(self._capacity(self.hot.seq_lens()))
            return out, None
        qc, qk = self.cache.query_heads(q.shape[2])
        out = torch.empty_like(q)
        out[:, :, qc] = decode_attention(q[:, :, qc].to(self.hot.dtype), self.hot, **opts).to(q.dtype)
        out[:, :, qk] = self._kept_attention(q[:, :, qk], opts)
        return out, None

    def _capacity(self, lens) -> int:
        """Static mode's reservation: the longest sequence held (``lens``, evicted tokens gone) plus the tokens still
        to come before ``max_cache_len`` counts every token fed (``seen``, the prompt's evicted tokens included)."""
        return max(lens) + max(0, self.cache.max_tokens - int(self.seen_t))

    def _kept_attention(self, q, opts) -> torch.Tensor:
        # Dense attention of the kept heads' queries [B, T, Hq', D] over their fp K/V (ragged lengths).
        B, T = q.shape[:2]
        L = max(self.kept_lens)
        lens = torch.tensor(self.kept_lens, device=q.device)
        k = self.kept_k[:, :, :L].transpose(1, 2)
        v = self.kept_v[:, :, :L].transpose(1, 2)
        k_index = torch.arange(L, device=q.device).expand(B, L)
        q_index = lens[:, None] - T + torch.arange(T, device=q.device)[None]
        scale = opts["softmax_scale"] or q.shape[-1] ** -0.5
        return ref.attention(q, k, v, q_index, k_index, k_index < lens[:, None], scale=scale,
                             softcap=opts["softcap"], window=opts["window"]).to(q.dtype)

    # -- compression ---------------------------------------------------------------------------------------------
    def encode(self, k, v, lens: list, selection, positions) -> None:
        """Build ``hot`` from left-aligned prompt K/V ``[B, T, H, D]`` with ``lens`` real tokens per sequence, the
        kept tokens of ``selection`` (or all), RoPE positions ``[B, T]`` (undo_rope) or None; free the dense K/V."""
        codec, policy = self.plan.codec, self.cache.policy
        comp, keep = self.cache.head_split
        kc, vc = (k[:, :, comp], v[:, :, comp]) if keep else (k, v)  # (no copy of the prompt when every head is)
        counts = lens
        if positions is not None:
            positions = positions[:, None].expand(-1, len(comp), -1)
        if selection is not None:
            kc, vc, counts = selection.gather(kc), selection.gather(vc), selection.counts.tolist()
            if positions is not None:
                positions = positions.gather(2, selection.indices.to(positions.device))
        B, P = k.shape[0], codec.page_size
        dtype = self.dtype if self.dtype in (torch.float16, torch.bfloat16) else torch.float16
        widest = max(1, -(-max(counts) // P))
        cap = self._capacity(counts) if policy.static else None
        if policy.static:  # every page up to the capacity now (make_static reserves them)
            widest = max(widest, (cap - policy.sinks - policy.fp_window) // P)
        self.hot = PagedKVCache(codec, num_kv_heads=len(comp), max_batch=B, num_pages=widest * B,
                                max_pages_per_seq=widest + 1, sink_tokens=policy.sinks, recent_tokens=policy.fp_window,
                                dtype=dtype, device=k.device)
        self.hot.append(kc, vc, lengths=counts, positions=positions)
        if policy.static:
            self.hot.make_static(cap)
        if keep:
            T = k.shape[1]
            self.kept_k = torch.zeros(B, len(keep), T + 64, k.shape[-1], dtype=self.dtype, device=k.device)
            self.kept_v = torch.zeros_like(self.kept_k)
            self.kept_k[:, :, :T] = k[:, :, keep].transpose(1, 2)
            self.kept_v[:, :, :T] = v[:, :, keep].transpose(1, 2)
            self.kept_lens = list(lens)
        B, H, _, D = self.keys.shape  # new empty tensors: a zero-length view would keep the whole prompt alive
        self.keys, self.values = self.keys.new_empty(B, H, 0, D), self.values.new_empty(B, H, 0, D)
        self.queries = None

    def _append(self, key_states, value_states) -> None:
        B, _, T, _ = key_states.shape
        if B != self.hot.max_batch:
            raise ValueError(f"batch {B} differs from the {self.hot.max_batch} sequences this cache was prefilled "
                             f"with")
        comp, keep = self.cache.head_split
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        if self.cache.policy.static:  # one token per sequence: device-side; a new turn's chunk on the host bookkeeping
            if T == 1 and self.hot.static_pages is not None:  # (attend returns to static mode after its attention)
                self.hot.append(k, v)
                return
            fed = int(self.seen_t)
            if fed + T > self.cache.max_tokens:
                raise ValueError(f"this chunk of {T} tokens would take the sequences to {fed + T} tokens, past the "
                                 f"max_cache_len={self.cache.max_tokens} of this static cache")
            self.hot.sync_host()
            self.seen = fed  # stale while static: from the device count (the chunk is added by update's seen_t)
            self.hot.append(k, v)
            return
        need, widest = self.hot.pages_needed([T] * B)
        if need or widest > self.hot.block_table.shape[1]:
            pool = self.hot.k_codes.shape[0]
            self.hot.grow(max(need, pool // 64, B), widest + max(1, widest // 8))  # small steps: little slack
        positions = self.cache.positions(B, T, self.seen, k.device) if self.plan.codec.rope is not None else None
        self.hot.append(k[:, :, comp], v[:, :, comp], positions=positions)
        if keep:
            self._append_kept(k[:, :, keep], v[:, :, keep])

    def _append_kept(self, k, v) -> None:
        T = k.shape[1]
        end = max(self.kept_lens) + T
        if end > self.kept_k.shape[2]:
            grow = max(T, self.kept_k.shape[2] // 8, 64)
            pad = self.kept_k.new_zeros(*self.kept_k.shape[:2], grow, self.kept_k.shape[3])
            self.kept_k, self.kept_v = torch.cat((self.kept_k, pad), 2), torch.cat((self.kept_v, pad), 2)
        for b, n in enumerate(self.kept_lens):
            self.kept_k[b, :, n:n + T] = k[b].transpose(0, 1)
            self.kept_v[b, :, n:n + T] = v[b].transpose(0, 1)
        self.kept_lens = [n + T for n in self.kept_lens]

    def nbytes(self, fp_element_bytes: Optional[int] = None) -> int:
        """Bytes held: the pages and fp buffers once compressed, else the dense K/V (uncompressed K/V counted at
        ``fp_element_bytes`` per element when given)."""
        dense = (self.keys, self.values) if self.hot is None else (self.kept_k, self.kept_v)
        size = sum(t.numel() * (fp_element_bytes or t.element_size()) for t in dense if t is not None)
        return size + (0 if self.hot is None else self.hot.nbytes())


class NQCache(Cache):
    """A transformers cache compressing the layers a ``Policy`` names (others are transformers' own layers).

    ``patch``/``compress`` make ``generate`` build one; pass one yourself as ``**with_cache(model, NQCache(model))``
    (``cache=`` on transformers >= 5.24, ``past_key_values=`` before) for
    manual forwards (the model must be patched, so its attention finds the compressed layers).

    Args:
        model: the transformers model (or its config).
        preset: a preset name, ``kXvY[-evictNN]``, or a ``Policy``; ``options`` replace its fields.
        max_cache_len: the longest sequence (prompt and new tokens), needed by ``static=True`` (the compiled decode
            path; ``generate`` passes its ``max_length``).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from integrations.hf import NQCache, compress
        >>> cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        ...                   num_key_value_heads=2, vocab_size=100)
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> with compress(model, preset="balanced", fp_window=16, page_size=16):
        ...     out = model.generate(torch.randint(100, (1, 80)), max_new_tokens=4, do_sample=False)
        >>> out.shape
        torch.Size([1, 84])
    """

    def __init__(self, model, preset="balanced", max_cache_len: Optional[int] = None, **options):
        config = getattr(model, "config", model)
        self.policy: Policy = resolve(preset, **options)
        self.plans = plan_layers(config, self.policy)
        self.max_tokens = max_cache_len  # static: the longest sequence (transformers names it max_cache_len)
        if self.policy.static:
            if not is_int(max_cache_len) or max_cache_len < 1:
                raise ValueError(f"static=True needs max_cache_len, an int >= 1 (the longest sequence, prompt "
                                 f"included; generate passes its max_length), got {max_cache_len!r}")
            base = StaticCache(config=config, max_cache_len=max_cache_len)
        else:
            base = DynamicCache(config=config)
        layers = [CompressedLayer(self, i, p) if p.codec is not None else base.layers[i]
                  for i, p in enumerate(self.plans)]
        super().__init__(layers=layers)
        cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        keep = sorted(set(self.policy.keep_heads))
        self.head_split = ([h for h in range(self.num_kv_heads) if h not in keep], keep)
        self.last_compressed = max((i for i, p in enumerate(self.plans) if p.codec is not None), default=-1)
        self.attention_mask: Optional[torch.Tensor] = None  # the model forward's 2-D mask and position ids
        self.prompt_mask: Optional[torch.Tensor] = None  # generate's 2-D mask of the prompt (its forwards may get 4-D)
        self.position_ids: Optional[torch.Tensor] = None

    @property
    def compressed(self) -> bool:
        """Whether the prompt has been compressed (after the first forward)."""
        return any(isinstance(l, CompressedLayer) and l.hot is not None for l in self.layers)

    def nbytes(self, fp_element_bytes: Optional[int] = None) -> int:
        """Bytes the cache's tensors hold, all layers, all metadata (pages, scales, means, positions, fp16 sinks and
        window, block tables; uncompressed layers' K/V). ``fp_element_bytes``: count uncompressed K/V at that many
        bytes per element (2: what an fp16 deployment holds, for a model run in fp32)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                total += layer.nbytes(fp_element_bytes)
            elif getattr(layer, "keys", None) is not None:
                total += sum(t.numel() * (fp_element_bytes or t.element_size()) for t in (layer.keys, layer.values))
        return total

    def observe(self, attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor]) -> None:
        """Record the current forward's 2-D attention mask and position ids (the patched model does this)."""
        self.attention_mask, self.position_ids = attention_mask, position_ids

    def query_heads(self, num_q_heads: int) -> tuple:
        """Query head indices served by the compressed and by the kept KV heads."""
        group = num_q_heads // self.num_kv_heads
        comp, keep = self.head_split
        return ([h * group + g for h in comp for g in range(group)],
                [h * group + g for h in keep for g in range(group)])

    def positions(self, B: int, T: int, seen: int, device) -> torch.Tensor:
        """int ``[B, T]`` RoPE positions of this forward's T tokens (its position_ids, else seen..seen+T-1)."""
        if self.position_ids is not None and self.position_ids.shape[-1] == T:
            return self.position_ids.to(device).expand(B, T)
        return torch.arange(seen, seen + T, device=device).expand(B, T)

    def _padding(self, B: int, T: int, device) -> torch.Tensor:
        """Left-padding tokens per sequence of the prompt, from the 2-D attention mask (0 without one)."""
        mask = self.attention_mask
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):  # a compileable cache's forward gets 4-D masks
            mask = self.prompt_mask
            if mask is None and self.attention_mask is not None and B > 1:
                raise ValueError("the forward got a 4-D attention mask, from which the compressed cache cannot tell "
                                 "each sequence's left padding: pass the 2-D attention_mask (generate does)")
        if mask is None or mask.dim() != 2:
            return torch.zeros(B, dtype=torch.long, device=device)
        mask = mask[:, :T].to(device).bool()
        pads = T - mask.sum(1)
        real = torch.arange(T, device=device)[None] >= pads[:, None]
        if not torch.equal(mask, real):
            raise ValueError("the attention mask is not left padding (zeros then ones per row): the compressed cache "
                             "needs tokenizer.padding_side='left' for batched prompts")
        return pads

    @torch.no_grad()
    def compress(self, layers: Optional[list] = None) -> None:
        """Compress the prompt of ``layers`` (default: every compressed layer, as eviction needs; called after the
        first forward's last compressed layer)."""
        layers = layers or [l for l in self.layers if isinstance(l, CompressedLayer)]
        B, _, T, _ = layers[0].keys.shape
        device = layers[0].keys.device
        pads = self._padding(B, T, device)
        lens = (T - pads).tolist()
        src = (torch.arange(T, device=device)[None] + pads[:, None]).clamp(max=T - 1)  # left-align each sequence

        def aligned(x):  # [B, H, T, D] → [B, T, H, D], sequence b's real tokens first
            x = x.transpose(1, 2)
            return x if not any(lens[b] != T for b in range(B)) else x.gather(
                1, src[:, :, None, None].expand(-1, -1, *x.shape[2:]))

        positions = None
        if any(l.plan.codec.rope is not None for l in layers):
            positions = self.positions(B, T, 0, device).gather(1, src).to(torch.int32)
        selection = None
        if self.policy.evict:
            selection = select_tokens(self._scores(layers, aligned, lens), seq_lens=lens, evict=self.policy.evict,
                                      sinks=self.policy.sinks, recent=self.policy.recent)
        for layer in layers:
            layer.encode(aligned(layer.keys), aligned(layer.values), lens, selection, positions)

    def _scores(self, layers, aligned, lens) -> torch.Tensor:
        """Window-attention scores of the compressed heads averaged over layers: one selection for all layers."""
        comp, _ = self.head_split
        total = None
        for layer in layers:
            qc, _ = self.query_heads(layer.queries.shape[2])
            k = aligned(layer.keys)[:, :, comp]
            s = score_tokens(layer.queries[:, :, qc].to(k.dtype), k, seq_lens=lens, pool=self.policy.pool,
                             softmax_scale=layer.scale)
            total = s if total is None else total + s
        return total / len(layers)
