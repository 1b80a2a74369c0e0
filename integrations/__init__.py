"""Adapters of nqkernels to model frameworks (Hugging Face transformers, FlashAttention-style decode)."""
