"""A/B of the Gluon fast path in one process: a saved copy of ``nqkernels/attention/gluon.py`` (the base) against
the working tree's, each as ``decode_attention`` launches it with this GPU's store, beside SDPA fp16 and the store's
own launch; the two outputs must agree.

    git show HEAD:nqkernels/attention/gluon.py > .gluon_base.py       # on the machine with the history
    python -m perf.gluon_ab --base .gluon_base.py [--shapes 8x32768x3x2,1x131072x3x2] [--fused] [--out DIR]

The base file travels with the checkout (untracked, not ignored, or carried). Shapes are BxTxKxV[xD] (head_dim 128
by default), Llama-3-8B heads (32 query, 8 KV). ``--fused`` forces the fused pass (``gluon_fused``) on top of the
store's config; without it each module runs where the store takes a Gluon pass. A base from before the "fields"
key layout of its key bits (``reads_fields``) reads the same codes in bit planes (``key_layout="planes"``): the row
then compares the two layouts; a base that reads 4-bit values in bit planes only is refused at V4 (no cache holds
them so). Times are CUDA-graph replays with L2 cleared (``autotune.tune.bench_ms``), base and new alternated twice,
the faster of each kept; decode plans are cleared between modules (a plan replays its launches).
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys

import torch

from autotune.tasks import random_cache
from autotune.tune import bench_ms
from nqkernels import KVCodec, decode_attention, runtime, store
from nqkernels.attention import gluon as new_module
from nqkernels.attention import launcher as A
from perf.bench_attention import device_info, log
from perf.bench_attention_gluon import sdpa_and_shipped

SHAPES = "8x32768x3x2,1x131072x3x2,16x8192x3x2,8x32768x2x2,8x32768x4x4,8x32768x3x2x64,1x32768x3x2"


def load_base(path: str):
    """The module at ``path`` as a sibling of ``nqkernels.attention.gluon`` (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location("nqkernels.attention._gluon_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if "q" not in inspect.signature(module.fused_pass).parameters:  # a copy from before the query operand in the pass
        prep_fused = module.fused_pass
        module.fused_pass = lambda cache, q, q_t, q_mean, *a, **k: prep_fused(cache, q_t, q_mean, *a, **k)
        module.supports_query_in_pass = lambda *a: False  # (so the launcher runs the prep for it)
    return module


def parse_shapes(text: str, flag: str = "--shapes") -> list:
    """"BxTxKxV[xD],..." -> [(B, T, K, V, D)] (head_dim 128 by default); exits naming ``flag`` on a bad one."""
    out = []
    for s in text.split(","):
        try:
            parts = [int(v) for v in s.split("x")]
        except ValueError:
            parts = []
        if len(parts) not in (4, 5):
            sys.exit(f"{flag}: BxTxKxV[xD] with integers, got {s!r}")
        B, T, kb, vb, D = parts if len(parts) == 5 else parts + [128]
        if B < 1 or T < 1 or kb not in (2, 3, 4) or vb not in (2, 3, 4) or D not in (64, 96, 128, 256):
            sys.exit(f"{flag}: batch and context >= 1, bits 2-4, head_dim 64/96/128/256; got {s!r}")
        out.append((B, T, kb, vb, D))
    return out


def reads_fields(module, bits: int = 3) -> bool:
    """Whether a copy of the Gluon module reads codes of ``bits`` bits in the "fields" layout: 3-bit keys since its
    ``fused_constants`` took ``key_layout``, 4-bit keys and values since its fused kernel took ``VFIELDS`` (older
    copies read bit planes there)."""
    if bits == 4:
        return "VFIELDS" in inspect.signature(module._gluon_fused_kernel.fn).parameters
    return "key_layout" in inspect.signature(module.fused_constants).parameters


def decode_case(dev, B, T, kb, vb, D, key_layout="auto"):
    """(cache, its K/V, query, the store's attention config) of one shape: Llama-3-8B heads (32 query, 8 KV), random
    keys and values (``autotune.tasks.random_cache``), seed 0, keys in ``key_layout``."""
    torch.manual_seed(0)
    codec = KVCodec(head_dim=D, key_bits=kb, value_bits=vb, key_layout=key_layout)
    cache, x = random_cache(codec, 8, B, T, dev)
    q = torch.randn(B, 1, 32, D, device=dev, dtype=torch.float16)
    cfg = runtime.launch_config("attention", A.attention_buckets(D, kb, vb, 4, B, T), dev).as_dict()
    return cache, x, q, cfg


def ab_row(dev, B, T, kb, vb, D, modules: dict, fused: bool) -> dict:
    cache, x, q, cfg = decode_case(dev, B, T, kb, vb, D)
    caches = {name: cache for name in modules}
    layouts = {name: cache.codec.layout("key") for name in modules}
    for name, m in modules.items():
        if cache.codec.layout("value") == "fields" and not reads_fields(m, vb):
            sys.exit(f"the {name} module reads {vb}-bit values in bit planes only, and a cache cannot hold them so "
                     f"(KVCodec has no value layout): leave K{kb}V{vb} out of --shapes")
        if layouts[name] == "fields" and not reads_fields(m, kb):  # the same codes in bit planes
            caches[name], layouts[name] = decode_case(dev, B, T, kb, vb, D, key_layout="planes")[0], "planes"
    real = A._import_gluon
    row = dict(batch=B, context=T, head_dim=D, bits=f"K{kb}V{vb}", config=cfg, key_layout=layouts, us={},
               **sdpa_and_shipped(q, cache, x))
    outs = {}
    try:
        with store.override("attention", dict(cfg, gluon_fused=True, min_tokens=0) if fused else cfg):
            for _ in range(2):
                for name, m in modules.items():
                    A._import_gluon = lambda m=m: m
                    A._PLANS.clear()
                    c = caches[name]
                    row["us"].setdefault(name, []).append(bench_ms(lambda: decode_attention(q, c)) * 1e3)
                    A._PLANS.clear()
                    outs[name] = decode_attention(q, c).float()
    finally:
        A._import_gluon = real
        A._PLANS.clear()
    row["rel_diff"] = ((outs["new"] - outs["base"]).norm() / outs["base"].norm()).item()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.gluon_ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="a copy of nqkernels/attention/gluon.py to compare against")
    ap.add_argument("--shapes", default=SHAPES, help=f"BxTxKxV[xD],... (default {SHAPES})")
    ap.add_argument("--fused", action="store_true", help="force the fused pass on top of the store's config")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes)
    if not torch.cuda.is_available():
        sys.exit("perf.gluon_ab needs a CUDA GPU")
    if not os.path.isfile(args.base):
        sys.exit(f"--base {args.base!r}: no such file (git show REV:nqkernels/attention/gluon.py > FILE)")
    modules = {"base": load_base(args.base), "new": new_module}
    res = {"info": device_info(torch.device("cuda")), "base": args.base, "fused": args.fused, "rows": []}
    for B, T, kb, vb, D in shapes:
        row = ab_row(torch.device("cuda"), B, T, kb, vb, D, modules, args.fused)
        res["rows"].append(row)
        b, n = min(row["us"]["base"]), min(row["us"]["new"])
        keys = row["key_layout"]
        layouts = "" if keys["base"] == keys["new"] else f"  (keys: base {keys['base']}, new {keys['new']})"
        log(f"K{kb}V{vb} B={B} T={T} D={D}: SDPA {row['sdpa_fp16']:.1f}  base {b:.1f}  new {n:.1f} us "
            f"({b / n:.3f}x; x{row['sdpa_fp16'] / n:.2f} SDPA)  rel. diff {row['rel_diff']:.1e}{layouts}")
        with open(os.path.join(args.out, "gluon_ab.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
