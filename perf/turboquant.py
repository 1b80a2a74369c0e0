"""TurboQuant (Zandieh, Daliri, Hadian, Mirrokni: "TurboQuant: Online Vector Quantization with Near-optimal
Distortion Rate", arXiv 2504.19874, ICLR 2026) as a peer of the quality harness, implemented from the paper.

The two quantizers of the paper, applied to each KV vector (one head, one token) on its own:

- ``TurboQuant_mse`` (Algorithm 1), b bits per coordinate: store ``||x||`` (fp16), rotate the unit vector by a
  random orthogonal matrix ``Pi`` (Haar: QR of a Gaussian matrix, one per layer, seeded), round every coordinate to
  the nearest centroid of the Lloyd-Max codebook of the rotated-coordinate distribution (the density
  ``f(x) ~ (1 - x^2)^((d - 3) / 2)`` on [-1, 1] of one coordinate of a uniform point on the unit sphere; computed
  numerically for each (bits, d) and cached), store the b-bit indices. Decode: ``x~ = ||x|| Pi^T c[idx]``.
- ``TurboQuant_prod`` (Algorithm 2), b bits: ``TurboQuant_mse`` at b - 1 bits, then the QJL sketch of the residual
  ``r = u - u~_mse`` of the unit vector: ``sign(S r)`` (d bits, S a d x d matrix of iid N(0, 1), one per layer,
  seeded) and ``gamma = ||r||`` (fp16). Decode (the paper's DeQuant_prod):
  ``x~ = ||x|| (u~_mse + sqrt(pi / 2) / d * gamma * S^T sign(S r))``, whose inner product with any query is the
  paper's unbiased estimator ``<q, u~_mse> + gamma sqrt(pi / 2) / d <S q, sign(S r)>`` (times ``||x||``): the
  estimator is linear in the reconstruction, so ordinary attention over ``x~`` computes exactly the paper's q.k
  estimate (``TurboQuant.inner_product`` computes it the estimator's way; tests check they agree).

Keys use ``TurboQuant_prod`` (preset ``turboquant-kXvY``) or ``TurboQuant_mse`` (``turboquant-mse-kXvY``); values
always ``TurboQuant_mse``. Bytes are what a real implementation stores per vector, held here as the packed tensors
themselves: the indices packed at their bit width, the QJL signs packed 8 per byte, the fp16 norm and residual norm.
At head_dim d: ``ceil(b d / 8) + 2`` bytes (mse), ``ceil((b - 1) d / 8) + ceil(d / 8) + 4`` (prod). ``Pi`` and S
are per-model constants (regenerated from the seed), like the codec's own rotation, and are not counted per token.

The paper's fractional budgets (2.5 / 3.5 bits: outlier channels at one more bit through a second instance) are not
implemented; the presets are integer bit widths.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Optional

import numpy as np
import torch

PRESET = re.compile(r"turboquant(-mse)?-k(\d)v(\d)")
KEY_BITS = {"turboquant": (2, 3, 4, 5), "turboquant-mse": (1, 2, 3, 4)}  # prod keys: (X - 1)-bit codebook + QJL
VALUE_BITS = (1, 2, 3, 4)


def parse(name: str) -> Optional[tuple]:
    """``turboquant-kXvY`` -> ("turboquant", X, Y), ``turboquant-mse-kXvY`` -> ("turboquant-mse", X, Y); None if
    ``name`` is not a TurboQuant preset; ValueError for out-of-range bits."""
    m = PRESET.fullmatch(name)
    if not m:
        if name.startswith("turboquant"):
            raise ValueError(f"unknown TurboQuant preset {name!r}; allowed: turboquant-kXvY (X in 2..5: (X-1)-bit "
                             f"codebook + 1-bit QJL keys; Y in 1..4) or turboquant-mse-kXvY (X, Y in 1..4)")
        return None
    kind = "turboquant-mse" if m.group(1) else "turboquant"
    kb, vb = int(m.group(2)), int(m.group(3))
    if kb not in KEY_BITS[kind] or vb not in VALUE_BITS:
        raise ValueError(f"{name!r}: {kind} key bits must be in {KEY_BITS[kind]} and value bits in {VALUE_BITS}")
    return kind, kb, vb


# ---------------------------------------------------------------------------------------------------------------
def _log_norm(d: int) -> float:
    return math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)


def coordinate_pdf(x, d: int):
    """Density of one coordinate of a uniform point on the unit sphere in R^d (paper, Lemma 1)."""
    x = np.asarray(x, dtype=np.float64)
    inside = np.abs(x) < 1
    out = np.zeros_like(x)
    out[inside] = np.exp(_log_norm(d) + (d - 3) / 2 * np.log1p(-x[inside] ** 2))
    return out


@functools.lru_cache(maxsize=None)
def _grid(d: int, n: int = 1 << 18):
    """A fine grid over [-1, 1] with the CDF (cumulative trapezoid, renormalised) and the second partial moment."""
    x = np.linspace(-1.0, 1.0, n + 1)
    f = coordinate_pdf(x, d)
    dx = x[1] - x[0]
    cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) * dx / 2)])
    m2 = np.concatenate([[0.0], np.cumsum((x[1:] ** 2 * f[1:] + x[:-1] ** 2 * f[:-1]) * dx / 2)])
    return x, cdf / cdf[-1], m2 / cdf[-1]


def _moments(edges: np.ndarray, d: int) -> tuple:
    """Probability and first moment of every interval ``[edges[i], edges[i+1]]`` (first moment in closed form:
    the antiderivative of x f(x) is -C (1 - x^2)^((d - 1) / 2) / (d - 1))."""
    x, cdf, _ = _grid(d)
    p = np.diff(np.interp(edges, x, cdf))
    inside = np.abs(edges) < 1
    g = np.zeros_like(edges)
    g[inside] = -np.exp(_log_norm(d) + (d - 1) / 2 * np.log1p(-edges[inside] ** 2)) / (d - 1)
    return p, np.diff(g)


@functools.lru_cache(maxsize=None)
def lloyd_max(bits: int, d: int, iters: int = 20000, tol: float = 1e-13) -> tuple:
    """The MSE-optimal (Lloyd-Max) scalar codebook with 2**bits centroids for the rotated-coordinate density at
    dimension d: Lloyd's iteration (boundaries at midpoints, centroids at conditional means) from the quantiles,
    to convergence. Sorted centroids as a tuple of floats."""
    if not (isinstance(bits, int) and 1 <= bits <= 8) or not (isinstance(d, int) and d >= 3):
        raise ValueError(f"need 1 <= bits <= 8 and d >= 3, got bits={bits!r}, d={d!r}")
    n = 1 << bits
    x, cdf, _ = _grid(d)
    c = np.interp((np.arange(n) + 0.5) / n, cdf, x)
    for _ in range(iters):
        edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2, [1.0]])
        p, m1 = _moments(edges, d)
        new = m1 / np.maximum(p, 1e-300)
        new = (new - new[::-1]) / 2  # the density is symmetric: keep the codebook exactly symmetric
        done = np.max(np.abs(new - c)) < tol / math.sqrt(d)
        c = new
        if done:
            break
    return tuple(float(v) for v in c)


def codebook_mse(centroids, d: int) -> float:
    """E[(X - q(X))^2] of nearest-centroid rounding of one rotated coordinate X (numerical integral)."""
    c = np.sort(np.asarray(centroids, dtype=np.float64))
    edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2, [1.0]])
    x, _, m2 = _grid(d)
    p, m1 = _moments(edges, d)
    e2 = np.diff(np.interp(edges, x, m2))
    return float(np.sum(e2 - 2 * c * m1 + c * c * p))


def random_rotation(d: int, seed: int) -> torch.Tensor:
    """A Haar-random d x d orthogonal matrix (QR of a Gaussian matrix, R's diagonal signs folded in), float32."""
    g = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))).float()


def gaussian_sketch(d: int, seed: int) -> torch.Tensor:
    """QJL's projection: a d x d matrix of iid N(0, 1), float32."""
    return torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., n]`` in [0, 2**bits) into ``[..., ceil(n * bits / 8)]`` uint8 (LSB first)."""
    shifts = torch.arange(bits, device=codes.device)
    b = ((codes.long()[..., None] >> shifts) & 1).flatten(-2)
    pad = (-b.shape[-1]) % 8
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    b = b.unflatten(-1, (-1, 8))
    return (b << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``[..., n]`` int64 codes."""
    b = ((packed.long()[..., None] >> torch.arange(8, device=packed.device)) & 1).flatten(-2)[..., :n * bits]
    return (b.unflatten(-1, (n, bits)) << torch.arange(bits, device=packed.device)).sum(-1)


class TurboQuant:
    """One TurboQuant quantizer (one layer's keys or values) at dimension ``dim`` and ``bits`` per coordinate:
    ``qjl=False`` TurboQuant_mse, ``qjl=True`` TurboQuant_prod ((bits - 1)-bit codebook + 1-bit QJL)."""

    def __init__(self, dim: int, bits: int, *, qjl: bool = False, seed: int = 0, device="cpu"):
        self.dim, self.bits, self.qjl = dim, bits, qjl
        self.mse_bits = bits - 1 if qjl else bits
        if self.mse_bits < 1:
            raise ValueError(f"TurboQuant_prod needs bits >= 2 (a >= 1-bit codebook plus the QJL bit), got {bits}")
        self.rotation = random_rotation(dim, seed).to(device)
        self.centroids = torch.tensor(lloyd_max(self.mse_bits, dim), dtype=torch.float32, device=device)
        self.boundaries = (self.centroids[1:] + self.centroids[:-1]) / 2
        self.sketch = gaussian_sketch(dim, seed + 1).to(device) if qjl else None

    @property
    def bytes_per_vector(self) -> int:
        d = self.dim
        return math.ceil(self.mse_bits * d / 8) + 2 + ((math.ceil(d / 8) + 2) if self.qjl else 0)

    def _mse(self, u: torch.Tensor) -> tuple:
        idx = torch.searchsorted(self.boundaries, (u @ self.rotation.T).contiguous())
        return idx, self.centroids[idx] @ self.rotation

    def encode(self, x: torch.Tensor) -> dict:
        """``x [..., dim]`` -> the stored form: ``codes`` (uint8, packed), ``norm`` (fp16) and, with QJL, ``signs``
        (uint8, packed) and ``rnorm`` (fp16)."""
        x = x.float()
        norm = x.norm(dim=-1, keepdim=True)
        u = x / norm.clamp_min(1e-30)
        idx, u_mse = self._mse(u)
        out = {"codes": pack_bits(idx, self.mse_bits), "norm": norm.half()}
        if self.qjl:
            r = u - u_mse
            out["signs"] = pack_bits((r @ self.sketch.T >= 0).long(), 1)
            out["rnorm"] = r.norm(dim=-1, keepdim=True).half()
        return out

    def _unit_mse(self, enc: dict) -> torch.Tensor:
        return self.centroids[unpack_bits(enc["codes"], self.mse_bits, self.dim)] @ self.rotation

    def _signs(self, enc: dict) -> torch.Tensor:
        return unpack_bits(enc["signs"], 1, self.dim).float() * 2 - 1

    def decode(self, enc: dict) -> torch.Tensor:
        """The paper's DeQuant (mse or prod), float32 ``[..., dim]``."""
        u = self._unit_mse(enc)
        if self.qjl:
            u = u + math.sqrt(math.pi / 2) / self.dim * enc["rnorm"].float() * (self._signs(enc) @ self.sketch)
        return u * enc["norm"].float()

    def inner_product(self, q: torch.Tensor, enc: dict) -> torch.Tensor:
        """The paper's estimator of ``<q, x>`` for queries ``q [..., Q, dim]`` against stored ``[..., N, dim]``:
        ``||x|| (<q, u~_mse> + gamma sqrt(pi/2)/d <S q, sign(S r)>)``, ``[..., Q, N]``."""
        q = q.float()
        ip = q @ self._unit_mse(enc).transpose(-1, -2)
        if self.qjl:
            qjl = (q @ self.sketch.T) @ self._signs(enc).transpose(-1, -2)
            ip = ip + math.sqrt(math.pi / 2) / self.dim * enc["rnorm"].float().transpose(-1, -2) * qjl
        return ip * enc["norm"].float().transpose(-1, -2)


class TurboQuantKV:
    """TurboQuant over a model's KV cache: per layer a key and a value quantizer with their own seeded rotations
    (and QJL sketch). ``compress(layer, keys, values)`` with ``[B, H, T, D]`` tensors returns the dequantized
    keys and values (float32) and the bytes of their stored form."""

    def __init__(self, num_layers: int, head_dim: int, key_bits: int, value_bits: int, *, qjl_keys: bool,
                 seed: int = 2504, device="cpu"):
        self.keys = [TurboQuant(head_dim, key_bits, qjl=qjl_keys, seed=seed + 10 * li, device=device)
                     for li in range(num_layers)]
        self.values = [TurboQuant(head_dim, value_bits, seed=seed + 10 * li + 5, device=device)
                       for li in range(num_layers)]

    def bytes_per_token(self, num_kv_heads: int) -> int:
        return num_kv_heads * sum(k.bytes_per_vector + v.bytes_per_vector for k, v in zip(self.keys, self.values))

    def compress(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple:
        ek, ev = self.keys[layer].encode(keys), self.values[layer].encode(values)
        nbytes = sum(t.nbytes for e in (ek, ev) for t in e.values())
        return self.keys[layer].decode(ek), self.values[layer].decode(ev), nbytes
