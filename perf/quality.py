"""The quality harness: continuation perplexity and passkey retrieval through a compressed cache.

    python -m perf.quality --model DIR --text FILE --preset k3v2 --preset evict50 [--passkey 40] [--json]

    python -m perf.quality ... --passkey 40 --needle " The secret code is {key}. " --question " The secret code is"

Protocol (per chunk of P + C tokens of the text): prefill P tokens uncompressed, compress the cache, then feed the
next C tokens through the compressed cache in one forward and score the C - 1 targets after the first
(continuation perplexity). Passkey: a line "The pass key is NNNNN. Remember it." hidden at a random depth of a
``--passkey-length``-token stretch of the text, followed by "What is the pass key? The pass key is"; everything
but the last prompt token is prefilled and compressed, so every generated token (greedy) comes from the
compressed cache. ``--needle`` / ``--question`` (with ``--passkey N``) replace those two templates, for models
tuned on other prompt formats: the needle must contain ``{key}`` where the five-digit key goes (literal braces
written ``{{`` ``}}``), the question must not; an answer counts when the generated text starts with the key. The
uncompressed no-op control (``fp16``) always runs first through the same harness and must reproduce the plain model
(one forward over each whole chunk) to 4 decimals.

Attention during the harness is the model's causal attention with the keys of the (possibly shorter) cache all
visible to new tokens, and RoPE at the tokens' true positions, so evicted caches are attended correctly.

Presets: ``fp16`` (no-op); ``kXvY`` (quant only, X/Y in 2..4 bits: the HOT format in a ``PagedKVCache``, attention over
what it stores); ``kXvY-alloc`` (at most the same HOT bytes per token, bits moved between layers and between keys and values by
``integrations.hf.allocate_layer_bits`` on ``--calibration-chunks`` chunks of ``--calibration-text`` (which must not be
``--text``) with the same ``--prefix``, once per budget before any preset runs; ``kXvY-alloc+N``: N more bits' bytes over
the layers, e.g. ``k2v2-alloc+1``, its bits column K2V2+1); ``evictNN`` (NN% of tokens evicted, default scorer, fp16 kept
tokens); ``kXvY-evictNN``; scorer variants ``evictNN-<scorer>`` with scorer in window (default), window-max, knorm,
random, and a layer schedule ``-pyramid``; named presets (``NAMED``); kvpress presses ``kvpress-<press>-NN`` with press
in snapkv, expected, knorm, streaming, tova, random (needs ``pip install --no-deps kvpress``; see
perf/results/quality_fixture.md); ``hf-<preset>[+<variant>]``: an ``integrations.hf`` preset through the real
``NQCache`` and patched model (the path users run; fp16 sinks and recent window), variants the per-layer policies of
``HF_VARIANTS``.
Peers: ``nexusquant-kXvY`` (the prior art, ``nexusquant-kv``'s quant_only mode: it writes the dequantized fp16 back
into the DynamicCache), ``quanto-intN`` (N in 2, 4) and ``hqq-intN`` (N in
2, 3, 4): transformers' ``QuantizedCache`` with its defaults (groups of 64, a 128-token fp16 residual); the
``peers`` extra installs all three. ``turboquant-kXvY`` (X in 2..5, Y in 1..4) and ``turboquant-mse-kXvY`` (X, Y in
1..4): TurboQuant (arXiv 2504.19874) implemented from the paper in perf/turboquant.py, keys by its inner-product
quantizer (an (X-1)-bit Lloyd-Max codebook after a random rotation + a 1-bit QJL sketch of the residual) or its MSE
quantizer, values by its MSE quantizer; the dequantized K/V (for QJL keys the paper's DeQuant_prod, whose dot
product with a query is its unbiased estimator) are attended by the harness's attention, and bytes are the packed
codes, signs and fp16 norms it stores. Integration presets and QuantizedCache peers are fed the
continuation ``HF_STEP`` tokens per forward, as decoding feeds them.
Bytes per token are measured from the cache tensors (codes, scales, means, positions, fp16 sinks/window buffers,
block tables; a peer's quantized tensors, scales and zero points), over all layers, per prefix token; floating-point
tensors count 2 bytes per element (the fp16 a server stores), integer tensors their real size.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from nqkernels import (KVCodec, PagedKVCache, key_norm_scores, layer_budgets, random_scores, score_tokens,
                       select_tokens)
from integrations.hf import PRESETS as HF_PRESETS
from integrations.hf import NQCache, with_cache
from perf import turboquant
from perf.continuation import load_chunks, load_model

# The named presets of integrations.hf, spelled in the harness's grammar (one definition of what they are).
NAMED = {name: f"k{p.key_bits}v{p.value_bits}" + (f"-evict{round(100 * p.evict)}" if p.evict else "")
         for name, p in HF_PRESETS.items()}
# Per-layer policies of integrations.hf presets (``hf-<preset>+<variant>``); "graduated" is filled per model.
HF_VARIANTS = {"boundary1-fp16": {"boundary_layers": 1},
               "boundary1-k4v4": {"boundary_layers": 1, "boundary_bits": (4, 4)},
               "graduated": {"layer_bits": "graduated"}, "keep-head0": {"keep_heads": (0,)},
               "keep-layer0": {"keep_layers": (0,)}, "fp-window16": {"fp_window": 16}, "page32": {"page_size": 32}}
HF_STEP = 16  # continuation tokens per forward through an NQCache (at most its fp16 window minus a margin)
SCORERS = ("window", "window-max", "window-layer", "knorm", "random")
PRESSES = {"snapkv": "SnapKVPress", "expected": "ExpectedAttentionPress", "knorm": "KnormPress",
           "streaming": "StreamingLLMPress", "tova": "TOVAPress", "random": "RandomPress"}
QUANTIZED_CACHE_BITS = {"quanto": (2, 4), "hqq": (2, 3, 4)}  # transformers' QuantizedCache backends
TURBOQUANT = tuple(turboquant.KEY_BITS)  # peers implemented in perf/turboquant.py
NEEDLE, QUESTION = " The pass key is {key}. Remember it. ", " What is the pass key? The pass key is"


@dataclass
class Preset:
    """A parsed preset: quantization bits (None: fp16), eviction fraction, scorer, layer schedule, or a press."""
    name: str
    bits: Optional[tuple] = None
    evict: float = 0.0
    scorer: str = "window"
    schedule: str = "uniform"
    press: Optional[str] = None
    options: dict = field(default_factory=dict)
    hf: Optional[str] = None  # an integrations.hf preset run through NQCache; options: its per-layer policy
    peer: Optional[str] = None  # a peer's cache: "nexusquant", "quanto", "hqq", "turboquant", "turboquant-mse"

    @property
    def noop(self) -> bool:
        return self.bits is None and self.evict == 0.0 and self.press is None and self.hf is None and self.peer is None

    @property
    def streams(self) -> bool:
        """Whether the cache quantizes what a forward appends (fed ``HF_STEP`` tokens per forward, as decoding)."""
        return self.hf is not None or self.peer in QUANTIZED_CACHE_BITS


def parse_preset(name: str) -> Preset:
    """``fp16`` | ``kXvY`` | ``evictNN[-scorer][-pyramid]`` | ``kXvY-evictNN[...]`` | ``kvpress-<press>-NN`` | a
    named preset. Raises ValueError naming what is allowed."""
    spelled = NAMED.get(name, name)
    if spelled == "fp16":
        return Preset(name)
    m = re.fullmatch(r"hf-([a-z0-9-]+?)(?:\+([a-z0-9-]+))?", spelled)
    if m:
        from integrations.hf import resolve
        resolve(m.group(1))  # raises for an unknown preset
        if m.group(2) and m.group(2) not in HF_VARIANTS:
            raise ValueError(f"unknown policy variant {m.group(2)!r}; allowed: {tuple(HF_VARIANTS)}")
        return Preset(name, hf=m.group(1), options=dict(HF_VARIANTS.get(m.group(2), {})))
    tq = turboquant.parse(spelled)  # raises for a malformed turboquant-... name
    if tq:
        return Preset(name, bits=tq[1:], peer=tq[0])
    m = re.fullmatch(r"nexusquant-k([2-4])v([2-4])", spelled)
    if m:
        return Preset(name, bits=(int(m.group(1)), int(m.group(2))), peer="nexusquant")
    m = re.fullmatch(r"(quanto|hqq)-int(\d)", spelled)
    if m:
        if int(m.group(2)) not in QUANTIZED_CACHE_BITS[m.group(1)]:
            raise ValueError(f"{m.group(1)} QuantizedCache bits must be one of {QUANTIZED_CACHE_BITS[m.group(1)]}, "
                             f"got {m.group(2)} in {name!r}")
        return Preset(name, bits=(int(m.group(2)),) * 2, peer=m.group(1))
    m = re.fullmatch(r"kvpress-([a-z]+)-(\d{1,2})", spelled)
    if m:
        if m.group(1) not in PRESSES:
            raise ValueError(f"unknown kvpress press {m.group(1)!r}; allowed: {tuple(PRESSES)}")
        return Preset(name, evict=int(m.group(2)) / 100, press=m.group(1))
    m = re.fullmatch(r"k([2-4])v([2-4])-alloc(?:\+(\d{1,2}))?", spelled)
    if m:
        return Preset(name, bits=(int(m.group(1)), int(m.group(2))),
                      options={"alloc": True, "extra_bits": int(m.group(3) or 0)})
    m = re.fullmatch(r"(?:k([2-4])v([2-4]))?-?(?:evict(\d{1,2})((?:-[a-z-]+)?))?", spelled)
    if not m or not (m.group(1) or m.group(3)):
        raise ValueError(f"unknown preset {name!r}; allowed: fp16, kXvY (X, Y in 2..4), evictNN, kXvY-evictNN, "
                         f"evictNN-<scorer> ({', '.join(SCORERS)}), ...-pyramid, kvpress-<press>-NN "
                         f"({', '.join(PRESSES)}), kXvY-alloc[+N], nexusquant-kXvY, quanto-intN, hqq-intN, "
                         f"turboquant[-mse]-kXvY, "
                         f"hf-<preset>[+<variant>], "
                         f"or one of {tuple(NAMED)}")
    p = Preset(name, bits=(int(m.group(1)), int(m.group(2))) if m.group(1) else None,
               evict=int(m.group(3)) / 100 if m.group(3) else 0.0)
    rest = (m.group(4) or "").lstrip("-")
    if rest.endswith("pyramid"):
        p.schedule, rest = "pyramid", rest[:-len("pyramid")].rstrip("-")
    if rest:
        if rest not in SCORERS:
            raise ValueError(f"unknown scorer {rest!r} in preset {name!r}; allowed: {SCORERS}")
        p.scorer = rest
    return p


# ---------------------------------------------------------------------------------------------------------------
class _EvalAttention:
    """Causal attention in which a new chunk sees every cached key (however many were evicted), registered with
    transformers' attention interface; optionally keeps the last ``window`` queries of each layer (post-RoPE)."""
    name = "nq_quality"

    def __init__(self, window: int):
        self.window, self.capture = window, None

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if self.capture is not None:
            self.capture[module.layer_idx] = query[:, :, -self.window:].transpose(1, 2)
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        q_len, kv_len = query.shape[2], key.shape[2]
        mask = None
        if q_len > 1:
            mask = (torch.arange(kv_len, device=query.device)[None, :]
                    <= torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None


def _register(attn: _EvalAttention) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(attn.name, attn)
    AttentionMaskInterface.register(attn.name, lambda *args, **kwargs: None)  # the function masks by itself


class Harness:
    """Runs presets through the protocol on one model. ``sinks``/``recent``: tokens every eviction keeps;
    ``window``: observation-window queries of the default scorer; ``pool``: its pooling kernel; ``calibration``:
    ``[N, T]`` ids the ``kXvY-alloc`` presets allocate their layers' bits on, the first ``calibration_prefix`` tokens
    of each chunk prefilled (the evaluation's prefix; required with ``calibration``)."""

    def __init__(self, model, *, sinks: int = 4, recent: int = 32, window: int = 32, pool: int = 31,
                 page_size: int = 64, calibration: Optional[torch.Tensor] = None,
                 calibration_prefix: Optional[int] = None):
        from nqkernels import RopeSpec

        self.model = model
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rope = RopeSpec.from_hf_config(cfg)
        self.sinks, self.recent, self.window, self.pool, self.page_size = sinks, recent, window, pool, page_size
        self.attn = _EvalAttention(window)
        _register(self.attn)
        self.plain_impl = model.config._attn_implementation
        self.decode_bytes = None  # while a continuation runs: bytes held per cached token after each forward
        if calibration is not None and calibration_prefix is None:
            raise ValueError("calibration_prefix is required with calibration: the tokens prefilled per calibration "
                             "chunk (the evaluation's prefix)")
        self.calibration, self.calibration_prefix = calibration, calibration_prefix
        self._layer_bits: dict = {}

    def layer_bits(self, preset: Preset) -> list:
        """Per-layer (key_bits, value_bits) of a quantizing preset: its bits in every layer, or for ``kXvY-alloc``
        ``integrations.hf.allocate_layer_bits`` on the calibration chunks at that budget over every layer the harness
        compresses (computed once, with the model's own attention; None: a layer kind no cache compresses, kept
        fp16). ``attention`` computes it before it sets the harness's attention."""
        if not preset.options.get("alloc"):
            return [preset.bits] * self.num_layers
        key = (preset.bits, preset.options["extra_bits"])
        if key not in self._layer_bits:
            if self.calibration is None:
                raise ValueError(f"preset {preset.name!r} allocates bits on calibration text: pass calibration ids")
            from integrations.hf import Policy, allocate_layer_bits

            sys.stderr.write(f"  {preset.name}: allocating bits on {len(self.calibration)} calibration chunks\n")
            self.model.set_attn_implementation(self.plain_impl)
            self._layer_bits[key] = list(allocate_layer_bits(
                self.model, self.calibration, *preset.bits, extra_bits=preset.options["extra_bits"],
                prefix=self.calibration_prefix, policy=Policy(compress_sliding=True),  # the harness compresses all
                progress=lambda line: sys.stderr.write(f"    {line}\n")))
        return self._layer_bits[key]

    @property
    def fp16_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2

    # -- compression ---------------------------------------------------------------------------------------------
    def scores(self, preset: Preset, cache, queries) -> list:
        """Per layer ``[B, H, T]`` token scores. ``window`` / ``window-max``: the observation window's attention
        (mean / max over its rows) of every layer, averaged over layers, so all layers keep the tokens any layer's
        window attends to (docs/eviction.md); ``window-layer``: each layer its own (SnapKV's rule)."""
        keys = [layer.keys.transpose(1, 2) for layer in cache.layers]  # [B, T, H, D]
        if preset.scorer == "knorm":
            return [key_norm_scores(k) for k in keys]
        if preset.scorer == "random":
            return [random_scores(k, generator=torch.Generator().manual_seed(1234 + li)) for li, k in enumerate(keys)]
        aggregate = "max" if preset.scorer == "window-max" else "mean"
        per_layer = [score_tokens(queries[li].to(k.dtype), k, aggregate=aggregate, pool=self.pool)
                     for li, k in enumerate(keys)]
        if preset.scorer == "window-layer":
            return per_layer
        shared = torch.stack(per_layer).mean(0)
        return [shared] * len(keys)

    def compress(self, preset: Preset, cache, queries) -> tuple:
        """Replace a prefilled DynamicCache by what the preset keeps. Returns (new cache, bytes held)."""
        from transformers import DynamicCache

        new, nbytes = DynamicCache(), 0
        keeps = layer_budgets(self.num_layers, 1.0 - preset.evict, preset.schedule) if preset.evict else None
        scores = self.scores(preset, cache, queries) if keeps is not None else None
        layer_bits = self.layer_bits(preset) if preset.bits is not None else [None] * self.num_layers
        for li, layer in enumerate(cache.layers):
            k, v = layer.keys.transpose(1, 2), layer.values.transpose(1, 2)  # [B, T, H, D]
            positions = None
            if keeps is not None:
                sel = select_tokens(scores[li], evict=1.0 - keeps[li], sinks=self.sinks, recent=self.recent)
                k, v, positions = sel.gather(k), sel.gather(v), sel.positions
            if layer_bits[li] is None:
                k, v = k.half(), v.half()
                nbytes += k.nbytes + v.nbytes
                k, v = k.float(), v.float()
            else:
                codec = KVCodec(head_dim=self.head_dim, key_bits=layer_bits[li][0], value_bits=layer_bits[li][1],
                                page_size=self.page_size)
                T = k.shape[1]
                hot = PagedKVCache(codec, num_kv_heads=self.num_kv_heads, max_batch=k.shape[0],
                                   num_pages=k.shape[0] * max(1, T // self.page_size), sink_tokens=0,
                                   recent_tokens=0, dtype=torch.float16, device=k.device)
                hot.append(k, v, positions=positions)
                nbytes += hot.nbytes()
                k, v, _ = hot.dense()
            new.update(k.transpose(1, 2).to(layer.keys.dtype), v.transpose(1, 2).to(layer.values.dtype), li)
        return new, nbytes

    def prefill(self, preset: Preset, ids: torch.Tensor):
        """Prefill ``ids`` and compress. Returns (cache, bytes held per prefix token)."""
        from transformers import DynamicCache

        if preset.hf is not None:
            cache = NQCache(self.model, preset.hf, **self.hf_options(preset))
            self.model(ids, **with_cache(self.model, cache), use_cache=True)
            return cache, self.held(preset, cache) / ids.shape[1]
        if preset.peer is not None:
            return self.prefill_peer(preset, ids)
        cache = DynamicCache()
        self.attn.capture = {} if (preset.evict and preset.press is None) else None
        try:
            if preset.press is not None:
                with _press(preset)(self.model):  # kvpress reads cache_position, which transformers >= 5.3 dropped
                    self.model(ids, **with_cache(self.model, cache), use_cache=True,
                               cache_position=torch.arange(ids.shape[1], device=ids.device))
                nbytes = sum(2 * (l.keys.numel() + l.values.numel()) for l in cache.layers)
                return cache, nbytes / ids.shape[1]
            self.model(ids, **with_cache(self.model, cache), use_cache=True)
            queries = self.attn.capture
        finally:
            self.attn.capture = None
        if preset.noop:
            return cache, self.fp16_bytes_per_token
        cache, nbytes = self.compress(preset, cache, queries)
        return cache, nbytes / ids.shape[1]

    def prefill_peer(self, preset: Preset, ids: torch.Tensor):
        """Prefill through a peer's cache. Returns (cache, bytes held per prefix token)."""
        from transformers import DynamicCache, QuantizedCache

        if preset.peer in TURBOQUANT:
            cache, tq = DynamicCache(), self.turboquant(preset, ids.device)
            self.model(ids, **with_cache(self.model, cache), use_cache=True)
            new, nbytes = DynamicCache(), 0
            for li, layer in enumerate(cache.layers):
                k, v, b = tq.compress(li, layer.keys, layer.values)
                new.update(k.to(layer.keys.dtype), v.to(layer.values.dtype), li)
                nbytes += b
            return new, nbytes / ids.shape[1]
        if preset.peer == "nexusquant":
            nexusquant = _import_peer("nexusquant", "pip install nexusquant-kv")
            cache = DynamicCache()
            self.model(ids, **with_cache(self.model, cache), use_cache=True)
            nexusquant.compress_kv_cache(cache, mode="quant_only", head_dim=self.head_dim, key_bits=preset.bits[0],
                                         value_bits=preset.bits[1], rope_base=self.rope.theta,
                                         model_config=self.model.config)
            return cache, held_bytes([(layer.keys, layer.values) for layer in cache.layers]) / ids.shape[1]
        _import_peer("optimum.quanto" if preset.peer == "quanto" else "hqq",
                     "pip install optimum-quanto" if preset.peer == "quanto" else "pip install hqq")
        cache = QuantizedCache(backend=preset.peer, config=self.model.config, nbits=preset.bits[0])
        self.model(ids, **with_cache(self.model, cache), use_cache=True)
        return cache, self.held(preset, cache) / ids.shape[1]

    def turboquant(self, preset: Preset, device) -> "turboquant.TurboQuantKV":
        """The preset's TurboQuant quantizers (per layer, seeded: the same rotations and sketches for every chunk)."""
        built = self.__dict__.setdefault("_turboquant", {})
        key = (preset.peer, preset.bits, str(device))
        if key not in built:
            built[key] = turboquant.TurboQuantKV(self.num_layers, self.head_dim, *preset.bits,
                                                 qjl_keys=preset.peer == "turboquant", device=device)
        return built[key]

    def hf_options(self, preset: Preset) -> dict:
        opts = dict(preset.options)
        if opts.get("layer_bits") == "graduated":
            from integrations.hf import graduated_bits
            opts["layer_bits"] = graduated_bits(self.num_layers)
        return opts

    @contextlib.contextmanager
    def attention(self, preset: Preset):
        """The attention a preset's cache is read with: the patched model (integrations.hf presets), the model's own
        (peers) or the harness's own attention over a DynamicCache (ours, and TurboQuant's dequantized K/V)."""
        if preset.hf is None and (preset.peer is None or preset.peer in TURBOQUANT):
            if preset.options.get("alloc"):
                self.layer_bits(preset)  # the allocation measures with the model's own attention, not the harness's
            self.model.set_attn_implementation(self.attn.name)
            yield
            return
        from integrations.hf import compress
        self.model.set_attn_implementation(self.plain_impl)
        with compress(self.model, preset.hf, **self.hf_options(preset)) if preset.hf else contextlib.nullcontext():
            yield

    def continue_(self, preset: Preset, ids: torch.Tensor, cache, start: int) -> torch.Tensor:
        """Logits of the continuation ``ids``. A cache that quantizes what a forward appends (an NQCache, a
        QuantizedCache) is fed ``HF_STEP`` tokens at a time, as decoding would feed it: one 512-token forward would
        quantize (NQCache) or keep fp16 (QuantizedCache's residual) the whole chunk, unlike decoding."""
        if not preset.streams:
            return self.step(ids, cache, start)
        logits = []
        for i in range(0, ids.shape[1], HF_STEP):
            logits.append(self.step(ids[:, i:i + HF_STEP], cache, start + i))
            if self.decode_bytes is not None:
                self.decode_bytes.append(self.held(preset, cache) / (start + i + logits[-1].shape[1]))
        return torch.cat(logits, dim=1)

    @staticmethod
    def held(preset: Preset, cache) -> int:
        """Bytes a streaming cache holds now (floating-point elements at 2 bytes)."""
        if preset.hf is not None:
            return cache.nbytes(fp_element_bytes=2)
        return held_bytes([(layer._quantized_keys, layer._quantized_values, layer.keys, layer.values)
                           for layer in cache.layers])

    def step(self, ids: torch.Tensor, cache, start: int):
        """Feed ``ids`` through ``cache`` at true positions start.. ; returns logits."""
        pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        return self.model(ids, **with_cache(self.model, cache), position_ids=pos, use_cache=True).logits

    # -- protocol ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def continuation(self, preset: Preset, chunks, prefix: int, progress=None) -> tuple:
        """(perplexity over the continuation targets, bytes per prefix token, mean bytes per cached token after each
        forward of the continuation: a streaming cache's fp16 buffers fill and drain while decoding; else None)."""
        nll, n, bpt = 0.0, 0, []
        self.decode_bytes = [] if preset.streams else None
        with self.attention(preset):
            for i, ids in enumerate(chunks):
                cache, b = self.prefill(preset, ids[:, :prefix])
                bpt.append(b)
                logits = self.continue_(preset, ids[:, prefix:], cache, prefix)[0, :-1].float()
                nll += F.cross_entropy(logits, ids[0, prefix + 1:], reduction="sum").item()
                n += ids.shape[1] - prefix - 1
                if progress:
                    progress(i + 1)
        decode = sum(self.decode_bytes) / len(self.decode_bytes) if self.decode_bytes else None
        self.decode_bytes = None
        return math.exp(nll / n), sum(bpt) / len(bpt), decode

    @torch.no_grad()
    def plain_ppl(self, chunks, prefix: int) -> float:
        """The plain model's own attention, one forward per whole chunk, same targets."""
        self.model.set_attn_implementation(self.plain_impl)
        nll, n = 0.0, 0
        for ids in chunks:
            logits = self.model(ids).logits[0, prefix:-1].float()
            nll += F.cross_entropy(logits, ids[0, prefix + 1:], reduction="sum").item()
            n += ids.shape[1] - prefix - 1
        return math.exp(nll / n)

    @torch.no_grad()
    def passkey(self, preset: Preset, prompts, tok, progress=None) -> float:
        """Fraction of prompts ``(ids, key)`` whose greedy answer (from the compressed cache, decoded by ``tok``)
        starts with the key."""
        hits = 0
        with self.attention(preset):
            for i, (ids, key) in enumerate(prompts):
                cache, _ = self.prefill(preset, ids[:, :-1])
                nxt, pos, out = ids[:, -1:], ids.shape[1] - 1, []
                for _ in range(6):
                    nxt = self.step(nxt, cache, pos)[:, -1].argmax(-1, keepdim=True)
                    pos += 1
                    out.append(nxt.item())
                hits += tok.decode(out).strip().startswith(key)
                if progress:
                    progress(i + 1)
        return hits / len(prompts)


def nominal_bits(preset: Preset) -> Optional[str]:
    """The preset's key/value bit budget ("K3V2"; "K2V2+1" for ``k2v2-alloc+1``: one bit's bytes over K2V2's, spent in
    the layers' keys or values), None for fp16 K/V."""
    bits = preset.bits
    if preset.hf is not None:
        from integrations.hf import resolve
        policy = resolve(preset.hf)
        bits = (policy.key_bits, policy.value_bits)
    extra = preset.options.get("extra_bits") if preset.options.get("alloc") else 0
    return None if bits is None else f"K{bits[0]}V{bits[1]}" + (f"+{extra}" if extra else "")


def held_bytes(obj, fp_element_bytes: int = 2) -> int:
    """Bytes of every tensor in ``obj`` (nested tuples, lists, dicts; tensor subclasses such as quanto's packed
    tensors through their inner tensors). Floating-point tensors count ``fp_element_bytes`` per element, integer
    tensors their real size."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, n), fp_element_bytes) for n in names)
        return obj.numel() * (fp_element_bytes if obj.is_floating_point() else obj.element_size())
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(o, fp_element_bytes) for o in obj)
    return 0


def _import_peer(module: str, install: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"this peer preset needs {module}: {install}, or pip install -e \".[peers]\" [{e}]")


def _press(preset: Preset):
    try:
        import kvpress
    except ImportError as e:
        raise SystemExit(f"preset {preset.name!r} needs kvpress: pip install --no-deps kvpress==0.5.5 cachetools "
                         f"datasets fire termcolor (kvpress pins transformers<5.3 but works with transformers 5: "
                         f"see perf/results/quality_fixture.md) [{e}]")
    cls = getattr(kvpress, PRESSES[preset.press])
    return cls(compression_ratio=preset.evict)


# ---------------------------------------------------------------------------------------------------------------
def check_templates(needle: str, question: str) -> None:
    """Raise ValueError (saying what is wrong and how to write it) unless ``needle`` is a usable passkey needle
    template (``{key}`` where the key goes, no other ``{...}`` fields, literal braces doubled) and ``question`` a
    question that does not contain the key."""
    import string

    if not isinstance(needle, str) or not isinstance(question, str):
        raise ValueError(f"needle and question must be strings, got {type(needle).__name__} and "
                         f"{type(question).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(needle) if f is not None]
    except ValueError as e:  # a lone "{" or "}"
        raise ValueError(f"--needle {needle!r} is not a valid template ({e}); write literal braces as '{{{{' and "
                         f"'}}}}'") from None
    if "key" not in fields:
        raise ValueError(f"--needle {needle!r} must contain '{{key}}' where the pass key goes, e.g. "
                         f"{NEEDLE!r}")
    others = sorted({f for f in fields if f != "key"})
    if others:
        raise ValueError(f"--needle {needle!r} has fields other than {{key}}: "
                         f"{', '.join('{' + f + '}' for f in others)}; only {{key}} is filled in (write literal "
                         f"braces as '{{{{' and '}}}}')")
    if not needle.replace("{key}", "").strip():
        raise ValueError(f"--needle {needle!r} is only the key; give it some words around {{key}}, e.g. {NEEDLE!r}")
    if not question.strip():
        raise ValueError(f"--question must not be empty; e.g. {QUESTION!r}")
    if "{key}" in question:
        raise ValueError(f"--question {question!r} contains '{{key}}': the question must not give the key away "
                         f"(it is not filled in)")


def passkey_prompts(tok, path: str, n: int, length: int, seed: int = 0, needle: str = NEEDLE,
                    question: str = QUESTION) -> list:
    """n prompts ``(ids [1, length], key)``: BOS, text with the needle (``needle.format(key=...)``) at a uniform
    random depth, the question."""
    check_templates(needle, question)
    template = needle
    with open(path) as f:
        text_ids = tok(f.read()).input_ids
    rng = random.Random(seed)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    question = tok(question, add_special_tokens=False).input_ids
    prompts = []
    for _ in range(n):
        key = str(rng.randint(10000, 99999))
        needle = tok(template.format(key=key), add_special_tokens=False).input_ids
        filler = length - len(bos) - len(needle) - len(question)
        if filler < 1:
            raise SystemExit(f"--passkey-length {length} leaves no room for text around the needle")
        start = rng.randrange(len(text_ids) - filler)
        body = text_ids[start:start + filler]
        depth = rng.randint(0, filler)
        ids = bos + body[:depth] + needle + body[depth:] + question
        prompts.append((torch.tensor([ids]), key))
    return prompts


def _bar(label: str, total: int):
    start = time.time()

    def update(done: int):
        if not sys.stderr.isatty() and done < total:
            return
        width = 24
        fill = width * done // total
        sys.stderr.write(f"\r  {label:<28} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
                         f"{time.time() - start:5.1f}s")
        if done == total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return update


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m perf.quality", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a transformers model directory (or hub id available offline)")
    ap.add_argument("--text", required=True, help="a held-out text file")
    ap.add_argument("--chunks", type=int, default=6, help="chunks of prefix + continuation tokens (default 6)")
    ap.add_argument("--prefix", type=int, default=1536, help="prefilled, then compressed, tokens (default 1536)")
    ap.add_argument("--continuation", type=int, default=512, help="scored tokens after the prefix (default 512)")
    ap.add_argument("--preset", action="append", default=[], help="repeatable; see the module doc")
    ap.add_argument("--passkey", type=int, default=0, help="passkey trials per preset (default 0: off)")
    ap.add_argument("--passkey-length", type=int, default=1536, help="tokens per passkey prompt (default 1536)")
    ap.add_argument("--needle", default=None,
                    help=f"passkey needle template, with {{key}} where the five-digit key goes (literal braces "
                         f"doubled); default {NEEDLE!r}".replace("%", "%%"))
    ap.add_argument("--question", default=None,
                    help=f"passkey question ending the prompt (must not contain {{key}}); the answer counts when the "
                         f"generated text starts with the key; default {QUESTION!r}".replace("%", "%%"))
    ap.add_argument("--calibration-text", default=None,
                    help="text the kXvY-alloc presets allocate their per-layer bits on (not --text)")
    ap.add_argument("--calibration-chunks", type=int, default=8,
                    help="chunks of that text, each --prefix + --continuation tokens (default 8)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent", type=int, default=32)
    ap.add_argument("--window", type=int, default=32, help="observation-window queries of the default scorer")
    ap.add_argument("--pool", type=int, default=31, help="max-pooling kernel of the window scorers (odd; 0 off)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    if (args.needle is not None or args.question is not None) and not args.passkey:
        ap.error("--needle / --question set the passkey prompts: add --passkey N")
    needle = NEEDLE if args.needle is None else args.needle
    question = QUESTION if args.question is None else args.question
    try:
        check_templates(needle, question)
    except ValueError as e:
        ap.error(str(e))
    presets = [parse_preset(p) for p in ["fp16"] + [p for p in args.preset if p != "fp16"]]
    if args.calibration_chunks < 1:
        ap.error(f"--calibration-chunks must be >= 1, got {args.calibration_chunks}")
    if any(p.options.get("alloc") for p in presets):
        if args.calibration_text is None:
            ap.error("kXvY-alloc presets allocate bits on calibration text: add --calibration-text FILE")
        if os.path.realpath(args.calibration_text) == os.path.realpath(args.text):
            ap.error("--calibration-text must not be the evaluation text (--text): the allocation would be fitted "
                     "to what it is scored on")
    elif args.calibration_text is not None:
        ap.error("--calibration-text is only read by kXvY-alloc presets, and none is asked for: add --preset "
                 "kXvY-alloc[+N] or drop --calibration-text")

    tok, model = load_model(args.model, dtype=getattr(torch, args.dtype))
    model = model.to(args.device)
    chunks = [c.to(args.device) for c in load_chunks(tok, args.text, args.chunks, args.prefix + args.continuation)]
    prompts = [(p.to(args.device), k) for p, k in passkey_prompts(tok, args.text, args.passkey, args.passkey_length,
                                                                        needle=needle, question=question)
               ] if args.passkey else []
    calibration = None
    if args.calibration_text is not None:
        calibration = torch.cat(load_chunks(tok, args.calibration_text, args.calibration_chunks,
                                            args.prefix + args.continuation)).to(args.device)
    h = Harness(model, sinks=args.sinks, recent=args.recent, window=args.window, pool=args.pool,
                calibration=calibration, calibration_prefix=args.prefix)
    for p in presets:  # once per budget, with the model's own attention, before any preset's evaluation
        if p.options.get("alloc"):
            h.layer_bits(p)
    plain = h.plain_ppl(chunks, args.prefix)
    rows, base = {}, None
    for p in presets:
        ppl, bpt, decode_bpt = h.continuation(p, chunks, args.prefix, _bar(f"{p.name} ppl", len(chunks)))
        acc = h.passkey(p, prompts, tok, _bar(f"{p.name} passkey", len(prompts))) if prompts else None
        if base is None:
            base = ppl
            if round(ppl, 4) != round(plain, 4):
                raise SystemExit(f"harness broken: the no-op control gives {ppl:.4f}, the plain model {plain:.4f}")
        rows[p.name] = {"bits": nominal_bits(p), "ppl": ppl, "ppl_delta_pct": 100.0 * (ppl / base - 1.0), "passkey_acc": acc,
                        "bytes_per_token": bpt, "compression_ratio": h.fp16_bytes_per_token / bpt,
                        "bytes_per_token_decoding": decode_bpt}
        if p.options.get("alloc"):
            rows[p.name]["layer_bits"] = h.layer_bits(p)
    result = {"model": args.model, "text": args.text, "plain_model_ppl": plain,
              "protocol": {"chunks": args.chunks, "prefix": args.prefix, "continuation": args.continuation,
                           "passkey": args.passkey, "passkey_length": args.passkey_length, "needle": needle,
                           "question": question, "calibration_text": args.calibration_text,
                           "calibration_chunks": args.calibration_chunks if args.calibration_text else None,
                           "sinks": args.sinks,
                           "recent": args.recent, "window": args.window, "pool": args.pool, "dtype": args.dtype},
              "presets": rows}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    return result


def _opt(x) -> str:
    return "—" if x is None else f"{x:.0f}"


def format_table(result: dict) -> str:
    lines = [f"plain model: PPL {result['plain_model_ppl']:.4f} (one forward per chunk)", "",
             "| preset | bits | PPL | ΔPPL | passkey | bytes/token | ratio vs fp16 | bytes/token decoding |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["presets"].items():
        acc = "—" if r["passkey_acc"] is None else f"{100 * r['passkey_acc']:.1f}%"
        lines.append(f"| {name} | {r.get('bits') or 'fp16'} | {r['ppl']:.4f} | {r['ppl_delta_pct']:+.2f}% | {acc} | {r['bytes_per_token']:.0f} | "
                     f"{r['compression_ratio']:.2f}× | {_opt(r.get('bytes_per_token_decoding'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
