"""The GPU benchmark tools refuse a bad shape with a message naming the flag, before they look for a GPU."""
import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, message", [
    (["perf.profile_decode", "--shape", "8x32768x3"], "--shape: BxTxKxV[xD] with integers"),
    (["perf.profile_decode", "--shape", "8x0x3x2"], "--shape: batch and context >= 1"),
    (["perf.profile_decode", "--shape", "8x32768x5x2"], "bits 2-4"),
    (["perf.profile_decode", "--shape", "1x64x3x2,1x64x3x2"], "--shape: one shape"),
    (["perf.gluon_ab", "--base", "x", "--shapes", "1x4096x3x2x48"], "--shapes: batch and context >= 1"),
])
def test_bad_shape_is_refused(args, message):
    run = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]


def test_parse_shapes_defaults_head_dim():
    from perf.gluon_ab import parse_shapes

    assert parse_shapes("8x32768x3x2,1x4096x4x4x64") == [(8, 32768, 3, 2, 128), (1, 4096, 4, 4, 64)]


def test_profile_decode_refuses_fused_where_it_cannot_run(monkeypatch):
    """--fused where the fused pass cannot run (here: no Gluon passes) exits instead of profiling no kernel."""
    import types

    from perf import profile_decode as P

    cache = types.SimpleNamespace(codec=types.SimpleNamespace(page_size=64))
    monkeypatch.setattr(P.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(P, "decode_case", lambda dev, *shape: (cache, None, None, {}))
    monkeypatch.setattr(P.A, "_gluon", lambda q: None)
    monkeypatch.setattr(sys, "argv", ["perf.profile_decode", "--shape", "8x32768x3x2", "--fused"])
    with pytest.raises(SystemExit, match="--fused: the fused Gluon pass does not run"):
        P.main()


def test_gluon_ab_knows_a_base_that_reads_bit_planes_only():
    """A base copy of gluon.py from before the "fields" key layout is given the same codes in bit planes."""
    import types

    from nqkernels.attention import gluon
    from perf.gluon_ab import reads_fields

    assert reads_fields(gluon) and reads_fields(gluon, 4)
    assert not reads_fields(types.SimpleNamespace(fused_constants=lambda *, head_dim, key_bits, value_bits: {}))
    before4 = types.SimpleNamespace(_gluon_fused_kernel=types.SimpleNamespace(fn=lambda kc_ptr, KFIELDS: None),
                                    fused_constants=gluon.fused_constants)
    assert reads_fields(before4, 3) and not reads_fields(before4, 4)
