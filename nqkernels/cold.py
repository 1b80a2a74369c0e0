"""COLD: a compressed cache saved to a file (or any binary stream) and brought back without a new prefill.

Each (layer, sequence) of a list of ``PagedKVCache`` (one per layer) becomes three zstd frames: the K and the V
codes+scales of its H heads, filtered per head by ``delta.filter_codes`` (RAW, SHUFFLE or DELTA, chosen per head
by trial compression of a sample, or fixed), and its uncompressed tokens and centering means. Frames are
compressed by a thread pool and written in order as they finish, so host memory holds a few frames, never the
whole cache; loading reads, checks and decompresses frame by frame. The layout is in docs/format.md.

Failures raise ``ColdFormatError`` (a ``ValueError``) naming the problem: not a COLD file, unknown version,
truncated file, a checksum mismatch (header, index or a frame), or a cache of another codec or model shape than
the caller expects. ``load_cache`` builds new caches and returns them only when every frame has been read, so
nothing is half-loaded. ``save_cache`` to a path writes a temporary file and renames it.
"""
from __future__ import annotations

import json
import os
import struct
import sys
import threading
import zlib
from dataclasses import replace
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Optional, Sequence, Union

import torch
import zstandard

from .config import KVCodec, is_int
from .delta import DEFAULT_CHUNK, DELTA, MODES, RAW, SHUFFLE, filter_codes, record_bytes, unfilter_codes
from .paged import PagedKVCache, SlotState
from .reference import relayout

MAGIC, END_MAGIC, VERSION = b"NQKVCOLD", b"NQKVEND1", 2
_PREFIX = struct.Struct("<8sHHII")  # magic, version, reserved, header length, header crc32
_FOOTER = struct.Struct("<QI8s")    # index length, index crc32, end magic
MODE_NAMES = {"raw": RAW, "shuffle": SHUFFLE, "delta": DELTA}
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class ColdFormatError(ValueError):
    """A COLD file that cannot be loaded as asked; the message names the problem."""


_LOCAL = threading.local()  # one zstd context per thread and level: creating one costs more than a small frame


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _LOCAL.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_LOCAL, "decompressor"):
        _LOCAL.decompressor = zstandard.ZstdDecompressor()
    return _LOCAL.decompressor


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of t; from the GPU into pinned memory (torch caches the blocks), so it runs at PCIe speed. The
    copy is asynchronous: synchronize before reading it."""
    if t.device.type != "cuda":
        return t.contiguous()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _threads(threads: Optional[int]) -> int:
    if threads is not None and (not is_int(threads) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None (the CPU count, at most 16), got {threads!r}")
    return threads or min(16, os.cpu_count() or 1)


def _check_file(file, stream: str, methods: tuple) -> None:
    if not isinstance(file, (str, os.PathLike)) and not all(hasattr(file, m) for m in methods):
        hint = " (wrap bytes in io.BytesIO)" if isinstance(file, (bytes, bytearray)) else ""
        raise TypeError(f"file must be a path or a {stream} binary stream, got {type(file).__name__}{hint}")


def _report(progress: bool, what: str, i: int, n: int, unit: str) -> None:
    if progress:
        print(f"\r{what}: {unit} {i}/{n}", end="\n" if i == n else "", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# save

def _choose_modes(codes, scales, head_dim, bits, chunk, level, sample, pool) -> torch.Tensor:
    """Per head, the mode whose filtered sample (the first ``sample`` tokens) zstd compresses smallest."""
    H, T = codes.shape[:2]
    n = min(T, sample)
    if n == 0:
        return torch.full((H,), SHUFFLE, dtype=torch.int32, device=codes.device)
    trials = []
    for mode in MODES:
        modes = torch.full((H,), mode, dtype=torch.int32, device=codes.device)
        trials.extend(_to_host(filter_codes(codes[:, :n], scales[:, :n], modes, head_dim, bits, chunk)))
    _sync(codes.device)
    sizes = list(pool.map(lambda a: len(_compressor(level).compress(a.numpy())), trials))
    return torch.tensor(sizes).view(len(MODES), H).argmin(0).to(torch.int32).to(codes.device)


def _parse_modes(modes) -> Union[str, dict]:
    if modes == "auto":
        return modes
    if isinstance(modes, str):
        modes = {"key": modes, "value": modes}
    if not isinstance(modes, dict) or set(modes) != {"key", "value"} or \
            any(m not in MODE_NAMES and m != "auto" for m in modes.values()):
        raise ValueError(f"modes must be 'auto', one of {tuple(MODE_NAMES)}, or a dict {{'key': ..., 'value': ...}} "
                         f"of those, got {modes!r}")
    return modes


def _check_caches(caches) -> list[PagedKVCache]:
    single = isinstance(caches, PagedKVCache)
    caches = [caches] if single else list(caches)
    if not caches or not all(isinstance(c, PagedKVCache) for c in caches):
        raise TypeError("caches must be a PagedKVCache or a non-empty sequence of them (one per layer)")
    first = caches[0]
    for i, c in enumerate(caches):
        if (c.codec, c.num_kv_heads, c.max_batch, c.sink_tokens, c.recent_tokens, c.dtype) != \
                (first.codec, first.num_kv_heads, first.max_batch, first.sink_tokens, first.recent_tokens, first.dtype):
            raise ValueError(f"layer {i}'s cache differs from layer 0's in codec, heads, max_batch, sinks, window or "
                             f"dtype; one COLD file holds caches of one configuration")
    return caches


def save_cache(caches: Union[PagedKVCache, Sequence[PagedKVCache]], file: Union[str, os.PathLike, BinaryIO], *,
               level: int = 3, threads: Optional[int] = None, modes: Union[str, dict] = "auto",
               chunk: int = DEFAULT_CHUNK, sample: int = 2048, fsync: bool = True, progress: bool = False) -> dict:
    """Write compressed caches (one ``PagedKVCache`` per layer, or one) to a COLD file; lossless.

    Args:
        caches: the caches of all layers (same codec and shape); every slot that holds tokens is saved.
        file: a path (written to ``<path>.tmp-<pid>`` and renamed when complete) or a writable binary stream.
        level: zstd level (1-22; 3 is fast, 19 smaller and much slower).
        threads: compression threads (default: CPU count, at most 16).
        modes: ``"auto"`` (per head, the filter whose sample compresses smallest), ``"raw"``, ``"shuffle"``,
            ``"delta"``, or a dict ``{"key": ..., "value": ...}`` of those.
        chunk: tokens per independently filtered chunk; sample: tokens tried per head by ``"auto"``.
        fsync: with a path, flush the file to disk before the rename (durable; costs the disk's write time).
        progress: print per-layer progress to stderr.
    Returns:
        ``{"file_bytes", "hot_bytes", "frames", "modes", "part_bytes"}``: bytes written, bytes of the saved state
        as held in memory (codes, scales, uncompressed tokens, means), frame count, how many head streams took each
        mode, and the compressed bytes of the K, V and uncompressed-token ("fp") frames.

    Example:
        >>> import io, torch
        >>> from nqkernels import KVCodec, PagedKVCache, save_cache, load_cache
        >>> cache = PagedKVCache(KVCodec(head_dim=64, page_size=16), num_kv_heads=2, max_batch=1, num_pages=8,
        ...                      device="cpu")
        >>> k = torch.randn(1, 50, 2, 64, dtype=torch.float16)
        >>> cache.append(k, torch.randn_like(k))
        >>> buf = io.BytesIO()
        >>> stats = save_cache([cache], buf)
        >>> [back] = load_cache(io.BytesIO(buf.getvalue()), device="cpu")
        >>> back.seq_lens(), torch.equal(back.dense()[0], cache.dense()[0])
        ([50], True)
    """
    caches = _check_caches(caches)
    modes = _parse_modes(modes)
    if not is_int(level) or not 1 <= level <= 22:
        raise ValueError(f"level must be an int in [1, 22], got {level!r}")
    if not is_int(chunk) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    if not is_int(sample) or sample < 1:
        raise ValueError(f"sample must be an int >= 1, got {sample!r}")
    threads = _threads(threads)
    _check_file(file, "writable", ("write",))
    if isinstance(file, (str, os.PathLike)):
        path = os.fspath(file)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                stats = _save(caches, f, level, threads, modes, chunk, sample, progress)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return stats
    return _save(caches, file, level, threads, modes, chunk, sample, progress)


def _save(caches, f, level, threads, modes, chunk, sample, progress) -> dict:
    first = caches[0]
    codec = first.codec
    slots = [b for b in range(first.max_batch) if any(c.seq_lens()[b] for c in caches)]
    header = {"format": "nqkernels-cold", "version": VERSION, "codec": codec.to_dict(), "num_layers": len(caches),
              "num_kv_heads": first.num_kv_heads, "head_dim": codec.head_dim, "dtype": str(first.dtype)[6:],
              "max_batch": first.max_batch, "num_pages": first.k_codes.shape[0], "sink_tokens": first.sink_tokens, "recent_tokens": first.recent_tokens,
              "chunk": chunk, "level": level,
              "sequences": [{"slot": b, "tokens": first.seq_lens()[b]} for b in slots]}
    raw = json.dumps(header).encode()
    f.write(_PREFIX.pack(MAGIC, VERSION, 0, len(raw), zlib.crc32(raw)))
    f.write(raw)
    offset = _PREFIX.size + len(raw)
    index, hot, used = [], 0, {name: 0 for name in MODE_NAMES}
    pending: deque = deque()

    def write_ready(block: bool):
        nonlocal offset
        while pending and (block or pending[0][1].done()):
            entry, fut = pending.popleft()
            blob, crc = fut.result()
            f.write(blob)
            index.append({**entry, "offset": offset, "size": len(blob), "crc": crc})
            offset += len(blob)

    def compress(data: torch.Tensor):  # in the pool: zstd and crc32 release the GIL
        blob = _compressor(level).compress(data.numpy())
        return blob, zlib.crc32(blob)

    with ThreadPoolExecutor(_threads(threads)) as pool:
        for layer, cache in enumerate(caches):
            for b in slots:
                st = cache.export_slot(b)
                hot += sum(t.nbytes for t in st[:8])
                jobs = []
                for part, codes, scales, bits in (("k", st.k_codes, st.k_scales, codec.key_bits),
                                                  ("v", st.v_codes, st.v_scales, codec.value_bits)):
                    kind = "key" if part == "k" else "value"
                    codes = relayout(codes, bits, codec.head_dim, codec.layout(kind), "planes")  # files: bit planes
                    mode = modes if modes == "auto" else modes[kind]
                    if mode == "auto":
                        m = _choose_modes(codes, scales, codec.head_dim, bits, chunk, level, sample, pool)
                    else:
                        m = torch.full((codes.shape[0],), MODE_NAMES[mode], dtype=torch.int32, device=codes.device)
                    data = _to_host(filter_codes(codes, scales, m, codec.head_dim, bits, chunk))
                    m = m.tolist()
                    for name, value in MODE_NAMES.items():
                        used[name] += m.count(value)
                    jobs.append(({"layer": layer, "slot": b, "part": part, "raw": data.nbytes, "modes": m}, data))
                fp = _to_host(torch.cat([t.reshape(-1).view(torch.uint8) for t in (
                    st.fp_k, st.fp_v, st.k_mean, st.v_mean, st.positions, st.fp_positions) if t is not None]))
                jobs.append(({"layer": layer, "slot": b, "part": "fp", "raw": fp.nbytes,
                              "compressed": st.k_codes.shape[1], "uncompressed": st.fp_k.shape[1],
                              "sinks": st.sinks, "next_position": st.next_position}, fp))
                _sync(first.device)
                pending.extend((entry, pool.submit(compress, data)) for entry, data in jobs)
                write_ready(block=len(pending) > 6 * _threads(threads))
            write_ready(block=False)
            _report(progress, "save_cache", layer + 1, len(caches), "layer")
        write_ready(block=True)
    idx = json.dumps(index).encode()
    f.write(idx)
    f.write(_FOOTER.pack(len(idx), zlib.crc32(idx), END_MAGIC))
    parts = {p: sum(e["size"] for e in index if e["part"] == p) for p in ("k", "v", "fp")}
    return {"file_bytes": offset + len(idx) + _FOOTER.size, "hot_bytes": hot, "frames": len(index), "modes": used,
            "part_bytes": parts}


# ---------------------------------------------------------------------------------------------------------------
# load

def read_header(f: BinaryIO) -> dict:
    """The header of a COLD stream (codec, model shape, sequences), checked; the stream is left after it."""
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
        raise ColdFormatError("not an nqkernels COLD file (bad magic)")
    _, version, _, n, crc = _PREFIX.unpack(prefix)
    if version != VERSION:
        raise ColdFormatError(f"COLD format version {version} is not supported; this build reads version {VERSION}")
    raw = f.read(n)
    if len(raw) < n:
        raise ColdFormatError("COLD file is truncated (inside the header)")
    if zlib.crc32(raw) != crc:
        raise ColdFormatError("COLD header checksum mismatch: the file is corrupted")
    return json.loads(raw)


def _footer_index(f: BinaryIO, data_start: int, stop: int) -> bytes:
    """The index of a COLD stream whose footer ends at byte ``stop``, checked (end marker, length, checksum)."""
    f.seek(stop - _FOOTER.size)
    n, crc, magic = _FOOTER.unpack(f.read(_FOOTER.size))
    if magic != END_MAGIC:
        raise ColdFormatError("COLD file is truncated or was not completely written (end marker missing)")
    if n > stop - _FOOTER.size - data_start:
        raise ColdFormatError("COLD index length is out of range: the file is corrupted")
    f.seek(stop - _FOOTER.size - n)
    raw = f.read(n)
    if zlib.crc32(raw) != crc:
        raise ColdFormatError("COLD index checksum mismatch: the file is corrupted")
    return raw


def _earlier_end(f: BinaryIO, data_start: int, end: int) -> Optional[int]:
    """Where the cache ends when its last bytes are no end marker: the end of the last complete footer (end marker,
    index length and checksum right) before ``end``, searched backwards; None if there is none (truncated)."""
    block, hi = 1 << 20, end
    while hi - data_start >= _FOOTER.size:
        lo = max(data_start, hi - block)
        f.seek(lo)
        buf = f.read(hi - lo)
        at = buf.rfind(END_MAGIC)
        while at >= 0:
            stop = lo + at + len(END_MAGIC)
            if stop - data_start >= _FOOTER.size:
                try:
                    _footer_index(f, data_start, stop)
                    return stop
                except ColdFormatError:
                    pass  # these bytes only look like an end marker
            at = buf.rfind(END_MAGIC, 0, at + len(END_MAGIC) - 1)
        hi = lo + len(END_MAGIC) - 1  # the next block overlaps by a marker less a byte: none is missed
    return None


def _read_index(f: BinaryIO, data_start: int) -> list:
    end = f.seek(0, os.SEEK_END)
    if end - data_start < _FOOTER.size:
        raise ColdFormatError("COLD file is truncated (no footer)")
    f.seek(end - _FOOTER.size)
    if f.read(_FOOTER.size)[-len(END_MAGIC):] != END_MAGIC:
        stop = _earlier_end(f, data_start, end)
        if stop is not None:
            raise ColdFormatError(f"COLD file has {end - stop} trailing bytes after the end of the cache (byte "
                                  f"{stop}): something was appended to it; truncate it to {stop} bytes")
    raw = _footer_index(f, data_start, end)
    index = json.loads(raw)
    limit = end - _FOOTER.size - len(raw)
    for e in index:
        if e["offset"] < data_start or e["offset"] + e["size"] > limit:
            raise ColdFormatError(f"frame (layer {e['layer']}, slot {e['slot']}, {e['part']}) lies outside the data")
    return index


def _check_expected(header: dict, codec, num_layers, num_kv_heads) -> None:
    saved = KVCodec.from_dict(header["codec"])
    if codec is not None and replace(codec, key_layout="auto") != replace(saved, key_layout="auto"):  # (files hold
        # bit planes whatever the cache's key layout: it may differ)
        raise ColdFormatError(f"the file holds a cache of another codec: saved {saved}, expected {codec}")
    for name, want in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
        if want is not None and header[name] != want:
            raise ColdFormatError(f"the file holds a cache of another model shape: {name} is {header[name]}, "
                                  f"expected {want}")


def load_cache(file: Union[str, os.PathLike, BinaryIO], device: Union[str, torch.device] = "cuda", *,
               num_pages: Optional[int] = None, codec: Optional[KVCodec] = None, num_layers: Optional[int] = None,
               num_kv_heads: Optional[int] = None, threads: Optional[int] = None,
               progress: bool = False) -> list[PagedKVCache]:
    """Load a COLD file written by ``save_cache`` into new ``PagedKVCache`` objects (one per layer) on ``device``.

    Args:
        file: a path or a readable, seekable binary stream.
        num_pages: pages of each new cache (default: as many as the saved caches had).
        codec, num_layers, num_kv_heads: if given, the file must match them (``ColdFormatError`` otherwise); the
            caches take ``codec``'s ``key_layout`` (files hold bit planes, so either loads).
        threads: decompression threads (default: CPU count, at most 16).
        progress: print per-layer progress to stderr.
    Returns:
        The caches, sequences in their saved slots, bit-identical to the saved ones.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a string such as 'cuda' or 'cpu', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device is {device} (default cuda) but CUDA is not available: pass device='cpu'")
    if num_pages is not None and (not is_int(num_pages) or num_pages < 1):
        raise ValueError(f"num_pages must be an int >= 1 or None, got {num_pages!r}")
    if codec is not None and not isinstance(codec, KVCodec):
        raise TypeError(f"codec must be a KVCodec or None, got {type(codec).__name__}")
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads)):
        if value is not None and (not is_int(value) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    threads = _threads(threads)
    _check_file(file, "readable, seekable", ("read", "seek"))
    if isinstance(file, (str, os.PathLike)):
        with open(file, "rb") as f:
            return _load(f, device, num_pages, codec, num_layers, num_kv_heads, threads, progress)
    return _load(file, device, num_pages, codec, num_layers, num_kv_heads, threads, progress)


def _load(f, device, num_pages, codec, num_layers, num_kv_heads, threads, progress) -> list[PagedKVCache]:
    header = read_header(f)
    data_start = f.tell()
    _check_expected(header, codec, num_layers, num_kv_heads)
    index = _read_index(f, data_start)
    saved = KVCodec.from_dict(header["codec"])
    if codec is not None:  # the caller's codec: its key layout may differ from the saving cache's
        saved = replace(codec, alpha=saved.alpha)
    L, H, P = header["num_layers"], header["num_kv_heads"], saved.page_size
    groups: dict = {}
    for e in index:
        groups.setdefault((e["layer"], e["slot"]), {})[e["part"]] = e
    need = [0] * L
    for (layer, _), parts in groups.items():
        if set(parts) != {"k", "v", "fp"} or not 0 <= layer < L:
            raise ColdFormatError(f"COLD index is inconsistent at layer {layer}: the file is corrupted")
        need[layer] += parts["fp"]["compressed"] // P
    pages = max(max(need), header["num_pages"]) if num_pages is None else num_pages
    if pages < max(need):
        raise ValueError(f"num_pages={num_pages} is too small: the saved sequences need {max(need)} pages per layer")
    caches = [PagedKVCache(saved, num_kv_heads=H, max_batch=header["max_batch"], num_pages=pages,
                           sink_tokens=header["sink_tokens"], recent_tokens=header["recent_tokens"],
                           dtype=_DTYPES[header["dtype"]], device=device) for _ in range(L)]
    chunk = header["chunk"]

    ordered = sorted(index, key=lambda e: e["offset"])
    done: dict = {}
    n_done = 0

    def collect(fut):
        nonlocal n_done
        _collect(fut.result(), done, caches, saved, chunk)
        n_done += 1
        _report(progress, "load_cache", n_done, len(ordered), "frame")

    with ThreadPoolExecutor(_threads(threads)) as pool:
        pending: deque = deque()
        for e in ordered:  # reads stay in this thread, in file order; the pool decompresses
            f.seek(e["offset"])
            pending.append(pool.submit(_decompress, e, f.read(e["size"]), caches[0].device.type == "cuda"))
            while pending and (pending[0].done() or len(pending) > 4 * _threads(threads)):
                collect(pending.popleft())
        while pending:
            collect(pending.popleft())
    if done:
        raise ColdFormatError("COLD file is missing frames: the file is corrupted")
    return caches


def _decompress(e: dict, blob: bytes, pin: bool):
    where = f"frame (layer {e['layer']}, slot {e['slot']}, {e['part']})"
    if len(blob) != e["size"]:
        raise ColdFormatError(f"COLD file is truncated inside {where}")
    if zlib.crc32(blob) != e["crc"]:
        raise ColdFormatError(f"checksum mismatch in {where}: the file is corrupted")
    try:
        data = _decompressor().decompress(blob, max_output_size=e["raw"])
    except zstandard.ZstdError as err:
        raise ColdFormatError(f"{where} does not decompress ({err}): the file is corrupted") from None
    if len(data) != e["raw"]:
        raise ColdFormatError(f"{where} decompressed to {len(data)} bytes, expected {e['raw']}")
    host = torch.empty(len(data), dtype=torch.uint8, pin_memory=pin)  # pinned: the upload runs at PCIe speed
    host.numpy()[:] = memoryview(data)
    return e, host


def _collect(item, done: dict, caches, codec: KVCodec, chunk: int) -> None:
    """Keep a decompressed frame; once a (layer, slot) has all three, rebuild its state and import it."""
    e, data = item
    key = (e["layer"], e["slot"])
    parts = done.setdefault(key, {})
    parts[e["part"]] = (e, data)
    if len(parts) < 3:
        return
    del done[key]
    cache = caches[e["layer"]]
    dev, H, D = cache.device, cache.num_kv_heads, codec.head_dim
    fp_e, fp = parts["fp"]
    C, F = fp_e["compressed"], fp_e["uncompressed"]
    streams = []
    for part, bits in (("k", codec.key_bits), ("v", codec.value_bits)):
        pe, raw = parts[part]
        if len(pe["modes"]) != H or pe["raw"] != H * C * record_bytes(D, bits):
            raise ColdFormatError(f"frame (layer {e['layer']}, slot {e['slot']}, {part}) has the wrong size")
        t = raw.view(H, C * record_bytes(D, bits)).to(dev, non_blocking=True)
        modes = torch.tensor(pe["modes"], dtype=torch.int32, device=dev)
        codes, scales = unfilter_codes(t, modes, D, bits, chunk, codec.scale_dtype)
        streams.extend((relayout(codes, bits, D, "planes", codec.layout("key" if part == "k" else "value")), scales))
    fpb = fp.to(dev, non_blocking=True)
    n_fp, n_mean = H * F * D * cache.fp_k.element_size(), 2 * H * D * 4
    n_pos = 4 * H * (C + F) if cache.positions is not None else 0
    if fpb.numel() != 2 * n_fp + n_mean + n_pos:
        raise ColdFormatError(f"frame (layer {e['layer']}, slot {e['slot']}, fp) has the wrong size")
    fp_k = fpb[:n_fp].view(cache.dtype).view(H, F, D)
    fp_v = fpb[n_fp:2 * n_fp].view(cache.dtype).view(H, F, D)
    means = fpb[2 * n_fp:2 * n_fp + n_mean].view(torch.float32).view(2, H, D)
    pos = fp_pos = None
    if n_pos:
        all_pos = fpb[2 * n_fp + n_mean:].view(torch.int32)
        pos, fp_pos = all_pos[:H * C].view(H, C), all_pos[H * C:].view(H, F)
    cache.import_slot(e["slot"], SlotState(*streams, fp_k, fp_v, means[0], means[1], fp_e["sinks"],
                                           fp_e["next_position"], pos, fp_pos))
