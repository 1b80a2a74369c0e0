"""nqkernels.launch: a recorded launch replays with the call's own tensors swapped in, everything else as recorded,
and refuses tensors Triton would have compiled differently (dtype, 16-byte alignment). A stand-in kernel records
what would be launched (the real kernels are replayed on the GPU: tests/test_attention_cuda.py)."""
from types import SimpleNamespace

import torch

from nqkernels.launch import LaunchRecord, launcher


class FakeKernel:
    """A ``@triton.jit`` stand-in: ``fn[grid](...)`` logs the launch and returns a compiled stand-in, whose
    ``[grid](*args, stream=...)`` logs the replay."""
    arg_names = ["x_ptr", "w_ptr", "n", "BLOCK"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.log)
        return launch


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, stream=None: self.log.append(("replay", grid, args, stream))


def test_replay_swaps_the_calls_tensors_and_keeps_the_rest():
    fn = FakeKernel()
    x, work = torch.randn(8), torch.randn(4)
    rec = LaunchRecord({"x": x})
    launcher(rec)(fn, (3, 1), x, work, 8, BLOCK=16, num_warps=4)
    assert fn.log[0] == ("triton", (3, 1), (x, work, 8), {"BLOCK": 16, "num_warps": 4})
    y = torch.randn(8)
    assert rec.matches({"x": y})
    rec.replay({"x": y}, stream=7)
    kind, grid, args, stream = fn.log[1]
    assert (kind, grid, stream) == ("replay", (3, 1, 1), 7)  # the runner takes three grid dimensions
    assert args[0] is y and args[1] is work and args[2:] == (8, 16)  # all arguments, in the kernel's order


def test_a_tensor_triton_would_compile_differently_does_not_match():
    x = torch.randn(20)[:16]
    rec = LaunchRecord({"x": x, "pos": None})
    assert rec.matches({"x": torch.randn(16), "pos": None})
    assert not rec.matches({"x": x.half(), "pos": None})  # another dtype
    assert not rec.matches({"x": torch.randn(20)[1:17], "pos": None})  # 4 bytes off the 16-byte alignment
    assert not rec.matches({"x": torch.randn(24)[4:], "pos": None})  # another shape
    assert rec.matches({"x": torch.randn(24)[4:20], "pos": None})  # 16 bytes off: aligned
    assert not rec.matches({"x": torch.randn(32)[::2], "pos": None})  # other strides
    assert not rec.matches({"x": x, "pos": torch.zeros(2)})  # a tensor where the record had none
    assert not rec.matches({"y": x, "pos": None})  # not the record's names


def test_without_a_record_it_is_a_plain_launch():
    fn = FakeKernel()
    launcher(None)(fn, (1,), torch.randn(2), torch.randn(2), 2, BLOCK=4)
    assert [entry[0] for entry in fn.log] == ["triton"]


def test_cache_launch_signature_is_shared_by_equal_caches_and_follows_grow():
    from nqkernels import KVCodec, PagedKVCache

    def cache():
        return PagedKVCache(KVCodec(head_dim=64, page_size=16), num_kv_heads=2, max_batch=2, num_pages=6, device="cpu")

    a, b = cache(), cache()
    assert a.launch_signature() == b.launch_signature()  # every layer's cache replays one plan
    a.grow(extra_pages=3)
    assert a.launch_signature() != b.launch_signature()  # new pools: another plan
    b.grow(0, max_pages_per_seq=b.block_table.shape[1] + 1)
    assert b.launch_signature() != cache().launch_signature()


knobs = SimpleNamespace(runtime=SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None))  # Triton's, as read


class PlainCompiled:
    """A compiled-kernel stand-in whose runner is Triton's plain launcher call (``launch._plain_runner``)."""

    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, "fn", "meta"

    def run(self, *args):
        self.log.append(("direct",) + args)

    def __getitem__(self, grid):
        def runner(*args, stream=None):
            launch_metadata = "metadata"
            self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, launch_metadata,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)
        return runner


def test_replay_calls_the_launcher_directly_unless_a_hook_is_set(monkeypatch):
    from nqkernels import launch

    fn = FakeKernel()
    compiled = PlainCompiled(fn.log)
    monkeypatch.setattr(FakeKernel, "__getitem__", lambda self, grid: lambda *a, **k: compiled)
    assert launch._plain_runner(PlainCompiled) and not launch._plain_runner(FakeCompiled)
    x = torch.randn(8)
    rec = LaunchRecord({"x": x})
    rec.record(fn, (3,), x, torch.randn(4), 8, BLOCK=16)
    y = torch.randn(8)
    monkeypatch.setattr(launch, "_hooks_set", lambda: False)
    rec.replay({"x": y}, stream=5)
    head, args = fn.log[-1][:10], fn.log[-1][10:]
    assert head == ("direct", 3, 1, 1, 5, "fn", "meta", None, None, None)  # no launch metadata, no hooks
    assert args[0] is y and args[2:] == (8, 16)
    monkeypatch.setattr(launch, "_hooks_set", lambda: True)  # a hook would read the metadata: through the runner
    rec.replay({"x": y}, stream=5)
    assert fn.log[-1][:8] == ("direct", 3, 1, 1, 5, "fn", "meta", "metadata")
