"""SASS helpers for instruction budgets (``perf.encode_budget``, the Gluon compile tests): nvdisasm text in, the
kernel's main loop out."""
import re


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
