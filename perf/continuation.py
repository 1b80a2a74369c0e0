"""Continuation-perplexity protocol: prefill P tokens, replace the cache by its compressed version, score the
next C tokens through it. The no-op control (no compression) must reproduce the plain model exactly.

Chunks are consecutive (P + C)-token windows of the tokenized text (BOS only at the start of the text); the
C continuation tokens are fed in one forward over the cache and the C - 1 targets after the first are scored.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch

# compress(layer_index, keys [B, Hkv, P, D], values) -> (keys', values', bytes of the compressed form)
Compressor = Callable[[int, torch.Tensor, torch.Tensor], tuple]

# The quality fixture: a small trained Llama (llama-tiny-hd128/) and held-out texts (text/), kept beside the
# repository (../shared/fixtures), not in it; NQ_FIXTURE_DIR points elsewhere.
FIXTURE = os.environ.get("NQ_FIXTURE_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                          "fixtures"))
_WHERE = ("The quality numbers in docs/ and perf/results/ come from a small trained fixture model that is not part of "
          f"the repository: its folder (llama-tiny-hd128/ and text/) is looked up at {os.path.abspath(FIXTURE)}; set "
          "NQ_FIXTURE_DIR to where yours is. Any local (or cached hub) causal-LM directory works with perf.quality: "
          "--model DIR --text held_out.txt.")


def load_model(path: str, dtype=torch.float32):
    """``(tokenizer, model)`` of a transformers causal LM directory (eval mode); a clear SystemExit when it is not
    there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return (AutoTokenizer.from_pretrained(path),
                AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval())
    except (OSError, ValueError) as e:
        missing = "does not exist" if not os.path.exists(path) else f"could not be loaded ({str(e).splitlines()[0]})"
        raise SystemExit(f"model {path!r} {missing}. {_WHERE}") from e


def read_text(path: str) -> str:
    """The text file at ``path``; a clear SystemExit when it is not there."""
    if not os.path.isfile(path):
        raise SystemExit(f"text {path!r} does not exist. {_WHERE}")
    with open(path) as f:
        return f.read()


def load_chunks(tokenizer, text_path: str, n_chunks: int, length: int) -> list[torch.Tensor]:
    ids = tokenizer(read_text(text_path), return_tensors="pt").input_ids[0]
    if len(ids) < n_chunks * length:
        raise ValueError(f"{text_path} has {len(ids)} tokens, fewer than {n_chunks} chunks of {length}")
    return [ids[i * length:(i + 1) * length][None] for i in range(n_chunks)]


@torch.no_grad()
def continuation_ppl(model, chunks: list[torch.Tensor], compress: Optional[Compressor], prefix: int = 1536):
    """Returns (perplexity, bytes of the compressed prefix caches per token per layer per KV head, K+V)."""
    from transformers import DynamicCache

    from integrations.hf.compat import output_cache, with_cache

    nll, n, nbytes, slots = 0.0, 0, 0, 0
    for ids in chunks:
        out = model(ids[:, :prefix], use_cache=True)
        cache = output_cache(out)
        if compress is not None:
            new = DynamicCache()
            for li, layer in enumerate(cache.layers):
                k, v, b = compress(li, layer.keys, layer.values)
                new.update(k.to(layer.keys.dtype), v.to(layer.values.dtype), li)
                nbytes += b
                slots += layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2]
            cache = new
        logits = model(ids[:, prefix:], **with_cache(model, cache)).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, prefix + 1:], reduction="sum").item()
        n += ids.shape[1] - prefix - 1
    return math.exp(nll / n), (nbytes / slots if slots else None)


def codec_compressor(codec) -> Compressor:
    """Ours: encode K and V to the HOT format, decode back; bytes are those of codes, scales and means."""
    from nqkernels import decode_kv, encode_kv

    def compress(li, k, v):  # k, v: [B, H, T, D] (transformers' layout): encoded through [B, T, H, D] views
        ek, ev = encode_kv(k.transpose(1, 2), codec, "key"), encode_kv(v.transpose(1, 2), codec, "value")
        nbytes = sum(t.nbytes for e in (ek, ev) for t in e if t is not None)
        return (decode_kv(ek, codec, "key", dtype=torch.float32).transpose(1, 2),
                decode_kv(ev, codec, "value", dtype=torch.float32).transpose(1, 2), nbytes)

    return compress
