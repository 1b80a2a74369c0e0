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
