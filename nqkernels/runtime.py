"""Runtime helpers every kernel launcher shares: launch configs (this GPU's config store over the untuned defaults),
grid sizing, the interpreter switch, and the cached tables kernels take (RoPE cos/sin, the rotation matrix)."""
from __future__ import annotations

import functools
import os

import torch

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


# Untuned defaults (``store.lookup`` answers these where a GPU's file has no entry). Encode: 64-token tiles
# give one 4-warp tensor-core (wgmma) tile per step on Hopper. Attention: one warpgroup (decoded 64-token pages
# are the A operand of 64-row tensor-core products), one stage (the next page is prefetched by hand) and 8
# programs per SM (short splits balance the SMs; H100, K3V2), but at least 4 pages per split (a split's prologue
# and partial cost about a page; docs/attention.md, "Launch configs"), keys and values in one pass. Scoring: 4
# programs per SM over the key splits of pass 1 (BLOCK_N is chosen per head_dim by the launcher). Filter/unfilter:
# 64-token tiles. Gluon passes (Hopper; attention/gluon.py; docs/attention.md): the two-pass keys pass
# (``gluon_keys``: 2-warp programs, registers one page ahead, an L2 prefetch two pages further), the values pass
# (``gluon_values``), or both in one fused pass (``gluon_fused``, which takes precedence over ``two_pass``).
DEFAULTS = {"encode": {"BLOCK_T": 64, "num_warps": 4, "num_stages": 1, "programs_per_sm": 2},
             "decode": {"BLOCK_T": 32, "num_warps": 4},
             "attention": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1, "programs_per_sm": 8,
                           "min_pages_per_split": 4, "maxnreg": None, "pages_per_step": 1,
                           "two_pass": False, "gluon_keys": False, "gluon_warps": 2, "gluon_prefetch": 1,
                           "gluon_l2": 2, "gluon_maxnreg": None, "gluon_values": False,
                           "gluon_values_warps": 2, "gluon_fused": False, "gluon_fused_warps": 2},
             "scoring": {"num_warps": 4, "programs_per_sm": 4},
             "filter": {"BT": 64, "num_warps": 4},
             "unfilter": {"BT": 64, "num_warps": 4}}


def launch_config(kernel: str, buckets, device, **default) -> dict:
    """Launch config of ``kernel``: the config store's entry for the first of ``buckets`` (most specific first) this
    GPU has, over ``DEFAULTS[kernel]`` updated with ``default``."""
    return lookup(kernel, buckets, {**DEFAULTS[kernel], **default}, device)


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
