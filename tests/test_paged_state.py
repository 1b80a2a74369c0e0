"""PagedKVCache tested the way serving engines test their block managers: thousands of seeded random operations on a
small pool (ragged appends with default, per-sequence and per-head positions and garbage padding; crop; reset of some
or all slots; grow; offload / restore into other slots; export / import; running out of pages and of block-table
width), each followed by the bookkeeping invariants against a shadow model that holds every slot's tokens:
    - no page leaks (free + owned = pool), no page owned twice or both free and owned;
    - block tables point only at the pages their slot owns, one per compressed page of the shadow;
    - seq_lens / compressed_lens / next_positions / free_pages / pages_needed / the ``lengths`` tensor are the shadow's;
    - the uncompressed tokens (sinks + window, and their positions) equal the shadow's exactly;
    - an operation that must fail (out of pages, too wide, crop into pages, import into a held slot) raises its error
      and changes nothing.
Every CONTENT_EVERY steps the dense view is checked exactly (uncompressed tokens are the shadow's; compressed pages are
the encode of the shadow's tokens with the mean of the slot's first compressed chunk), and every ATTN_EVERY steps
``decode_attention`` against reference attention over the dense view.

The operations run on the torch reference (under the interpreter they would take minutes). When the session runs with
TRITON_INTERPRET=1 the attention checks and a few appends (encode and window-write kernels) run the Triton kernels;
their encodes are bit-exact with the reference, so pages of both paths mix in one cache.
A failure names the seed, the step and the last operations."""
import contextlib
import os
import random
import re
from collections import deque

import pytest
import torch

from nqkernels import KVCodec, PagedKVCache, RopeSpec, decode_attention
from nqkernels.codec import centering_mean, decode_kv, encode_kv
from nqkernels.reference import paged_attention

from .conftest import HEAD_DIMS, interpreted
from .test_attention import _cache, _check, _fill

STEPS = 1200
CONTENT_EVERY = 10
ATTN_EVERY = 100
KERNEL_APPENDS = 0.04  # share of appends that run the kernels when interpreted
D, PAGE = 64, 16
CASES = {  # seed: the cache (few pages and a narrow block table, so both run out)
    0: dict(rope=False, bits=(3, 2), heads=2, batch=3, pages=8, width=4, sinks=2, recent=5, dtype=torch.float16),
    1: dict(rope=True, bits=(4, 2), heads=1, batch=4, pages=6, width=3, sinks=0, recent=3, dtype=torch.float16),
    2: dict(rope=False, bits=(2, 3), heads=2, batch=4, pages=7, width=3, sinks=1, recent=0, dtype=torch.bfloat16),
}
POOL_CAP, WIDTH_CAP = 14, 8  # grow stops about here, so running out keeps happening


class _Slot:
    """The shadow of one sequence: its tokens in order (K/V [H, L, D] in the cache dtype, positions [H, L]) and the
    split the cache's documented rules give (sinks first, then pages of PAGE tokens flushed from the window)."""

    def __init__(self, H, dtype):
        self.k = self.v = torch.zeros(H, 0, D, dtype=dtype)
        self.pos = torch.zeros(H, 0, dtype=torch.int64)
        self.sink = self.comp = self.next = 0
        self.first = 0  # tokens of the first compressed chunk: the centering means are theirs

    @property
    def len(self):
        return self.k.shape[1]

    @property
    def window(self):
        return self.len - self.sink - self.comp

    def uncompressed(self, x):
        return torch.cat((x[:, :self.sink], x[:, self.sink + self.comp:]), dim=1)

    def copy(self):
        c = _Slot(self.k.shape[0], self.k.dtype)
        c.__dict__.update(self.__dict__)
        return c


def _finite_rows(x, dtype):
    # the cache's rule: a (token, head) row holding NaN/Inf after the cast to the cache dtype is stored as zeros
    x = x.to(dtype)
    return torch.where(torch.isfinite(x).all(-1, keepdim=True), x, torch.zeros((), dtype=dtype))


@contextlib.contextmanager
def _kernels(on: bool):
    """The Triton kernels (interpreted) inside, the torch reference outside."""
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        os.environ["TRITON_INTERPRET"] = "0"


def _ok(cond, message):
    # not a bare assert: pytest's rewriting would put whole tensors into the message
    if not cond:
        raise AssertionError(message)


def _expect(error, pattern, fn):
    try:
        fn()
    except error as e:
        _ok(re.search(pattern, str(e)), f"expected {error.__name__} matching {pattern!r}, got: {e}")
        return
    raise AssertionError(f"expected {error.__name__} matching {pattern!r}; nothing was raised")


class _Run:
    def __init__(self, seed, kernels):
        cfg = CASES[seed]
        self.rng, self.gen, self.kernels = random.Random(seed), torch.Generator().manual_seed(seed), kernels
        self.H, self.nb, self.S, self.R = cfg["heads"], cfg["batch"], cfg["sinks"], cfg["recent"]
        self.pool, self.width, self.dtype = cfg["pages"], cfg["width"], cfg["dtype"]
        self.codec = KVCodec(head_dim=D, key_bits=cfg["bits"][0], value_bits=cfg["bits"][1], page_size=PAGE,
                             rope=RopeSpec(theta=10000.0) if cfg["rope"] else None)
        self.cache = PagedKVCache(self.codec, num_kv_heads=self.H, max_batch=self.nb, num_pages=self.pool,
                                  max_pages_per_seq=self.width, sink_tokens=self.S, recent_tokens=self.R,
                                  dtype=self.dtype, device="cpu")
        self.slots = [self.empty() for _ in range(self.nb)]
        self.parked = []  # (SlotState, shadow) of offloaded sequences
        self.history = deque(maxlen=8)

    def log(self, step, text):
        self.history.append(f"step {step}: {text}")

    def empty(self):
        return _Slot(self.H, self.dtype)

    def free(self):
        return self.pool - sum(s.comp // PAGE for s in self.slots)

    def held(self):
        return [b for b, s in enumerate(self.slots) if s.len]

    def fits(self, shadow, free):
        return shadow.comp // PAGE <= min(free, self.width)

    # ---- operations (False: not possible now, draw another) ---------------------------------------------------
    def op_append(self, step):
        rng, H = self.rng, self.H
        B = rng.randint(1, self.nb)
        decode = rng.random() < 0.6
        T = rng.randint(1, 3) if decode else rng.randint(1, 40)
        ragged = rng.random() < (0.2 if decode else 0.6)
        counts = [rng.randint(0, T) for _ in range(B)] if ragged else [T] * B
        pmode = rng.choices(("default", "per_seq", "per_head"), (0.7, 0.2, 0.1))[0]
        fp32, kernels, inf = rng.random() < 0.2, rng.random() < KERNEL_APPENDS and self.kernels, rng.random() < 0.03
        # The interpreter casts fp32 to bf16 toward zero (the GPU rounds to nearest, as torch): no fp32 input there.
        fp32 = fp32 and not (kernels and self.dtype == torch.bfloat16)
        k, v = torch.randn(B, T, H, D, generator=self.gen) * 1.5 + 0.3, torch.randn(B, T, H, D, generator=self.gen)
        for b, n in enumerate(counts):  # padding: garbage the cache must ignore
            k[b, n:], v[b, n:] = float("nan"), 1e9
        if inf and counts[0]:
            k[0, counts[0] - 1, H - 1, 7] = float("inf")
        pos = None
        if pmode != "default":  # increasing, from the slot's next position on, with gaps (kept tokens of a longer run)
            pos = torch.full((B, H, T), -1, dtype=rng.choice((torch.int32, torch.int64)))  # padding: ignored
            for b, n in enumerate(counts):
                base = self.slots[b].next + rng.randint(0, 3)
                for h in range(H if pmode == "per_head" else 1):
                    pos[b, h, :n] = torch.tensor(sorted(rng.sample(range(base, base + n + rng.randint(0, 4)), n)))
                if pmode == "per_seq":
                    pos[b, 1:] = pos[b, 0]
            pos = pos[:, 0] if pmode == "per_seq" else pos
        self.log(step, f"append(B={B}, T={T}, lengths={counts if ragged else None}, positions={pmode}, "
                       f"{'fp32' if fp32 else 'cache dtype'}{', kernels' if kernels else ''}{', inf' if inf else ''})")
        plan, need, widest = [], 0, self.width  # sinks first; the window flushes whole pages at R + PAGE tokens
        for b, n in enumerate(counts):
            s = self.slots[b]
            take = min(self.S - s.sink, n)
            w, m = s.window, n - take
            flush = (w + m - self.R) // PAGE * PAGE if m and w + m >= self.R + PAGE else 0
            plan.append((take, flush))
            need += flush // PAGE
            widest = max(widest, (s.comp + flush) // PAGE)
        want = (max(0, need - self.free()), widest)
        _ok(self.cache.pages_needed(counts) == want, f"pages_needed = {self.cache.pages_needed(counts)}, shadow {want}")
        kin, vin = (k, v) if fp32 else (k.to(self.dtype), v.to(self.dtype))
        call = lambda: self.cache.append(kin, vin, lengths=counts if ragged else None, positions=pos)  # noqa: E731
        if need > self.free() or widest > self.width:
            self.log(step, f"  -> must fail: needs {need} pages, {self.free()} free; {widest} wide, {self.width} may")
            with _kernels(kernels):
                _expect(RuntimeError, "out of pages|max_pages_per_seq", call)
            return
        with _kernels(kernels):
            call()
        for b, (n, (take, flush)) in enumerate(zip(counts, plan)):
            if not n:
                continue
            s = self.slots[b]
            if pos is None:
                p = torch.arange(s.next, s.next + n).expand(H, n)
            else:
                p = pos[b, :, :n].long() if pos.dim() == 3 else pos[b, None, :n].long().expand(H, n)
            s.k = torch.cat((s.k, _finite_rows(k[b, :n].transpose(0, 1), self.dtype)), 1)
            s.v = torch.cat((s.v, _finite_rows(v[b, :n].transpose(0, 1), self.dtype)), 1)
            s.pos = torch.cat((s.pos, p), 1)
            s.next = s.next + n if pos is None else int(p.max()) + 1
            s.sink += take
            s.first = s.first or flush
            s.comp += flush

    def op_crop(self, step):
        held = [self.slots[b] for b in self.held()]
        room = min((s.window for s in held), default=0)
        t = self.rng.randint(1, room) if room and self.rng.random() < 0.85 else room + self.rng.randint(0, 3)
        self.log(step, f"crop({t})  [windows {[s.window for s in self.slots]}]")
        if held and t > room:
            _expect(ValueError, "cannot crop", lambda: self.cache.crop(t))
            return
        self.cache.crop(t)
        for s in held if t else ():
            s.k, s.v, s.pos = s.k[:, :-t], s.v[:, :-t], s.pos[:, :-t]
            s.next -= t

    def op_reset(self, step):
        slots = None if self.rng.random() < 0.15 else self.rng.sample(range(self.nb), self.rng.randint(1, self.nb))
        self.log(step, f"reset({slots})")
        self.cache.reset(slots)
        for b in range(self.nb) if slots is None else slots:
            self.slots[b] = self.empty()

    def op_grow(self, step):
        extra = self.rng.randint(0, 3) if self.pool < POOL_CAP else 0
        width = self.rng.choice((None, self.width - 1, self.width + 1, self.width + 2))  # narrower: no change
        width = None if width is not None and width > WIDTH_CAP else width
        self.log(step, f"grow({extra}, max_pages_per_seq={width})")
        self.cache.grow(extra, width)
        self.pool += extra
        self.width = max(self.width, width or 0)

    def op_offload(self, step):
        held = self.held()
        if not held or len(self.parked) >= 4:
            return False
        slots = self.rng.sample(held, self.rng.randint(1, min(2, len(held))))
        self.log(step, f"offload({slots})")
        for state, b in zip(self.cache.offload(slots), slots):
            self.parked.append((state, self.slots[b]))
            self.slots[b] = self.empty()

    def op_restore(self, step):
        empty = [b for b in range(self.nb) if not self.slots[b].len]
        if not self.parked or not empty:
            return False
        n = self.rng.randint(1, min(len(self.parked), len(empty), 2))
        picks, slots = self.rng.sample(range(len(self.parked)), n), self.rng.sample(empty, n)
        self.log(step, f"restore(parked {picks} -> slots {slots})  [pages "
                       f"{[self.parked[i][1].comp // PAGE for i in picks]}, free {self.free()}, width {self.width}]")
        done, free = 0, self.free()  # states are imported one by one; the first that does not fit raises
        for i in picks:
            if not self.fits(self.parked[i][1], free):
                break
            free -= self.parked[i][1].comp // PAGE
            done += 1
        call = lambda: self.cache.restore([self.parked[i][0] for i in picks], slots)  # noqa: E731
        if done < n:
            _expect(RuntimeError, "out of pages", call)
        else:
            call()
        for i, b in zip(picks[:done], slots[:done]):
            self.slots[b] = self.parked[i][1].copy()
        for i in sorted(picks[:done], reverse=True):
            del self.parked[i]

    def op_copy(self, step):
        held, empty = self.held(), [b for b in range(self.nb) if not self.slots[b].len]
        if not held or not empty:
            return False
        a, c = self.rng.choice(held), self.rng.choice(empty)
        self.log(step, f"export_slot({a}) -> import_slot({c})  [pages {self.slots[a].comp // PAGE}, "
                       f"free {self.free()}, width {self.width}]")
        state, s = self.cache.export_slot(a), self.slots[a]
        _ok((state.length, state.k_codes.shape[1], state.sinks, state.next_position) == (s.len, s.comp, s.sink, s.next),
            "export_slot's lengths or next position differ from the shadow's")
        _ok(torch.equal(state.fp_k, s.uncompressed(s.k)) and torch.equal(state.fp_v, s.uncompressed(s.v)),
            "export_slot's uncompressed tokens differ from the shadow's")
        if not self.fits(s, self.free()):
            _expect(RuntimeError, "out of pages", lambda: self.cache.import_slot(c, state))
            return
        self.cache.import_slot(c, state)
        self.slots[c] = s.copy()

    def op_import_into_held(self, step):
        held = self.held()
        if not held:
            return False
        a, c = self.rng.choice(held), self.rng.choice(held)
        self.log(step, f"export_slot({a}) -> import_slot({c}), a held slot: must fail")
        state = self.cache.export_slot(a)
        _expect(ValueError, "reset it", lambda: self.cache.import_slot(c, state))

    OPS = (("op_append", 55), ("op_crop", 10), ("op_reset", 6), ("op_grow", 4), ("op_offload", 5),
           ("op_restore", 7), ("op_copy", 5), ("op_import_into_held", 1))

    # ---- checks -----------------------------------------------------------------------------------------------
    def check_state(self):
        """Every step, cheap: pages, block tables, lengths, the uncompressed tokens and all positions."""
        c = self.cache
        for name in ("k_codes", "v_codes", "k_scales", "v_scales", "positions"):
            n = self.pool if getattr(c, name) is None else getattr(c, name).shape[0]
            _ok(n == self.pool, f"{name} holds {n} pages; the pool is {self.pool}")
        _ok(tuple(c.block_table.shape) == (self.nb, self.width), f"block_table is {list(c.block_table.shape)}")
        free, table = list(c._free), c.block_table.tolist()
        owned = [p for b, s in enumerate(self.slots) for p in table[b][:s.comp // PAGE]]
        for b, s in enumerate(self.slots):
            _ok(c._pages[b] == table[b][:s.comp // PAGE],
                f"slot {b}: pages {c._pages[b]}, block table {table[b]}; the shadow holds {s.comp // PAGE} pages")
        _ok(len(set(free)) == len(free), f"a page is free twice: {sorted(free)}")
        _ok(len(set(owned)) == len(owned), f"a page is owned twice: {owned}")
        _ok(not set(free) & set(owned), f"pages both free and owned: {sorted(set(free) & set(owned))}")
        _ok(sorted(free + owned) == list(range(self.pool)),
            f"page leak: free {sorted(free)} + owned {sorted(owned)} is not the pool of {self.pool}")
        _ok(c.free_pages() == self.free(), f"free_pages() = {c.free_pages()}, shadow {self.free()}")
        want = [[s.len for s in self.slots], [s.comp for s in self.slots], [s.len - s.comp for s in self.slots],
                [s.sink for s in self.slots]]
        _ok(c.lengths.tolist() == want, f"lengths tensor {c.lengths.tolist()}, shadow {want}")
        got = (c.seq_lens(), c.compressed_lens(), c.next_positions())
        _ok(got == (want[0], want[1], [s.next for s in self.slots]),
            f"seq_lens, compressed_lens, next_positions = {got}; shadow {want[:2]}, {[s.next for s in self.slots]}")
        for b, s in enumerate(self.slots):
            f = s.len - s.comp
            _ok(torch.equal(c.fp_k[b, :, :f], s.uncompressed(s.k)) and torch.equal(c.fp_v[b, :, :f],
                                                                                     s.uncompressed(s.v)),
                f"slot {b}: uncompressed tokens differ from the shadow's")
            if c.positions is not None:
                _ok(torch.equal(c.fp_pos[b, :, :f].long(), s.uncompressed(s.pos)),
                    f"slot {b}: positions of the uncompressed tokens differ from the shadow's")
                got = c.positions[table[b][:s.comp // PAGE]].transpose(0, 1).reshape(self.H, s.comp)
                _ok(torch.equal(got.long(), s.pos[:, s.sink:s.sink + s.comp]),
                    f"slot {b}: positions of the compressed tokens differ from the shadow's")

    def check_content(self):
        """Every CONTENT_EVERY steps: the dense view against the shadow, exactly."""
        c, H = self.cache, self.H
        K, V, valid = c.dense()
        for b, s in enumerate(self.slots):
            _ok(valid[b].tolist() == [True] * s.len + [False] * (K.shape[1] - s.len), f"slot {b}: dense validity")
            end = s.sink + s.comp
            for name, got, x in (("K", K, s.k), ("V", V, s.v)):
                _ok(torch.equal(got[b, :s.sink], x[:, :s.sink].transpose(0, 1).float()),
                    f"slot {b}: dense {name} sinks differ from the shadow's")
                _ok(torch.equal(got[b, end:s.len], x[:, end:].transpose(0, 1).float()),
                    f"slot {b}: dense {name} window differs from the shadow's")
            if not s.comp:
                continue
            pages = c.block_table[b, :s.comp // PAGE].long()
            for kind, x, mean, codes, scales, dense in (("key", s.k, c.k_mean, c.k_codes, c.k_scales, K),
                                                       ("value", s.v, c.v_mean, c.v_codes, c.v_scales, V)):
                p = s.pos[:, s.sink:end] if c.positions is not None and kind == "key" else None
                first = centering_mean(x[:, s.sink:s.sink + s.first, None], self.codec, kind,
                                       None if p is None else p[:, :s.first])[:, 0]
                _ok(torch.allclose(mean[b], first, rtol=0, atol=1e-4),
                    f"slot {b}: the {kind} mean is not that of the first compressed chunk ({s.first} tokens)")
                enc = encode_kv(x[:, s.sink:end, None], self.codec, kind, positions=p, mean=mean[b, :, None])
                got_c = codes[pages].transpose(0, 1).reshape(H, s.comp, -1)
                got_s = scales[pages].transpose(0, 1).reshape(H, s.comp)
                _ok(torch.equal(got_c, enc.codes[:, :, 0]) and torch.equal(got_s, enc.scales[:, :, 0]),
                    f"slot {b}: {kind} pages are not the encode of the shadow's tokens {s.sink}..{end - 1}")
                want = decode_kv(enc, self.codec, kind, positions=p, dtype=torch.float32)[:, :, 0].transpose(0, 1)
                _ok(torch.equal(dense[b, s.sink:end], want), f"slot {b}: dense {kind} pages")

    def check_attention(self):
        """decode_attention (the kernels when interpreted) against attention over the dense view, for the held slots
        in front. False: slot 0 is empty, try again next step."""
        B = next((b for b, s in enumerate(self.slots) if not s.len), self.nb)
        if not B:
            return False
        q_len = self.rng.randint(1, min(3, *(s.len for s in self.slots[:B])))
        q = torch.randn(B, q_len, 2 * self.H, D, generator=self.gen).to(self.dtype)
        kw = self.rng.choice(({}, {"num_splits": self.rng.randint(1, 3)}, {"window": self.rng.randint(1, 40)},
                              {"softcap": 2.0, "softmax_scale": 0.2}))
        self.log("-", f"decode_attention(B={B}, q_len={q_len}, {kw})")
        with _kernels(self.kernels):
            out = decode_attention(q, self.cache, **kw)
        ref = paged_attention(q, self.cache, kw.get("softmax_scale") or D ** -0.5, kw.get("softcap"),
                                   kw.get("window"))
        err = (out.float() - ref).abs().max().item()
        tol = 2e-2 if self.dtype == torch.bfloat16 else 3e-3  # as tests/test_attention.py
        _ok(err <= tol * max(1.0, ref.abs().max().item()), f"decode_attention differs from the reference by {err}")


def _run(seed, kernels, steps=STEPS):
    run = _Run(seed, kernels)
    names, weights = zip(*_Run.OPS)
    step, attend = 0, False
    try:
        for step in range(steps):
            while getattr(run, run.rng.choices(names, weights)[0])(step) is False:
                pass
            run.check_state()
            if step % CONTENT_EVERY == CONTENT_EVERY - 1:
                run.check_content()
            attend = attend or step % ATTN_EVERY == ATTN_EVERY - 1
            if attend:
                attend = run.check_attention() is False
        run.check_content()
    except Exception as e:
        mode = "kernels interpreted" if kernels else "torch reference only"
        raise AssertionError(f"seed {seed} ({mode}), step {step}: {type(e).__name__}: {e}\nlast operations:\n  "
                             + "\n  ".join(run.history)) from (None if isinstance(e, AssertionError) else e)
    return run


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter on NaN/Inf rows
@pytest.mark.parametrize("seed", sorted(CASES))
def test_long_run_state(seed, monkeypatch):
    kernels = interpreted()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only spin, and on shared cores are 10-20x slower
    try:
        _run(seed, kernels)
    finally:
        torch.set_num_threads(threads)


# The cache alone: its dense view, page reuse, window appends, grow and crop (the helpers and the attention check
# of tests/test_attention.py).


def test_dense_view_matches_inputs_up_to_quantization():
    cache = _cache(recent=5, sinks=3, rope=RopeSpec(theta=10000.0), bits=(4, 4))
    k, v = _fill(cache, [60, 40])
    K, V, valid = cache.dense()
    assert valid.sum(1).tolist() == [60, 40]
    for b, n in enumerate((60, 40)):
        for got, want in ((K, k), (V, v)):
            err = (got[b, :n] - want[b, :n].float()).pow(2).mean() / want[b, :n].float().var()
            assert err < 0.02
        assert torch.equal(K[b, :3], k[b, :3].float())  # sinks are exact


def test_pages_are_freed_and_reused():
    cache = _cache(recent=0, pages=4, batch=2)
    _fill(cache, [64, 0])
    assert cache.free_pages() == 0
    with pytest.raises(RuntimeError, match="out of pages"):
        _fill(cache, [0, 16])
    cache.reset([0])
    assert cache.free_pages() == 4 and cache.seq_lens() == [0, 0]
    _fill(cache, [20, 33])
    _check(torch.randn(2, 1, 4, 128, dtype=torch.float16), cache)


def test_window_appends_equal_one_by_one_and_grow_and_crop():
    # Batched decode-step appends (one write for all slots) equal per-slot appends; growing the pool keeps every
    # page; crop drops window tokens only.
    rope = RopeSpec(theta=10000.0)
    a, b = _cache(recent=6, sinks=2, rope=rope, pages=8), _cache(recent=6, sinks=2, rope=rope, pages=8)
    for cache in (a, b):
        torch.manual_seed(1)
        _fill(cache, [21, 9])
    for step in range(12):
        k = torch.randn(2, 1, 2, 128, dtype=torch.float16)
        v = torch.randn_like(k)
        need, widest = a.pages_needed([1, 1])
        if need or widest > a.block_table.shape[1]:
            a.grow(need + 1, widest + 1)
        a.append(k, v)
        for slot in (0, 1):  # slot by slot: the per-sequence path
            b.append(k[slot:slot + 1].expand(2, -1, -1, -1), v[slot:slot + 1].expand(2, -1, -1, -1),
                     lengths=[1 if i == slot else 0 for i in (0, 1)])
    for x, y in zip(a.dense(), b.dense()):
        assert torch.equal(x, y)
    assert a.next_positions() == b.next_positions() == [33, 21] and torch.equal(a.lengths, b.lengths)
    a.grow(5, a.block_table.shape[1] + 3)
    assert all(torch.equal(x, y) for x, y in zip(a.dense(), b.dense()))
    _check(torch.randn(2, 3, 4, 128, dtype=torch.float16), a)
    a.crop(3)
    assert a.seq_lens() == [30, 18] and a.next_positions() == [30, 18]
    with pytest.raises(ValueError, match="cannot crop"):
        a.crop(20)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("src", ("float32", "cache"))
def test_window_write_kernel_equals_per_slot_appends(d, dtype, src):
    # The batched window write (a Triton kernel) vs the per-slot path: fp32 input cast to the cache dtype, a chunk of
    # 3 tokens, a non-contiguous input, a NaN row and a row that overflows fp16 are zeroed alone.
    a, b = (_cache(d=d, recent=9, sinks=2, dtype=dtype, pages=8, kv_heads=3, batch=3) for _ in range(2))
    for cache in (a, b):
        torch.manual_seed(2)
        _fill(cache, [21, 5, 40])
    k = torch.randn(3, 3, 2 * d, 3)[:, :, ::2].transpose(2, 3)  # [B, T, H, D], strided
    v = torch.randn(3, 3, 3, d)
    k[1, 2, 0, 5], v[2, 0, 1, 3] = float("nan"), 1e6 if dtype == torch.float16 and src == "float32" else float("inf")
    if src == "cache":  # inputs already in the cache dtype (what a model in that dtype appends)
        k, v = k.to(dtype), v.to(dtype)
    a.append(k, v)
    for slot in range(3):
        b.append(k, v, lengths=[3 if i == slot else 0 for i in range(3)])
    for x, y in zip(a.dense(), b.dense()):
        assert torch.equal(x, y)
    kd, vd, _ = a.dense()
    assert kd[1, 5 + 2, 0].abs().sum() == 0 and kd[1, 5 + 2, 1].abs().sum() > 0
    assert vd[2, 40, 1].abs().sum() == 0 and torch.isfinite(vd).all() and torch.isfinite(kd).all()


def test_offload_and_restore_slots():
    from .test_cold import _caches

    [cache] = _caches(layers=1, lengths=(70, 40, 33))
    keep = [cache.export_slot(b) for b in range(3)]
    free = cache.free_pages()
    states = cache.offload([0, 2])
    assert cache.seq_lens() == [0, 40, 0] and cache.free_pages() == free + 3 + 1  # 48 and 16 compressed tokens
    cache.restore(states, [2, 0])  # into other slots
    for slot, want in ((2, keep[0]), (0, keep[2]), (1, keep[1])):
        got = cache.export_slot(slot)
        assert all(torch.equal(x, y) for x, y in zip(got[:8], want[:8])) and got.sinks == want.sinks
    with pytest.raises(ValueError, match="reset it"):
        cache.restore(states[:1], [1])


@pytest.mark.parametrize("bits", ((4, 4), (3, 2)))
def test_a_state_moves_between_key_layouts(bits):
    """A slot exported from a cache with bit-plane keys imports into one with fields keys (and back) as the same
    codes: ``SlotState.layouts`` says what the codes are, ``import_slot`` converts; at 4 bits the words per token
    are equal, so only the layouts tell them apart."""
    from nqkernels import reference as R

    kw = dict(head_dim=128, key_bits=bits[0], value_bits=bits[1], page_size=16)
    planes = PagedKVCache(KVCodec(**kw, key_layout="planes"), num_kv_heads=2, max_batch=2, num_pages=16,
                          device="cpu")
    fields = PagedKVCache(KVCodec(**kw), num_kv_heads=2, max_batch=2, num_pages=16, device="cpu")
    _fill(planes, [50, 29])
    q = torch.randn(2, 1, 4, 128, dtype=torch.float16)
    want = decode_attention(q, planes)
    for b in range(2):
        state = planes.export_slot(b)
        assert state.layouts == ("planes", fields.codec.layout("value"))
        fields.import_slot(b, state)
        got = fields.export_slot(b)
        assert got.layouts == ("fields", fields.codec.layout("value"))
        assert torch.equal(R.relayout(got.k_codes, bits[0], 128, "fields", "planes"), state.k_codes)
    torch.testing.assert_close(decode_attention(q, fields), want, rtol=0, atol=2e-3)
    before = planes.export_slot(0)
    planes.reset([0])
    planes.import_slot(0, fields.export_slot(0))  # and back: the same codes as before
    assert all(torch.equal(x, y) for x, y in zip(planes.export_slot(0)[:8], before[:8]))


def test_append_positions_bad_inputs():
    cache = PagedKVCache(KVCodec(head_dim=64, page_size=16), num_kv_heads=2, max_batch=1, num_pages=4, device="cpu")
    k = torch.randn(1, 5, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="positions"):
        cache.append(k, k, positions=torch.arange(4)[None])
    with pytest.raises(ValueError, match=">= 0"):
        cache.append(k, k, positions=torch.full((1, 5), -1))

