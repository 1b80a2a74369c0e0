"""score_tokens (Triton, under TRITON_INTERPRET=1) against reference.window_scores; selection invariants (sinks and
recent always kept, budgets exact); evicted tokens in a PagedKVCache keep their positions in both key modes."""
import io

import pytest
import torch

from nqkernels import (KVCodec, PagedKVCache, RopeSpec, decode_attention, key_norm_scores, keep_for_bytes,
                       layer_budgets, load_cache, random_scores, save_cache, score_tokens, select_tokens)
from nqkernels import reference as R
from nqkernels.runtime import rope_tables

from .conftest import HEAD_DIMS


def _close(out, ref, tol=2e-5):
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = (out - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max error {err}"


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_scores_match_reference(d, dtype):
    B, T, H, G, W = 3, 77, 2, 3, 9
    k = (torch.randn(B, H, T, d) * 2).to(dtype).transpose(1, 2)  # strided [B, T, H, D]
    q = (torch.randn(B, W, H * G, d) * 2).to(dtype)
    lens = [77, 40, 5]  # ragged; the last is shorter than the window
    for aggregate in ("sum", "mean", "max"):
        out = score_tokens(q, k, seq_lens=lens, aggregate=aggregate)
        _close(out, R.window_scores(q, k, torch.tensor(lens), scale=d ** -0.5, aggregate=aggregate))
        assert (out[1, :, 40:] == 0).all() and (out[2, :, 5:] == 0).all()


@pytest.mark.parametrize("group", (1, 4, 8))
def test_scores_gqa_long_window_and_splits(group):
    # more rows than one block (W·group > 64) and more keys than one split
    q = torch.randn(2, 33, 2 * group, 64)
    k = torch.randn(2, 301, 2, 64)
    out = score_tokens(q, k, seq_lens=[301, 1], softmax_scale=0.2)
    _close(out, R.window_scores(q, k, torch.tensor([301, 1]), scale=0.2, aggregate="mean"))
    # mean over rows of probabilities: each sequence's scores sum to 1
    assert torch.allclose(out.sum(-1), torch.ones(2, 2), atol=1e-5)


def test_pooling_and_scorers_shapes():
    q, k = torch.randn(1, 4, 2, 64), torch.randn(1, 50, 2, 64)
    raw = score_tokens(q, k, seq_lens=[45])
    pooled = score_tokens(q, k, seq_lens=[45], pool=5, pool_mode="max")
    want = torch.nn.functional.max_pool1d(raw.reshape(2, 1, 50), 5, stride=1, padding=2).reshape(1, 2, 50)
    want[..., 45:] = 0
    assert torch.equal(pooled, want)
    avg = score_tokens(q, k, pool=3, pool_mode="avg")
    assert torch.allclose(avg[0, :, 10], score_tokens(q, k)[0, :, 9:12].mean(-1), atol=1e-6)
    kn = key_norm_scores(k, seq_lens=[45])
    assert torch.allclose(kn[0, :, :45], -k[0, :45].norm(dim=-1).T) and torch.isinf(kn[0, :, 45:]).all()
    g = torch.Generator().manual_seed(1)
    r = random_scores(k, seq_lens=[45], generator=g)
    assert r.shape == (1, 2, 50) and (r[..., 45:] == 0).all() and (r[..., :45] > 0).all()


def test_nonfinite_key_or_query_does_not_corrupt_other_scores():
    q, k = torch.randn(1, 6, 4, 128), torch.randn(1, 40, 2, 128)
    clean = score_tokens(q, k, aggregate="sum")
    k[0, 7, 0, 5] = float("nan")
    k[0, 20, 1, 0] = float("inf")
    out = score_tokens(q, k, aggregate="sum")
    assert torch.isfinite(out).all()
    assert out[0, 0, 7] == 0 and out[0, 1, 20] == 0
    _close(out, R.window_scores(q, k, torch.tensor([40]), scale=128 ** -0.5, aggregate="sum"))
    assert torch.allclose(out[0, 0, 30:], clean[0, 0, 30:] / (1 - clean[0, 0, 7] / 6), rtol=0.2)
    q[0, 2, 1, 0] = float("nan")  # one query row of head 1 drops out
    assert torch.isfinite(score_tokens(q, k)).all()


def test_score_bad_inputs():
    q, k = torch.randn(1, 4, 4, 64), torch.randn(1, 30, 2, 64)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        score_tokens(torch.randn(1, 4, 3, 64), k)
    with pytest.raises(ValueError, match="must match"):
        score_tokens(q.half(), k)
    with pytest.raises(ValueError, match="seq_lens"):
        score_tokens(q, k, seq_lens=[31])
    with pytest.raises(ValueError, match="aggregate"):
        score_tokens(q, k, aggregate="median")
    with pytest.raises(ValueError, match="pool"):
        score_tokens(q, k, pool=4)
    with pytest.raises(ValueError, match="head_dim"):
        score_tokens(q, torch.randn(1, 30, 2, 32))
    with pytest.raises(ValueError, match="4-D"):
        score_tokens(q, k[0])


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_head", (True, False))
def test_selection_invariants(per_head):
    scores = torch.rand(3, 2, 200)
    lens = [200, 120, 9]
    sel = select_tokens(scores, seq_lens=lens, evict=0.6, sinks=4, recent=16, per_head=per_head)
    assert sel.counts.tolist() == [80, 48, 9]  # L - floor(0.6 L), raised to all 9 tokens for the short one
    assert sel.indices.shape == (3, 2, 80)
    for b, (n, c) in enumerate(zip(lens, sel.counts.tolist())):
        for h in range(2):
            kept = sel.indices[b, h, :c]
            assert (kept[1:] > kept[:-1]).all() and kept.max() < n  # ascending, unique, inside the sequence
            assert set(range(min(4, n))) <= set(kept.tolist())  # sinks
            assert set(range(max(0, n - 16), n)) <= set(kept.tolist())  # recent
            assert (sel.indices[b, h, c:] == kept[-1]).all()  # padding repeats the last
            rest = [t for t in range(4, n - 16)]
            if rest and c < n:  # the kept middle tokens are the best-scoring ones
                s = scores[b].sum(0) if not per_head else scores[b, h]
                middle = [t for t in kept.tolist() if 4 <= t < n - 16]
                dropped = sorted(set(rest) - set(middle))
                assert s[middle].min() >= s[dropped].max()
        if not per_head:
            assert torch.equal(sel.indices[b, 0], sel.indices[b, 1])


def test_selection_budgets_and_errors():
    scores = torch.rand(2, 1, 100)
    assert select_tokens(scores, keep=[30, 70], sinks=2, recent=2).counts.tolist() == [30, 70]
    assert select_tokens(scores, keep=5, sinks=4, recent=8).counts.tolist() == [12, 12]  # raised to protected
    assert select_tokens(scores, evict=0.0, recent=0).counts.tolist() == [100, 100]
    scores[0, 0, 50] = float("nan")
    assert 50 not in select_tokens(scores, keep=90, sinks=0, recent=0).indices[0, 0].tolist()
    with pytest.raises(ValueError, match="exactly one"):
        select_tokens(scores, evict=0.5, keep=3)
    with pytest.raises(ValueError, match="evict"):
        select_tokens(scores, evict=1.0)
    with pytest.raises(ValueError, match="keep"):
        select_tokens(scores, keep=[3])
    with pytest.raises(ValueError, match="scores"):
        select_tokens(scores[0], evict=0.5)


def test_layer_budgets_and_byte_budget():
    assert layer_budgets(4, 0.5) == [0.5] * 4
    pyr = layer_budgets(6, 0.5, "pyramid")
    assert abs(sum(pyr) / 6 - 0.5) < 1e-12 and pyr == sorted(pyr, reverse=True) and max(pyr) <= 1.0
    assert max(layer_budgets(5, 0.9, "pyramid")) <= 1.0 + 1e-12
    with pytest.raises(ValueError, match="schedule"):
        layer_budgets(4, 0.5, "triangle")
    codec = KVCodec(head_dim=128, key_bits=3, value_bits=2)
    per_token = 8 * 2 * (54 + 34)  # 2 layers × 8 heads × (K3 54 (fields layout) + V2 34 bytes)
    assert keep_for_bytes(1000 * per_token, codec, 8, num_layers=2) == 1000
    assert keep_for_bytes(1000 * per_token + 64 * 8 * 2 * 512, codec, 8, num_layers=2, fp_tokens=64) == 1064
    with pytest.raises(ValueError, match="budget"):
        keep_for_bytes(10, codec, 8, fp_tokens=4)


# ---------------------------------------------------------------------------------------------------------------
def _rotated_keys(B, T, H, D, spec):
    """Keys as a model makes them: RoPE applied at each token's position."""
    cos, sin = rope_tables(KVCodec(head_dim=D, rope=spec), T, "cpu")
    cos, sin = cos[:T], sin[:T]
    k = torch.randn(B, T, H, D) + 0.3
    return R.rope_apply(k.transpose(1, 2), cos, sin).transpose(1, 2)


@pytest.mark.parametrize("rope", (False, True), ids=("post_rope", "rope_undone"))
def test_evicted_tokens_keep_their_positions(rope):
    spec = RopeSpec(theta=10000.0) if rope else None
    D, H, lens = 64, 2, [150, 97]
    k = _rotated_keys(2, 150, H, D, RopeSpec(theta=10000.0)).half()
    v = torch.randn_like(k)
    scores = score_tokens(torch.randn(2, 8, 4, D).half(), k, seq_lens=lens)
    sel = select_tokens(scores, seq_lens=lens, evict=0.5, sinks=3, recent=10)
    codec = KVCodec(head_dim=D, key_bits=4, value_bits=4, page_size=16, rope=spec)
    cache = PagedKVCache(codec, num_kv_heads=H, max_batch=2, num_pages=16, sink_tokens=3, recent_tokens=10,
                         device="cpu")
    cache.append(sel.gather(k), sel.gather(v), lengths=sel.counts, positions=sel.positions)
    assert cache.seq_lens() == [75, 49] and cache.next_positions() == [150, 97]
    K, V, _ = cache.dense()
    for b, c in enumerate(sel.counts.tolist()):
        want = sel.gather(k)[b, :c].float()
        err = (K[b, :c] - want).pow(2).mean() / want.var()
        assert err < 0.02
        if rope:  # RoPE is undone (and re-applied) at each kept token's own position, per head
            st = cache.export_slot(b)
            stored = torch.cat((st.fp_positions[:, :st.sinks], st.positions, st.fp_positions[:, st.sinks:]), 1)
            assert torch.equal(stored, sel.positions[b, :, :c])
    # decode steps continue at the next position; the kernel re-applies RoPE at the stored positions
    step = _rotated_keys(2, 151, H, D, RopeSpec(theta=10000.0))[:, 150:].half()
    cache.append(step, torch.randn_like(step))
    assert cache.next_positions() == [151, 98]
    q = torch.randn(2, 1, 4, D, dtype=torch.float16)
    out = decode_attention(q, cache)
    ref = R.paged_attention(q, cache, D ** -0.5, None, None)
    assert (out.float() - ref).abs().max() < 3e-3
    if rope:  # positions survive the COLD format
        buf = io.BytesIO()
        save_cache([cache], buf)
        back = load_cache(io.BytesIO(buf.getvalue()), device="cpu")[0]
        assert back.next_positions() == cache.next_positions()
        assert torch.equal(back.dense()[0], cache.dense()[0])
