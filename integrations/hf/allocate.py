"""Per-layer bits at a fixed byte budget, chosen by measured sensitivity (``allocate_layer_bits``).

Layers do not spend a bit equally well. On the fixture model (docs/codec.md, "Bits per layer") one layer's keys lose
+0.60% perplexity going from 3 to 2 bits while every other layer's lose +0.01-0.03%, and one layer's values gain
0.11% from a third bit where others gain nothing. So bits move from where they buy least to where they buy most,
within a byte budget: the HOT bytes of the uniform setting (``KVCodec.bytes_per_token``), which a move may not
exceed. A bit is 16 bytes per token per KV head at head_dim 128 almost everywhere, but 3-bit keys there hold 4 bytes
more (the "fields" layout, docs/format.md "Codes"), so keys 2 <-> 3 bits move 20 bytes and keys 3 <-> 4 bits 12;
the budget counts those bytes, never bits. The allocation is measured, not modelled: the KL divergence of
the model's next-token distributions on calibration text from the uncompressed model's, with one layer's keys or
values one bit up or down; then pairs of moves (one bit up here, one down there, or up alone where the budget has
room) whose summed measured effects are a gain; then the result measured again and kept only if it is better. Only
the layers the cache will compress (``plan_layers`` of the policy the bits are for) are measured and given bits; the
others stay fp16 and are ``None`` in the result.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Optional, Union

import torch

from nqkernels import KVCodec, decode_kv, encode_kv
from nqkernels.config import SUPPORTED_BITS, is_int

from .compat import output_cache, with_cache
from .policy import Policy, plan_layers, resolve


def _round_trip(x: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
    """``x`` ``[B, H, T, D]`` (transformers' layout) encoded at ``bits`` and decoded, as the HOT pages hold it."""
    codec = KVCodec(head_dim=x.shape[-1], key_bits=bits, value_bits=bits)
    enc = encode_kv(x.transpose(1, 2), codec, kind)
    return decode_kv(enc, codec, kind, dtype=x.dtype).transpose(1, 2)


class _Calibration:
    """The calibration chunks' prefill caches and uncompressed continuation distributions, and the divergence from
    them with each layer's K/V at given bits."""

    def __init__(self, model, input_ids: torch.Tensor, prefix: int):
        self.model, self.prefix, self.ids = model, prefix, input_ids
        self.prefill = []  # per chunk: its prefill cache as it was before the continuation ran through it
        self.log_p = []  # per chunk: the uncompressed model's log-probabilities of the continuation tokens
        for row in input_ids:
            cache = output_cache(model(row[None, :prefix], use_cache=True))
            self.prefill.append(_shallow_copy(cache))
            self.log_p.append(self._log_probs(row, cache))
        self._coded: dict = {}

    def _coded_kv(self, chunk: int, layer: int, kind: int, bits: int) -> torch.Tensor:
        key = (chunk, layer, kind, bits)
        if key not in self._coded:
            held = self.prefill[chunk].layers[layer]
            self._coded[key] = _round_trip((held.keys, held.values)[kind], bits, ("key", "value")[kind])
        return self._coded[key]

    def _log_probs(self, row: torch.Tensor, cache) -> torch.Tensor:
        logits = self.model(row[None, self.prefix:], **with_cache(self.model, cache)).logits[0]
        return torch.log_softmax(logits.float(), -1)

    def loss(self, layer_bits) -> float:
        """Mean KL divergence (nats per token) of the continuation's next-token distributions with each layer's
        cache at ``layer_bits`` (``(key_bits, value_bits)``, or None: fp16) from the uncompressed model's. Unlike
        perplexity it does not depend on which token came next, so small effects are measured on few chunks."""
        kl, n = 0.0, 0
        for c, row in enumerate(self.ids):
            # the prefill cache with the layers' K/V replaced: its layer kinds and the tokens each has seen (a
            # sliding-window layer holds fewer than it has seen; its positions and mask come from the latter)
            cache = _shallow_copy(self.prefill[c])
            for li, (layer, b) in enumerate(zip(cache.layers, layer_bits)):
                if b is not None:
                    layer.keys, layer.values = self._coded_kv(c, li, 0, b[0]), self._coded_kv(c, li, 1, b[1])
            log_q, log_p = self._log_probs(row, cache), self.log_p[c]
            kl += (log_p.exp() * (log_p - log_q)).sum().item()
            n += log_p.shape[0]
        return kl / n


def _shallow_copy(cache):
    """A transformers cache whose layers are copies of ``cache``'s sharing their tensors: a forward through it
    replaces (never writes into) its layers' K/V, so ``cache`` stays as it is."""
    copied = copy.copy(cache)
    copied.layers = [copy.copy(layer) for layer in cache.layers]
    return copied


@torch.no_grad()
def allocate_layer_bits(model, input_ids: torch.Tensor, key_bits: int = 3, value_bits: int = 2,
                        extra_bits: int = 0, prefix: Optional[int] = None, rounds: int = 2,
                        progress: Optional[Callable[[str], None]] = None,
                        policy: Union[str, Policy, None] = None) -> tuple:
    """Per-layer ``(key_bits, value_bits)`` (each 2..4) within the HOT bytes of uniform K{key_bits}V{value_bits} over
    the layers the cache compresses, plus ``extra_bits`` bits' bytes, chosen on calibration text; pass it as the
    ``layer_bits`` of the policy it was allocated for.

    Args:
        model: a transformers causal LM (eval mode).
        input_ids: ``[N, T]`` int64 calibration chunks (text you will not evaluate on): N >= 1, and T >= 5 (the
            default prefix leaves 2 tokens to score) or ``prefix + 2``. Each chunk's first ``prefix`` tokens are
            prefilled and their cache compressed; the loss is that of the rest.
        key_bits / value_bits: the uniform budget (ints, 2..4).
        extra_bits: bits that may be added over the layers beyond the uniform budget, where they measure best; an
            int >= 0, default 0. Each adds the bytes of the dearest one-bit step to the budget (at head_dim 128: 20
            bytes per token per KV head, what a third key bit costs; a value bit costs 16 and a fourth key bit 12, so
            the budget may buy other steps than N).
            At K2V2 nothing can be moved (no layer can give a bit), so an extra bit is the only way to spend bytes
            where they matter.
        prefix: tokens prefilled per chunk, an int >= 1; default ``3 * T // 4``.
        rounds: rounds of measure-then-move, an int >= 0; default 2. Each round measures every compressed layer's
            keys and values one bit up and down, then the moved result: up to ``4 * layers + 1`` forward passes
            over the chunks' continuations (their ``T - prefix`` tokens on the cached prefix). Before the rounds:
            one uncompressed prefill + continuation and one pass at the uniform budget; with 2 rounds up to
            ``8 * layers + 3`` passes after the uncompressed one.
        progress: called with a line per measurement (e.g. ``print``); default silent.
        policy: the policy the bits are for, a preset name or a ``Policy`` (as ``compress`` takes them); default
            ``compress``'s default. Only which layers it compresses counts (``integrations.hf.policy.plan_layers``):
            the layers it leaves fp16 (``keep_layers``; sliding-window layers beside full-attention ones unless
            ``compress_sliding``; ``None`` entries of its ``layer_bits``; fp16 boundary layers) stay fp16 while
            measuring, take no part in the budget or the moves, and are ``None`` in the result. Its bits in the
            layers it compresses are what the result replaces.

    Returns:
        A tuple with one entry per layer: ``(key_bits, value_bits)`` where the policy compresses the layer, ``None``
        where it leaves it fp16; its HOT bytes per token never exceed the budget's. Uniform over the compressed
        layers when no move measured better.

    Example:
        >>> from integrations.hf import allocate_layer_bits, compress  # doctest: +SKIP
        >>> bits = allocate_layer_bits(model, calibration_ids, 3, 2, policy="balanced")  # doctest: +SKIP
        >>> with compress(model, "balanced", layer_bits=bits):  # doctest: +SKIP
        ...     model.generate(**inputs)
    """
    for name, b in (("key_bits", key_bits), ("value_bits", value_bits)):
        if not is_int(b) or b not in SUPPORTED_BITS:
            raise ValueError(f"{name} must be an int in {SUPPORTED_BITS}, got {b!r}")
    for name, n in (("extra_bits", extra_bits), ("rounds", rounds)):
        if not is_int(n) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    if prefix is not None and (not is_int(prefix) or prefix < 1):
        raise ValueError(f"prefix must be an int >= 1 (tokens prefilled per chunk) or None, got {prefix!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be an int64 tensor [chunks, tokens] of calibration text")
    least = 5 if prefix is None else prefix + 2
    if input_ids.shape[0] < 1 or input_ids.shape[1] < least:
        need = ("the default prefix, 3 * T // 4, leaves 2 tokens to score from T = 5 on" if prefix is None else
                f"prefix {prefix} prefilled + 2 scored")
        raise ValueError(f"input_ids must hold at least 1 chunk of at least {least} tokens ({need}), got shape "
                         f"{tuple(input_ids.shape)}")
    prefix = 3 * input_ids.shape[1] // 4 if prefix is None else prefix
    plans = plan_layers(model.config, resolve(policy))
    bits = [None if plan.codec is None else [key_bits, value_bits] for plan in plans]
    compressed = [li for li, b in enumerate(bits) if b is not None]
    say = progress or (lambda line: None)
    lo, hi = min(SUPPORTED_BITS), max(SUPPORTED_BITS)
    if not compressed or key_bits == value_bits == hi or (key_bits == value_bits == lo and not extra_bits):
        # no bit can move: no layer to move it in, none can be taken (all at the most) or given (all at the least)
        return _frozen(bits)
    cal = _Calibration(model, input_ids.to(model.device), prefix)
    price = _Price([plan.codec for plan in plans])
    budget = price.total(bits) + extra_bits * price.dearest_step()
    best = cal.loss(bits)
    say(f"uniform K{key_bits}V{value_bits} ({price.total(bits)} B per token per KV head over the layers, budget "
        f"{budget}): KL {best:.6f}")
    for r in range(rounds):
        effect = {}  # (layer, kind, +1 / -1): loss change with that one bit moved
        for li in compressed:
            for kind in (0, 1):
                for step in (1, -1):
                    if lo <= bits[li][kind] + step <= hi:
                        trial = _copy(bits)
                        trial[li][kind] += step
                        effect[li, kind, step] = cal.loss(trial) - best
                        say(f"round {r + 1}: layer {li} {('keys', 'values')[kind]} {bits[li][kind]} -> "
                            f"{bits[li][kind] + step} bits: KL {effect[li, kind, step]:+.6f}")
        trial = _moves(bits, effect, budget - price.total(bits),
                       lambda li, kind, step: price.step(li, kind, bits[li][kind], step))
        if trial == bits:
            break
        loss = cal.loss(trial)
        say(f"round {r + 1}: {_spell(trial)} ({price.total(trial)} B): KL {loss:.6f}")
        if loss >= best:
            break
        bits, best = trial, loss
    return _frozen(bits)


class _Price:
    """HOT bytes per token per KV head of each compressed layer's keys and values at given bits, in that layer's codec
    (its head_dim and key layout); ``codecs`` has one entry per layer, None where it stays fp16."""

    def __init__(self, codecs: list):
        self.codecs = codecs

    def bytes(self, layer: int, kind: int, bits: int) -> int:
        """Bytes of ``layer``'s keys (``kind`` 0) or values (1) at ``bits``."""
        codec = dataclasses.replace(self.codecs[layer], key_bits=bits, value_bits=bits)
        return codec.bytes_per_token(("key", "value")[kind])

    def step(self, layer: int, kind: int, bits: int, step: int) -> int:
        """Bytes that moving from ``bits`` by ``step`` (+1 or -1) adds (negative: frees)."""
        return self.bytes(layer, kind, bits + step) - self.bytes(layer, kind, bits)

    def total(self, bits: list) -> int:
        """Bytes of the compressed layers at ``bits`` (per layer ``(key_bits, value_bits)``, None where fp16)."""
        return sum(self.bytes(li, kind, b[kind]) for li, b in enumerate(bits) if b is not None for kind in (0, 1))

    def dearest_step(self) -> int:
        """The most bytes one bit up costs in any compressed layer: what an extra bit adds to the budget."""
        lo, hi = min(SUPPORTED_BITS), max(SUPPORTED_BITS)
        return max(self.step(li, kind, b, 1) for li, c in enumerate(self.codecs) if c is not None
                   for kind in (0, 1) for b in range(lo, hi))


def _moves(bits: list, effect: dict, room: int, cost: Callable[[int, int, int], int]) -> list:
    """One round's moves: ``bits`` with the measured helpful bits up (most helpful first), each paid from ``room``
    (bytes the budget has left) where it fits, else by the least harmful measured bit down that frees enough, and
    taken only when the pair's summed effect is a gain. ``effect[layer, kind, ±1]`` is the measured loss change of
    that one move, ``cost(layer, kind, ±1)`` its bytes; each (layer, kind) moves at most once."""
    ups = sorted((e, li, kind) for (li, kind, step), e in effect.items() if step == 1)
    downs = sorted((e, li, kind) for (li, kind, step), e in effect.items() if step == -1)
    trial, used = _copy(bits), set()
    for gain, li, kind in ups:
        if gain >= 0:
            break
        if (li, kind) in used:
            continue
        need = cost(li, kind, 1) - room  # bytes a donor must free
        donor = None
        if need > 0:
            donor = next(((e, lj, kj) for e, lj, kj in downs if (lj, kj) not in used and (lj, kj) != (li, kind)
                          and -cost(lj, kj, -1) >= need), None)
            if donor is None or gain + donor[0] >= 0:
                continue
            used.add(donor[1:])
            trial[donor[1]][donor[2]] -= 1
            room -= cost(donor[1], donor[2], -1)
        used.add((li, kind))
        trial[li][kind] += 1
        room -= cost(li, kind, 1)
    return trial


def _copy(bits: list) -> list:
    return [None if b is None else list(b) for b in bits]


def _frozen(bits: list) -> tuple:
    return tuple(None if b is None else tuple(b) for b in bits)


def _spell(bits) -> str:
    return ",".join("fp16" if b is None else f"K{b[0]}V{b[1]}" for b in bits)
