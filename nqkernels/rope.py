"""Rotary-embedding tables (host side) for undoing and re-applying RoPE on keys.

HF's split-half convention: channel j and j + rotary_dim/2 form a pair rotated by angle pos * inv_freq[j]
(``x * cos + rotate_half(x) * sin``). Attention scaling factors (yarn's mscale) multiply both q and k and are
*not* part of the rotation: undoing uses the pure rotation, so the stored key keeps that factor and
re-applying the pure rotation gives back exactly the key the model produced.
"""
from __future__ import annotations

import math

import torch

from .config import RopeSpec


def rope_inv_freq(spec: RopeSpec, head_dim: int, seq_len: int | None = None) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim // 2]`` (float64) for the spec's scaling type.

    ``seq_len`` only matters for ``dynamic`` scaling (NTK base grows past ``max_position_embeddings``):
    pass the sequence length the keys were rotated at.
    """
    dim = spec.rotary_dim or head_dim
    sc = spec.scaling_dict
    kind = sc.get("rope_type", sc.get("type", "default"))
    base = spec.theta
    if kind == "dynamic" and seq_len is not None and seq_len > spec.max_position_embeddings:
        f = float(sc.get("factor", 1.0))
        base = base * ((f * seq_len / spec.max_position_embeddings) - (f - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        f, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv / f + smooth * inv
        inv = torch.where(wavelen > old / lo, inv / f, torch.where(wavelen < old / hi, inv, mid))
    elif kind == "yarn":
        f = float(sc["factor"])
        old = float(sc.get("original_max_position_embeddings", spec.max_position_embeddings))
        beta_fast, beta_slow = float(sc.get("beta_fast", 32.0)), float(sc.get("beta_slow", 1.0))

        def corr(n_rot):
            return dim * math.log(old / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = max(math.floor(corr(beta_fast)), 0), min(math.ceil(corr(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = inv / f * (1 - extrapolation) + inv * extrapolation
    return inv


def rope_cos_sin(spec: RopeSpec, head_dim: int, n_positions: int, device=None,
                 seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[n_positions, rotary_dim // 2]`` float32, rows indexed by token position."""
    inv = rope_inv_freq(spec, head_dim, seq_len)
    ang = torch.arange(n_positions, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().float().to(device), ang.sin().float().to(device)
