"""The codec study behind docs/codec.md.

    python -m perf.codec_study [--model DIR] [--text FILE] [--skip-ppl]

1. Normalised MSE at 2/3/4 bits on Gaussian data and on real K and V of the model: scalar uniform, Hadamard +
   scalar, the prior art's relaxed E8 with an amax scale (if nexusquant-kv is installed), and ours, beside the
   rate-distortion bound 2^(-2R). Every method spends one fp16 scale per token per head (metadata equal).
2. Continuation perplexity (perf.continuation) for ours at K4V4 / K3V3 / K3V2 / K2V2 under the least-squares and
   the unbiased scale rule (the default), with measured bytes, and the prior art's quant_only mode if installed.
   ``--chunks 40`` gives finer resolution.
3. ``--key-modes``: only the key-mode comparison (keys stored post-RoPE vs with RoPE undone at encode and re-applied
   at decode), default scale rule, continuation perplexity at every bit setting (docs/codec.md, "Key mode").
"""
from __future__ import annotations

import argparse
import os

import torch

from nqkernels import KVCodec, RopeSpec
from nqkernels import reference as R
from perf.continuation import FIXTURE, codec_compressor, continuation_ppl, load_chunks, load_model


def scalar_uniform(x, bits):
    """b-bit mid-rise uniform quantizer per token, step = c·RMS with c optimised for a Gaussian."""
    c = {2: 0.996, 3: 0.586, 4: 0.335}[bits]
    step = (x.pow(2).mean(-1, keepdim=True).sqrt() * c).half().float()
    q = torch.clamp(torch.floor(x / step), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return (q + 0.5) * step


def hadamard_scalar(x, bits):
    n = R.transform_norm(x.shape[-1]) ** 0.5
    return R.inverse_hadamard(scalar_uniform(R.hadamard(x) / n, bits)) * n


def prior_art_relaxed_e8(x, bits):
    from nexusquant.core.e8_lattice import E8Lattice

    d, n = x.shape[-1], R.transform_norm(x.shape[-1]) ** 0.5
    y = R.hadamard(x) / n
    return R.inverse_hadamard(E8Lattice.quantize_perhead(y.reshape(-1, d), levels=1 << bits).reshape(y.shape)) * n


def ours(fit):
    def quantize(x, bits):
        idx, s = R.quantize(x, bits, KVCodec().alpha[bits], fit, torch.float16)
        return R.dequantize(idx, s, bits)
    return quantize


METHODS = {"scalar uniform": scalar_uniform, "Hadamard + scalar": hadamard_scalar,
           "prior art relaxed E8 (amax)": prior_art_relaxed_e8,
           "ours, least-squares scale (rms_lsq)": ours("lsq"),
           "ours, unbiased scale (rms_unbiased, default)": ours("unbiased")}


def prior_art_compressor(model, key_bits, value_bits):
    """nexusquant-kv's quant_only mode on one layer's cache (it writes dequantized fp16 back)."""
    from nexusquant.pipeline import NexusQuantQuantOnly
    from transformers import DynamicCache

    nq = NexusQuantQuantOnly(key_bits=key_bits, value_bits=value_bits,
                             rope_base=RopeSpec.from_hf_config(model.config).theta)

    def compress(li, k, v):
        cache = DynamicCache()
        cache.update(k.clone(), v.clone(), 0)
        nq.compress(cache)
        return cache.layers[0].keys.float(), cache.layers[0].values.float(), 0

    return compress


def nmse(x, xh):
    return ((xh - x) ** 2).sum().item() / (x ** 2).sum().item()


def mse_table(name, x):
    rows = [f"\n### {name}\n", "| method | 2 bits | 3 bits | 4 bits |", "|---|---|---|---|"]
    for mname, fn in METHODS.items():
        try:
            vals = [nmse(x, fn(x, b)) for b in (2, 3, 4)]
        except ImportError:
            continue
        rows.append(f"| {mname} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    rows.append("| rate-distortion bound 2^(-2R) | 0.0625 | 0.0156 | 0.0039 |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(FIXTURE, "llama-tiny-hd128"))
    ap.add_argument("--text", default=os.path.join(FIXTURE, "text", "eval_pydocs.txt"))
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--key-modes", action="store_true", help="only the key-mode perplexity comparison")
    args = ap.parse_args()
    from integrations.hf.compat import output_cache

    torch.manual_seed(0)
    tok, model = load_model(args.model)
    chunks = load_chunks(tok, args.text, args.chunks, 2048)
    if args.key_modes:
        return key_mode_table(model, chunks, os.path.basename(args.text))
    print(mse_table("Gaussian, 4096 vectors of 128", torch.randn(4096, 128)))
    with torch.no_grad():
        layers = output_cache(model(chunks[0][:, :1536], use_cache=True)).layers
    k = torch.cat([l.keys[0] for l in layers]).reshape(-1, 128)
    v = torch.cat([l.values[0] for l in layers]).reshape(-1, 128)
    # Each method sees the token vectors as stored (keys post-RoPE), centred per layer and head as ours does.
    kc = torch.cat([(l.keys[0] - l.keys[0].mean(1, keepdim=True)) for l in layers]).reshape(-1, 128)
    vc = torch.cat([(l.values[0] - l.values[0].mean(1, keepdim=True)) for l in layers]).reshape(-1, 128)
    print(mse_table("fixture keys (post-RoPE), all layers and heads of one 1536-token prefill", k))
    print(mse_table("fixture keys, centred per head", kc))
    print(mse_table("fixture values", v))
    print(mse_table("fixture values, centred per head", vc))
    if args.skip_ppl:
        return
    print(f"\nContinuation perplexity, {args.chunks} chunks of {os.path.basename(args.text)}")
    base, _ = continuation_ppl(model, chunks, None)
    print("\n| setting | PPL | delta | bytes / token / head (K+V) | bits / element |\n|---|---|---|---|---|")
    print(f"| fp16 (no-op control) | {base:.4f} | — | 512 | 16 |")
    rope = RopeSpec.from_hf_config(model.config)
    for kb, vb in ((4, 4), (3, 3), (3, 2), (2, 2)):
        for rule in ("rms_lsq", "rms_unbiased"):
            codec = KVCodec(head_dim=128, key_bits=kb, value_bits=vb, rope=rope, scale_rule=rule)
            p, nbytes = continuation_ppl(model, chunks, codec_compressor(codec))
            print(f"| K{kb}V{vb}, {rule} | {p:.4f} | {100 * (p / base - 1):+.2f}% | {nbytes:.2f} | "
                  f"{nbytes * 8 / 256:.3f} |", flush=True)
        try:
            p, _ = continuation_ppl(model, chunks, prior_art_compressor(model, kb, vb))
        except ImportError:
            continue
        print(f"| K{kb}V{vb}, prior art quant_only (fp16 in memory) | {p:.4f} | {100 * (p / base - 1):+.2f}% | 512 | "
              f"16 |", flush=True)


def key_mode_table(model, chunks, text_name):
    """Continuation perplexity with keys stored post-RoPE vs with RoPE undone, default scale rule."""
    print(f"Key modes, continuation perplexity, {len(chunks)} chunks of {text_name}")
    base, _ = continuation_ppl(model, chunks, None)
    print(f"\nfp16 (no-op control): {base:.4f}\n")
    print("| keys / values | post-RoPE keys | delta | RoPE undone | delta | bytes / token / head (K+V) |")
    print("|---|---|---|---|---|---|")
    rope = RopeSpec.from_hf_config(model.config)
    for kb, vb in ((4, 4), (3, 3), (3, 2), (2, 2)):
        cells = []
        for mode in (None, rope):
            codec = KVCodec(head_dim=128, key_bits=kb, value_bits=vb, rope=mode)
            p, nbytes = continuation_ppl(model, chunks, codec_compressor(codec))
            cells.append(f"{p:.4f} | {100 * (p / base - 1):+.2f}%")
        print(f"| K{kb}V{vb} | {' | '.join(cells)} | {nbytes:.2f} |", flush=True)


if __name__ == "__main__":
    main()
