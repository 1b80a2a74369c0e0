"""Config store: ``configs/<gpu>.json`` maps kernel name -> shape bucket -> launch config.

Launchers call ``lookup(kernel, bucket, default)``; a GPU or bucket without a tuned entry falls back to the
launcher's default with a one-line notice (once per GPU and kernel). Nothing is tuned at import.
"""
from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


def gpu_key(device=None) -> str:
    """File stem for a device: its name lower-cased, non-alphanumerics as '-' ('nvidia-h100-80gb-hbm3')."""
    if device is None or torch.device(device).type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


@functools.lru_cache(maxsize=None)
def _load(key: str) -> dict:
    path = CONFIG_DIR / f"{key}.json"
    if not path.exists():
        return {}
    return json.loads(path.read_text())


_noticed: set = set()


def lookup(kernel: str, bucket: str, default: dict, device=None) -> dict:
    """Tuned launch config for (GPU, kernel, bucket), else ``default`` (with a one-time notice on GPUs)."""
    key = gpu_key(device)
    entry = _load(key).get(kernel, {}).get(bucket)
    if entry is not None:
        return dict(entry)
    if key != "cpu" and (key, kernel) not in _noticed:
        _noticed.add((key, kernel))
        warnings.warn(f"nqkernels: no tuned config for {kernel} on {key}; using defaults", stacklevel=3)
    return dict(default)
