"""Patching a transformers model onto the compressed cache: attention function, mask, cache creation."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Optional

from transformers import DynamicCache

from .cache import NQCache, take_layer
from .policy import Policy, plan_layers, resolve


@dataclass
class Patched:
    """What ``patch`` changed on a model (``model._nq_patch``): undone by ``unpatch``."""
    policy: Policy
    base_impl: str
    hook: object
    last_cache: Optional[NQCache] = None

    def new_cache(self, model) -> NQCache:
        """A fresh ``NQCache`` with this patch's policy (for manual forwards)."""
        return NQCache(model, self.policy)


def nq_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered with transformers: compressed layers attend over their pages (or, during
    the prompt, run the model's own attention and then compress); every other layer runs the model's own."""
    layer = take_layer(key)
    base = module._nq_base_attention
    if layer is None:
        return base(module, query, key, value, attention_mask, **kwargs)
    return layer.attend(module, query, key, value, attention_mask, base, kwargs)


def _base_attention(impl: str, module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":  # not in the registry: each modeling file has its own
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _register(impl: str) -> str:
    """Register ``nq_<impl>``: our attention, and ``impl``'s mask (the base attention takes the masks it expects)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"nq_{impl}"
    AttentionInterface.register(name, nq_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


def _attention_modules(model):
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config") and
            any(hasattr(m, p) for p in ("k_proj", "qkv_proj"))]


def _observe(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    if isinstance(cache, NQCache):
        cache.observe(kwargs.get("attention_mask"), kwargs.get("position_ids"))


def patch(model, preset="balanced", **options) -> Patched:
    """Make ``model`` (a transformers causal LM) generate on the compressed cache, until ``unpatch(model)``.

    ``preset``: a name from ``PRESETS`` (near-lossless, balanced, compact, balanced-evict50, compact-evict75),
    ``"kXvY"`` / ``"kXvY-evictNN"``, or a ``Policy``; ``options``: ``Policy`` fields (per-layer bits, kept layers
    or heads, eviction, ...). Unsupported models raise ValueError here, before anything runs.

    After it, ``model.generate(...)`` builds an ``NQCache`` instead of a ``DynamicCache`` (a cache you pass is used
    as is), and the model's attention goes through ``nq_attention``.
    """
    if getattr(model, "_nq_patch", None) is not None:
        raise RuntimeError("model is already patched: unpatch(model) first")
    policy = resolve(preset, **options)
    plan_layers(model.config, policy)  # refuse unsupported models before touching anything
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__}: no attention modules with a layer_idx found")
    impl = model.config._attn_implementation or "sdpa"
    if impl not in ("eager", "sdpa"):
        impl = "sdpa"  # the prompt's dense attention; decode steps use decode_attention either way
    name = _register(impl)
    for m in modules:
        m._nq_base_attention = _base_attention(impl, m)
    state = Patched(policy, model.config._attn_implementation, model.register_forward_pre_hook(_observe,
                                                                                              with_kwargs=True))
    prepare = model._prepare_cache_for_generation

    def prepare_cache(generation_config, model_kwargs, *args, **kwargs):
        if getattr(generation_config, "num_beams", 1) > 1:
            raise ValueError("beam search (num_beams > 1) is not supported on the compressed cache: its sequences "
                             "own their pages; use greedy, sampling or assisted decoding, or unpatch(model)")
        prepare(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            state.last_cache = model_kwargs["past_key_values"] = NQCache(model, policy)
        elif isinstance(cache, NQCache):
            state.last_cache = cache

    model._prepare_cache_for_generation = prepare_cache
    model.set_attn_implementation(name)
    model._nq_patch = state
    return state


def unpatch(model) -> None:
    """Undo ``patch``: the model's own attention and caches again."""
    state = getattr(model, "_nq_patch", None)
    if state is None:
        raise RuntimeError("model is not patched")
    state.hook.remove()
    del model._prepare_cache_for_generation  # the class's method again
    for m in _attention_modules(model):
        del m._nq_base_attention
    model.set_attn_implementation(state.base_impl)
    model._nq_patch = None


@contextlib.contextmanager
def compress(model, preset="balanced", **options):
    """``with compress(model, preset="balanced"): model.generate(...)`` — ``patch`` for the block's duration.
    Yields the ``Patched`` state (``.last_cache``: the cache ``generate`` built last, e.g. for ``.nbytes()``)."""
    state = patch(model, preset, **options)
    try:
        yield state
    finally:
        unpatch(model)
