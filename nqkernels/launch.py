"""Replaying a recorded sequence of Triton launches on other tensors of the same geometry, at a few microseconds of
host time per launch.

Triton's ``kernel[grid](...)`` binds and specializes every argument on every call (tens of microseconds for kernels
with fifty arguments). A decode step calls the same launches once per layer with identical scalars, shapes and
strides; only the tensors differ (each layer's cache, its query, its output). ``LaunchRecord`` launches through Triton
once, keeps the compiled kernels, notes which arguments are the call's own tensors, and replays the launches with
those tensors swapped in. A replay is used only where Triton would have compiled the same binary: each swapped
tensor must have the recorded dtype, shape and strides (the scalars the caller derived from them) and the same 16-byte
alignment (what Triton specializes a pointer on); anything else (a scalar, a config) belongs to the key under which
the caller keeps the record.

Where Triton's compiled-kernel runner is only the launcher call (``_plain_runner``) and no launch hook is set, a
replay calls that launcher directly: the runner would first build per-launch metadata for hooks nobody reads.

Only for CUDA tensors: under ``TRITON_INTERPRET=1`` kernels launch as usual. Not used while a CUDA graph is being
captured (the caller checks): a graph replays without host cost anyway, and must own its workspaces.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import functools
import inspect

import torch

try:
    from triton import knobs as _knobs
except ImportError:  # Triton < 3.4: its runner differs too (``_plain_runner`` is False)
    _knobs = None

try:  # what triton's own driver reads the current stream with (a C call, no Stream object)
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # a torch without it
    def _raw_stream(index: int) -> int:
        return torch.cuda.current_stream(index).cuda_stream


def current_stream(device: torch.device) -> int:
    """The raw handle of ``device``'s current CUDA stream (what a launch takes)."""
    return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())


def signature(t: torch.Tensor) -> tuple:
    """What Triton specializes a compiled kernel on, of a tensor argument: dtype, shape, strides, 16-byte alignment
    (shape and strides for the scalars callers derive from them)."""
    return t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0


# What ``CompiledKernel.__getitem__``'s runner calls when it does nothing else (Triton 3.4-3.9): the C launcher, with
# the launch metadata and the two hooks in front of the kernel's arguments.
_LAUNCHER_CALL = ("self.run(grid[0],grid[1],grid[2],stream,self.function,self.packed_metadata,launch_metadata,"
                  "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*args)")


@functools.lru_cache(maxsize=None)
def _plain_runner(compiled_type: type) -> bool:
    """Whether ``compiled_type[grid]`` returns a runner that only computes the launch metadata (read by launch hooks
    alone) and calls ``self.run`` with it: then a replay may call ``run`` itself while no hook is set."""
    try:
        source = inspect.getsource(compiled_type.__getitem__)
    except (OSError, TypeError, AttributeError):
        return False
    calls = "".join(source.split())
    return "".join(_LAUNCHER_CALL.split()) in calls and calls.count("self.run(") == 1


def _hooks_set() -> bool:
    """Whether a Triton launch hook is set (a function, or a non-empty hook chain in Triton >= 3.7)."""
    if _knobs is None:
        return True
    hooks = (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


class LaunchRecord:
    """The launches of one call, recorded (``record``) and replayed (``replay``) with the call's own tensors.

    ``inputs`` names the call's own tensors (e.g. ``{"q": q, "k_codes": cache.k_codes, ...}``): an argument that *is*
    one of them (the same object) is swapped in at replay; every other argument (scalars, constexprs, the record's
    workspaces) is replayed as recorded. The first launch of each kernel goes through Triton (compiling if needed).
    """

    def __init__(self, inputs: dict):
        self._slot = {id(t): name for name, t in inputs.items() if isinstance(t, torch.Tensor)}
        self._signatures = {name: signature(t) if isinstance(t, torch.Tensor) else None for name, t in inputs.items()}
        # (the launcher call's leading arguments where a replay may make it directly, else None; the compiled
        #  kernel's runner; args in signature order; [(position, name)])
        self._launches: list = []

    def record(self, fn, grid: tuple, *args: Any, **kwargs: Any) -> None:
        """Launch ``fn[grid](*args, **kwargs)`` through Triton and remember it (kwargs: the kernel's keyword arguments
        and launch options such as ``num_warps``)."""
        compiled = fn[grid](*args, **kwargs)
        bound = dict(zip(fn.arg_names, args))
        bound.update((k, v) for k, v in kwargs.items() if k in fn.arg_names)
        ordered = [bound[name] for name in fn.arg_names]
        swaps = [(i, self._slot[id(a)]) for i, a in enumerate(ordered)
                 if isinstance(a, torch.Tensor) and id(a) in self._slot]
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        direct = ((compiled.run, *grid3, compiled.function, compiled.packed_metadata)
                  if _plain_runner(type(compiled)) else None)
        self._launches.append((direct, compiled[grid3], ordered, swaps))

    def __len__(self) -> int:
        """The number of recorded launches (each replay makes exactly these)."""
        return len(self._launches)

    def matches(self, inputs: dict) -> bool:
        """Whether ``inputs`` can replay this record: the same tensors by name, each with the recorded dtype, shape,
        strides and 16-byte alignment."""
        signatures = self._signatures
        return inputs.keys() == signatures.keys() and all(
            signatures[name] == (signature(t) if isinstance(t, torch.Tensor) else None) for name, t in inputs.items())

    def replay(self, inputs: dict, stream: Optional[int] = None) -> None:
        """The recorded launches with ``inputs``' tensors swapped in (``matches(inputs)`` must hold)."""
        if stream is None:
            stream = torch.cuda.current_stream().cuda_stream
        hooks = _hooks_set()
        for direct, runner, ordered, swaps in self._launches:
            args = list(ordered)
            for i, name in swaps:
                args[i] = inputs[name]
            if direct is None or hooks:
                runner(*args, stream=stream)
            else:  # the runner's own call, without the metadata only hooks read
                run, g0, g1, g2, function, packed_metadata = direct
                run(g0, g1, g2, stream, function, packed_metadata, None, None, None, *args)


def launcher(record: Optional[LaunchRecord]) -> Callable:
    """``launch(fn, grid, *args, **kwargs)``: through ``record`` when one is given, else a plain Triton launch."""
    if record is not None:
        return record.record
    return lambda fn, grid, *args, **kwargs: fn[grid](*args, **kwargs)
