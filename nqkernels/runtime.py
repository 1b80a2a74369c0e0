"""Runtime helpers every kernel launcher shares: launch configs (this GPU's config store over the untuned defaults),
grid sizing, the interpreter switch, and the cached tables kernels take (RoPE cos/sin, the rotation matrix)."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch
import triton.language as tl

from .store import lookup

from . import reference as ref
from .config import KVCodec
from .rope import rope_cos_sin

_TABLES: dict = {}  # rope_tables, per (RoPE spec, head_dim, length, device)


def rope_tables(codec: KVCodec, n_positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos/sin tables ``[n, R/2]`` fp32 of ``codec.rope`` for at least ``n_positions`` positions (a power of two,
    at least the model's max_position_embeddings), cached per device."""
    n = max(n_positions, codec.rope.max_position_embeddings)
    n = 1 << (n - 1).bit_length()
    key = (codec.rope, codec.head_dim, n, str(device))
    if key not in _TABLES:
        _TABLES[key] = rope_cos_sin(codec.rope, codec.head_dim, n, device=device, seq_len=n_positions)
    return _TABLES[key]


@functools.lru_cache(maxsize=None)
def rotation(head_dim: int, device: str) -> torch.Tensor:
    """reference.rotation_matrix zero-padded to ``[DP, DP]`` (DP the next power of two), fp32, cached per device."""
    dp = ref.next_pow2(head_dim)
    rot = torch.zeros(dp, dp, dtype=torch.float32)
    rot[:head_dim, :head_dim] = ref.rotation_matrix(head_dim)
    return rot.to(device)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """A kernel's launch parameters: the fields of a subclass, each with its untuned default (what ``store.lookup``
    answers where a GPU's file has no entry). Built from the store's dictionaries by ``launch_config``; a key that
    is not a field is an error naming the allowed ones."""

    @classmethod
    def from_dict(cls, kernel: str, config: dict) -> "LaunchConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise ValueError(f"launch config of {kernel!r}: unknown parameter(s) {unknown}; allowed: {names}")
        return cls(**config)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EncodeConfig(LaunchConfig):
    """Encode: 64-token tiles give one 4-warp tensor-core (wgmma) tile per step on Hopper."""
    BLOCK_T: int = 64
    num_warps: int = 4
    num_stages: int = 1
    programs_per_sm: int = 2


@dataclasses.dataclass(frozen=True)
class DecodeConfig(LaunchConfig):
    BLOCK_T: int = 32
    num_warps: int = 4


@dataclasses.dataclass(frozen=True)
class AttentionConfig(LaunchConfig):
    """Decode attention: one warpgroup (decoded 64-token pages are the A operand of 64-row tensor-core products), one
    stage (the next page is prefetched by hand) and 8 programs per SM (short splits balance the SMs; H100, K3V2), but
    at least 4 pages per split (a split's prologue and partial cost about a page; docs/attention.md, "Launch
    configs"), keys and values in one pass. ``two_pass``: keys, then values. The Gluon passes (Hopper;
    attention/gluon.py; docs/attention.md): the two-pass keys pass (``gluon_keys``: 2-warp programs, registers one
    page ahead, an L2 prefetch two pages further), the values pass (``gluon_values``), or both in one fused pass
    (``gluon_fused``, which takes precedence over ``two_pass``). ``min_tokens``: the config holds only where batch ×
    longest context reaches this many tokens; a smaller call launches with the untuned defaults (a bucket spans a
    range of shapes, and the fused pass's or the two passes' fixed cost loses to the one-pass kernel on the few
    tokens at its low end: docs/attention.md, "Launch configs"). ``gluon_query_in_pass`` (with ``gluon_fused``,
    head_dim 128): the pass makes its query operand from q itself instead of a prep kernel launched before it (one
    launch less, a prologue more per program; chosen per bucket by measurement). ``uncompressed_per_split``: the
    uncompressed tokens (sinks and window) are attended in parts of at least this many (whole ``BLOCK_N`` tiles)
    beside the compressed splits, and in no more parts than fill the GPU, so a long window is spread over programs as
    the pages are (the default window, a page or two, is one part)."""
    BLOCK_N: int = 64
    num_warps: int = 4
    num_stages: int = 1
    programs_per_sm: int = 8
    min_pages_per_split: int = 4
    maxnreg: Optional[int] = None
    pages_per_step: int = 1
    two_pass: bool = False
    gluon_keys: bool = False
    gluon_warps: int = 2
    gluon_prefetch: int = 1
    gluon_l2: int = 2
    gluon_maxnreg: Optional[int] = None
    gluon_values: bool = False
    gluon_values_warps: int = 2
    gluon_fused: bool = False
    gluon_fused_warps: int = 2
    min_tokens: int = 0
    gluon_query_in_pass: bool = False
    uncompressed_per_split: int = 256


@dataclasses.dataclass(frozen=True)
class ScoringConfig(LaunchConfig):
    """Scoring: 4 programs per SM over the key splits of pass 1; the launcher picks BLOCK_N per head_dim."""
    num_warps: int = 4
    programs_per_sm: int = 4
    BLOCK_N: int = 64


@dataclasses.dataclass(frozen=True)
class FilterConfig(LaunchConfig):
    """COLD filter and unfilter: 64-token tiles."""
    BT: int = 64
    num_warps: int = 4


@dataclasses.dataclass(frozen=True)
class FixedConfig(LaunchConfig):
    """The launch of a kernel that is not searched (small or latency-bound work): ``BLOCK`` rows or tokens per program
    (0 where the kernel takes no block), ``num_warps``, and ``programs_per_sm`` where its grid is sized to fill the GPU
    (0 where it is one program per item)."""
    BLOCK: int = 0
    num_warps: int = 4
    programs_per_sm: int = 0


# The fixed launches, by kernel: the centering mean (32-token tiles, about 4 programs per SM), decode attention's
# query prep (64 operand rows per program) and reduce, the paged cache's window write (one warp per token and head),
# scoring's pooling (256 tokens per program).
FIXED = {"mean": FixedConfig(BLOCK=32, num_warps=4, programs_per_sm=4), "prep": FixedConfig(BLOCK=64, num_warps=4),
         "reduce": FixedConfig(num_warps=4), "window": FixedConfig(num_warps=1), "pool": FixedConfig(BLOCK=256)}

CONFIGS = {"encode": EncodeConfig, "decode": DecodeConfig, "attention": AttentionConfig, "scoring": ScoringConfig,
           "filter": FilterConfig, "unfilter": FilterConfig}


def launch_config(kernel: str, buckets, device, **default) -> LaunchConfig:
    """Launch config of ``kernel`` (``CONFIGS``): the config store's entry for the first of ``buckets`` (most specific
    first) this GPU has, over the untuned defaults updated with ``default``."""
    cls = CONFIGS[kernel]
    return cls.from_dict(kernel, lookup(kernel, buckets, {**cls().as_dict(), **default}, device))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def max_programs(device, per_sm: int) -> int:
    """Grid size that fills a GPU: ``per_sm`` programs per SM; a few under the interpreter (loops exercised)."""
    if device.type != "cuda":
        return 3
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * per_sm


def use_triton(x: torch.Tensor) -> bool:
    """Whether x's kernels run: on a CUDA tensor, or under TRITON_INTERPRET=1 (else the torch reference runs)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def dot_dtype(q: torch.Tensor):
    """Tensor-core operand type of kernels that take q's dtype: q's dtype. The interpreter's bf16 dot returns garbage
    (triton 3.9, CPU), so there bf16 operands are widened to fp32 (same math, fp32 products)."""
    if q.dtype == torch.bfloat16:
        return tl.float32 if not q.is_cuda else tl.bfloat16
    return tl.float16


_CODECS: list = []  # codec_id: index -> KVCodec
_CODEC_IDS: dict = {}


@torch.compiler.assume_constant_result  # under torch.compile: evaluated while tracing, a constant in the graph
def codec_id(codec: KVCodec) -> int:
    """A process-wide int naming ``codec`` (equal codecs with equal ``alpha``, equal ids; alpha is left out of a
    codec's equality): how the custom ops (``codec.encode_kv`` / ``decode_kv``, static mode's append and attention
    under torch.compile) take a codec, whose schema has no place for a Python object."""
    key = (codec, tuple(sorted(codec.alpha.items())))
    i = _CODEC_IDS.get(key)
    if i is None:
        i = _CODEC_IDS[key] = len(_CODECS)
        _CODECS.append(codec)
    return i


def codec_of(i: int) -> KVCodec:
    """The codec ``codec_id`` named ``i``."""
    return _CODECS[i]
