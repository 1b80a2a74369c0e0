"""nqkernels: fixed-rate E8 lattice compression of the KV cache, as Triton kernels.

Public API:
    KVCodec, RopeSpec      codec configuration (bits, head_dim, RoPE handling, centering, scale rule)
    encode_kv, decode_kv   fused encode to the HOT format and its dequantization
    centering_mean         the per-(sequence, head) mean encode_kv subtracts (one read of K or V)
    EncodedKV              codes + scales (+ centering mean) of one K or V tensor
    PagedKVCache           one layer's paged HOT cache with uncompressed sinks and recent window
    decode_attention       attention over a PagedKVCache, codes decoded in registers (split-K + reduce)
    score_tokens           token importance from an observation window's attention (two-pass kernel)
    key_norm_scores, random_scores   baseline scorers
    select_tokens, Selection         kept tokens: sinks + recent always, budgets per sequence; gather + positions
    layer_budgets, keep_for_bytes    per-layer (uniform / pyramid) and byte budgets
    save_cache, load_cache the COLD format: lossless delta/shuffle filter + zstd frames, to a file or stream
    filter_codes, unfilter_codes   the COLD filter kernels (delta, zigzag, byte shuffle) and their inverse
    reference              the pure-torch oracle of every stage
"""
from . import reference
from .attention import decode_attention
from .cold import ColdFormatError, load_cache, save_cache
from .delta import filter_codes, unfilter_codes
from .eviction import Selection, keep_for_bytes, layer_budgets, select_tokens
from .codec import EncodedKV, centering_mean, decode_kv, encode_kv
from .config import KVCodec, RopeSpec
from .paged import PagedKVCache, SlotState
from .scoring import key_norm_scores, random_scores, score_tokens

__all__ = ["KVCodec", "RopeSpec", "EncodedKV", "encode_kv", "decode_kv", "centering_mean", "PagedKVCache",
           "SlotState", "decode_attention", "save_cache", "load_cache", "ColdFormatError", "filter_codes",
           "unfilter_codes", "score_tokens", "key_norm_scores", "random_scores", "select_tokens", "Selection",
           "layer_budgets", "keep_for_bytes", "reference"]
__version__ = "0.1.0"
