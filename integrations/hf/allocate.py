"""Per-layer bits at a fixed byte budget, chosen by measured sensitivity (``allocate_layer_bits``).

Layers do not spend a bit equally well. On the fixture model (docs/codec.md, "Bits per layer") one layer's keys lose
+0.60% perplexity going from 3 to 2 bits while every other layer's lose +0.01-0.03%, and one layer's values gain
0.11% from a third bit where others gain nothing. A bit costs the same bytes in any layer and in keys or values (16
bytes per token per head at head_dim 128), so moving bits from where they buy least to where they buy most keeps the
bytes and lowers the loss. The allocation is measured, not modelled: the KL divergence of the model's next-token
distributions on calibration text from the uncompressed model's, with one layer's keys or values one bit up or down;
then pairs of moves (one bit up here, one down there) whose summed measured effects are a gain; then the result
measured again and kept only if it is better.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from nqkernels import KVCodec, decode_kv, encode_kv
from nqkernels.config import SUPPORTED_BITS

from .compat import output_cache, with_cache


def _round_trip(x: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
    """``x`` ``[B, H, T, D]`` (transformers' layout) encoded at ``bits`` and decoded, as the HOT pages hold it."""
    codec = KVCodec(head_dim=x.shape[-1], key_bits=bits, value_bits=bits)
    enc = encode_kv(x.transpose(1, 2), codec, kind)
    return decode_kv(enc, codec, kind, dtype=x.dtype).transpose(1, 2)


class _Calibration:
    """The calibration chunks' prefill caches and uncompressed continuation distributions, and the divergence from
    them with each layer's K/V at given bits."""

    def __init__(self, model, input_ids: torch.Tensor, prefix: int):
        from transformers import DynamicCache

        self.model, self.prefix, self._DynamicCache = model, prefix, DynamicCache
        self.ids = input_ids
        self.kv = []  # per chunk: [(keys, values)] per layer
        self.log_p = []  # per chunk: the uncompressed model's log-probabilities of the continuation tokens
        for row in input_ids:
            cache = output_cache(model(row[None, :prefix], use_cache=True))
            self.kv.append([(layer.keys, layer.values) for layer in cache.layers])
            self.log_p.append(self._log_probs(row, cache))
        self.num_layers = len(self.kv[0])
        self._coded: dict = {}

    def _coded_kv(self, chunk: int, layer: int, kind: int, bits: int) -> torch.Tensor:
        key = (chunk, layer, kind, bits)
        if key not in self._coded:
            self._coded[key] = _round_trip(self.kv[chunk][layer][kind], bits, ("key", "value")[kind])
        return self._coded[key]

    def _log_probs(self, row: torch.Tensor, cache) -> torch.Tensor:
        logits = self.model(row[None, self.prefix:], **with_cache(self.model, cache)).logits[0]
        return torch.log_softmax(logits.float(), -1)

    def loss(self, layer_bits) -> float:
        """Mean KL divergence (nats per token) of the continuation's next-token distributions with each layer's
        cache at ``layer_bits`` from the uncompressed model's. Unlike perplexity it does not depend on which token
        came next, so small effects are measured on few chunks."""
        kl, n = 0.0, 0
        for c, row in enumerate(self.ids):
            cache = self._DynamicCache(config=self.model.config)  # the prefill cache's layer kinds (sliding windows)
            for li, (kb, vb) in enumerate(layer_bits):
                cache.update(self._coded_kv(c, li, 0, kb), self._coded_kv(c, li, 1, vb), li)
            log_q, log_p = self._log_probs(row, cache), self.log_p[c]
            kl += (log_p.exp() * (log_p - log_q)).sum().item()
            n += log_p.shape[0]
        return kl / n


@torch.no_grad()
def allocate_layer_bits(model, input_ids: torch.Tensor, key_bits: int = 3, value_bits: int = 2,
                        extra_bits: int = 0, prefix: Optional[int] = None, rounds: int = 2,
                        progress: Optional[Callable[[str], None]] = None) -> tuple:
    """Per-layer ``(key_bits, value_bits)`` with the bytes of uniform K{key_bits}V{value_bits} (the same total bits
    over the layers, each 2..4), plus at most ``extra_bits`` more, chosen on calibration text; pass it as
    ``Policy(layer_bits=...)``.

    Args:
        model: a transformers causal LM (eval mode).
        input_ids: ``[N, T]`` int64 calibration chunks (text you will not evaluate on). Each chunk's first
            ``prefix`` tokens are prefilled and their cache compressed; the loss is that of the rest.
        key_bits / value_bits: the uniform budget (2..4).
        extra_bits: bits (each 16 bytes per token per KV head at head_dim 128) that may be added over the layers
            beyond the uniform budget, where they measure best; default 0. At K2V2 nothing can be moved (no layer
            can give a bit), so an extra bit is the only way to spend bytes where they matter.
        prefix: tokens prefilled per chunk; default ``3 * T // 4``.
        rounds: rounds of measure-then-move (each round measures every layer one bit up and down: up to
            ``4 * layers`` forward passes over the chunks).
        progress: called with a line per measurement (e.g. ``print``); default silent.

    Returns:
        A tuple of ``(key_bits, value_bits)``, one per layer. Uniform when no move measured better.

    Example:
        >>> from integrations.hf import Policy, allocate_layer_bits, compress  # doctest: +SKIP
        >>> bits = allocate_layer_bits(model, calibration_ids, 3, 2)  # doctest: +SKIP
        >>> with compress(model, Policy(layer_bits=bits)):  # doctest: +SKIP
        ...     model.generate(**inputs)
    """
    for name, b in (("key_bits", key_bits), ("value_bits", value_bits)):
        if b not in SUPPORTED_BITS:
            raise ValueError(f"{name} must be one of {SUPPORTED_BITS}, got {b!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be an int64 tensor [chunks, tokens] of calibration text")
    T = input_ids.shape[1]
    prefix = 3 * T // 4 if prefix is None else int(prefix)
    if not 1 <= prefix <= T - 2:
        raise ValueError(f"prefix must leave at least 2 scored tokens of the {T} per chunk, got {prefix}")
    if not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
    if not isinstance(extra_bits, int) or extra_bits < 0:
        raise ValueError(f"extra_bits must be an int >= 0, got {extra_bits!r}")
    say = progress or (lambda line: None)
    lo, hi = min(SUPPORTED_BITS), max(SUPPORTED_BITS)
    if key_bits == value_bits == hi or (key_bits == value_bits == lo and not extra_bits):
        # no bit can move: none can be taken (all at the most) or given (all at the least, none extra)
        return ((key_bits, value_bits),) * model.config.num_hidden_layers
    cal = _Calibration(model, input_ids.to(model.device), prefix)
    bits = [[key_bits, value_bits] for _ in range(cal.num_layers)]
    budget = cal.num_layers * (key_bits + value_bits) + extra_bits
    best = cal.loss(bits)
    say(f"uniform K{key_bits}V{value_bits}: KL {best:.6f}")
    for r in range(rounds):
        effect = {}  # (layer, kind, +1 / -1): loss change with that one bit moved
        for li in range(cal.num_layers):
            for kind in (0, 1):
                for step in (1, -1):
                    if lo <= bits[li][kind] + step <= hi:
                        trial = [list(b) for b in bits]
                        trial[li][kind] += step
                        effect[li, kind, step] = cal.loss(trial) - best
                        say(f"round {r + 1}: layer {li} {('keys', 'values')[kind]} {bits[li][kind]} -> "
                            f"{bits[li][kind] + step} bits: KL {effect[li, kind, step]:+.6f}")
        ups = sorted((e, li, kind) for (li, kind, step), e in effect.items() if step == 1)
        free = budget - sum(map(sum, bits))  # extra bits not spent yet: donors that cost nothing
        downs = [(0.0, None, i) for i in range(free)]
        downs += sorted((e, li, kind) for (li, kind, step), e in effect.items() if step == -1)
        trial, used = [list(b) for b in bits], set()
        for gain, li, kind in ups:  # most helpful bit first, paid by the least harmful one left
            donor = next(((cost, lj, kj) for cost, lj, kj in downs if (lj, kj) not in used and (lj, kj) != (li, kind)),
                         None)
            if (li, kind) in used or donor is None or gain + donor[0] >= 0:
                continue
            used |= {(li, kind), donor[1:]}
            trial[li][kind] += 1
            if donor[1] is not None:
                trial[donor[1]][donor[2]] -= 1
        if trial == bits:
            break
        loss = cal.loss(trial)
        say(f"round {r + 1}: {_spell(trial)}: KL {loss:.6f}")
        if loss >= best:
            break
        bits, best = trial, loss
    return tuple(tuple(b) for b in bits)


def _spell(bits) -> str:
    return ",".join(f"K{k}V{v}" for k, v in bits)
