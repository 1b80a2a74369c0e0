"""SASS helpers for instruction budgets (``perf.encode_budget``, ``perf.fused_budget``, the Gluon compile tests): a
cubin to nvdisasm text and registers, nvdisasm text to the kernel's loops."""
import os
import re
import subprocess
import tempfile


def tool(name: str) -> str:
    """The path of one of the NVIDIA tools pip's triton ships (ptxas, nvdisasm, cuobjdump)."""
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: bytes) -> tuple[str, int]:
    """(nvdisasm text, registers per thread from ``cuobjdump -res-usage``, -1 if it does not say) of a cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    return sass, int(regs.group(1)) if regs else -1


def loop_bodies(sass: str) -> list[list[str]]:
    """The instructions (nvdisasm text) of each backward branch's body, in address order: a kernel's loops."""
    labels, ins, branches, pending = {}, [], [], []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        labels.update({lb: addr for lb in pending})
        pending = []
        ins.append((addr, m.group(2)))
        b = re.search(r"BRA\s+`\((\.L_x_\d+)\)", m.group(2))
        if b:
            branches.append((b.group(1), addr))
    loops = sorted((labels[t], a) for t, a in branches if t in labels and labels[t] < a)
    return [[t for a, t in ins if lo <= a <= hi] for lo, hi in loops]


def loop_body(sass: str) -> list[str]:
    """The instructions of the largest backward branch's body: a kernel's main loop."""
    return max(loop_bodies(sass), key=len)
