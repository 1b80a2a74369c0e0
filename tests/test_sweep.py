"""perf.sweep: its CPU path (a reduced sweep in the Triton interpreter, re-rendered from its JSON) and its plots of
a GPU run."""
import json

import pytest

from .conftest import interpreted


@pytest.mark.skipif(not interpreted(), reason="the reduced sweep runs the kernels in the Triton interpreter")
def test_sweep_cpu_reduced(tmp_path, capsys):
    from perf import sweep

    assert sweep.main(["--quick", "--only", "cold", "--out", str(tmp_path), "--csv"]) == 0
    out = capsys.readouterr()
    assert "timings say nothing about GPU speed" in out.err
    assert "| filter | 64 | K2 | pass |" in out.out
    rows = json.loads((tmp_path / "sweep.json").read_text())["tables"]["cpu"]
    assert [r["op"] for r in rows] == ["filter", "unfilter"]
    assert (tmp_path / "sweep_cpu.csv").read_text().startswith("op,head_dim,setting,check,error")
    assert sweep.main(["--from", str(tmp_path / "sweep.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "sweep.md").read_text().startswith("# perf.sweep on cpu")
    with pytest.raises(SystemExit):
        sweep.main(["--only", "decode"])


def test_sweep_plots_a_gpu_run(tmp_path):
    pytest.importorskip("matplotlib")
    from perf import sweep

    att = [dict(method=m, batch=B, context=T, us=T / s, speedup_vs_sdpa=s, GBps=1.0, bytes=B * T * 1024 // f)
           for m, s, f in (("sdpa_fp16", 1.0, 1), ("K3V2", 2.0, 6)) for B in (1, 8) for T in (4096, 32768)]
    att += [dict(method="flashinfer_fp16", batch=1, context=4096, us=3.0, speedup_vs_sdpa=1.1, GBps=1.0)]  # no bytes
    res = dict(info=dict(device="Test GPU"), copy_GBps=3000.0, tables=dict(
        attention=att, encode=[dict(kind="key", batch=1, tokens=T, GBps=300.0) for T in (1024, 4096)],
        scoring=[dict(tokens=T, score_ms=1.0, snapkv_torch_ms=None) for T in (8192, 32768)]))
    paths = sweep.plot(res, tmp_path)
    assert [p.name for p in paths] == ["sweep_attention_latency.png", "sweep_attention_speedup.png",
                                       "sweep_encode.png", "sweep_scoring.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "| 8 | 32768 | K3V2 |" in sweep.markdown(res)
