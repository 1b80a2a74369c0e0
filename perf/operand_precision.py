"""What lower-precision tensor-core operands in the decode attention would cost in quality (a design study, CPU).

    python -m perf.operand_precision --model DIR --text FILE [--preset k3v2 ...] [--chunks 6] [--json]

The decode kernels multiply stored lattice indices (exact small integers) by fp16 operands: the rotated query
(R q, ``reference.rotation_matrix``) in the key products and the weights p·s (softmax weight times the value
token's scale) in the value products. With 8-bit operands a register holds four indices instead of two (one mask
per four, half the products: docs/attention.md, "What limits it"), so their precision is what such a kernel would
trade. This runs ``perf.quality``'s protocol (prefill, compress to HOT, score the continuation) with the harness's
attention replaced, on the compressed tokens only (the window stays exact, as in the kernels), by

    logits = (Rᵀ·Q_q(R q) / n)·(k − μ_k) + q·μ_k        values = Σ Q_p(p·s)/s · (v − μ_v) + (Σ p)·μ_v

where k, v are the dequantized tokens, μ the centering means, s each value token's stored scale, and Q_q / Q_p
round an operand: ``fp16`` (today's kernels), ``e4m3`` (FP8, one scale per query row / per 64-token page of
weights, amax to 448) or ``int8`` (symmetric per row / unsigned per page). The lattice offset rides on the rounded
weights (today's kernels weigh it by an unrounded fp32 Σ p·s, which an 8-bit kernel could keep too). ``exact`` applies no rounding and must reproduce the
harness's own attention (the control, to 4 decimals), as the ``fp16`` preset reproduces the plain model.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from nqkernels import PagedKVCache
from nqkernels import reference as ref
from perf.continuation import load_chunks, load_model
from perf.quality import Harness, _EvalAttention, _register, parse_preset

UNIT = 64  # tokens per scale of the weights: a page (an 8-bit kernel would convert its int32 accumulators per page)
VARIANTS = {"exact": (None, None), "fp16": ("fp16", "fp16"), "q e4m3": ("e4m3", "fp16"),
            "p e4m3": ("fp16", "e4m3"), "q+p e4m3": ("e4m3", "e4m3"), "q int8": ("int8", "fp16"),
            "p uint8": ("fp16", "int8"), "q+p int8": ("int8", "int8")}


def round_operand(x: torch.Tensor, mode, group: int = 0) -> torch.Tensor:
    """x rounded as an operand of the given precision; one scale per row of the last dim, or per ``group``
    consecutive elements of it (x >= 0 there: the unsigned int8 of weights)."""
    if mode is None:
        return x
    if mode == "fp16":
        return x.half().float()
    shape = x.shape
    if group:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    amax = x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    if mode == "e4m3":
        y = (x * (448.0 / amax)).to(torch.float8_e4m3fn).float() * (amax / 448.0)
    elif mode == "int8":
        levels = 255.0 if group else 127.0
        y = torch.round(x * (levels / amax)) * (amax / levels)
    else:
        raise ValueError(f"unknown operand precision {mode!r}")
    return y.reshape(shape)


class OperandAttention(_EvalAttention):
    """The harness's attention with the compressed tokens' products taken through rounded operands (see the
    module doc); ``state[layer]``: (compressed tokens C, μ_k [H, D], μ_v [H, D], value scales [H, C]) of batch row 0
    (the protocol's chunks are single sequences)."""
    name = "nq_operand"

    def __init__(self, window: int):
        super().__init__(window)
        self.mode, self.state = (None, None), {}

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        st = self.state.get(module.layer_idx)
        if st is None:  # the prefill, or the no-op preset: nothing compressed
            return super().__call__(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if query.shape[0] != 1:
            raise ValueError(f"OperandAttention simulates one sequence at a time, got a batch of {query.shape[0]}")
        q_mode, p_mode = self.mode
        C, mu_k, mu_v, s_v = st
        group = query.shape[1] // key.shape[1]
        q = query.float()
        k, v = (t.float().repeat_interleave(group, 1) for t in (key, value))
        mu_k, mu_v, s_v = (t.repeat_interleave(group, 0)[None] for t in (mu_k, mu_v, s_v))  # [1, Hq, ...]
        D = q.shape[-1]
        R = ref.rotation_matrix(D).to(q.device)
        n = ref.transform_norm(D)
        scale = scaling if scaling is not None else D ** -0.5
        q_op = round_operand(q @ R.T, q_mode) @ R / n  # Rᵀ Q(R q) / n: q itself without rounding
        logits = q @ k.transpose(-1, -2)
        logits[..., :C] = q_op @ (k[..., :C, :] - mu_k[:, :, None]).transpose(-1, -2) + \
            (q @ mu_k[..., None])
        q_len, kv_len = q.shape[2], k.shape[2]
        if q_len > 1:
            causal = (torch.arange(kv_len, device=q.device)[None, :]
                      <= torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len))
            logits = logits.masked_fill(~causal, float("-inf"))
        p = torch.softmax(logits * scale, dim=-1)
        pc = p[..., :C]
        sv = s_v[:, :, None, :]
        w = round_operand(pc * sv, p_mode, UNIT if p_mode in ("e4m3", "int8") else 0)
        pc_op = torch.where(sv > 0, w / sv.clamp_min(1e-30), pc)
        out = pc_op @ (v[..., :C, :] - mu_v[:, :, None]) + pc.sum(-1, keepdim=True) * mu_v[:, :, None] + \
            p[..., C:] @ v[..., C:, :]
        return out.to(query.dtype).transpose(1, 2).contiguous(), None


class OperandHarness(Harness):
    """``perf.quality.Harness`` whose compression also hands each layer's HOT cache state to ``OperandAttention``."""

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        self.attn = OperandAttention(self.window)
        _register(self.attn)

    def prefill(self, preset, ids):
        self.attn.state = {}  # the prefill attends the fp16 prefix (the kernels' prefill does), then compresses it
        return super().prefill(preset, ids)

    def compress(self, preset, cache, queries):
        caches = []
        real = PagedKVCache.dense

        def spy(hot, *a, **kw):
            caches.append(hot)
            return real(hot, *a, **kw)
        PagedKVCache.dense = spy
        try:
            out = super().compress(preset, cache, queries)
        finally:
            PagedKVCache.dense = real
        if (caches or preset.bits is not None) and len(caches) != self.num_layers:
            raise ValueError(f"preset {preset.name!r} compresses {len(caches)} of {self.num_layers} layers: the study "
                             f"maps compressed caches to layers by order and needs every layer compressed")
        self.attn.state = {li: _layer_state(hot) for li, hot in enumerate(caches)}
        return out


def _layer_state(hot: PagedKVCache) -> tuple:
    """(compressed tokens, μ_k, μ_v, value scales in token order [H, C]) of batch row 0 of a HOT cache."""
    C, P = hot.compressed_lens()[0], hot.codec.page_size
    pages = hot.block_table[0, :C // P].long()
    scales = hot.v_scales[pages].float().permute(1, 0, 2).reshape(hot.num_kv_heads, -1)[:, :C]
    return C, hot.k_mean[0].float(), hot.v_mean[0].float(), scales


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m perf.operand_precision", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--preset", action="append", default=[], help="kXvY presets (default k3v2, k2v2, k4v4)")
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--prefix", type=int, default=1536)
    ap.add_argument("--continuation", type=int, default=512)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    presets = args.preset or ["k3v2", "k2v2", "k4v4"]
    tok, model = load_model(args.model, dtype=torch.float32)
    chunks = load_chunks(tok, args.text, args.chunks, args.prefix + args.continuation)
    plain = Harness(model).plain_ppl(chunks, args.prefix)
    h = OperandHarness(model)
    noop, _, _ = h.continuation(parse_preset("fp16"), chunks, args.prefix)
    if round(noop, 4) != round(plain, 4):
        raise SystemExit(f"harness broken: the no-op control gives {noop:.4f}, the plain model {plain:.4f}")
    rows = {}
    for name in presets:
        preset = parse_preset(name)
        base = Harness(model)
        own, _, _ = base.continuation(preset, chunks, args.prefix)  # the harness's own attention
        rows[name] = {"harness": own}
        for variant, mode in VARIANTS.items():
            h.attn.mode = mode
            ppl, _, _ = h.continuation(preset, chunks, args.prefix)
            rows[name][variant] = ppl
            print(f"{name} {variant}: {ppl:.4f} ({100 * (ppl / own - 1):+.3f}% vs the harness's attention)",
                  file=sys.stderr, flush=True)
        if round(rows[name]["exact"], 4) != round(own, 4):
            raise SystemExit(f"{name}: the unrounded operands give {rows[name]['exact']:.4f}, the harness's "
                             f"attention {own:.4f}: the simulation is wrong")
    result = {"model": args.model, "text": args.text, "plain_model_ppl": plain, "noop_ppl": noop,
              "protocol": {"chunks": args.chunks, "prefix": args.prefix, "continuation": args.continuation,
                           "unit": UNIT}, "presets": rows}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        cols = list(VARIANTS)
        print("| preset | harness | " + " | ".join(cols) + " |\n|---|---|" + "---|" * len(cols))
        for name, r in rows.items():
            print(f"| {name} | {r['harness']:.4f} | " + " | ".join(
                f"{r[c]:.4f} ({100 * (r[c] / r['harness'] - 1):+.2f}%)" for c in cols) + " |")
    return result


if __name__ == "__main__":
    main()
