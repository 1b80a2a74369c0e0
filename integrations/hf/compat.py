"""What differs between the transformers releases the ``hf`` extra allows (pyproject: ``transformers>=5.17``).

The one difference that matters here is the name of the cache keyword: ``past_key_values`` up to 5.23, ``cache`` from
5.24 on (``past_key_values`` stays a deprecated alias until 5.40 / 6.0). ``generate`` keeps the cache in its
``model_kwargs`` under the same name, and model outputs carry it under it. Every place that reads or passes a cache
asks this module instead of naming one release's keyword.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

# Newest first: a model whose forward takes both (a release in the deprecation window) gets the current one.
CACHE_NAMES = ("cache", "past_key_values")


def cache_name(model) -> str:
    """The keyword under which ``model``'s forward (and so ``generate``) takes the KV cache.

    Raises RuntimeError when the forward takes none of ``CACHE_NAMES``: a transformers release this module does not
    know yet, on which the compressed cache could not attach.
    """
    params = inspect.signature(model.forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise RuntimeError(f"{type(model).__name__}.forward takes its KV cache under none of {CACHE_NAMES} (transformers "
                       f"{_version()}): integrations.hf does not know this release's cache keyword")


def find_cache(kwargs: dict) -> tuple[Optional[str], Any]:
    """``(name, cache)`` of the first of ``CACHE_NAMES`` present in ``kwargs`` with a value, else ``(None, None)``."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def with_cache(model, cache) -> dict:
    """Keyword arguments passing ``cache`` to ``model``'s forward or ``generate``: ``model(ids, **with_cache(model,
    cache))``."""
    return {cache_name(model): cache}


def output_cache(output) -> Any:
    """The cache a model forward returned (``output.cache`` or, before 5.24, ``output.past_key_values``)."""
    for name in CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def _version() -> str:
    import transformers

    return transformers.__version__
