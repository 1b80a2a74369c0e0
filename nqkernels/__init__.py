"""nqkernels: fixed-rate E8 lattice compression of the KV cache, as Triton kernels.

Public API:
    KVCodec, RopeSpec      codec configuration (bits, head_dim, RoPE handling, centering, scale rule)
    encode_kv, decode_kv   fused encode to the HOT format and its dequantization
    centering_mean         the per-(sequence, head) mean encode_kv subtracts (one read of K or V)
    EncodedKV              codes + scales (+ centering mean) of one K or V tensor
    PagedKVCache           one layer's paged HOT cache with uncompressed sinks and recent window
    decode_attention       attention over a PagedKVCache, codes decoded in registers (split-K + reduce)
    reference              the pure-torch oracle of every stage
"""
from . import reference
from .attention import decode_attention
from .codec import EncodedKV, centering_mean, decode_kv, encode_kv
from .config import KVCodec, RopeSpec
from .paged import PagedKVCache

__all__ = ["KVCodec", "RopeSpec", "EncodedKV", "encode_kv", "decode_kv", "centering_mean", "PagedKVCache",
           "decode_attention", "reference"]
__version__ = "0.1.0"
