"""Per-GPU kernel configurations: JSON files keyed by GPU name, kernel and shape bucket."""
from .store import lookup, gpu_key

__all__ = ["lookup", "gpu_key"]
