"""Recomputes the K3V2 row of docs/codec.md's continuation-perplexity table on the fixture model (CPU fp32)."""
import os

import pytest
import torch

from nqkernels import KVCodec, RopeSpec
from .conftest import FIXTURE
from perf.continuation import codec_compressor, continuation_ppl, load_chunks

MODEL = os.path.join(FIXTURE, "llama-tiny-hd128")


@pytest.fixture(scope="module")
def setup():
    transformers = pytest.importorskip("transformers")
    if not os.path.isdir(MODEL):
        pytest.skip(f"fixture model not found at {MODEL} (set NQ_FIXTURE_DIR)")
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    chunks = load_chunks(tok, os.path.join(FIXTURE, "text", "eval_pydocs.txt"), 6, 2048)
    return model, chunks


def test_noop_control_reproduces_plain_model(setup):
    model, chunks = setup
    ppl, _ = continuation_ppl(model, chunks, None)
    assert round(ppl, 4) == 10.3500


def test_k3v2_row(setup, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch path; kernels are bit-exact with it (test_codec)
    model, chunks = setup
    codec = KVCodec(head_dim=128, key_bits=3, value_bits=2, rope=RopeSpec.from_hf_config(model.config))
    ppl, nbytes = continuation_ppl(model, chunks, codec_compressor(codec))
    assert abs(ppl - 10.3811) < 2e-3
    assert abs(nbytes - 88.67) < 0.01  # 52 (fields keys) + 32 code bytes, 2 + 2 scale bytes, means amortised
