"""perf.fused_budget: each stage it replaces names a function of attention.gluon with the same parameters (a renamed
stage would otherwise be measured as the full kernel), and a missing one is refused."""
import inspect

import pytest

gluon = pytest.importorskip("triton.experimental.gluon")


def test_stand_ins_match_the_kernel_functions():
    from nqkernels.attention import gluon as G
    from perf import fused_budget as F

    for variant, swap in F.STAND_INS.items():
        for name, stand_in in swap.items():
            assert hasattr(G, name), (variant, name)
            assert list(inspect.signature(getattr(G, name).fn).parameters) == \
                list(inspect.signature(stand_in.fn).parameters), (variant, name)


def test_a_missing_stage_is_refused(monkeypatch):
    from perf import fused_budget as F

    monkeypatch.setitem(F.STAND_INS, "renamed", {"_no_such_stage": F._no_coset})
    with pytest.raises(RuntimeError, match="_no_such_stage"):
        F.count("renamed", 128, (3, 2), 2)


def _row(*args):
    """One ``perf.fused_budget --variant`` row, in a process of its own (triton caches a kernel per process)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "perf.fused_budget", *args], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    return run.returncode, run.stdout, run.stderr


def test_fields_keys_take_one_product_chain():
    """3-bit keys at head_dim 128 are stored in the "fields" layout: the fused pass decodes them with one product
    chain, so K3V2 issues as many HMMA per unit as K2V2 (the planes' high-plane chain is gone), with no spills."""
    rows = {}
    for bits in ("3,2", "2,2"):
        rc, out, err = _row("--bits", bits, "--variant", "full")
        assert rc == 0, err[-2000:]
        rows[bits] = [c.strip() for c in out.strip().splitlines()[-1].strip("|").split("|")]
    assert rows["3,2"][2] == rows["2,2"][2] and rows["3,2"][4] == "0"
