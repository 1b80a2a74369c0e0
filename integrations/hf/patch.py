"""Patching a transformers model onto the compressed cache: attention function, mask, cache creation."""
from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import DynamicCache

from .cache import NQCache, take_layer
from .compat import CACHE_NAMES, cache_name, find_cache
from .policy import Policy, plan_layers, resolve


@dataclass
class Patched:
    """What ``patch`` changed on a model (``model._nq_patch``): undone by ``unpatch``.

    ``generating`` / ``prepared`` / ``expected`` are the guard against a silent no-op: while ``generate`` runs, every
    forward must receive the cache that the patched ``_prepare_cache_for_generation`` installed."""
    policy: Policy
    base_impl: str
    hook: object = None
    last_cache: Optional[NQCache] = None
    generating: bool = False
    prepared: bool = False
    expected: object = None

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


def _version() -> str:
    import transformers

    return transformers.__version__


def _observe(state: Patched):
    """The model's forward pre-hook: hands the forward's mask and positions to an ``NQCache``, and inside
    ``generate`` refuses to run a forward that did not get the compressed cache (it would run uncompressed)."""
    def hook(module, args, kwargs):
        _, cache = find_cache(kwargs)
        if isinstance(cache, NQCache):
            cache.observe(kwargs.get("attention_mask"), kwargs.get("position_ids"))
        if not state.generating:
            return
        if not state.prepared:
            raise RuntimeError(f"integrations.hf could not attach: generate() of transformers {_version()} did not "
                               f"build its cache through _prepare_cache_for_generation, so the model would run "
                               f"uncompressed; pass an NQCache to generate (integrations.hf.with_cache) or "
                               f"unpatch(model)")
        if state.expected is not None and cache is not state.expected:
            raise RuntimeError(f"integrations.hf could not attach: inside generate() (transformers {_version()}) the "
                               f"model's forward got {type(cache).__name__} instead of the NQCache installed for it "
                               f"(looked under {CACHE_NAMES}), so it would run uncompressed")
    return hook


def _install_cache(state: Patched, model, generation_config, model_kwargs) -> None:
    """After transformers prepared ``generate``'s cache: put an ``NQCache`` where it put its ``DynamicCache``
    (under whichever of ``CACHE_NAMES`` this release uses), or refuse what would run uncompressed."""
    state.prepared, state.expected = True, None
    name, cache = find_cache(model_kwargs)
    if isinstance(cache, NQCache):
        state.last_cache = state.expected = cache
    elif cache is None:
        if generation_config.use_cache is False:
            raise ValueError("generate(use_cache=False) keeps no KV cache, so nothing would be compressed: drop "
                             "use_cache=False, or unpatch(model)")
        raise RuntimeError(f"integrations.hf could not attach: generate() of transformers {_version()} prepared no "
                           f"cache under any of {CACHE_NAMES}, so the model would run uncompressed")
    elif getattr(cache, "_is_user_defined", False):
        warnings.warn(f"generate() got a {type(cache).__name__} from the caller: it is used as is and this "
                      f"generation runs uncompressed (pass an NQCache to compress)", stacklevel=4)
    elif type(cache) is DynamicCache:
        size = {"max_cache_len": generation_config.max_length} if state.policy.static else {}
        state.last_cache = state.expected = model_kwargs[name] = NQCache(model, state.policy, **size)
    else:
        raise ValueError(f"generate() built a {type(cache).__name__} (cache_implementation="
                         f"{generation_config.cache_implementation!r}): the compressed cache replaces the default "
                         f"dynamic cache only; drop cache_implementation (static=True is the compiled path), or "
                         f"unpatch(model)")
    if isinstance(state.expected, NQCache):  # the prompt's padding, whatever mask the forwards get
        mask = model_kwargs.get("attention_mask")
        state.expected.prompt_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def patch(model, preset="balanced", **options) -> Patched:
    """Make ``model`` (a transformers causal LM) generate on the compressed cache, until ``unpatch(model)``.

    ``preset``: a name from ``PRESETS`` (near-lossless, balanced, compact, balanced-evict50, compact-evict75),
    ``"kXvY"`` / ``"kXvY-evictNN"``, or a ``Policy``; ``options``: ``Policy`` fields (per-layer bits, kept layers
    or heads, eviction, ...). Unsupported models raise ValueError here, before anything runs.

    After it, ``model.generate(...)`` builds an ``NQCache`` instead of a ``DynamicCache`` (an ``NQCache`` you pass
    is used; any other cache you pass is used as is, with a warning that it runs uncompressed), and the model's
    attention goes through ``nq_attention``. Whatever would make ``generate`` run uncompressed raises instead: a
    transformers release whose ``generate`` builds its cache elsewhere, ``cache_implementation="static"``,
    ``use_cache=False``.
    """
    if not (hasattr(model, "config") and hasattr(model, "generate")):
        raise TypeError(f"model must be a transformers causal LM (e.g. from AutoModelForCausalLM), got "
                        f"{type(model).__name__}")
    if getattr(model, "_nq_patch", None) is not None:
        raise RuntimeError("model is already patched: unpatch(model) first")
    policy = resolve(preset, **options)
    plan_layers(model.config, policy)  # refuse unsupported models before touching anything
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__}: no attention modules with a layer_idx found")
    cache_name(model)  # a release whose cache keyword is unknown raises here
    if "_prepare_cache_for_generation" not in dir(type(model)):
        raise RuntimeError(f"integrations.hf cannot attach to transformers {_version()}: {type(model).__name__} has "
                           f"no _prepare_cache_for_generation, where generate() builds its cache")
    impl = model.config._attn_implementation or "sdpa"
    if impl not in ("eager", "sdpa"):
        impl = "sdpa"  # the prompt's dense attention; decode steps use decode_attention either way
    name = _register(impl)
    for m in modules:
        m._nq_base_attention = _base_attention(impl, m)
    state = Patched(policy, model.config._attn_implementation)
    state.hook = model.register_forward_pre_hook(_observe(state), with_kwargs=True)
    prepare, generate = model._prepare_cache_for_generation, model.generate

    def prepare_cache(generation_config, model_kwargs, *args, **kwargs):
        if getattr(generation_config, "num_beams", 1) > 1:
            raise ValueError("beam search (num_beams > 1) is not supported on the compressed cache: its sequences "
                             "own their pages; use greedy, sampling or assisted decoding, or unpatch(model)")
        out = prepare(generation_config, model_kwargs, *args, **kwargs)
        _install_cache(state, model, generation_config, model_kwargs)
        return out

    @functools.wraps(generate)
    def guarded_generate(*args, **kwargs):
        state.generating, state.prepared, state.expected = True, False, None
        try:
            return generate(*args, **kwargs)
        finally:
            state.generating = False

    model._prepare_cache_for_generation = prepare_cache
    model.generate = guarded_generate
    model.set_attn_implementation(name)
    model._nq_patch = state
    return state


def unpatch(model) -> None:
    """Undo ``patch``: the model's own attention and caches again."""
    state = getattr(model, "_nq_patch", None)
    if state is None:
        raise RuntimeError("model is not patched")
    state.hook.remove()
    del model._prepare_cache_for_generation, model.generate  # the class's methods again
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
