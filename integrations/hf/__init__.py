"""Hugging Face transformers models on the compressed KV cache.

    from integrations.hf import compress
    with compress(model, preset="balanced"):          # K3V2 HOT pages, fp16 sinks + recent window
        out = model.generate(**inputs, max_new_tokens=256)

The prompt runs the model's own attention, then every compressed layer's K/V is scored, evicted (eviction
presets) and encoded once; each generated token appends to the pages and attends with ``decode_attention``.
Presets (``PRESETS``; measured ratios and quality in README.md): ``near-lossless`` (K4V4), ``balanced`` (K3V2),
``compact`` (K2V2), ``balanced-evict50``, ``compact-evict75``; or ``"kXvY"`` / ``"kXvY-evictNN"``, or a ``Policy``
with per-layer bits (``boundary_layers``/``boundary_bits``, ``layer_bits=graduated_bits(n)``, or
``layer_bits=allocate_layer_bits(model, calibration_ids)``: at most the same bytes, bits where they measure best), ``keep_layers``,
``keep_heads``, ``compress_sliding``, ``key_mode``.

Works with ``generate`` (greedy, sampling, assisted decoding), batches with left padding (each sequence scored and
evicted on its own), multi-turn reuse of one cache (``**with_cache(model, NQCache(model))``: ``cache=`` from
transformers 5.24, ``past_key_values=`` before), GQA and MHA, head_dim 64/96/128/256,
Llama / Mistral / Qwen2 / Phi-3 / Gemma-2-style models. Not supported: beam search (raises).
"""
from .allocate import allocate_layer_bits
from .cache import CompressedLayer, NQCache
from .compat import output_cache, with_cache
from .patch import Patched, compress, nq_attention, patch, unpatch
from .policy import PRESETS, Policy, graduated_bits, resolve

__all__ = ["compress", "patch", "unpatch", "NQCache", "CompressedLayer", "Policy", "PRESETS", "graduated_bits",
           "allocate_layer_bits",
           "resolve", "Patched", "nq_attention", "with_cache", "output_cache"]
