"""The config store (bucket fallback, overrides, untuned), the typed launch configs, the tuner's search and files."""
import json
import time
import warnings

import pytest
import torch

import nqkernels.store as store
from nqkernels.store import lookup, override, untuned
from autotune.tasks import KERNELS, Task, cold_setup, make_tasks
from autotune.tune import main as tune_main
from autotune.tune import report_markdown, search, write_store
from nqkernels.attention import attention_buckets
from tests.conftest import interpreted


def test_lookup_falls_back_to_default_on_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup("encode", "d128_b3", {"BLOCK_T": 32, "num_warps": 4}) == {"BLOCK_T": 32, "num_warps": 4}


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """A store directory with one GPU's file, and lookups that believe they run on that GPU."""
    monkeypatch.setattr(store, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(store, "gpu_key", lambda device=None: "test-gpu")
    monkeypatch.setattr(store, "_noticed", set())
    store.reload()
    (tmp_path / "test-gpu.json").write_text(json.dumps({
        "_meta": {"device": "Test GPU"},
        "attention": {"d128_k3v2_g4_t32k_b16": {"num_warps": 8}, "d128_k3v2": {"num_warps": 2}}}))
    yield tmp_path
    store.reload()


def test_lookup_takes_the_most_specific_bucket_then_coarser_then_default(fake_gpu):
    default = {"num_warps": 4, "num_stages": 1}
    assert lookup("attention", ["d128_k3v2_g4_t32k_b16", "d128_k3v2"], default) == {"num_warps": 8, "num_stages": 1}
    assert lookup("attention", ["d128_k3v2_g8_t4k_b1", "d128_k3v2"], default) == {"num_warps": 2, "num_stages": 1}
    with pytest.warns(UserWarning, match="no tuned attention config for test-gpu at d64_k3v2_g4"):
        assert lookup("attention", ["d64_k3v2_g4_t4k_b1", "d64_k3v2"], default) == default
    with warnings.catch_warnings():  # one notice per GPU and kernel
        warnings.simplefilter("error")
        assert lookup("attention", "d64_k2v2", default) == default


def test_override_and_untuned(fake_gpu):
    default = {"num_warps": 4, "num_stages": 1}
    with override("attention", {"num_stages": 2}):
        assert lookup("attention", "d128_k3v2", default) == {"num_warps": 4, "num_stages": 2}
    with untuned():
        assert lookup("attention", "d128_k3v2", default) == default
    assert lookup("attention", "d128_k3v2", default) == {"num_warps": 2, "num_stages": 1}


def test_attention_buckets_cover_context_and_batch_ranges():
    assert attention_buckets(128, 3, 2, 4, 1, 4096) == ["d128_k3v2_g4_t4k_b1", "d128_k3v2"]
    assert attention_buckets(128, 3, 2, 4, 16, 4097)[0] == "d128_k3v2_g4_t32k_b16"
    assert attention_buckets(64, 4, 4, 8, 17, 32769) == ["d64_k4v4_g8_tmax_bmax", "d64_k4v4_g4_tmax_bmax",
                                                         "d64_k3v2_g4_tmax_bmax", "d128_k3v2_g4_tmax_bmax", "d64_k4v4"]
    assert attention_buckets(256, 3, 3, 2, 1, 4096) == ["d256_k3v3_g2_t4k_b1", "d256_k3v3_g4_t4k_b1",
                                                        "d256_k3v2_g4_t4k_b1", "d256_k3v3"]  # wider tiles: no d128


def test_a_config_from_a_token_count_falls_back_to_the_defaults_below_it():
    from nqkernels.attention.launcher import call_config
    from nqkernels.runtime import AttentionConfig

    cfg = AttentionConfig(gluon_fused=True, programs_per_sm=4, min_pages_per_split=8, min_tokens=16384)
    assert call_config(cfg, 4, 4096) is cfg and call_config(cfg, 16, 1024) is cfg  # 16K tokens: the bucket's
    assert call_config(cfg, 8, 1024) == AttentionConfig() and call_config(cfg, 1, 4095) == AttentionConfig()
    passes = AttentionConfig(two_pass=True, gluon_values=True, min_tokens=16384)  # any config, not only the fused pass
    assert call_config(passes, 1, 16384) is passes and call_config(passes, 1, 8192) == AttentionConfig()
    plain = AttentionConfig(programs_per_sm=4)  # no threshold: the bucket's at any size
    assert call_config(plain, 1, 1) is plain


def test_tasks_name_the_launchers_buckets():
    tasks = make_tasks()
    assert {t.kernel for t in tasks} == set(KERNELS)
    assert len({(t.kernel, t.bucket) for t in tasks}) == len(tasks)
    assert tasks[0].bucket.startswith("d128_")  # the common head_dim first, for a bounded run
    quick = make_tasks(quick=True)
    assert {t.bucket for t in quick if t.kernel == "encode"} == {"d128_b3", "d128_b2"}
    # the Gluon keys pass reads bit planes: where 3-4 bit keys at head_dim 128 are "fields", it is not searched
    stages = {t.bucket: t.stages for t in tasks if t.kernel == "attention"}
    assert stages["d128_k4v4_g4_t32k_b16"][-1]["gluon_keys"] == [False]
    assert stages["d128_k2v2_g4_t32k_b16"][-1]["gluon_keys"] == [True]
    assert stages["d128_k3v2_g4_t32k_b16"][-1]["gluon_keys"] == [False]
    assert stages["d64_k3v2_g4_t32k_b16"][-1]["gluon_keys"] == [True]


def _cpu_timer(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@pytest.mark.skipif(not interpreted(), reason="the search launches kernels (Triton interpreter on CPU)")
def test_search_checks_every_candidate_and_a_broken_one_loses():
    # BT=24 is not a power of two: the kernel does not compile, so that candidate must lose, not crash the search.
    task = Task("filter", "d64_b2", "test", [{"BT": [16, 24], "num_warps": [1]}], cold_setup(64, 2, [40, 70], False),
                0.0)
    lines = []
    r = search(task, torch.device("cpu"), timer=_cpu_timer, log=lines.append)
    assert r["tried"] == 3 and r["failed"] == 1
    assert r["config"] in ({}, {"BT": 16, "num_warps": 1})
    assert len(r["default_us"]) == len(r["tuned_us"]) == 2
    assert any("'BT': 24" in line and "lost" in line for line in lines)


def _fake_task(times, wrong_warps=8):
    """A search over num_warps in (2, 8) of two problems whose timings come from ``times`` in call order; the
    "kernel" is wrong under ``wrong_warps``, so that config is never timed."""
    def setup(device):
        def check():
            return 1.0 if store._overrides.get("filter", {}).get("num_warps") == wrong_warps else 0.0
        return [lambda: None, lambda: None], check

    timer = iter(times)
    return Task("filter", "d64_b2", "test", [{"num_warps": [2, 8]}], setup, 0.0), lambda fn: next(timer)


def test_search_scores_by_geometric_mean_and_rejects_a_wrong_result():
    # default (5, 50), num_warps=2 (4, 40): 1.25x on both problems; confirmed by (5, 50) vs (4, 40) again.
    task, timer = _fake_task([5.0, 50.0, 4.0, 40.0, 5.0, 50.0, 4.0, 40.0])
    r = search(task, torch.device("cpu"), timer=timer, log=lambda s: None)
    assert r["config"] == {"num_warps": 2} and r["failed"] == 1 and r["speedup"] == pytest.approx(1.25)
    assert r["default_us"] == [5000.0, 50000.0] and r["tuned_us"] == [4000.0, 40000.0]


def test_search_keeps_the_default_when_a_win_does_not_confirm():
    lines = []
    # default, num_warps=2 (a 1.25x win), num_warps=8 (no better); then default and num_warps=2 again: a tie.
    task, timer = _fake_task([5.0, 50.0, 4.0, 40.0, 4.0, 40.0, 4.0, 40.0, 4.0, 40.0], wrong_warps=0)
    r = search(task, torch.device("cpu"), timer=timer, log=lines.append)
    assert r["config"] == {} and r["speedup"] == 1.0
    assert any("did not confirm" in line for line in lines)


def test_search_does_not_trade_one_end_for_the_other():
    # num_warps=2 halves the short problem but makes the long one 4% slower: a 1.39x geometric mean that the guard
    # (at most 3% slower on any problem) refuses.
    task, timer = _fake_task([5.0, 50.0, 2.5, 52.0], wrong_warps=8)
    r = search(task, torch.device("cpu"), timer=timer, log=lambda s: None)
    assert r["config"] == {} and r["tried"] == 3


def test_search_refines_from_a_recorded_winner():
    # start from the recorded {"num_warps": 2, "BT": 16} (1.25x); only BT is searched on top: BT=32 (1.6x) wins and
    # confirms; num_warps stays from the start.
    task, timer = _fake_task([5.0, 50.0, 4.0, 40.0, 3.125, 31.25, 5.0, 50.0, 3.125, 31.25], wrong_warps=8)
    r = search(task, torch.device("cpu"), timer=timer, log=lambda s: None, start={"num_warps": 2, "BT": 16},
               stages=[{"BT": [32]}])
    assert r["config"] == {"num_warps": 2, "BT": 32} and r["tried"] == 3
    assert r["speedup"] == pytest.approx(1.6)


def test_store_file_takes_the_records_winners_and_keeps_the_rest(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"_meta": {"device": "old"}, "encode": {"d64_b2": {"BLOCK_T": 128}},  # set by hand: kept
                                "attention": {"d128_k3v2_g4_t4k_b1": {"num_warps": 2},  # searched again: replaced
                                              "d128_k4v4_g4_t4k_b16": {"gluon_fused": True}}}))
    record = {"meta": {"device": "Test GPU", "gpu_key": "test-gpu", "date": "today", "torch": "t", "triton": "tr"},
              "buckets": {"attention": {"d128_k3v2_g4_t4k_b1": dict(config={"num_warps": 8}, default_us=[10.0, 20.0],
                                                                     tuned_us=[8.0, 16.0], speedup=1.25, tried=5,
                                                                     failed=0, shape="1x4096")}}}
    kept = write_store(path, record, record["meta"])
    data = json.loads(path.read_text())
    assert data["encode"] == {"d64_b2": {"BLOCK_T": 128}}
    assert data["attention"] == {"d128_k3v2_g4_t4k_b1": {"num_warps": 8}, "d128_k4v4_g4_t4k_b16": {"gluon_fused": True}}
    assert kept == ["attention/d128_k4v4_g4_t4k_b16", "encode/d64_b2"]
    assert data["_meta"]["device"] == "Test GPU"
    assert write_store(tmp_path / "new.json", record, record["meta"]) == []  # no file yet: the record's winners
    md = report_markdown(record)
    assert "| d128_k3v2_g4_t4k_b1 | 1x4096 | 10.0 / 20.0 | 8.0 / 16.0 | 1.25x |" in md


def test_tune_needs_a_gpu_and_names_bad_kernels(capsys):
    if not torch.cuda.is_available():
        assert tune_main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune_main(["--kernels", "attention,warp"])
    assert "unknown ['warp']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tune_main(["--buckets", "d128_(k3"])
    assert "--buckets: not a regular expression" in capsys.readouterr().err


def test_launch_configs_are_typed_and_a_bad_key_is_named():
    """launch_config answers the kernel's typed config; a store entry or override with a key that is not one of its
    fields is an error naming the key and the allowed ones (never silently ignored)."""
    from nqkernels.runtime import AttentionConfig, launch_config

    cfg = launch_config("attention", "d128_k3v2", torch.device("cpu"))
    assert isinstance(cfg, AttentionConfig) and cfg == AttentionConfig()
    with override("attention", {"two_pass": True, "num_warp": 8}):
        with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['num_warp'\].*num_warps"):
            launch_config("attention", "d128_k3v2", torch.device("cpu"))


def test_every_shipped_entry_is_a_valid_config():
    """Every bucket of every shipped GPU file (nqkernels/configs/) builds its kernel's typed config."""
    from nqkernels.runtime import CONFIGS

    files = sorted(store.CONFIG_DIR.glob("*.json"))
    assert files
    for path in files:
        for kernel, buckets in json.loads(path.read_text()).items():
            if kernel == "_meta":
                continue
            for bucket, entry in buckets.items():
                cfg = CONFIGS[kernel].from_dict(kernel, {**CONFIGS[kernel]().as_dict(), **entry})
                assert cfg.as_dict()["num_warps"] >= 1, (path.name, kernel, bucket)
