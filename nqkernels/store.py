"""Config store: ``nqkernels/configs/<gpu>.json`` maps kernel name -> shape bucket -> launch config (the shipped
per-GPU tables; ``python -m autotune.tune`` searches and writes them).

Launchers call ``lookup(kernel, buckets, default)`` with their buckets from the most specific to the coarsest
(``["d128_k3v2_g4_t32k_b8", "d128_k3v2"]``); the first bucket the GPU's file holds wins. A GPU or shape without a
tuned entry falls back to the launcher's default with a one-line notice (once per GPU and kernel), never an error.
The file's ``"_meta"`` entry (device, versions, date of the search) is not a kernel. Nothing is tuned at import;
``python -m autotune.tune`` writes the files.
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import warnings
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch

CONFIG_DIR = Path(__file__).parent / "configs"

_overrides: dict = {}  # kernel -> config forced by the tuner (``override``)
_untuned = [False]  # ``untuned()``: every lookup answers its default, for tuned-vs-untuned measurements
_noticed: set = set()
_generation = [0]  # bumped whenever what lookup answers may change (overrides, untuned, reload)


def generation() -> int:
    """A number that changes whenever ``lookup`` may answer differently (an override or ``untuned()`` entered or
    left, files reloaded): launchers that keep launches of earlier calls (decode plans) key them by it."""
    return _generation[0]


def gpu_key(device=None) -> str:
    """File stem for a device: its name lower-cased, non-alphanumerics as '-' ('nvidia-h100-80gb-hbm3')."""
    if device is None or torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def config_path(key: str) -> Path:
    return CONFIG_DIR / f"{key}.json"


@functools.lru_cache(maxsize=None)
def _load(key: str) -> dict:
    path = config_path(key)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def reload() -> None:
    """Forget the files read so far (after the tuner wrote one)."""
    _load.cache_clear()
    _generation[0] += 1


def lookup(kernel: str, buckets: Union[str, Sequence[str]], default: dict, device=None) -> dict:
    """Launch config for ``kernel``: the tuner's override, else the first of ``buckets`` (most specific first)
    this GPU's file holds, over ``default``; only ``default`` on CPU or under ``untuned()``."""
    if kernel in _overrides:
        return {**default, **_overrides[kernel]}
    key = gpu_key(device)
    if _untuned[0] or key == "cpu":
        return dict(default)
    buckets = [buckets] if isinstance(buckets, str) else list(buckets)
    entries = _load(key).get(kernel, {})
    for bucket in buckets:
        if bucket in entries:
            return {**default, **entries[bucket]}
    if (key, kernel) not in _noticed:
        _noticed.add((key, kernel))
        warnings.warn(f"nqkernels: no tuned {kernel} config for {key} at {buckets[0]}; using defaults "
                      f"(python -m autotune.tune writes them)", stacklevel=3)
    return dict(default)


@contextlib.contextmanager
def override(kernel: str, config: dict) -> Iterator[None]:
    """Force ``config`` (over the launcher's default) for every launch of ``kernel`` inside the block."""
    _overrides[kernel] = dict(config)
    _generation[0] += 1
    try:
        yield
    finally:
        del _overrides[kernel]
        _generation[0] += 1


@contextlib.contextmanager
def untuned() -> Iterator[None]:
    """Launch every kernel with its launcher's default config inside the block (no notices)."""
    _untuned[0] = True
    _generation[0] += 1
    try:
        yield
    finally:
        _untuned[0] = False
        _generation[0] += 1
