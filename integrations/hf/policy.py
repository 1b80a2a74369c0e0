"""What a compressed transformers cache does per layer: presets, per-layer bit policies, model checks."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

from nqkernels import KVCodec, RopeSpec
from nqkernels.config import ROPE_SCALING_TYPES, SUPPORTED_BITS, SUPPORTED_HEAD_DIMS, is_int

Bits = Optional[tuple]  # (key_bits, value_bits), or None: the layer stays fp16 (uncompressed)
KEY_MODES = ("post_rope", "undo_rope")
# Models whose RoPE is the split-half layout RopeSpec undoes (key_mode="undo_rope"); post-RoPE keys work with any
# RoPE model that runs attention through transformers' attention interface.
SPLIT_HALF_ROPE = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "granite", "olmo2")


def _check_bits(name: str, bits) -> None:
    if bits is None:
        return
    if not (isinstance(bits, (tuple, list)) and len(bits) == 2 and all(is_int(b) and b in SUPPORTED_BITS
                                                                        for b in bits)):
        raise ValueError(f"{name} must be None (fp16) or (key_bits, value_bits) with bits in {SUPPORTED_BITS}, "
                         f"got {bits!r}")


@dataclass(frozen=True)
class Policy:
    """How a model's KV cache is compressed (``integrations.hf.compress(model, preset=..., **options)``).

    Args:
        key_bits / value_bits: bits per coordinate of the HOT format (2..4) in every compressed layer.
        evict: fraction of each prompt's tokens dropped after prefill (0: quantization only). Tokens are scored by
            the attention of the prompt's last ``window`` queries, averaged over layers, max-pooled over ``pool``
            neighbours (docs/eviction.md); the first ``sinks`` and last ``recent`` prompt tokens are always kept.
        fp_window: most recent tokens kept uncompressed in each compressed layer (and the most tokens a speculative
            step may reject, ``Cache.crop``); default 64.
        boundary_layers / boundary_bits: the first and last ``boundary_layers`` layers are kept fp16
            (``boundary_bits=None``) or at ``boundary_bits`` (e.g. ``(4, 4)``).
        layer_bits: one entry per layer, ``(key_bits, value_bits)`` or ``None`` (fp16): an explicit (e.g. graduated,
            ``graduated_bits``) profile; overrides key_bits/value_bits and the boundary options.
        keep_layers: layers left uncompressed (fp16, never evicted).
        keep_heads: KV heads left uncompressed (fp16, never evicted) in every compressed layer.
        compress_sliding: compress sliding-window layers too; default (None): only when every layer slides
            (Mistral-style); with full-attention layers beside them (Gemma-2-style) they are left alone.
        key_mode: ``"post_rope"`` (default: keys stored as the model made them) or ``"undo_rope"`` (RoPE undone
            before quantization, re-applied in attention; split-half RoPE models only).
        page_size: tokens per page of the HOT format.
        static: the compiled decode path (docs/hf.md, "The compiled decode path"): after the prompt every
            compressed layer reserves its pages up to ``generate``'s ``max_length`` and keeps its lengths on the
            device (``PagedKVCache.make_static``), uncompressed layers are transformers' ``StaticLayer``, and
            ``generate`` compiles its decode step as it does for a ``StaticCache`` (``torch.compile``, CUDA graphs
            on a GPU; ``compile_config`` to change). Post-RoPE keys and no ``keep_heads``; default off.
    """
    key_bits: int = 3
    value_bits: int = 2
    evict: float = 0.0
    sinks: int = 4
    recent: int = 32
    window: int = 32
    pool: int = 31
    fp_window: int = 64
    boundary_layers: int = 0
    boundary_bits: Bits = None
    layer_bits: Optional[tuple] = None
    keep_layers: tuple = ()
    keep_heads: tuple = ()
    compress_sliding: Optional[bool] = None
    key_mode: str = "post_rope"
    page_size: int = 64
    static: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        for name in ("key_bits", "value_bits"):
            if not is_int(getattr(self, name)) or getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {getattr(self, name)!r}")
        if not (isinstance(self.evict, (int, float)) and not isinstance(self.evict, bool) and 0.0 <= self.evict < 1.0):
            raise ValueError(f"evict must be a fraction in [0, 1), got {self.evict!r}")
        for name in ("sinks", "recent", "window", "pool", "fp_window", "boundary_layers"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.evict and self.window < 1:
            raise ValueError("window must be >= 1 when evicting (the scorer's observation window)")
        if self.pool and self.pool % 2 == 0:
            raise ValueError(f"pool must be odd (or 0: off), got {self.pool}")
        _check_bits("boundary_bits", self.boundary_bits)
        if self.layer_bits is not None:
            object.__setattr__(self, "layer_bits", tuple(None if b is None else tuple(b) for b in self.layer_bits))
            for i, b in enumerate(self.layer_bits):
                _check_bits(f"layer_bits[{i}]", b)
        for name in ("keep_layers", "keep_heads"):
            values = getattr(self, name)
            if not isinstance(values, (tuple, list, range, set, frozenset)):
                raise ValueError(f"{name} must be a tuple of ints >= 0 (e.g. (0, 1)), got {values!r}")
            values = tuple(values)
            if any(not is_int(x) or x < 0 for x in values):
                raise ValueError(f"{name} must be ints >= 0, got {values!r}")
            object.__setattr__(self, name, values)
        if self.key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {KEY_MODES}, got {self.key_mode!r}")
        if not is_int(self.page_size) or self.page_size < 16 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {self.page_size!r}")
        if not isinstance(self.static, bool):
            raise ValueError(f"static must be True or False, got {self.static!r}")
        if self.static and (self.key_mode != "post_rope" or self.keep_heads):
            raise ValueError("static=True (the compiled decode path) needs key_mode='post_rope' and no keep_heads: "
                             "both keep host-side state per decode step")

    def bits_for(self, layer: int, num_layers: int) -> Bits:
        """(key_bits, value_bits) of ``layer``, or None when it stays fp16."""
        if layer in self.keep_layers:
            return None
        if self.layer_bits is not None:
            return self.layer_bits[layer]
        if layer < self.boundary_layers or layer >= num_layers - self.boundary_layers:
            return self.boundary_bits
        return (self.key_bits, self.value_bits)


def graduated_bits(num_layers: int, profile: Sequence[tuple] = ((4, 4), (3, 3), (3, 2))) -> tuple:
    """A graduated per-layer profile: ``num_layers`` entries, the layers split into ``len(profile)`` equal runs in
    order (default: K4V4 for the first third, K3V3, then K3V2). Pass as ``layer_bits``."""
    n = len(profile)
    return tuple(tuple(profile[min(n - 1, i * n // num_layers)]) for i in range(num_layers))


# Named presets; measured ratios and quality are in README.md and perf/results/hf_quality.md.
PRESETS = {
    "near-lossless": Policy(key_bits=4, value_bits=4, name="near-lossless"),
    "balanced": Policy(key_bits=3, value_bits=2, name="balanced"),
    "compact": Policy(key_bits=2, value_bits=2, name="compact"),
    "balanced-evict50": Policy(key_bits=3, value_bits=2, evict=0.5, name="balanced-evict50"),
    "compact-evict75": Policy(key_bits=2, value_bits=2, evict=0.75, name="compact-evict75"),
}


def resolve(preset: Union[str, Policy, None] = "balanced", **options) -> Policy:
    """A ``Policy`` from a preset name (``PRESETS``, or ``kXvY`` / ``kXvY-evictNN``), a ``Policy``, or None (the
    default), with ``options`` (``Policy`` fields) replacing its fields."""
    if isinstance(preset, Policy):
        base = preset
    elif preset is None:
        base = Policy(name="balanced")
    elif isinstance(preset, str) and preset in PRESETS:
        base = PRESETS[preset]
    else:
        m = re.fullmatch(r"k([2-4])v([2-4])(?:-evict(\d{1,2}))?", preset) if isinstance(preset, str) else None
        if not m:
            raise ValueError(f"unknown preset {preset!r}; allowed: {tuple(PRESETS)}, 'kXvY' or 'kXvY-evictNN' "
                             f"(X, Y in 2..4), or a Policy")
        base = Policy(key_bits=int(m.group(1)), value_bits=int(m.group(2)),
                      evict=int(m.group(3) or 0) / 100, name=preset)
    unknown = set(options) - set(Policy.__dataclass_fields__) - {"name"}
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; allowed: {sorted(Policy.__dataclass_fields__)}")
    return replace(base, **options) if options else base


# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer's cache does: ``codec`` None means the layer is left to transformers (fp16)."""
    codec: Optional[KVCodec]
    sliding: bool
    keep_heads: tuple


def plan_layers(config, policy: Policy) -> list:
    """One ``LayerPlan`` per decoder layer of a transformers ``config``; raises ValueError (before anything runs)
    for models the compressed cache cannot serve. Layer kinds are those of transformers' own ``DynamicCache``: full
    and sliding-window attention layers can be compressed, any other kind is left alone."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if not hasattr(cfg, "num_hidden_layers"):
        raise TypeError(f"expected a transformers causal LM (or its config), got {type(config).__name__}")
    check_model_config(cfg, policy)
    L = cfg.num_hidden_layers
    H = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if policy.layer_bits is not None and len(policy.layer_bits) != L:
        raise ValueError(f"layer_bits has {len(policy.layer_bits)} entries; the model has {L} layers")
    bad = [i for i in policy.keep_layers if i >= L]
    if bad:
        raise ValueError(f"keep_layers {bad} out of range: the model has {L} layers")
    bad = [h for h in policy.keep_heads if h >= H]
    if bad or len(set(policy.keep_heads)) >= H:
        raise ValueError(f"keep_heads must name some (not all) of the {H} KV heads, got {policy.keep_heads}")
    kinds = [{DynamicLayer: "full", DynamicSlidingWindowLayer: "sliding"}.get(type(layer), "other")
             for layer in DynamicCache(config=cfg).layers]
    # Sliding layers hold one window only; by default they are left alone, unless the whole model slides (Mistral).
    compress_sliding = policy.compress_sliding if policy.compress_sliding is not None else "full" not in kinds
    rope = RopeSpec.from_hf_config(cfg) if policy.key_mode == "undo_rope" else None
    plans = []
    for i, kind in enumerate(kinds):
        bits = policy.bits_for(i, L)
        if kind == "other" or (kind == "sliding" and not compress_sliding):
            bits = None
        codec = None if bits is None else KVCodec(head_dim=D, key_bits=bits[0], value_bits=bits[1], rope=rope,
                                                  page_size=policy.page_size)
        plans.append(LayerPlan(codec, kind == "sliding", policy.keep_heads))
    if len({p.codec is None for p in plans if p.sliding}) > 1:
        raise ValueError("sliding-window layers must be all compressed or all left alone (transformers builds one "
                         "mask for all of them): keep none or all of them in keep_layers")
    return plans


def check_model_config(cfg, policy: Policy) -> None:
    """Refuse, with the reason, models whose attention the compressed cache cannot reproduce."""
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported; allowed: {SUPPORTED_HEAD_DIMS}")
    model_type = getattr(cfg, "model_type", "?")
    if getattr(cfg, "alibi", False) or model_type in ("bloom", "mpt"):
        raise ValueError(f"{model_type}: ALiBi position biases are not supported by the compressed attention")
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    has_rope = bool(params) or hasattr(cfg, "rope_theta")
    if not has_rope:
        raise ValueError(f"{model_type}: no rotary position embedding found in the config; the compressed cache "
                         f"serves RoPE models (Llama, Mistral, Qwen2, Phi-3, Gemma-2 and alike)")
    if policy.key_mode == "undo_rope":
        kind = params.get("rope_type", params.get("type", "default"))
        if model_type not in SPLIT_HALF_ROPE:
            raise ValueError(f"key_mode='undo_rope' needs the split-half RoPE layout of {SPLIT_HALF_ROPE}; "
                             f"{model_type!r} is not known to use it: use key_mode='post_rope'")
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"key_mode='undo_rope' cannot undo rope_type {kind!r} (supported: {ROPE_SCALING_TYPES});"
                             f" use key_mode='post_rope'")
