"""Search launch configs for this GPU and write its config store: ``python -m autotune.tune``.

    python -m autotune.tune [--kernels attention,encode,...] [--quick] [--buckets REGEX] [--budget-min 20] [--fresh]

For every kernel and shape bucket (``autotune.tasks``) the search times the launcher's default first, then a few
stages, each a grid over some launch parameters on top of the best config so far (compile-time parameters such as
warps and pipeline stages first, then grid-size parameters such as programs per SM and pages per split). Before a
candidate is timed it must reproduce the reference on a small problem with the same config: codes and COLD bytes
bit for bit, attention and scores within fp32-accumulation error. A candidate that fails to compile, to launch or
to match loses. A winner must beat the default by 2% (timing noise is about 1%) in the geometric mean of the
bucket's problems, be no more than 3% slower on any of them, and confirm both in a second timing; otherwise the
bucket keeps the default. Timings are ``bench_ms``: do_bench medians of CUDA-graph replays (L2 cleared before
every call).

Results are written after every bucket: the search record (default and tuned times of every bucket searched so
far) into ``tune_<gpu>.json`` and ``.md`` in the working directory (``--record``; the published records are
perf/results/tune_<gpu>.*), and its winners into the library's store, ``nqkernels/configs/<gpu>.json`` (``--store``;
with a ``_meta`` entry naming the device and versions). A run stops when ``--budget-min`` is spent,
between buckets; the next run skips the buckets the record already holds (``--fresh`` searches them again).
``--refine pages_per_step`` searches only that parameter on top of each recorded winner (a parameter added after
the buckets were searched), and records that it did.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from nqkernels import store
from .tasks import KERNELS, Task, make_tasks

NOISE = 1.02  # a candidate must be this much faster than the best so far to replace it
GUARD = 1.03  # ... and no slower than the default by more than this on any of the bucket's problems


def graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """One call of ``fn`` captured in a CUDA graph (after a first call outside the capture compiles and fills the
    launcher's caches): returns the graph's replay. ``fn`` must never synchronize."""
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def bench_ms(fn: Callable[[], object], graph: bool = True) -> float:
    """Median GPU time (ms) of one call of ``fn`` (triton.testing.do_bench, L2 cleared before every call). With
    ``graph`` the call is captured once in a CUDA graph and the replays are timed, so the launcher's Python time is
    not counted (a decode step of a served model is one graph replay); ``fn`` must then never synchronize."""
    from triton.testing import do_bench

    return do_bench(graph_replay(fn) if graph else fn, warmup=5, rep=25, return_mode="median")


def _geomean(xs) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def search(task: Task, device: torch.device, timer: Optional[Callable[[Callable], float]] = None,
           log: Callable[[str], None] = print, start: Optional[dict] = None,
           stages: Optional[list] = None) -> dict:
    """Time the default and each stage's grid (``stages``, default the task's), starting from ``start`` (default: the
    default config); returns the record of the bucket (winner, times, failures).

    A config's score is the geometric mean over the bucket's problems of its time / the default's time (short and
    long problems weigh the same); it may win only if it is also no slower than the default by more than ``GUARD``
    on any problem (so a win at one end of the bucket never costs the other end). The winner is timed again beside
    a fresh timing of the default and must still pass both tests, or the bucket keeps the default."""
    runs, check = task.setup(device)
    timer = timer or (lambda fn: bench_ms(fn, task.graph))
    failed = []

    def measure(cfg: dict) -> Optional[list]:
        with store.override(task.kernel, cfg):
            try:
                err = check()
                if not err <= task.tol:
                    failed.append(dict(config=cfg, why=f"error {err:.3g} > {task.tol:g}"))
                    return None
                return [timer(run) for run in runs]
            except Exception as e:  # noqa: BLE001 - a config that does not compile or launch just loses
                failed.append(dict(config=cfg, why=f"{type(e).__name__}: {str(e)[:120]}"))
                return None

    def score(times, ref) -> float:
        return _geomean([t / r for t, r in zip(times, ref)])

    def guarded(times, ref) -> bool:
        return all(t <= r * GUARD for t, r in zip(times, ref))

    t_default = measure({})
    if t_default is None:
        raise RuntimeError(f"{task.kernel} {task.bucket}: the default config fails its check: {failed[-1]['why']}")
    best, t_best, s_best, tried = {}, t_default, 1.0, 1
    if start:
        t = measure(start)
        tried += 1
        if t is not None:
            best, t_best, s_best = dict(start), t, score(t, t_default)
    for stage in stages or task.stages:
        base = dict(best)
        for values in itertools.product(*stage.values()):
            cfg = {**base, **dict(zip(stage, values))}
            t = measure(cfg)
            tried += 1
            if t is not None and score(t, t_default) * NOISE < s_best and guarded(t, t_default):
                best, t_best, s_best = cfg, t, score(t, t_default)
    if best:  # confirm: a win by timing noise is undone
        t_default, t_best = measure({}), measure(best)
        if score(t_best, t_default) * NOISE >= 1.0 or not guarded(t_best, t_default):
            log(f"    {task.kernel} {task.bucket}: {best} did not confirm ({1 / score(t_best, t_default):.3f}x)")
            best, t_best = {}, t_default
    for cfg in failed:
        log(f"    {task.kernel} {task.bucket}: {cfg['config']} lost: {cfg['why']}")
    return dict(config=best, default_us=[t * 1e3 for t in t_default], tuned_us=[t * 1e3 for t in t_best],
                speedup=1.0 / score(t_best, t_default), tried=tried, failed=len(failed), shape=task.shape)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def write_store(path: Path, record: dict, meta: dict) -> list[str]:
    """Write the record's winners into the store file (an empty winner: the default, stored as such). The file's
    entries for buckets the record does not hold (set by hand, or by a record kept elsewhere: perf/results/
    tune_<gpu>.md lists the hand-set ones) are kept, not dropped; returns their names ("kernel/bucket")."""
    old = json.loads(path.read_text()) if path.exists() else {}
    data, kept = {}, []
    for kernel, entries in old.items():
        if kernel == "_meta" or not isinstance(entries, dict):
            continue
        held = record["buckets"].get(kernel, {})
        data[kernel] = {b: c for b, c in entries.items() if b not in held}
        kept += [f"{kernel}/{b}" for b in data[kernel]]
    for kernel, buckets in record["buckets"].items():
        data.setdefault(kernel, {}).update({bucket: r["config"] for bucket, r in buckets.items()})
    _write_json(path, {"_meta": meta, **data})
    return sorted(kept)


def _us(times) -> str:
    return " / ".join(f"{t:.1f}" for t in times)


def report_markdown(record: dict) -> str:
    meta = record["meta"]
    lines = [f"# Autotuning on {meta['device']}", "",
             f"`python -m autotune.tune` ({meta['date']}; torch {meta['torch']}, triton {meta['triton']}). Times are "
             f"GPU times (do_bench medians of CUDA-graph replays, L2 cleared) of each bucket's problems, the default "
             f"and the winner timed again side by side after the search; the speed-up is their geometric mean. A "
             f"winner had to reproduce the reference first, beat the default by 2% in that mean and be at most 3% "
             f"slower on every problem, twice. Store: "
             f"`nqkernels/configs/{meta['gpu_key']}.json`.", ""]
    for kernel, buckets in record["buckets"].items():
        speedups = [r["speedup"] for r in buckets.values()]
        geo = float(torch.tensor(speedups).log().mean().exp())
        lines += [f"## {kernel}: {len(buckets)} buckets, geometric-mean speed-up {geo:.2f}x "
                  f"(best {max(speedups):.2f}x)", "",
                  "| bucket | shape | default (us) | tuned (us) | speed-up | config |", "|---|---|---|---|---|---|"]
        for bucket, r in buckets.items():
            cfg = json.dumps(r["config"]) if r["config"] else "default"
            if r.get("default_config"):  # the launcher's default when this bucket was searched, if it has changed
                cfg += f" (default then: {json.dumps(r['default_config'])})"
            if r.get("refined"):
                cfg += f" (refined: {', '.join(r['refined'])})"
            lines.append(f"| {bucket} | {r['shape']} | {_us(r['default_us'])} | {_us(r['tuned_us'])} | "
                         f"{r['speedup']:.2f}x | {cfg} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    ap.add_argument("--quick", action="store_true", help="head_dim 128 and the common bit widths only")
    ap.add_argument("--budget-min", type=float, default=20.0, help="stop between buckets after this many minutes")
    ap.add_argument("--buckets", help="only the buckets matching this regular expression (e.g. 'd128_k3v2_.*_b16')")
    ap.add_argument("--fresh", action="store_true",
                    help="search the selected buckets again, even those the record holds")
    ap.add_argument("--refine", metavar="PARAMS",
                    help="comma-separated launch parameters (e.g. pages_per_step): search only their values, on top "
                         "of each selected bucket's recorded winner (buckets the record holds; with --fresh also "
                         "those already refined by them)")
    ap.add_argument("--store", type=Path, help="config file to write (default nqkernels/configs/<gpu>.json)")
    ap.add_argument("--record", type=Path, help="search record (default ./tune_<gpu>.json)")
    args = ap.parse_args(argv)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = sorted(set(kernels) - set(KERNELS))
    if unknown:
        ap.error(f"--kernels: unknown {unknown}; allowed: {', '.join(KERNELS)}")
    try:
        pattern = re.compile(args.buckets or "")
    except re.error as e:
        ap.error(f"--buckets: not a regular expression ({e})")
    if not torch.cuda.is_available():
        print("autotune.tune needs a CUDA GPU (configs are per GPU; CPU runs use the defaults).", file=sys.stderr)
        return 2
    import triton

    warnings.filterwarnings("ignore", message="nqkernels: no tuned")  # every bucket is untuned until searched
    device = torch.device("cuda")
    key = store.gpu_key(device)
    store_path = args.store or store.config_path(key)
    record_path = args.record or Path(f"tune_{key}.json")
    meta = dict(device=torch.cuda.get_device_name(), gpu_key=key, torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), date=time.strftime("%Y-%m-%d"))
    record = json.loads(record_path.read_text()) if record_path.exists() else {"buckets": {}}
    record["meta"] = meta
    tasks = [t for t in make_tasks(kernels, quick=args.quick) if pattern.search(t.bucket)]
    refine = sorted(p.strip() for p in (args.refine or "").split(",") if p.strip())
    if refine:
        held = record["buckets"]
        tasks = [t for t in tasks if t.bucket in held.get(t.kernel, {})]
        for t in tasks:
            unknown = [p for p in refine if not any(p in stage for stage in t.stages)]
            if unknown:
                ap.error(f"--refine: {unknown} not searched for {t.kernel}; allowed: "
                         f"{sorted({p for stage in t.stages for p in stage})}")
        todo = [t for t in tasks if args.fresh or held[t.kernel][t.bucket].get("refined") != refine]
    else:
        todo = [t for t in tasks if args.fresh or t.bucket not in record["buckets"].get(t.kernel, {})]
    print(f"{meta['device']}: {len(tasks)} buckets selected, {len(tasks) - len(todo)} already in {record_path}, "
          f"budget {args.budget_min:g} min", flush=True)
    t0 = time.time()
    for i, task in enumerate(todo):
        spent = (time.time() - t0) / 60
        if spent > args.budget_min:
            print(f"budget spent ({spent:.1f} min): {i} of {len(todo)} buckets tuned this run; run again to resume",
                  flush=True)
            break
        t1 = time.time()
        if refine:
            start = record["buckets"][task.kernel][task.bucket]["config"]
            stages = [{p: values for p, values in stage.items() if p in refine} for stage in task.stages]
            r = search(task, device, log=lambda s: print(s, flush=True), start=start, stages=[s for s in stages if s])
            r["refined"] = refine
        else:
            r = search(task, device, log=lambda s: print(s, flush=True))
        r["seconds"] = round(time.time() - t1, 1)
        record["buckets"].setdefault(task.kernel, {})[task.bucket] = r
        torch.cuda.empty_cache()
        _write_json(record_path, record)
        record_path.with_suffix(".md").write_text(report_markdown(record))
        kept = write_store(store_path, record, meta)
        if kept and i == 0:
            print(f"{store_path}: kept {len(kept)} entries the record does not hold (set by hand or by another "
                  f"record; a search of their bucket replaces them): {', '.join(kept[:8])}"
                  + (" ..." if len(kept) > 8 else ""), flush=True)
        print(f"[{i + 1}/{len(todo)}] {task.kernel} {task.bucket}: {_us(r['default_us'])} -> {_us(r['tuned_us'])} us "
              f"({r['speedup']:.2f}x) {r['config'] or 'default'} [{r['seconds']:.0f}s, {r['failed']} lost]",
              flush=True)
    store.reload()
    print(f"store: {store_path}\nrecord: {record_path} (+ .md)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
