"""Decode attention over a paged HOT cache (``PagedKVCache``): split-K partial kernel + reduce kernel.

Math. A stored token decodes as x = Rᵀ v · s / √n (R = σ·T, ``reference.rotation_matrix``), so
    q·k   = (R q / √n) · v_k · s_k + q·mean_k           (keys stored post-RoPE)
    Σ p v = Rᵀ (Σ p s_v v_v) / √n + (Σ p) · mean_v
Codes become tensor-core operands without conversions: one mask of a code word yields two fp16 subnormals
(``lattice.plane_pairs``), in an order ("pair order") that the contraction does not care about and that puts each
decoded element in the register where the tensor-core product wants it. So the query is multiplied by the rows of R
in pair order once per (sequence, KV head) (``_query_prep_kernel``, ``_decode_matrix``), keys are never rotated
back, and values are accumulated in pair order and rotated back once per split, at its end (``_values_original``: a
gather to storage order and an inverse Hadamard transform), so the reduce only weighs and adds. fp16 K/V never reach
memory. Keys stored with RoPE undone are decoded to the original basis per page (one product with R) and RoPE is
re-applied at each key's stored position (``PagedKVCache.positions``).

Grid: (batch · kv_heads · row blocks, splits + uncompressed parts). Programs 0..splits-1 each take a run of pages
(64-token pages are the A operand of the logit product, keys along axis 0); the others take the uncompressed sinks
and window, ``uncompressed_per_split`` tokens each (one part for a window of a page or two).
Each writes (running max, sum, accumulator); the reduce combines them. A block of few rows may take several pages
per softmax step, side by side in its columns (``pages_per_step``, ``_query_rows``). On Hopper the split kernel and
the reduce start while their predecessor still runs (programmatic dependent launch, ``_pdl``). Rows are (query
position, query head of the group) pairs, so the codes of a KV head are read once for all its query heads (GQA) and
all positions of a chunk (q_len > 1, causal inside the chunk).

Two passes (launch config ``two_pass``, post-RoPE keys): the split's keys first (``_attn_keys_kernel``: fp32 logits
to a workspace of 4 bytes per (token, row), and the split's max), then its values (``_attn_values_kernel``: no
running max, nothing rescaled). Each loop holds half the state, so more programs fit an SM and its issue slots are
shared by more independent work; the logits cost a write and a read (docs/attention.md, "One call: three kernels").
On Hopper the keys and values passes may be the Gluon kernels of ``gluon`` (launch configs ``gluon_keys`` and
``gluon_values``).

Modules: ``kernels`` (the portable Triton kernels), ``gluon`` (the GPU-only fast path), ``launcher``
(``decode_attention``, configs, plans, operand tables, the reference path).
"""
from .launcher import BATCH_RANGES, CONTEXT_RANGES, attention_buckets, decode_attention

__all__ = ["BATCH_RANGES", "CONTEXT_RANGES", "attention_buckets", "decode_attention"]
