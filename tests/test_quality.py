"""perf.quality: preset parsing, the harness's no-op control (must reproduce the plain model), compressed presets on a
tiny random Llama (kernels under the interpreter), and the fixture's evict50 row (torch reference path)."""
import json
import math
import os

import pytest
import torch

from .conftest import FIXTURE
from perf.quality import Harness, Preset, held_bytes, main, nominal_bits, parse_preset, passkey_prompts

transformers = pytest.importorskip("transformers")
MODEL = os.path.join(FIXTURE, "llama-tiny-hd128")


def test_parse_presets():
    assert parse_preset("fp16").noop
    assert parse_preset("k3v2") == Preset("k3v2", bits=(3, 2))
    assert parse_preset("evict50") == Preset("evict50", evict=0.5)
    p = parse_preset("k2v4-evict75-knorm-pyramid")
    assert (p.bits, p.evict, p.scorer, p.schedule) == ((2, 4), 0.75, "knorm", "pyramid")
    assert parse_preset("evict25-window-layer").scorer == "window-layer"
    assert parse_preset("kvpress-tova-50").press == "tova"
    assert parse_preset("balanced").bits == (3, 2)
    assert parse_preset("hf-balanced+boundary1-k4v4") == Preset("hf-balanced+boundary1-k4v4", hf="balanced", options={
        "boundary_layers": 1, "boundary_bits": (4, 4)})
    assert parse_preset("nexusquant-k3v2") == Preset("nexusquant-k3v2", bits=(3, 2), peer="nexusquant")
    assert parse_preset("hqq-int3") == Preset("hqq-int3", bits=(3, 3), peer="hqq")
    assert parse_preset("k3v2-alloc") == Preset("k3v2-alloc", bits=(3, 2), options={"alloc": True, "extra_bits": 0})
    assert parse_preset("k2v2-alloc+1").options == {"alloc": True, "extra_bits": 1}
    assert parse_preset("quanto-int2").streams and parse_preset("hf-k3v2").streams
    assert not parse_preset("nexusquant-k4v4").streams and not parse_preset("nexusquant-k4v4").noop
    assert [nominal_bits(parse_preset(n)) for n in ("fp16", "balanced", "hf-near-lossless", "quanto-int4", "k3v2-alloc",
                                                    "k2v2-alloc+1")] == [None, "K3V2", "K4V4", "K4V4", "K3V2", "K2V2+1"]
    for bad, match in (("k5v2", "unknown preset"), ("evict50-foo", "unknown scorer"),
                       ("kvpress-bar-50", "kvpress press"), ("q8", "unknown preset"), ("hf-huge", "unknown preset"),
                       ("hf-balanced+foo", "unknown policy variant"), ("quanto-int3", "must be one of \\(2, 4\\)"),
                       ("hqq-int5", "must be one of"), ("nexusquant-k5v2", "unknown preset")):
        with pytest.raises(ValueError, match=match):
            parse_preset(bad)


def tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, vocab_size=97, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    chunks = [torch.randint(3, 97, (1, 160)) for _ in range(2)]
    return model, chunks


def test_noop_control_and_presets_on_a_tiny_model(tiny):
    model, chunks = tiny
    h = Harness(model, sinks=2, recent=8, window=8, pool=5, page_size=16)
    plain = h.plain_ppl(chunks, 128)
    noop, bpt, _ = h.continuation(parse_preset("fp16"), chunks, 128)
    assert round(noop, 4) == round(plain, 4) and bpt == h.fp16_bytes_per_token == 2 * 2 * 2 * 64 * 2
    for name in ("k3v2", "evict50", "k3v2-evict50", "evict50-knorm", "evict50-window-layer-pyramid"):
        ppl, bpt, _ = h.continuation(parse_preset(name), chunks, 128)
        assert ppl > 1.0 and 0 < bpt < h.fp16_bytes_per_token, name
    # bytes are the allocated tensors': K3V2 codes+scales (24+2 and 16+2 bytes at head_dim 64) plus buffers
    _, bpt, _ = h.continuation(parse_preset("k3v2"), chunks, 128)
    assert bpt >= 2 * 2 * (26 + 18)


def test_alloc_preset_keeps_the_bytes_of_its_budget(tiny, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, chunks = tiny
    with pytest.raises(ValueError, match="calibration"):
        Harness(model, page_size=16).continuation(parse_preset("k3v2-alloc"), chunks, 128)
    h = Harness(model, sinks=2, recent=8, window=8, pool=5, page_size=16,
                calibration=torch.randint(3, 97, (2, 160), generator=torch.Generator().manual_seed(5)),
                calibration_prefix=128)
    _, uniform, _ = h.continuation(parse_preset("k3v2"), chunks, 128)
    ppl, allocated, _ = h.continuation(parse_preset("k3v2-alloc"), chunks, 128)
    bits = h.layer_bits(parse_preset("k3v2-alloc"))
    assert ppl > 1.0 and sum(k + v for k, v in bits) == 2 * 5 and allocated == uniform  # same bytes, whatever moved


def test_alloc_needs_calibration_text_other_than_the_evaluation_text(capsys):
    text = os.path.join(FIXTURE, "text", "eval_pydocs.txt")
    for extra, match in (([], "--calibration-text FILE"), (["--calibration-text", text], "must not be the evaluation"),
                         (["--calibration-text", __file__, "--calibration-chunks", "0"],
                          "--calibration-chunks must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            main(["--model", MODEL, "--text", text, "--preset", "k3v2-alloc"] + extra)
        assert match in capsys.readouterr().err
    with pytest.raises(SystemExit):  # calibration text no preset reads: refused, not silently ignored
        main(["--model", MODEL, "--text", text, "--preset", "k3v2", "--calibration-text", __file__])
    assert "--calibration-text is only read by kXvY-alloc presets" in capsys.readouterr().err


def _fake_allocation(calls: list, bits: dict):
    """A stand-in for allocate_layer_bits recording what it is called with (the model's attention then included)."""
    def allocate(model, input_ids, key_bits, value_bits, extra_bits=0, prefix=None, rounds=2, progress=None,
                 policy=None):
        calls.append(("alloc", model.config._attn_implementation, tuple(input_ids.shape), prefix, extra_bits,
                      policy.compress_sliding))
        return bits[key_bits, value_bits, extra_bits]
    return allocate


def test_alloc_is_computed_once_with_the_model_attention_and_the_evaluation_prefix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, chunks, calls = tiny_llama(), [torch.randint(3, 97, (1, 160)) for _ in range(2)], []
    plain_impl = model.config._attn_implementation
    monkeypatch.setattr("integrations.hf.allocate_layer_bits", _fake_allocation(calls, {(3, 2, 0): (None, (3, 2))}))
    calibration = torch.randint(3, 97, (2, 160), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="calibration_prefix is required"):
        Harness(model, calibration=calibration)
    h = Harness(model, sinks=2, recent=8, window=8, pool=5, page_size=16, calibration=calibration,
                calibration_prefix=100)
    _, uniform, _ = h.continuation(parse_preset("k3v2"), chunks, 128)  # leaves the harness's attention set
    _, allocated, _ = h.continuation(parse_preset("k3v2-alloc"), chunks, 128)
    h.continuation(parse_preset("k3v2-alloc"), chunks, 128)
    assert calls == [("alloc", plain_impl, (2, 160), 100, 0, True)] and plain_impl != h.attn.name
    assert uniform < allocated < h.fp16_bytes_per_token  # layer 0 left fp16 by the allocation is held fp16


def test_main_allocates_before_any_preset_runs_at_the_evaluation_prefix(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model, calls = tiny_llama(), []
    plain_impl = model.config._attn_implementation
    monkeypatch.setattr("perf.quality.load_model", lambda path, dtype: (Tok(), model))
    monkeypatch.setattr("perf.quality.load_chunks", lambda tok, path, n, length: [
        torch.randint(3, 97, (1, length), generator=torch.Generator().manual_seed(i)) for i in range(n)])
    monkeypatch.setattr("integrations.hf.allocate_layer_bits", _fake_allocation(
        calls, {(3, 2, 0): ((2, 3), (4, 2)), (2, 2, 1): ((3, 2), (2, 2))}))
    evaluate = Harness.continuation
    monkeypatch.setattr(Harness, "continuation", lambda self, preset, *a, **k: (
        calls.append(("eval", preset.name)), evaluate(self, preset, *a, **k))[1])
    result = main(["--model", "tiny", "--text", __file__, "--calibration-text", os.path.join(FIXTURE, "x.txt"),
                   "--calibration-chunks", "3", "--chunks", "1", "--prefix", "128", "--continuation", "32",
                   "--preset", "k3v2-alloc", "--preset", "k2v2-alloc+1"])
    assert calls == [("alloc", plain_impl, (3, 160), 128, 0, True), ("alloc", plain_impl, (3, 160), 128, 1, True),
                     ("eval", "fp16"), ("eval", "k3v2-alloc"), ("eval", "k2v2-alloc+1")]
    rows = result["presets"]
    assert rows["k2v2-alloc+1"]["bits"] == "K2V2+1" and rows["k2v2-alloc+1"]["layer_bits"] == [(3, 2), (2, 2)]
    assert rows["k3v2-alloc"]["bits"] == "K3V2" and "| k2v2-alloc+1 | K2V2+1 |" in capsys.readouterr().out


def test_hf_presets_run_through_the_integration(tiny):
    model, chunks = tiny
    h = Harness(model, sinks=2, recent=8, window=8, pool=5, page_size=16)
    plain_impl = model.config._attn_implementation
    plain = h.plain_ppl(chunks, 128)
    for name in ("hf-k4v4", "hf-k4v4+keep-head0", "hf-balanced-evict50", "hf-balanced+graduated"):
        ppl, bpt, _ = h.continuation(parse_preset(name), chunks, 128)
        assert ppl > 1.0 and bpt > 0, name
        if name.startswith("hf-k4v4"):  # the prompt fits the fp16 sinks + window; 64 tokens are quantized later
            assert abs(ppl - plain) < 2e-3 * plain, name
    assert model.config._attn_implementation == plain_impl and getattr(model, "_nq_patch", None) is None


def test_held_bytes_counts_fp_elements_at_two_bytes_and_walks_containers():
    fp, codes = torch.randn(3, 5), torch.zeros(7, dtype=torch.uint8)
    assert held_bytes(fp) == 30 and held_bytes(fp.double(), fp_element_bytes=4) == 60
    assert held_bytes([(fp, codes), {"scale": fp, "shape": (3, 5)}, None]) == 30 + 7 + 30


@pytest.mark.parametrize("name", ["quanto-int4", "hqq-int4", "hqq-int2", "nexusquant-k4v4", "nexusquant-k2v2"])
def test_peer_presets_run_through_the_harness(tiny, name):
    pytest.importorskip({"quanto": "optimum.quanto", "hqq": "hqq", "nexusquant": "nexusquant"}[name.split("-")[0]])
    model, chunks = tiny
    h = Harness(model, sinks=2, recent=8, window=8, pool=5, page_size=16)
    plain = h.plain_ppl(chunks, 128)
    ppl, bpt, decoding = h.continuation(parse_preset(name), chunks, 128)
    assert math.isfinite(ppl) and ppl > 1.0
    if name.startswith("nexusquant"):  # it writes dequantized fp16 back: nothing saved
        assert bpt == h.fp16_bytes_per_token and decoding is None
    else:  # packed codes plus fp16 scale and zero point per group of 64; the fp16 residual fills while decoding
        bits = int(name[-1])
        assert bpt == h.fp16_bytes_per_token * (bits + 0.5) / 16 and decoding > bpt
    if name.endswith(("int4", "k4v4")):
        assert abs(ppl / plain - 1) < 0.05, name
    assert model.config._attn_implementation == h.plain_impl


class Tok:  # a byte-level stand-in tokenizer (tests/test_turboquant.py uses it too)
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        return type("E", (), {"input_ids": [3 + (b % 90) for b in text.encode()]})()

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_passkey_prompts_and_retrieval_runs(tiny):
    model, _ = tiny
    prompts = passkey_prompts(Tok(), __file__, 3, 200)
    assert all(ids.shape == (1, 200) for ids, _ in prompts)
    acc = Harness(model, sinks=2, recent=8, window=8, pool=5, page_size=16).passkey(parse_preset("evict50"), prompts,
                                                                                     Tok())
    assert 0.0 <= acc <= 1.0


@pytest.mark.skipif(not os.path.isdir(MODEL), reason="fixture model not found (set NQ_FIXTURE_DIR)")
def test_fixture_control_and_evict50(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch reference path; the kernel equals it (test_scoring)
    text = os.path.join(FIXTURE, "text", "eval_pydocs.txt")
    result = main(["--model", MODEL, "--text", text, "--chunks", "2", "--preset", "evict50", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["presets"].keys() == {"fp16", "evict50"}
    assert round(result["presets"]["fp16"]["ppl"], 4) == round(result["plain_model_ppl"], 4)
    row = result["presets"]["evict50"]
    assert row["compression_ratio"] == 2.0 and 0 < row["ppl_delta_pct"] < 2.0


def test_missing_model_or_text_says_what_and_where(tmp_path, monkeypatch):
    """No fixture (a fresh clone without ../shared): the harnesses say what is missing and how to point at a model."""
    import perf.codec_study

    text = tmp_path / "t.txt"
    text.write_text("some text " * 50)
    for run in (lambda: main(["--model", str(tmp_path / "none"), "--text", str(text)]),
                lambda: main(["--model", str(tmp_path), "--text", str(text)]),  # a folder with no model in it
                lambda: main(["--model", MODEL, "--text", str(tmp_path / "none.txt")]),
                lambda: (monkeypatch.setattr("sys.argv", ["codec_study", "--model", str(tmp_path / "none")]),
                         perf.codec_study.main())):
        with pytest.raises(SystemExit, match="NQ_FIXTURE_DIR.*--model DIR"):
            run()
