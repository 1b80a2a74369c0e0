"""How much smaller COLD is than HOT on the fixture model's real KV (docs/format.md, perf/results/cold_ratio.md).

    python -m perf.cold_study [--tokens 2048] [--levels 1,3,9,19] [--out perf/results]

Four held-out texts are prefilled as one ragged batch of sequences (each up to --tokens); every layer's K/V goes
into a PagedKVCache (default codec, both key modes, K4V4..K2V2) and is saved with ``save_cache`` at several zstd
levels with the per-head filter chosen automatically, and with each filter forced, so the data shows where deltas
help. Bytes: fp16 = the K/V of the same tokens in fp16; HOT = the saved state as held (codes, scales, fp16 window,
means); COLD = the file. Beside them the empirical entropy of the lattice indices (per coordinate, and given the
previous token's index): what any lossless coder of the codes could reach on this data.
"""
from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
import torch

from nqkernels import KVCodec, PagedKVCache, RopeSpec, save_cache
from nqkernels import reference as R
from perf.continuation import FIXTURE, load_model, read_text

TEXTS = ("eval_pydocs", "eval_gcide", "eval_foldoc", "eval_jargon")
SETTINGS = ((4, 4), (3, 3), (3, 2), (2, 2))


def _entropy(x: np.ndarray) -> float:
    _, c = np.unique(x, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def index_entropy(state_codes: torch.Tensor, bits: int, head_dim: int, layout: str) -> tuple[float, float]:
    """(order-0 per coordinate, order-1 given the previous token) entropy in bits per coordinate, [H, T, W] codes."""
    idx = R.unpack_codes(state_codes, bits, head_dim, layout).numpy()
    H, T, D = idx.shape
    h0 = h1 = 0.0
    for h in range(H):
        for d in range(D):
            col = idx[h, :, d]
            h0 += _entropy(col)
            h1 += _entropy(col[1:] * 16 + col[:-1]) - _entropy(col[:-1])
    return h0 / (H * D), h1 / (H * D)


def prefill(model_dir: str, n_tokens: int):
    from integrations.hf.compat import output_cache

    tok, model = load_model(model_dir)
    kvs = []
    for name in TEXTS:
        text = read_text(os.path.join(FIXTURE, "text", f"{name}.txt"))
        ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
        with torch.no_grad():
            kvs.append([(l.keys[0].transpose(0, 1), l.values[0].transpose(0, 1))
                        for l in output_cache(model(ids, use_cache=True)).layers])
    return kvs, model.config


def build(kvs, config, codec) -> list[PagedKVCache]:
    L, H = len(kvs[0]), config.num_key_value_heads
    T = max(k.shape[0] for k, _ in (seq[0] for seq in kvs))
    caches = []
    for li in range(L):
        c = PagedKVCache(codec, num_kv_heads=H, max_batch=len(kvs), num_pages=len(kvs) * (T // codec.page_size + 1),
                         device="cpu")
        k = torch.zeros(len(kvs), T, H, codec.head_dim)
        v = torch.zeros_like(k)
        for b, seq in enumerate(kvs):
            k[b, :seq[li][0].shape[0]], v[b, :seq[li][1].shape[0]] = seq[li]
        c.append(k.half(), v.half(), lengths=[seq[li][0].shape[0] for seq in kvs])
        caches.append(c)
    return caches


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(FIXTURE, "llama-tiny-hd128"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--levels", default="1,3,9,19")
    ap.add_argument("--out", default=None, help="write cold_ratio.md and .json into this folder")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    kvs, config = prefill(args.model, args.tokens)
    n_tok = sum(seq[0][0].shape[0] for seq in kvs)
    fp16 = n_tok * len(kvs[0]) * config.num_key_value_heads * config.head_dim * 2 * 2
    rows = []
    for mode_name, rope in (("post-RoPE keys", None), ("RoPE undone", RopeSpec.from_hf_config(config))):
        for kb, vb in SETTINGS:
            codec = KVCodec(head_dim=config.head_dim, key_bits=kb, value_bits=vb, rope=rope)
            caches = build(kvs, config, codec)
            row = {"key_mode": mode_name, "setting": f"K{kb}V{vb}", "tokens": n_tok, "fp16_bytes": fp16}
            for lvl in levels:
                st = save_cache(caches, io.BytesIO(), level=lvl)
                row["hot_bytes"] = st["hot_bytes"]
                row[f"cold_l{lvl}"] = st["file_bytes"]
                if lvl == 3:
                    row["auto_modes"] = st["modes"]
                    row["auto_parts"] = st["part_bytes"]
            for forced in ("raw", "shuffle", "delta"):
                st = save_cache(caches, io.BytesIO(), level=3, modes=forced)
                row[f"parts_{forced}"] = st["part_bytes"]
            h = {"k": [0.0, 0.0], "v": [0.0, 0.0]}
            n = 0
            for c in caches:
                for b in range(len(kvs)):
                    s = c.export_slot(b)
                    n += 1
                    for part, codes, bits in (("k", s.k_codes, kb), ("v", s.v_codes, vb)):
                        e0, e1 = index_entropy(codes, bits, config.head_dim, c.codec.layout("key" if part == "k"
                                                                                           else "value"))
                        h[part][0] += e0
                        h[part][1] += e1
            row["entropy_bits"] = {p: [round(x / n, 4) for x in v] for p, v in h.items()}
            rows.append(row)
            print(f"{mode_name:15s} K{kb}V{vb}: HOT {row['hot_bytes']} B, COLD (level 3) {row['cold_l3']} B = "
                  f"{row['hot_bytes'] / row['cold_l3']:.3f}x smaller; fp16 / COLD {fp16 / row['cold_l3']:.2f}x; "
                  f"modes {row['auto_modes']}; index entropy K {h['k'][0] / n:.3f}/{h['k'][1] / n:.3f}, "
                  f"V {h['v'][0] / n:.3f}/{h['v'][1] / n:.3f} bits", flush=True)
    if args.out:
        with open(os.path.join(args.out, "cold_ratio.json"), "w") as f:
            json.dump({"model": os.path.basename(args.model), "texts": TEXTS, "levels": levels, "rows": rows}, f,
                      indent=1)
        with open(os.path.join(args.out, "cold_ratio.md"), "w") as f:
            f.write(markdown(rows, levels))


def markdown(rows, levels) -> str:
    out = ["# COLD vs HOT on real KV (fixture llama-tiny-hd128)", "",
           f"{rows[0]['tokens']} tokens (4 held-out texts, one ragged batch), 6 layers x 2 KV heads, head_dim 128, "
           "page 64, 64-token fp16 window; `python -m perf.cold_study --out perf/results` (CPU, torch reference "
           "filter; the GPU kernel's bytes are identical). Lossless: every round trip is bit-exact (tests).", "",
           "| key mode | setting | fp16 B | HOT B | " + " | ".join(f"COLD z{l} B" for l in levels) +
           " | HOT/COLD (z3) | fp16/COLD (z3) | modes chosen (raw/shuffle/delta) |",
           "|---|---|---|---|" + "---|" * len(levels) + "---|---|---|"]
    for r in rows:
        m = r["auto_modes"]
        out.append(f"| {r['key_mode']} | {r['setting']} | {r['fp16_bytes']} | {r['hot_bytes']} | " +
                   " | ".join(str(r[f'cold_l{l}']) for l in levels) +
                   f" | {r['hot_bytes'] / r['cold_l3']:.3f}x | {r['fp16_bytes'] / r['cold_l3']:.2f}x | "
                   f"{m['raw']}/{m['shuffle']}/{m['delta']} |")
    out += ["", "Compressed bytes of the K and V code frames at level 3 by filter (each forced for every head, and "
            "the per-head automatic choice), with the empirical index entropy in bits per coordinate (order 0 per "
            "coordinate / given the previous token's index):", "",
            "| key mode | setting | K raw | K shuffle | K delta | K auto | K entropy | V raw | V shuffle | V delta | "
            "V auto | V entropy |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for p in ("k", "v"):
            cells += [str(r[f"parts_{m}"][p]) for m in ("raw", "shuffle", "delta")] + [str(r["auto_parts"][p])]
            cells.append("{:.3f} / {:.3f}".format(*r["entropy_bits"][p]))
        out.append(f"| {r['key_mode']} | {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
