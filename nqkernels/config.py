"""Codec configuration: what the HOT format stores and how keys are prepared before quantization."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch

SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
SUPPORTED_BITS = (2, 3, 4)
ROPE_SCALING_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
# Scale rules: the lattice step is alpha * RMS of the token; the stored scale is then that step ("rms"), the
# least-squares fit to the chosen points ("rms_lsq") or the unbiased fit ("rms_unbiased", docs/codec.md, "The scale
# rule").
SCALE_RULES = {"rms": "none", "rms_lsq": "lsq", "rms_unbiased": "unbiased"}


def is_int(value) -> bool:
    """A count proper: an int but not a bool (bool is an int subclass: True would pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (an int, a float or a numpy scalar), not a bool or a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def describe(value) -> str:
    """What an argument is, for error messages: a tensor's dtype, shape and device, else its type."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)} on {value.device}"
    return type(value).__name__


def check_int(name: str, value, allowed: str) -> None:
    """TypeError naming ``name`` and what it takes unless ``value`` is an int: not a bool, and not a float such as
    3.0, which would reach tensor shapes and kernel constants."""
    if not is_int(value):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__} {value!r}")


def check_positive_float(name: str, value) -> None:
    """ValueError naming ``name`` unless ``value`` is a positive finite real number (an int, a float or a numpy
    scalar; not a bool or a string)."""
    if not (is_real(value) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")


# Scale multiplier alpha (quantizer step = alpha * RMS of the token / lattice unit), per bit width.
# Chosen by minimising MSE of the cube-truncated E8 codebook on Gaussian data (docs/codec.md).
DEFAULT_ALPHA = {2: 0.98, 3: 0.58, 4: 0.33}


LAYOUTS = ("planes", "fields")  # how a token's codes are packed (KVCodec.layout; docs/format.md, "Codes")


def code_layout(kind: str, bits: int, head_dim: int) -> str:
    """How one token's codes are packed by default (docs/format.md, "Codes"): ``"fields"`` (each index's bits
    together) for 3-bit keys (five 3-bit fields per 16-bit half, parity stored) and 4-bit keys and values (four
    nibbles per 16-bit half) at head_dim 128, where the decode attention's tensor-core operands then come from one
    mask per register and one product chain; ``"planes"`` (bit planes) otherwise."""
    if kind not in ("key", "value"):
        raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
    return "fields" if head_dim == 128 and (bits == 4 or (bits == 3 and kind == "key")) else "planes"


def code_words(head_dim: int, bits: int, layout: str) -> int:
    """int32 words of one token's codes: head_dim · bits / 32 in the "planes" layout and in the "fields" layout at
    4 bits; 13 in the "fields" layout at 3 bits (every index bit and the 16 coset flags in 416 bits). The "fields"
    layout is defined at head_dim 128 only."""
    if layout == "fields":
        if head_dim != 128 or bits not in (3, 4):
            raise ValueError(f"the 'fields' layout holds 3- or 4-bit codes at head_dim 128, got {bits} bits at "
                             f"{head_dim}")
        return 13 if bits == 3 else head_dim * bits // 32
    if layout != "planes":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return head_dim * bits // 32


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of the model, needed to undo RoPE on keys at encode time (split-half layout).

    theta: rope base. rotary_dim: number of leading channels that rotate (partial rotary; default all).
    scaling: the HF ``rope_scaling`` / ``rope_parameters`` dict (types linear, dynamic, llama3, yarn).
    """

    theta: float = 10000.0
    rotary_dim: Optional[int] = None
    scaling: Optional[tuple] = None  # frozen (key, value) pairs; use RopeSpec.from_hf_config
    max_position_embeddings: int = 4096

    def __post_init__(self):
        check_positive_float("RopeSpec.theta", self.theta)
        if self.rotary_dim is not None:
            check_int("RopeSpec.rotary_dim", self.rotary_dim, "a positive even int or None")
        check_int("RopeSpec.max_position_embeddings", self.max_position_embeddings, "an int >= 1")
        if self.scaling is not None and not (isinstance(self.scaling, tuple) and
                                             all(isinstance(kv, tuple) and len(kv) == 2 for kv in self.scaling)):
            raise TypeError(f"RopeSpec.scaling must be a tuple of (key, value) pairs or None (from a dict d: "
                            f"tuple(sorted(d.items())), or use RopeSpec.from_hf_config), got {self.scaling!r}")
        if self.rotary_dim is not None and (self.rotary_dim <= 0 or self.rotary_dim % 2):
            raise ValueError(f"RopeSpec.rotary_dim must be a positive even int, got {self.rotary_dim!r}")
        if self.max_position_embeddings < 1:
            raise ValueError(f"RopeSpec.max_position_embeddings must be an int >= 1, got "
                             f"{self.max_position_embeddings!r}")
        kind = self.scaling_dict.get("rope_type", self.scaling_dict.get("type", "default"))
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"RopeSpec.scaling type {kind!r} is not supported; allowed: {ROPE_SCALING_TYPES}")

    @property
    def scaling_dict(self) -> dict:
        return dict(self.scaling or ())

    @classmethod
    def from_hf_config(cls, config) -> "RopeSpec":
        """Build from a transformers config (reads rope_parameters / rope_scaling, partial_rotary_factor)."""
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        theta = params.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        factor = params.pop("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        rotary_dim = int(head_dim * factor)
        scaling = tuple(sorted((k, v) for k, v in params.items() if not isinstance(v, (list, dict))))
        return cls(theta=float(theta), rotary_dim=rotary_dim if rotary_dim != head_dim else None,
                   scaling=scaling or None,
                   max_position_embeddings=int(getattr(config, "max_position_embeddings", 4096)))


@dataclass(frozen=True)
class KVCodec:
    """Fixed-rate E8 codec for one layer's K and V.

    Args:
        head_dim: 64, 96, 128 or 256.
        key_bits / value_bits: exactly this many bits per coordinate (2, 3 or 4), plus one scale per token.
        rope: keys arrive post-RoPE; if a ``RopeSpec`` is given RoPE is undone at encode (split-half layout)
            and re-applied at decode. ``None`` stores keys post-RoPE.
        center_keys / center_values: subtract the per-(sequence, head) mean (fp32 metadata) before the
            rotation and add it back at decode (exact for attention: it is a shared offset).
        scale_rule: the lattice step is alpha * RMS of the token; ``"rms"`` stores that step, ``"rms_lsq"`` the
            least-squares scale for the chosen lattice points (smallest error, but it shrinks every vector),
            ``"rms_unbiased"`` (default) the scale whose reconstruction projects exactly onto the input, so
            attention logits are not shrunk (reference.quantize).
        scale_dtype: ``torch.float16`` or ``torch.bfloat16``.
        page_size: tokens per page of the HOT format.
        key_layout: how key codes are packed (docs/format.md, "Codes"): ``"auto"`` (default) the "fields" layout
            where it is defined (3- and 4-bit keys at head_dim 128; at 3 bits 13 words, every index bit stored,
            decode attention ~20% faster) and bit planes elsewhere; ``"planes"`` bit planes always (at K3 head_dim
            128, 4 bytes per token per KV head less); ``"fields"`` the fields layout, refused where it is not
            defined. Values take ``code_layout``'s (fields at 4 bits, head_dim 128).
    """

    head_dim: int = 128
    key_bits: int = 3
    value_bits: int = 2
    rope: Optional[RopeSpec] = None
    center_keys: bool = True
    center_values: bool = True
    scale_rule: str = "rms_unbiased"
    scale_dtype: torch.dtype = torch.float16
    page_size: int = 64
    key_layout: str = "auto"
    alpha: dict = field(default_factory=lambda: dict(DEFAULT_ALPHA), compare=False, hash=False)

    def __post_init__(self):
        check_int("KVCodec.head_dim", self.head_dim, f"an int in {SUPPORTED_HEAD_DIMS}")
        for name in ("key_bits", "value_bits"):
            check_int(f"KVCodec.{name}", getattr(self, name), f"an int in {SUPPORTED_BITS}")
        check_int("KVCodec.page_size", self.page_size, "an int, a power of two >= 16")
        for name in ("center_keys", "center_values"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KVCodec.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.scale_rule, str):
            raise TypeError(f"KVCodec.scale_rule must be one of {tuple(SCALE_RULES)}, got {self.scale_rule!r}")
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"KVCodec.head_dim={self.head_dim!r} is not supported; allowed: {SUPPORTED_HEAD_DIMS}")
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ValueError(f"KVCodec.{name}={getattr(self, name)!r} is not supported; allowed: {SUPPORTED_BITS}")
        if self.rope is not None and not isinstance(self.rope, RopeSpec):
            raise TypeError(f"KVCodec.rope must be a RopeSpec or None, got {type(self.rope).__name__}")
        if self.rope is not None and (self.rope.rotary_dim or self.head_dim) > self.head_dim:
            raise ValueError(f"RopeSpec.rotary_dim={self.rope.rotary_dim} exceeds head_dim={self.head_dim}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"KVCodec.scale_rule={self.scale_rule!r} is not supported; allowed: {tuple(SCALE_RULES)}")
        if self.scale_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"KVCodec.scale_dtype must be torch.float16 or torch.bfloat16, got {self.scale_dtype!r}")
        if self.page_size < 16 or self.page_size & (self.page_size - 1):
            raise ValueError(f"KVCodec.page_size must be a power of two >= 16, got {self.page_size!r}")
        if not isinstance(self.key_layout, str):
            raise TypeError(f"KVCodec.key_layout must be 'auto', 'planes' or 'fields', got {self.key_layout!r}")
        if self.key_layout not in ("auto",) + LAYOUTS:
            raise ValueError(f"KVCodec.key_layout must be 'auto', 'planes' or 'fields', got {self.key_layout!r}")
        if self.key_layout == "fields" and code_layout("key", self.key_bits, self.head_dim) != "fields":
            raise ValueError(f"KVCodec.key_layout='fields' holds 3- or 4-bit keys at head_dim 128 only, got "
                             f"key_bits={self.key_bits}, head_dim={self.head_dim}")
        if not isinstance(self.alpha, dict):
            raise TypeError(f"KVCodec.alpha must be a dict {{bits: step multiplier}}, got {self.alpha!r}")
        for bits in (self.key_bits, self.value_bits):
            check_positive_float(f"KVCodec.alpha[{bits}]", self.alpha.get(bits))

    @property
    def scale_fit(self) -> str:
        """How the stored scale is fitted to the chosen lattice points (reference.FITS)."""
        return SCALE_RULES[self.scale_rule]

    def bits_for(self, kind: str) -> int:
        """Bits per coordinate for ``kind`` in {"key", "value"}."""
        if kind not in ("key", "value"):
            raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")
        return self.key_bits if kind == "key" else self.value_bits

    def layout(self, kind: str) -> str:
        """How one token's codes of ``kind`` ("key" or "value") are packed: ``code_layout``, unless ``key_layout``
        asks for bit planes."""
        if kind == "key" and self.key_layout != "auto":
            return self.key_layout
        return code_layout(kind, self.bits_for(kind), self.head_dim)

    def words_per_token(self, kind: str) -> int:
        """int32 words of codes per token per head for ``kind`` ("key" or "value"): ``config.code_words``."""
        return code_words(self.head_dim, self.bits_for(kind), self.layout(kind))

    def to_dict(self) -> dict:
        """JSON-safe form (``from_dict`` inverts it); saved in COLD file headers."""
        rope = None
        if self.rope is not None:
            rope = {"theta": self.rope.theta, "rotary_dim": self.rope.rotary_dim,
                    "scaling": [list(kv) for kv in self.rope.scaling or ()],
                    "max_position_embeddings": self.rope.max_position_embeddings}
        return {"head_dim": self.head_dim, "key_bits": self.key_bits, "value_bits": self.value_bits, "rope": rope,
                "center_keys": self.center_keys, "center_values": self.center_values, "scale_rule": self.scale_rule,
                "scale_dtype": str(self.scale_dtype).removeprefix("torch."), "page_size": self.page_size,

                "alpha": {str(b): a for b, a in self.alpha.items()},
                **({} if self.key_layout == "auto" else {"key_layout": self.key_layout})}

    @classmethod
    def from_dict(cls, d: dict) -> "KVCodec":
        d = dict(d)
        if d.get("rope") is not None:
            r = dict(d["rope"])
            r["scaling"] = tuple(tuple(kv) for kv in r.get("scaling") or ()) or None
            d["rope"] = RopeSpec(**r)
        d["scale_dtype"] = {"float16": torch.float16, "bfloat16": torch.bfloat16}[d["scale_dtype"]]
        d["alpha"] = {int(b): float(a) for b, a in d["alpha"].items()}
        return cls(**d)

    def bytes_per_token(self, kind: str) -> int:
        """HOT bytes per token per head for ``kind`` ("key" or "value"): packed codes plus the scale."""
        return 4 * self.words_per_token(kind) + 2
