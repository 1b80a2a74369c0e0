"""integrations.hf's compiled decode path (``static=True``): generate compiles its decode step over the compressed
cache (every compressed layer in ``PagedKVCache`` static mode, uncompressed layers transformers' StaticLayer) and
produces the tokens of the eager path. On the CPU the compile runs on the aot_eager backend with ``fullgraph=True``
(a graph break fails the test); on a GPU generate's default is inductor with CUDA graphs (perf/bench_hf --compiled)."""
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CompileConfig  # noqa: E402

from integrations.hf import NQCache, Policy, compress, with_cache  # noqa: E402
from .conftest import FIXTURE  # noqa: E402
from .test_hf import SMALL, prompt, tiny  # noqa: E402


def compiled(**kw) -> dict:
    """generate() options compiling the decode step on this CPU, no graph break allowed."""
    config = CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers' switch for compiling off-GPU (tests)
    return dict(compile_config=config, **kw)


def _generate(model, ids, preset, static, options=None, **kw):
    torch._dynamo.reset()
    with compress(model, preset, static=static, **SMALL, **(options or {})) as state:
        out = model.generate(ids, do_sample=False, **(compiled(**kw) if static else kw))
        return out, state.last_cache


@pytest.mark.parametrize("preset,options", [("k3v2", {}), ("k2v2-evict50", {}), ("k4v4", dict(boundary_layers=1))])
def test_compiled_generate_matches_eager(preset, options, reference_mode):
    """Greedy tokens equal, pages filling during decode, one compile (no recompile per step), mixed layers."""
    model = tiny("llama", layers=3)
    ids = prompt(45, batch=2)
    kw = dict(max_new_tokens=30, pad_token_id=0)
    eager, eager_cache = _generate(model, ids, preset, False, options, **kw)
    counters = torch._dynamo.utils.counters
    counters.clear()
    static, cache = _generate(model, ids, preset, True, options, **kw)
    assert torch.equal(eager, static)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the decode step, traced once
    pairs = [(m.hot, t.hot) for m, t in zip(cache.layers, eager_cache.layers) if hasattr(m, "hot")]
    for mine, theirs in pairs:  # the same tokens held, pages filled during the decode
        assert mine.static_pages is not None
        assert mine.seq_lens() == theirs.seq_lens() and torch.equal(mine.lengths, theirs.lengths)
    assert pairs and pairs[0][0].compressed_lens()[0] > 0


@pytest.mark.parametrize("arch,extra", [("gemma2", {}), ("mistral", dict(sliding_window=24))])
def test_compiled_sliding_window_models_match_eager(arch, extra, reference_mode):
    """Gemma-2 (sliding layers left fp16: transformers' StaticSlidingWindowLayer beside ours; soft-capping) and a
    Mistral whose every layer slides (compressed, attention over the window)."""
    model = tiny(arch, layers=2, **extra)
    ids = prompt(60)
    kw = dict(max_new_tokens=24, pad_token_id=0)
    eager, _ = _generate(model, ids, "k3v2", False, **kw)
    static, _ = _generate(model, ids, "k3v2", True, **kw)
    assert torch.equal(eager, static)


def test_compiled_batch_with_left_padding_matches_eager(reference_mode):
    model = tiny("llama")
    ids = prompt(50, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    kw = dict(max_new_tokens=20, pad_token_id=0, attention_mask=mask)
    eager, _ = _generate(model, ids, "k3v2", False, **kw)
    static, _ = _generate(model, ids, "k3v2", True, **kw)
    assert torch.equal(eager, static)


def test_compiled_multi_turn_matches_eager(reference_mode):
    """A second turn on the same cache: its prompt chunk runs on the host bookkeeping, then static mode again."""
    model = tiny("llama")
    outs = []
    for static in (False, True):
        torch._dynamo.reset()
        with compress(model, "k3v2", static=static, **SMALL):
            cache = NQCache(model, "k3v2", static=static, max_cache_len=160, **SMALL)
            kw = dict(do_sample=False, max_new_tokens=20, pad_token_id=0, **with_cache(model, cache),
                      **(compiled() if static else {}))
            first = model.generate(prompt(45), **kw)
            second = model.generate(torch.cat((first, prompt(13, seed=7)), 1), **kw)
        outs.append((first, second, cache.layers[0].hot.lengths.clone()))
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))


def test_generate_calls_share_one_compiled_step(reference_mode):
    """Every generate builds a new cache: caches of equal codecs and shapes must not trace the step again."""
    model = tiny("llama")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with compress(model, "k3v2", static=True, **SMALL):
        for seed in range(3):
            model.generate(prompt(45, seed=seed), do_sample=False, max_new_tokens=6, pad_token_id=0, **compiled())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_a_turn_past_max_cache_len_is_refused_on_the_host(reference_mode):
    model = tiny("llama")
    with compress(model, "k3v2", static=True, **SMALL):
        cache = NQCache(model, "k3v2", static=True, max_cache_len=60, **SMALL)
        out = model.generate(prompt(45), do_sample=False, max_new_tokens=5, pad_token_id=0,
                             **with_cache(model, cache))
        with pytest.raises(ValueError, match="past the max_cache_len=60"):
            model(torch.cat((out, prompt(20, seed=4)), 1)[:, -20:], **with_cache(model, cache))


def test_eviction_reserves_only_what_the_kept_tokens_need(reference_mode):
    model = tiny("llama")
    _, cache = _generate(model, prompt(120), "k3v2-evict75", True, max_new_tokens=8, pad_token_id=0)
    hot = cache.layers[0].hot
    kept = hot.seq_lens()[0] - 7  # the 8th token is never fed
    assert kept < 50
    assert hot.static_pages == (kept + 8 - 1 - SMALL["sinks"] - SMALL["fp_window"]) // SMALL["page_size"]


def test_static_policy_errors(reference_mode):
    model = tiny("llama")
    with pytest.raises(ValueError, match="post_rope"):
        Policy(static=True, key_mode="undo_rope")
    with pytest.raises(ValueError, match="keep_heads"):
        Policy(static=True, keep_heads=(1,))
    with pytest.raises(ValueError, match="static must be True or False"):
        Policy(static=1)
    with pytest.raises(ValueError, match="max_cache_len"):
        NQCache(model, "k3v2", static=True)
    with compress(model, "k3v2", static=True, **SMALL), torch.no_grad():
        cache = NQCache(model, "k3v2", static=True, max_cache_len=80, **SMALL)
        model(prompt(50), **with_cache(model, cache), use_cache=True)
        with pytest.raises(ValueError, match="crop is not available"):
            cache.crop(-1)
        with pytest.raises(ValueError, match="crop is not available"):
            cache.crop(40)  # the transformers < 5.18 form (keep 40)


MODEL = os.path.join(FIXTURE, "llama-tiny-hd128")


def test_fixture_compiled_greedy_matches_eager(reference_mode):
    if not os.path.isdir(MODEL):
        pytest.skip(f"fixture model not found at {MODEL} (set NQ_FIXTURE_DIR)")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with open(os.path.join(FIXTURE, "text", "eval_pydocs.txt")) as f:
        text = f.read()
    ids = tok(text[2000:2600], return_tensors="pt").input_ids
    kw = dict(max_new_tokens=24, pad_token_id=tok.pad_token_id or 0)
    eager, _ = _generate(model, ids, "balanced", False, **kw)
    static, _ = _generate(model, ids, "balanced", True, **kw)
    assert torch.equal(eager, static)
