"""Per-GPU kernel configurations: JSON files keyed by GPU name, kernel and shape bucket (written by
``python -m autotune.tune``)."""
from .store import gpu_key, lookup, override, untuned

__all__ = ["gpu_key", "lookup", "override", "untuned"]
