"""nqkernels: fixed-rate E8 lattice compression of the KV cache, as Triton kernels.

Public API:
    KVCodec, RopeSpec      codec configuration (bits, head_dim, RoPE handling, centering, scale rule)
    encode_kv, decode_kv   fused encode to the HOT format and its dequantization
    centering_mean         the per-(sequence, head) mean encode_kv subtracts (one read of K or V)
    EncodedKV              codes + scales (+ centering mean) of one K or V tensor
    reference              the pure-torch oracle of every stage
"""
from . import reference
from .codec import EncodedKV, centering_mean, decode_kv, encode_kv
from .config import KVCodec, RopeSpec

__all__ = ["KVCodec", "RopeSpec", "EncodedKV", "encode_kv", "decode_kv", "centering_mean", "reference"]
__version__ = "0.1.0"
