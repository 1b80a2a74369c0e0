"""Latency and throughput tables to pick configurations from: ``python -m perf.sweep``.

    python -m perf.sweep [--quick] [--only encode,scoring,attention,cold] [--out DIR] [--json] [--csv]
    python -m perf.sweep --from DIR/sweep.json [--out DIR]      # tables and plots again from a saved run

On a GPU, in one run and beside the device-to-device copy ceiling:
  encode     encode_kv GB/s (fp16 read + codes written) for K3V2 keys and values, batch x context; the prior art's
             compression step (nexusquant-kv quant_only, 32 layers) beside ours;
  scoring    score_tokens over a Llama-3-8B-shaped prompt (32 layers) beside kvpress-style torch SnapKV scoring;
  attention  decode_attention latency over context x batch x bits (Llama-3-8B layer: 32 q / 8 KV heads, head_dim
             128; and at 4K x 1, 32K x 1, 32K x 8, 128K x 1 head_dim 64 (32 q / 8 KV) and 256 (16 q / 8 KV))
             beside SDPA over fp16 K/V and FlashInfer's fp16 and FP8 decode where it imports;
  cold       filter/unfilter kernel GB/s, zstd GB/s on the CPU, and delta + zstd end to end beside the prior art's.
Every timing is a triton.testing.do_bench median (L2 cleared before each call). Our kernels are timed with the
tuned configs of this GPU and again with the launchers' defaults (``nqkernels.store.untuned``): the ``tuned``
column is the speed-up the config store gives. Writes ``sweep.md`` (tables), ``sweep.json``, one CSV per table
(``--csv``) and PNG plots (latency vs context per batch, speed-up vs SDPA, encode and scoring) when matplotlib
imports. Without a GPU it runs a reduced sweep through the Triton interpreter: every kernel runs and is checked
against its reference, and it says that the timings mean nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

SECTIONS = ("encode", "scoring", "attention", "cold")

# Columns of each table: (key, header, format).
COLUMNS = {
    "encode": [("kind", "kind", "{}"), ("bits", "bits", "{}"), ("batch", "batch", "{}"), ("tokens", "tokens", "{}"),
               ("us", "time (us)", "{:.1f}"), ("GBps", "GB/s", "{:.0f}"), ("pct_copy", "% of copy", "{:.1f}"),
               ("tuned", "tuned vs default", "{:.2f}x")],
    "encode_prior_art": [("tokens", "tokens", "{}"), ("layers", "layers", "{}"), ("ours_ms", "ours (ms)", "{:.2f}"),
                         ("nexusquant_ms", "nexusquant-kv (ms)", "{:.2f}"), ("speedup", "speed-up", "{:.1f}x")],
    "scoring": [("tokens", "tokens", "{}"), ("score_ms", "score_tokens x32 (ms)", "{:.2f}"),
                ("score_tflops", "TFLOP/s", "{:.0f}"), ("gpu_kernels_ms", "GPU time with select (ms)", "{:.2f}"),
                ("snapkv_torch_ms", "torch SnapKV x32 (ms)", "{:.2f}"), ("speedup", "speed-up", "{:.1f}x")],
    "attention": [("head_dim", "head_dim", "{}"), ("batch", "batch", "{}"), ("context", "context", "{}"),
                  ("method", "method", "{}"),
                  ("us", "latency (us)", "{:.1f}"), ("GBps", "GB/s read", "{:.0f}"),
                  ("pct_copy", "% of copy", "{:.0f}"),
                  ("speedup_vs_sdpa", "vs SDPA fp16", "{:.2f}x"), ("tuned", "tuned vs default", "{:.2f}x")],
    "cold_kernels": [("bits", "bits", "{}"), ("mode", "mode", "{}"), ("filter_GBps", "filter GB/s", "{:.0f}"),
                     ("filter_pct_copy", "% of copy", "{:.0f}"), ("unfilter_GBps", "unfilter GB/s", "{:.0f}"),
                     ("unfilter_pct_copy", "% of copy", "{:.0f}"),
                     ("filter_tuned", "filter tuned vs default", "{:.2f}x"),
                     ("unfilter_tuned", "unfilter tuned vs default", "{:.2f}x")],
    "zstd": [("level", "level", "{}"), ("threads", "threads", "{}"), ("compress_GBps", "compress GB/s", "{:.2f}"),
             ("decompress_GBps", "decompress GB/s", "{:.2f}")],
    "cold_prior_art": [("method", "method", "{}"), ("bits", "bits", "{}"), ("streams", "streams", "{}"),
                       ("tokens", "tokens", "{}"), ("save_Mtok_s", "save (M token-streams/s)", "{:.2f}"),
                       ("load_Mtok_s", "load (M token-streams/s)", "{:.2f}")],
    "cpu": [("op", "op", "{}"), ("head_dim", "head_dim", "{}"), ("setting", "setting", "{}"),
            ("check", "check vs reference", "{}"), ("error", "error", "{:.2e}"),
            ("interpreter_s", "interpreter (s)", "{:.2f}")],
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def _timed_both(measure):
    """(tuned result, default-config result) of ``measure()``."""
    from nqkernels.store import untuned

    tuned = measure()
    with untuned():
        return tuned, measure()


# ---------------------------------------------------------------------------------------------------------------
# GPU sections: each returns {table name: rows}.

def encode_section(dev, copy_gbps, quick):
    from nqkernels import KVCodec, RopeSpec
    from perf import bench_encode

    codec = KVCodec(head_dim=128, key_bits=3, value_bits=2, rope=RopeSpec(theta=500000.0))
    rows = []
    for kind in ("key", "value"):
        for B in (1, 4, 16):
            for T in (4096, 32768) if quick else (1024, 4096, 16384, 32768, 131072):
                if B * T > (1 << 21):
                    continue
                (ms, gbps), (ms_d, _) = _timed_both(lambda: bench_encode.bench_encode(dev, codec, kind, B, T))
                rows.append(dict(kind=kind, bits=codec.bits_for(kind), batch=B, tokens=T, us=ms * 1e3, GBps=gbps,
                                 pct_copy=100 * gbps / copy_gbps, tuned=ms_d / ms))
                log(f"encode {kind} B={B} T={T}: {gbps:.0f} GB/s ({rows[-1]['pct_copy']:.1f}% of copy), "
                    f"tuned {rows[-1]['tuned']:.2f}x")
    prior = [bench_encode.prior_art(dev, T) for T in ((8192,) if quick else (1664, 8192))]
    log("encode prior art:", prior)
    return {"encode": rows, "encode_prior_art": prior}


def scoring_section(dev, quick):
    from perf import bench_scoring

    rows = []
    for T in (8192, 32768) if quick else (8192, 32768, 131072):
        r = bench_scoring.time_scoring(dev, T)
        r["speedup"] = r["snapkv_torch_ms"] / r["score_ms"] if r["snapkv_torch_ms"] else None
        rows.append(r)
        log(f"scoring T={T}: {r['score_ms']:.2f} ms x32 layers (torch SnapKV {r['snapkv_torch_ms']})")
    return {"scoring": rows}


def attention_shapes(quick):
    """(query heads, head_dim, batch, context) of the attention section: a Llama-3-8B layer (32 / 8 heads, head_dim
    128) over batch x context; in the full sweep also head_dim 64 (32 / 8) and 256 (16 / 8, Gemma-2-like) at the
    shapes the targets name (docs/attention.md, "What limits it")."""
    if quick:
        return [(32, 128, B, T) for B in (1, 8) for T in (4096, 32768)]
    shapes = [(32, 128, B, T) for B in (1, 8, 32, 64) for T in (1024, 4096, 16384, 32768, 131072)
              if B * T <= (1 << 21)]
    return shapes + [(hq, d, B, T) for hq, d in ((32, 64), (16, 256))
                     for B, T in ((1, 4096), (1, 32768), (8, 32768), (1, 131072))]


def attention_section(dev, copy_gbps, quick, save=None):
    """``save(table)``, if given, is called after each shape with the rows so far (a cut-off run keeps them)."""
    from perf import bench_attention

    bench_attention.FLASHINFER = bench_attention._import_flashinfer()
    rows = []
    for Hq, D, B, T in attention_shapes(quick):
        shape_rows = bench_attention.bench_decode(dev, Hq, 8, D, B, T, copy_gbps, quick, compare_untuned=True)
        rows += shape_rows
        if save is not None:
            save({"attention": rows})
        log(f"attention D={D} B={B} T={T}: " + "  ".join(f"{r['method']} {r['us']:.1f}us x{r['speedup_vs_sdpa']:.2f}"
                                                   for r in shape_rows))
    return {"attention": rows}


def cold_section(dev, copy_gbps, quick):
    from perf import bench_cold

    tuned, default = _timed_both(lambda: bench_cold.kernel_throughput(dev, copy_gbps, quick))
    for r, d in zip(tuned, default):
        r["filter_tuned"] = d["filter_us"] / r["filter_us"]
        r["unfilter_tuned"] = d["unfilter_us"] / r["unfilter_us"]
    threads = min(16, os.cpu_count() or 1)
    return {"cold_kernels": tuned, "zstd": bench_cold.zstd_throughput(dev, threads),
            "cold_prior_art": bench_cold.prior_art(dev, threads)}


def gpu_sweep(sections, quick, out: Path) -> dict:
    import torch
    import triton

    from nqkernels.store import gpu_key
    from perf.bench_attention import copy_bandwidth

    dev = torch.device("cuda")
    info = dict(device=torch.cuda.get_device_name(), gpu_key=gpu_key(dev), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
                quick=quick)
    log(json.dumps(info))
    res = dict(info=info, copy_GBps=copy_bandwidth(dev), tables={})
    log(f"copy: {res['copy_GBps']:.0f} GB/s")
    for name in sections:
        t0 = time.time()
        if name == "encode":
            res["tables"].update(encode_section(dev, res["copy_GBps"], quick))
        elif name == "scoring":
            res["tables"].update(scoring_section(dev, quick))
        elif name == "attention":
            def save(table):
                res["tables"].update(table)
                (out / "sweep.json").write_text(json.dumps(res, indent=1) + "\n")
            res["tables"].update(attention_section(dev, res["copy_GBps"], quick, save))
        else:
            res["tables"].update(cold_section(dev, res["copy_GBps"], quick))
        log(f"{name}: {time.time() - t0:.0f} s")
        torch.cuda.empty_cache()
        (out / "sweep.json").write_text(json.dumps(res, indent=1) + "\n")  # what is done survives a cut-off run
    return res


# ---------------------------------------------------------------------------------------------------------------
# CPU: a reduced sweep through the interpreter (correctness only).

def cpu_sweep(sections, quick) -> dict:
    os.environ["TRITON_INTERPRET"] = "1"
    import torch

    from autotune.tasks import attention_setup, codec_setup, cold_setup, scoring_setup

    log("No GPU: reduced sweep through the Triton interpreter. Every kernel runs and is checked against its "
        "reference; the timings say nothing about GPU speed.")
    dev = torch.device("cpu")
    cases = []
    for d in (64,) if quick else (64, 128):
        if "encode" in sections:
            cases += [("encode", d, "K3", codec_setup(d, 3, [(1, 33)], False), 2e-3),
                      ("decode", d, "K3", codec_setup(d, 3, [(1, 33)], True), 2e-3)]
        if "scoring" in sections:
            cases.append(("scoring", d, "GQA 4", scoring_setup(d, 4, [100]), 1e-3))
        if "attention" in sections:
            cases.append(("attention", d, "K3V2 GQA 4", attention_setup(d, 3, 2, 4, [(2, 200)]), 1e-2))
        if "cold" in sections:
            cases += [("filter", d, "K2", cold_setup(d, 2, [64], False), 0.0),
                      ("unfilter", d, "K2", cold_setup(d, 2, [64], True), 0.0)]
    rows = []
    for op, d, setting, setup, tol in cases:
        t0 = time.perf_counter()
        runs, check = setup(dev)
        for run in runs:
            run()
        err = check()
        rows.append(dict(op=op, head_dim=d, setting=setting, check="pass" if err <= tol else "FAIL", error=err,
                         interpreter_s=time.perf_counter() - t0))
        log(f"{op} d{d} {setting}: error {err:.2e} ({rows[-1]['check']})")
    info = dict(device="cpu (Triton interpreter: timings are not GPU speed)", torch=torch.__version__,
                python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    return dict(info=info, tables={"cpu": rows})


# ---------------------------------------------------------------------------------------------------------------
# Output: markdown, CSV, plots.

def _cell(value, fmt):
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown(res: dict) -> str:
    info = res["info"]
    lines = [f"# perf.sweep on {info['device']}", "",
             ", ".join(f"{k} {v}" for k, v in info.items() if k != "device"), ""]
    if "copy_GBps" in res:
        lines += [f"Copy ceiling (device-to-device, bytes read + written): {res['copy_GBps']:.0f} GB/s.", ""]
    for name, rows in res["tables"].items():
        cols = [c for c in COLUMNS[name] if any(c[0] in r for r in rows)]
        if not cols:  # a peer that did not run: say why
            lines += [f"## {name}", ""] + [f"- {r}" for r in rows] + [""]
            continue
        lines += [f"## {name}", "", "| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def write_csv(res: dict, out: Path) -> list[Path]:
    paths = []
    for name, rows in res["tables"].items():
        keys = list(dict.fromkeys(k for r in rows for k in r))
        path = out / f"sweep_{name}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows([{k: r.get(k) for k in keys} for r in rows])
        paths.append(path)
    return paths


def plot(res: dict, out: Path) -> list[Path]:
    """PNG plots of a GPU sweep (nothing without matplotlib or GPU tables)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    tables, dev, paths = res["tables"], res["info"]["device"], []
    if tables.get("attention"):  # the plots: the head_dim 128 grid (rows of runs before other head dims have none)
        rows = [r for r in tables["attention"] if r.get("head_dim", 128) == 128]
        batches = sorted({r["batch"] for r in rows})
        methods = list(dict.fromkeys(r["method"] for r in rows))
        fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
        for ax, B in zip(axes[0], batches):
            for m in methods:
                pts = sorted((r["context"], r["us"]) for r in rows if r["batch"] == B and r["method"] == m)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m, linestyle="--" if "fp16" in m else "-")
            ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="latency (us)", title=f"batch {B}")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"decode attention, Llama-3-8B layer (32q/8kv, d128), {dev}")
        paths.append(_save(fig, out / "sweep_attention_latency.png"))
        # Each compressed setting's byte limit: SDPA's fp16 bytes / the bytes it reads, the speed-up a kernel running
        # at SDPA's bandwidth would reach (dashed, in the setting's colour).
        fp16_bytes = {(r["batch"], r["context"]): r["bytes"] for r in rows
                      if r["method"] == "sdpa_fp16" and r.get("bytes")}
        fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
        for ax, B in zip(axes[0], batches):
            for m in methods:
                pts = sorted((r["context"], r["speedup_vs_sdpa"]) for r in rows if r["batch"] == B and r["method"] == m)
                if pts and m != "sdpa_fp16":
                    line, = ax.plot(*zip(*pts), marker="o", label=m)
                    limit = sorted((r["context"], fp16_bytes[B, r["context"]] / r["bytes"]) for r in rows
                                   if r["batch"] == B and r["method"] == m and r.get("bytes")
                                   and (B, r["context"]) in fp16_bytes and not m.endswith("fp16"))
                    if limit:
                        ax.plot(*zip(*limit), linestyle="--", linewidth=0.9, color=line.get_color(),
                                label=f"{m} byte limit")
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="speed-up vs SDPA fp16",
                   title=f"batch {B}")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"decode attention speed-up vs SDPA over fp16 K/V, {dev}")
        paths.append(_save(fig, out / "sweep_attention_speedup.png"))
    if tables.get("encode"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in ("key", "value"):
            for B in sorted({r["batch"] for r in tables["encode"]}):
                pts = sorted((r["tokens"], r["GBps"]) for r in tables["encode"]
                             if r["kind"] == kind and r["batch"] == B)
                ax.plot(*zip(*pts), marker="o", label=f"{kind} batch {B}")
        ax.axhline(res["copy_GBps"], color="gray", linestyle="--", label="copy ceiling")
        ax.set(xscale="log", xlabel="tokens per sequence", ylabel="GB/s",
               title=f"encode_kv K3V2 (8 KV heads, d128), {dev}")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "sweep_encode.png"))
    if tables.get("scoring"):
        fig, ax = plt.subplots(figsize=(6, 4))
        rows = tables["scoring"]
        ax.plot([r["tokens"] for r in rows], [r["score_ms"] for r in rows], marker="o", label="score_tokens")
        snap = [(r["tokens"], r["snapkv_torch_ms"]) for r in rows if r["snapkv_torch_ms"]]
        if snap:
            ax.plot(*zip(*snap), marker="o", label="torch SnapKV (kvpress-style)")
        ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms (32 layers)",
               title=f"token scoring, {dev}")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "sweep_scoring.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a few minutes on a GPU)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "sweep_results")),
                    help="folder for the outputs (default: $OUT, else ./sweep_results)")
    ap.add_argument("--json", action="store_true", help="also print the JSON to stdout")
    ap.add_argument("--csv", action="store_true", help="also write one CSV per table")
    ap.add_argument("--from", dest="from_json", type=Path, help="re-render tables, CSV and plots of a saved run")
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        ap.error(f"--only: unknown {bad}; allowed: {', '.join(SECTIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
    else:
        import torch

        if torch.cuda.is_available():
            res = gpu_sweep(sections, args.quick, args.out)
        else:
            res = cpu_sweep(sections, args.quick)
        (args.out / "sweep.json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    (args.out / "sweep.md").write_text(text + "\n")
    print(json.dumps(res, indent=1) if args.json else text)
    written = [args.out / "sweep.md", args.out / "sweep.json"]
    if args.csv:
        written += write_csv(res, args.out)
    if "copy_GBps" in res:
        written += plot(res, args.out)
    log("wrote " + ", ".join(str(p) for p in written))
    return 1 if any(r.get("check") == "FAIL" for r in res["tables"].get("cpu", [])) else 0


if __name__ == "__main__":
    sys.exit(main())
