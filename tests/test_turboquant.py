"""perf.turboquant (TurboQuant, arXiv 2504.19874, as a quality peer) and perf.quality's --needle / --question: the
Lloyd-Max codebooks are MSE-optimal, the rotation is orthogonal, the QJL estimator is unbiased and equals the
dequantized key's dot product, bytes are the packed form, presets parse, and passkey templates are validated."""
import math
import os

import numpy as np
import pytest
import torch

from perf import turboquant as tq
from tests.test_quality import Tok
from .conftest import FIXTURE
from perf.quality import (NEEDLE, QUESTION, Harness, Preset, check_templates, main, nominal_bits, parse_preset,
                          passkey_prompts)

MODEL = os.path.join(FIXTURE, "llama-tiny-hd128")


def sphere_coordinates(d: int, n: int, seed: int = 0) -> np.ndarray:
    """All coordinates of n uniform points on the unit sphere in R^d (what a Haar rotation makes of a unit vector)."""
    g = np.random.default_rng(seed).standard_normal((n, d))
    return (g / np.linalg.norm(g, axis=1, keepdims=True)).ravel()


def empirical_mse(samples: np.ndarray, centroids) -> float:
    c = np.sort(np.asarray(centroids))
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, samples)
    return float(np.mean((samples - c[idx]) ** 2))


# -- codebooks ---------------------------------------------------------------------------------------------------
def test_lloyd_max_one_bit_is_the_closed_form_and_d_times_mse_is_the_papers():
    for d in (8, 64, 128):  # 1 bit: +-E|X|, E|X| = Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))
        e_abs = math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
        assert tq.lloyd_max(1, d) == pytest.approx((-e_abs, e_abs), rel=1e-6)
    # the paper's distortion of TurboQuant_mse per unit vector at b = 1..4: ~0.36, 0.117, 0.03, 0.009
    got = [128 * tq.codebook_mse(tq.lloyd_max(b, 128), 128) for b in (1, 2, 3, 4)]
    assert got == pytest.approx([0.36, 0.117, 0.034, 0.0093], rel=0.03)
    assert all(len(tq.lloyd_max(b, 128)) == 2 ** b for b in (1, 2, 3, 4))


def test_lloyd_max_two_bits_beats_every_symmetric_codebook_of_a_brute_force_grid():
    d = 12  # far from Gaussian: the exact coordinate density matters
    x = sphere_coordinates(d, 100_000)
    ours = tq.lloyd_max(2, d)
    a, b = np.meshgrid(np.linspace(0.02, 0.3, 141), np.linspace(0.2, 0.8, 301), indexing="ij")
    best, arg = math.inf, None
    xs = np.sort(np.abs(x))  # symmetric codebook (-b, -a, a, b): the error depends on |x| only
    cums, cums2 = np.concatenate([[0], np.cumsum(xs)]), np.concatenate([[0], np.cumsum(xs ** 2)])
    for ai, bi in zip(a.ravel(), b.ravel()):
        if bi <= ai:
            continue
        k = np.searchsorted(xs, (ai + bi) / 2)  # |x| below the midpoint rounds to a, above to b
        err = (cums2[k] - 2 * ai * cums[k] + ai * ai * k
               + (cums2[-1] - cums2[k]) - 2 * bi * (cums[-1] - cums[k]) + bi * bi * (len(xs) - k))
        if err < best:
            best, arg = err, (ai, bi)
    best /= len(xs)
    assert empirical_mse(x, ours) <= best * (1 + 1e-3)
    assert ours[2:] == pytest.approx(arg, abs=0.005)  # the grid's argmin, within the grid step
    assert tq.codebook_mse(ours, d) == pytest.approx(empirical_mse(x, ours), rel=0.01)  # the integral is right


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_is_a_fixed_point_and_a_local_minimum(bits):
    d = 32
    c = np.array(tq.lloyd_max(bits, d))
    x = sphere_coordinates(d, 20_000, seed=bits)
    idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
    for i in range(len(c)):  # every centroid is its cell's conditional mean
        cell = x[idx == i]
        assert abs(cell.mean() - c[i]) < 5 * cell.std() / math.sqrt(len(cell)) + 1e-6
    base = tq.codebook_mse(c, d)
    eps = 0.01 / math.sqrt(d) / 2 ** bits
    for i in range(len(c)):  # moving any centroid either way costs distortion
        for s in (-eps, eps):
            moved = c.copy()
            moved[i] += s
            assert tq.codebook_mse(moved, d) > base


def test_lloyd_max_rejects_bad_arguments():
    for bits, d in ((0, 64), (9, 64), (2, 2), (2.0, 64)):
        with pytest.raises(ValueError, match="bits"):
            tq.lloyd_max(bits, d)


# -- rotation, packing ---------------------------------------------------------------------------------------------
def test_rotation_is_orthogonal_seeded_and_spreads_a_vector_uniformly():
    for d in (16, 128):
        p = tq.random_rotation(d, seed=3).double()
        assert torch.allclose(p @ p.T, torch.eye(d, dtype=torch.float64), atol=1e-5)
        assert abs(abs(torch.linalg.det(p).item()) - 1) < 1e-4
    assert torch.equal(tq.random_rotation(32, 1), tq.random_rotation(32, 1))
    assert not torch.allclose(tq.random_rotation(32, 1), tq.random_rotation(32, 2))
    # a fixed unit vector through many rotations: each coordinate has variance 1/d (uniform on the sphere)
    d = 16
    e = torch.zeros(d)
    e[0] = 1
    coords = torch.stack([tq.random_rotation(d, s) @ e for s in range(2000)])
    assert coords.pow(2).mean().item() == pytest.approx(1 / d, rel=0.05)
    assert coords.mean().abs().item() < 0.01


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pack_bits_round_trips_at_the_bit_width(bits):
    codes = torch.randint(0, 2 ** bits, (3, 2, 37))
    packed = tq.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, math.ceil(37 * bits / 8))
    assert torch.equal(tq.unpack_bits(packed, bits, 37), codes)


# -- the quantizers ------------------------------------------------------------------------------------------------
def test_mse_quantizer_distortion_is_the_codebooks():
    d, bits = 64, 3
    q = tq.TurboQuant(d, bits, seed=7)
    x = torch.randn(4000, d) * 3.0
    xh = q.decode(q.encode(x))
    rel = ((x - xh).pow(2).sum(-1) / x.pow(2).sum(-1)).mean().item()
    assert rel == pytest.approx(d * tq.codebook_mse(tq.lloyd_max(bits, d), d), rel=0.05)


def test_qjl_estimator_is_unbiased_over_sketches_and_the_mse_one_is_not():
    d = 32
    g = torch.Generator().manual_seed(0)
    k, qv = torch.randn(1, d, generator=g), torch.randn(1, d, generator=g)
    true = (qv @ k.T).item()
    prod, mse = [], []
    for s in range(3000):  # a fresh rotation and sketch each time: the expectation is over the randomness
        quant = tq.TurboQuant(d, 2, qjl=True, seed=1000 + 2 * s)
        prod.append(quant.inner_product(qv, quant.encode(k)).item())
        one_bit = tq.TurboQuant(d, 1, seed=1000 + 2 * s)
        mse.append(one_bit.inner_product(qv, one_bit.encode(k)).item())
    prod, mse = np.array(prod), np.array(mse)
    assert abs(prod.mean() - true) < 4 * prod.std() / math.sqrt(len(prod)) + 2e-3 * abs(true)
    # the 1-bit MSE quantizer shrinks inner products by about 2/pi: biased, which is what the QJL bit removes
    assert mse.mean() / true == pytest.approx(2 / math.pi, rel=0.1)
    assert abs(mse.mean() - true) > 10 * mse.std() / math.sqrt(len(mse))


def test_dequantized_keys_give_exactly_the_papers_estimator():
    d = 64
    quant = tq.TurboQuant(d, 3, qjl=True, seed=11)
    k, q = torch.randn(2, 50, d), torch.randn(2, 7, d)
    enc = quant.encode(k)
    via_attention = q @ quant.decode(enc).transpose(-1, -2)
    assert torch.allclose(via_attention, quant.inner_product(q, enc), rtol=1e-4, atol=1e-4)
    # and the reconstruction is better than the 2-bit codebook alone on inner products (it adds the residual's)
    mse_only = q @ (quant._unit_mse(enc) * enc["norm"].float()).transpose(-1, -2)
    true = q @ k.transpose(-1, -2)
    assert (via_attention - true).abs().mean() < (mse_only - true).abs().mean() * 1.5


def test_prod_needs_two_bits():
    with pytest.raises(ValueError, match="bits >= 2"):
        tq.TurboQuant(16, 1, qjl=True)


# -- bytes ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,qjl,expected", [(3, False, 48 + 2), (2, False, 32 + 2), (4, False, 64 + 2),
                                               (3, True, 32 + 16 + 2 + 2), (2, True, 16 + 16 + 4),
                                               (5, True, 64 + 16 + 4)])
def test_bytes_are_the_packed_codes_signs_and_fp16_norms(bits, qjl, expected):
    quant = tq.TurboQuant(128, bits, qjl=qjl, seed=0)
    enc = quant.encode(torch.randn(2, 3, 10, 128))
    assert quant.bytes_per_vector == expected
    assert sum(t.nbytes for t in enc.values()) == 2 * 3 * 10 * expected
    assert enc["codes"].dtype == torch.uint8 and enc["norm"].dtype == torch.float16
    if qjl:
        assert enc["signs"].shape[-1] == 16 and enc["rnorm"].dtype == torch.float16
    # the fixture's shape (6 layers, 2 KV heads, head_dim 128): K3V2 is 1032 bytes per token (prod), 1008 (mse)
    assert tq.TurboQuantKV(6, 128, 3, 2, qjl_keys=True).bytes_per_token(2) == 12 * (52 + 34) == 1032
    assert tq.TurboQuantKV(6, 128, 3, 2, qjl_keys=False).bytes_per_token(2) == 1008


# -- presets and the harness ---------------------------------------------------------------------------------------
def test_preset_parsing():
    assert parse_preset("turboquant-k3v2") == Preset("turboquant-k3v2", bits=(3, 2), peer="turboquant")
    assert parse_preset("turboquant-mse-k2v2") == Preset("turboquant-mse-k2v2", bits=(2, 2), peer="turboquant-mse")
    assert parse_preset("turboquant-k5v4").bits == (5, 4) and parse_preset("turboquant-mse-k1v1").bits == (1, 1)
    assert nominal_bits(parse_preset("turboquant-k3v2")) == "K3V2"
    p = parse_preset("turboquant-k4v4")
    assert not p.noop and not p.streams
    for bad in ("turboquant-k1v2", "turboquant-mse-k5v2", "turboquant-k3v5", "turboquant-k3v0", "turboquant-k3",
                "turboquant-mse", "turboquant-prod-k3v2", "turboquant-k3v2-evict50", "turboquantk3v2"):
        with pytest.raises(ValueError, match="TurboQuant|turboquant"):
            parse_preset(bad)


@pytest.fixture(scope="module")
def tiny():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, vocab_size=97, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, [torch.randint(3, 97, (1, 160)) for _ in range(2)]


def test_turboquant_presets_run_through_the_harness(tiny):
    model, chunks = tiny
    h = Harness(model, sinks=2, recent=8, window=8, pool=5, page_size=16)
    plain = h.plain_ppl(chunks, 128)
    for name, per_head in (("turboquant-k4v4", (24 + 8 + 4) + (32 + 2)), ("turboquant-mse-k2v2", 2 * (16 + 2))):
        ppl, bpt, decoding = h.continuation(parse_preset(name), chunks, 128)
        assert math.isfinite(ppl) and decoding is None
        assert bpt == 2 * 2 * per_head  # 2 layers x 2 KV heads, the stored form exactly
        if name == "turboquant-k4v4":
            assert abs(ppl / plain - 1) < 0.02


@pytest.mark.skipif(not os.path.isdir(MODEL), reason="fixture model not found (set NQ_FIXTURE_DIR)")
def test_fixture_turboquant_row(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    text = os.path.join(FIXTURE, "text", "eval_pydocs.txt")
    result = main(["--model", MODEL, "--text", text, "--chunks", "1", "--preset", "turboquant-mse-k4v4", "--json"])
    row = result["presets"]["turboquant-mse-k4v4"]
    assert row["bytes_per_token"] == 12 * 2 * 66 and row["bits"] == "K4V4" and 0 < row["ppl_delta_pct"] < 2


# -- --needle / --question -----------------------------------------------------------------------------------------
def test_check_templates_accepts_good_ones_and_says_what_is_wrong():
    check_templates(NEEDLE, QUESTION)
    check_templates("The code {{not a field}} is {key}.", "What is the code? It is")
    check_templates("{key} is the key, {key}!", "Key:")
    for needle, question, match in (
            ("The pass key is 12345.", QUESTION, "must contain '\\{key\\}'"),
            ("The {kind} key is {key}.", QUESTION, "fields other than \\{key\\}: \\{kind\\}"),
            ("The key is {}.", QUESTION, "must contain"),
            ("The key is {key", QUESTION, "not a valid template"),
            ("The key } is {key}", QUESTION, "not a valid template"),
            ("  {key} ", QUESTION, "only the key"),
            (NEEDLE, "   ", "must not be empty"),
            (NEEDLE, "The key is {key}", "must not give the key away"),
            (None, QUESTION, "must be strings")):
        with pytest.raises(ValueError, match=match):
            check_templates(needle, question)


def test_passkey_prompts_use_the_templates():
    tok = Tok()
    prompts = passkey_prompts(tok, __file__, 3, 300, needle="<<{key}>>", question=" Code:")
    for ids, key in prompts:
        ids = ids[0].tolist()
        needle = tok(f"<<{key}>>").input_ids
        assert ids[-len(tok(" Code:").input_ids):] == tok(" Code:").input_ids and len(ids) == 300
        assert any(ids[i:i + len(needle)] == needle for i in range(len(ids)))
    with pytest.raises(ValueError, match="must contain"):
        passkey_prompts(tok, __file__, 1, 300, needle="no key")


@pytest.mark.parametrize("argv,message", [
    (["--passkey", "2", "--needle", "no key here"], "must contain '{key}'"),
    (["--passkey", "2", "--needle", "{a} {key}"], "fields other than {key}"),
    (["--passkey", "2", "--question", "is it {key}?"], "must not give the key away"),
    (["--needle", "The key is {key}."], "add --passkey N"),
])
def test_cli_rejects_bad_templates_before_loading_anything(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # the model does not exist: the templates are checked first
        main(["--model", str(tmp_path / "none"), "--text", str(tmp_path / "none.txt")] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_documents_the_templates(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--needle" in out and "--question" in out and "{key}" in out
