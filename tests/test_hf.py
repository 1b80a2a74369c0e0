"""integrations.hf: transformers models on the compressed cache (tiny random configs built in memory, and the
fixture model). The oracle of a compressed decode step is the plain model attending over the dequantized cache."""
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from integrations.hf import (PRESETS, CompressedLayer, NQCache, Policy, compress,  # noqa: E402
                             graduated_bits, patch, resolve, unpatch, with_cache)
from .conftest import FIXTURE  # noqa: E402

ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma2")


def tiny(arch="llama", head_dim=64, heads=4, kv_heads=2, layers=2, **kw):
    """A small random model of ``arch`` (fp32, eval) with the given attention shape."""
    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "phi3": "Phi3Config",
           "gemma2": "Gemma2Config"}[arch]
    extra = {"phi3": dict(pad_token_id=0, eos_token_id=1, bos_token_id=2),
             "gemma2": dict(sliding_window=24, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                            query_pre_attn_scalar=head_dim, head_dim=head_dim),
             "mistral": dict(sliding_window=None, head_dim=head_dim), "llama": dict(head_dim=head_dim)}.get(arch, {})
    extra.update(kw)
    cfg = getattr(transformers, cls)(hidden_size=heads * head_dim, intermediate_size=128, num_hidden_layers=layers,
                                     num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=128,
                                     max_position_embeddings=1024, **extra)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def prompt(n, batch=1, seed=1):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


SMALL = dict(fp_window=16, page_size=16, sinks=2, recent=8, window=8, pool=3)  # pages fill on short prompts


def oracle_cache(model, cache: NQCache, drop: int, before: dict) -> DynamicCache:
    """A DynamicCache holding what the compressed cache's attention saw in its last step of ``drop`` tokens: every
    token before them (pages dequantized, fp window and sinks, kept heads), in token order; uncompressed layers'
    K/V as they were before the step (``before``)."""
    dc = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, CompressedLayer):
            K, V, _ = layer.hot.dense()
            if layer.kept_k is not None:
                comp, keep = cache.head_split
                n = layer.kept_lens[0]
                full = K.new_empty(K.shape[0], K.shape[1], cache.num_kv_heads, K.shape[3])
                fullv = torch.empty_like(full)
                full[:, :, comp], fullv[:, :, comp] = K, V
                full[:, :, keep] = layer.kept_k[:, :, :n].transpose(1, 2).float()
                fullv[:, :, keep] = layer.kept_v[:, :, :n].transpose(1, 2).float()
                K, V = full, fullv
            K, V = K.transpose(1, 2), V.transpose(1, 2)
            K, V = K[:, :, :-drop], V[:, :, :-drop]
        else:
            K, V = before[i]
        dc.update(K.to(model.dtype).contiguous(), V.to(model.dtype).contiguous(), i)
    return dc


def step_vs_oracle(model, preset, ids, nxt=None, **options):
    """Logits of one decode step (``nxt``, default one token) through the compressed cache, and through the plain
    model over what that step attended to (the dequantized cache) at the same, true positions."""
    nxt = (prompt(1, ids.shape[0], seed=9) if nxt is None else nxt).to(ids.device)
    pos = torch.arange(ids.shape[1], ids.shape[1] + nxt.shape[1], device=ids.device).expand(ids.shape[0], -1)
    with compress(model, preset, **options) as state, torch.no_grad():
        cache = state.new_cache(model)
        model(ids, **with_cache(model, cache), use_cache=True)
        assert cache.compressed
        before = {i: (l.keys.clone(), l.values.clone()) for i, l in enumerate(cache.layers)
                  if not isinstance(l, CompressedLayer)}
        got = model(nxt, **with_cache(model, cache), position_ids=pos, use_cache=True).logits
        dc = oracle_cache(model, cache, nxt.shape[1], before)
        want = model(nxt, **with_cache(model, dc), position_ids=pos, use_cache=True).logits
    return got, want, cache


# ---------------------------------------------------------------------------------------------------------------
def test_noop_control_is_exact():
    model = tiny()
    ids = prompt(70)
    plain = model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with compress(model, "k4v4", keep_layers=(0, 1), **SMALL) as state:
        ours = model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True,
                              return_dict_in_generate=True)
        assert isinstance(state.last_cache, NQCache) and not state.last_cache.compressed
    assert torch.equal(plain.sequences, ours.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, ours.scores))
    assert model.config._attn_implementation == "sdpa"  # unpatched


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset", ["k3v2", "k2v2-evict50"])
def test_step_matches_dequantized_oracle(arch, preset, reference_mode):
    model = tiny(arch)
    got, want, cache = step_vs_oracle(model, preset, prompt(77), **SMALL)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    compressed = [l for l in cache.layers if isinstance(l, CompressedLayer)]
    assert compressed and all(l.hot.compressed_lens()[0] > 0 for l in compressed)
    if arch == "gemma2":  # sliding layers left alone next to full-attention layers
        assert [isinstance(l, CompressedLayer) for l in cache.layers] == [False, True]


@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 4, 4), (96, 6, 2), (128, 4, 1), (256, 2, 2)])
def test_head_dims_and_gqa(head_dim, heads, kv_heads, reference_mode):
    model = tiny("llama", head_dim=head_dim, heads=heads, kv_heads=kv_heads)
    got, want, _ = step_vs_oracle(model, "k3v2", prompt(50), **SMALL)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_kernels_under_interpreter():
    """The same oracle with the Triton kernels (encode, decode attention, scoring) in the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs under TRITON_INTERPRET=1")
    model = tiny("llama")
    got, want, _ = step_vs_oracle(model, "k3v2-evict50", prompt(61), **SMALL)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (compiled kernels)")
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("preset", ["k3v2", "k2v2-evict50"])
def test_cuda_kernels_match_oracle(arch, preset):
    model = tiny(arch, head_dim=128).to("cuda", torch.float16)
    got, want, _ = step_vs_oracle(model, preset, prompt(200).cuda(), nxt=prompt(3, seed=4), compress_sliding=True,
                                  **SMALL)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_speculative_chunk_and_crop(reference_mode):
    """A q_len > 1 step (assisted decoding's candidates) equals its oracle; crop drops rejected tokens."""
    model = tiny("qwen2")
    ids = prompt(64)
    got, want, cache = step_vs_oracle(model, "k3v2", ids, nxt=prompt(5, seed=4), **SMALL)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert cache.get_seq_length() == 69
    cache.crop(-3)
    assert cache.get_seq_length() == 66
    assert all(l.hot.seq_lens() == [66] for l in cache.layers)
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(-40)


def test_assisted_decoding_matches_greedy(reference_mode):
    model = tiny("llama", layers=3)
    draft = tiny("llama", layers=1)
    ids = prompt(60)
    with compress(model, "k4v4", **SMALL):
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
        assisted = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft)
    assert torch.equal(greedy, assisted)


@pytest.mark.parametrize("preset", ["k3v2", "k3v2-evict50"])
def test_batch_of_mixed_lengths_equals_each_alone(preset, reference_mode):
    model = tiny("llama")
    a, b = prompt(70, seed=2), prompt(45, seed=3)
    ids = torch.zeros(2, 70, dtype=torch.long)
    ids[0], ids[1, 25:] = a[0], b[0]
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :25] = 0
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with compress(model, preset, **SMALL):
        both = model.generate(ids, attention_mask=mask, **kw)
        alone = [model.generate(x, **kw) for x in (a, b)]
    for row, single in enumerate(alone):
        assert torch.equal(both.sequences[row, 70:], single.sequences[0, -6:])
        for s_both, s_single in zip(both.scores, single.scores):
            torch.testing.assert_close(s_both[row], s_single[0], atol=2e-3, rtol=2e-3)


def test_right_padding_is_refused(reference_mode):
    model = tiny()
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    with compress(model, "k3v2", **SMALL), pytest.raises(ValueError, match="left padding"):
        model.generate(prompt(40, 2), attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_multi_turn_never_recompresses(reference_mode):
    model = tiny("llama")
    turn1 = prompt(60)
    with compress(model, "k3v2", **SMALL):
        cache = NQCache(model, "k3v2", **SMALL)
        out1 = model.generate(turn1, **with_cache(model, cache), max_new_tokens=4, do_sample=False)
        layer = cache.layers[0]
        pages = layer.hot._pages[0][:]
        codes = layer.hot.k_codes[pages].clone()
        turn2 = torch.cat((out1, prompt(30, seed=5)), dim=1)
        out2 = model.generate(turn2, **with_cache(model, cache), max_new_tokens=4, do_sample=False)
        assert torch.equal(layer.hot.k_codes[pages], codes)  # earlier pages untouched
        assert layer.hot._pages[0][:len(pages)] == pages
        assert cache.get_seq_length() == out2.shape[1] - 1
        # the same conversation in one go from a fresh cache agrees on the new tokens' first step
        fresh = model.generate(turn2, max_new_tokens=1, do_sample=False)
    assert out2.shape[1] == turn2.shape[1] + 4 and out2[0, :turn2.shape[1]].equal(turn2[0])
    assert fresh.shape[1] == turn2.shape[1] + 1


@pytest.mark.parametrize("options", [dict(keep_heads=(1,)), dict(boundary_layers=1), dict(boundary_layers=1,
                         boundary_bits=(4, 4)), dict(layer_bits=((4, 4), (2, 2))), dict(key_mode="undo_rope"),
                         dict(keep_layers=(1,))])
def test_layer_policies_match_oracle(options, reference_mode):
    model = tiny("llama", layers=3) if options.get("boundary_layers") else tiny("llama")
    got, want, cache = step_vs_oracle(model, "k3v2", prompt(66), **{**SMALL, **options})
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    plans = [None if p.codec is None else (p.codec.key_bits, p.codec.value_bits) for p in cache.plans]
    if options.get("boundary_layers"):
        assert plans == [options.get("boundary_bits"), (3, 2), options.get("boundary_bits")]
    if "layer_bits" in options:
        assert plans == [(4, 4), (2, 2)]
    if "keep_layers" in options:
        assert plans == [(3, 2), None]


def test_compressed_sliding_layers_and_softcap(reference_mode):
    model = tiny("gemma2")
    got, want, cache = step_vs_oracle(model, "k3v2", prompt(70), compress_sliding=True, **SMALL)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert all(isinstance(l, CompressedLayer) for l in cache.layers)


def test_memory_is_saved(reference_mode):
    model = tiny("llama", head_dim=128, heads=4, kv_heads=2)
    ids = prompt(600)
    with compress(model, "k3v2") as state:
        model.generate(ids, max_new_tokens=2, do_sample=False)
        ours = state.last_cache.nbytes()
    dense = 2 * 2 * 2 * 602 * 128 * 4  # layers · K,V · heads · tokens · head_dim · fp32 bytes
    # all buffers counted: at 600 tokens the fp16 sinks + window + one page (132 tokens) are half of it (4.93x less
    # than dense with the 3-bit keys' fields layout, 5.02x with bit planes)
    assert ours == sum(l.hot.nbytes() for l in state.last_cache.layers) and ours < dense / 4.9


def test_generate_grows_pages(reference_mode):
    model = tiny("llama")
    with compress(model, "k2v2", **SMALL) as state:
        out = model.generate(prompt(20), max_new_tokens=100, do_sample=False)
    assert out.shape[1] == 120
    layer = state.last_cache.layers[0]
    assert layer.hot.seq_lens() == [119] and layer.hot.compressed_lens()[0] >= 96


# -- errors ------------------------------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(ValueError, match="head_dim 32"):
        patch(tiny("llama", head_dim=32), "k3v2")
    phi = tiny("phi3", rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 32,
                                        "long_factor": [1.0] * 32, "original_max_position_embeddings": 512})
    with pytest.raises(ValueError, match="cannot undo rope_type 'longrope'"):
        patch(phi, "k3v2", key_mode="undo_rope")
    patch(phi, "k3v2")  # post-RoPE keys serve any RoPE
    unpatch(phi)
    bloom = transformers.AutoModelForCausalLM.from_config(transformers.BloomConfig(hidden_size=128, n_head=2,
                                                                                  n_layer=1, vocab_size=64))
    with pytest.raises(ValueError, match="ALiBi"):
        patch(bloom, "k3v2")
    model = tiny()
    with pytest.raises(ValueError, match="unknown preset"):
        patch(model, "k5v2")
    with pytest.raises(TypeError, match="unknown options"):
        patch(model, "k3v2", bitz=3)
    with pytest.raises(ValueError, match="keep_heads"):
        patch(model, "k3v2", keep_heads=(0, 1))
    with pytest.raises(ValueError, match="evict must be"):
        resolve("k3v2", evict=1.0)
    for bad, match in ((dict(page_size="64"), "page_size must be"),
                       (dict(keep_layers=1), "keep_layers must be a tuple"),
                       (dict(sinks=True), "sinks must be an int"), (dict(key_bits=3.0), "key_bits must be one of"),
                       (dict(boundary_layers=1, boundary_bits=(3.0, 2)), "boundary_bits must be"),
                       (dict(evict=True), "evict must be")):
        with pytest.raises(ValueError, match=match):
            patch(model, "k3v2", **bad)
    with pytest.raises(TypeError, match="transformers causal LM"):
        patch("llama", "k3v2")
    with pytest.raises(TypeError, match="transformers causal LM"):
        NQCache(object())
    patch(model, "k3v2")
    with pytest.raises(RuntimeError, match="already patched"):
        patch(model, "k3v2")
    with pytest.raises(ValueError, match="beam search"):
        model.generate(prompt(40), max_new_tokens=3, num_beams=2, do_sample=False)
    with pytest.raises(ValueError, match="does not reorder"):
        NQCache(model).layers[0].reorder_cache(torch.tensor([0]))
    unpatch(model)
    with pytest.raises(RuntimeError, match="not patched"):
        unpatch(model)


# -- never a silent no-op: whatever would run uncompressed raises (or, for the caller's own cache, warns) ----------
def test_generate_attaches_on_this_transformers(reference_mode):
    """The installed release's generate builds the NQCache and every step goes through the pages."""
    model = tiny("llama")
    with compress(model, "k3v2", **SMALL) as state:
        model.generate(prompt(40), max_new_tokens=3, do_sample=False)
    assert isinstance(state.last_cache, NQCache) and state.last_cache.compressed
    assert state.last_cache.layers[0].hot.seq_lens() == [42]


def test_unknown_cache_keyword_raises_at_patch(monkeypatch):
    """A future release that renames the cache keyword again: refused before anything runs."""
    monkeypatch.setattr("integrations.hf.compat.CACHE_NAMES", ("kv_state",))
    with pytest.raises(RuntimeError, match="takes its KV cache under none of"):
        patch(tiny("llama"), "k3v2")


def test_cache_under_an_unknown_name_raises_in_generate(monkeypatch, reference_mode):
    """transformers 5.24's break, replayed: generate keeps its cache under a name the patch does not read."""
    model = tiny("llama")
    monkeypatch.setattr(sys.modules["integrations.hf.patch"], "find_cache", lambda kwargs: (None, None))
    with compress(model, "k3v2", **SMALL), pytest.raises(RuntimeError, match="prepared no cache"):
        model.generate(prompt(40), max_new_tokens=3, do_sample=False)


def test_generate_that_bypasses_the_hook_raises(reference_mode):
    """A release whose generate builds its cache without _prepare_cache_for_generation: the first forward raises."""
    model = tiny("llama")
    with compress(model, "k3v2", **SMALL):
        model._prepare_cache_for_generation = type(model)._prepare_cache_for_generation.__get__(model)
        with pytest.raises(RuntimeError, match="could not attach"):
            model.generate(prompt(40), max_new_tokens=3, do_sample=False)


def test_caches_that_would_run_uncompressed(reference_mode):
    model = tiny("llama")
    with compress(model, "k3v2", **SMALL):
        with pytest.raises(ValueError, match="use_cache=False"):
            model.generate(prompt(40), max_new_tokens=2, do_sample=False, use_cache=False)
        with pytest.raises(ValueError, match="StaticCache"):
            model.generate(prompt(40), max_new_tokens=2, do_sample=False, cache_implementation="static")
        with pytest.warns(UserWarning, match="runs uncompressed"):
            model.generate(prompt(40), max_new_tokens=2, do_sample=False,
                           **with_cache(model, DynamicCache(config=model.config)))


def test_presets_and_profiles():
    assert {p: (v.key_bits, v.value_bits, v.evict) for p, v in PRESETS.items()}["balanced-evict50"] == (3, 2, 0.5)
    assert resolve("k4v3-evict25") == Policy(key_bits=4, value_bits=3, evict=0.25)
    assert graduated_bits(6) == ((4, 4),) * 2 + ((3, 3),) * 2 + ((3, 2),) * 2


# -- the fixture ---------------------------------------------------------------------------------------------------
MODEL = os.path.join(FIXTURE, "llama-tiny-hd128")


@pytest.fixture(scope="module")
def fixture_model():
    if not os.path.isdir(MODEL):
        pytest.skip(f"fixture model not found at {MODEL} (set NQ_FIXTURE_DIR)")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    return tok, model


def test_fixture_k4v4_greedy_matches_plain(fixture_model, reference_mode):
    tok, model = fixture_model
    with open(os.path.join(FIXTURE, "text", "eval_pydocs.txt")) as f:
        text = f.read()
    tok.padding_side = "left"
    prompts = [text[1000:1700], text[5000:5400], text[9000:9900]]
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id or 0)
    plain = model.generate(**batch, **kw)
    with compress(model, "near-lossless", fp_window=16, page_size=16) as state:
        ours = model.generate(**batch, **kw)
        assert state.last_cache.compressed
    assert torch.equal(plain, ours)
