"""integrations.hf.allocate_layer_bits: per-layer bits at a uniform budget's bytes, measured on calibration text,
over the layers the cache compresses (tiny random models, torch reference path)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from integrations.hf import Policy, allocate_layer_bits, resolve  # noqa: E402
from integrations.hf.allocate import _Calibration, _moves, _Price  # noqa: E402
from nqkernels import KVCodec  # noqa: E402
from integrations.hf.policy import plan_layers  # noqa: E402
from .test_hf import prompt, tiny  # noqa: E402


def test_allocate_layer_bits_keeps_the_bytes_and_only_measured_gains(reference_mode):
    model = tiny(layers=3)
    ids = prompt(48, batch=2)
    lines = []
    bits = allocate_layer_bits(model, ids, 3, 2, progress=lines.append)
    # head_dim 64: every one-bit step is 8 bytes (no fields layout), so K3V2's bytes are its bits
    assert len(bits) == 3 and sum(k + v for k, v in bits) == 3 * (3 + 2)
    assert all(2 <= b <= 4 for kv in bits for b in kv)
    assert lines[0].startswith("uniform K3V2 (132 B per token per KV head over the layers, budget 132): KL")
    assert any("layer 2 values 2 -> 3 bits" in x for x in lines)
    measured = [float(x.split("KL ")[1]) for x in lines if ": KL " in x and "->" not in x]
    assert measured[0] > 0  # compression moves the distributions
    if bits != ((3, 2),) * 3:  # kept only when measured better than uniform
        assert measured[-1] < measured[0]
    Policy(layer_bits=bits)  # what it returns is a policy's per-layer profile
    assert allocate_layer_bits(model, ids, 3, 2, rounds=0) == ((3, 2),) * 3
    assert allocate_layer_bits(model, ids, 2, 2) == ((2, 2),) * 3  # no bit below 2 to give
    plus = allocate_layer_bits(model, ids, 2, 2, extra_bits=1)  # one more bit, where it measures best (or none)
    assert 12 <= sum(k + v for k, v in plus) <= 13 and all(2 <= b <= 4 for kv in plus for b in kv)
    with pytest.raises(ValueError, match="key_bits"):
        allocate_layer_bits(model, ids, 5, 2)
    with pytest.raises(ValueError, match="input_ids"):
        allocate_layer_bits(model, ids[0], 3, 2)
    with pytest.raises(ValueError, match="rounds"):
        allocate_layer_bits(model, ids, 3, 2, rounds=-1)
    with pytest.raises(ValueError, match="extra_bits"):
        allocate_layer_bits(model, ids, 3, 2, extra_bits=-1)


def test_moves_keep_the_bytes_where_3_bit_keys_hold_more():
    """At head_dim 128 3-bit keys (the "fields" layout) cost 4 bytes per token per KV head more than a bit's 16: the
    budget counts bytes, so a move into them needs a donor freeing 20, one out of them leaves 4 for later moves, and
    an extra bit adds the dearest step's 20."""
    price = _Price([KVCodec(head_dim=128, key_bits=3, value_bits=2), None, KVCodec(head_dim=128)])
    assert price.bytes(0, 0, 3) == 54 and price.bytes(0, 0, 2) == 34 and price.bytes(0, 1, 3) == 50
    assert price.total([[3, 2], None, [3, 2]]) == 2 * 88 and price.dearest_step() == 20

    def moves(bits, effect, room):
        trial = _moves(bits, effect, room, lambda li, kind, step: price.step(li, kind, bits[li][kind], step))
        assert price.total(trial) <= price.total(bits) + room  # never over the budget
        return trial

    # keys 3 -> 2 in layer 0 frees 20; values 2 -> 3 in layer 2 takes 16 of it; 4 bytes stay unspent
    effect = {(2, 1, 1): -0.5, (0, 0, -1): 0.1, (2, 0, -1): 0.3, (0, 1, 1): 0.2}
    assert moves([[3, 2], None, [3, 2]], effect, 0) == [[2, 2], None, [3, 3]]
    # keys 2 -> 3 costs 20: neither a value bit (16) nor keys 4 -> 3 (12) can pay for it; keys 3 -> 2 (20) can
    bits = [[2, 3], None, [3, 2]]
    assert price.step(2, 0, 4, -1) == -12
    assert moves(bits, {(0, 0, 1): -0.5, (0, 1, -1): 0.1}, 0) == bits
    assert moves([[2, 3], None, [4, 2]], {(0, 0, 1): -0.5, (0, 1, -1): 0.1, (2, 0, -1): 0.05}, 0) == [[2, 3], None,
                                                                                                     [4, 2]]
    assert moves(bits, {(0, 0, 1): -0.5, (0, 1, -1): 0.1, (2, 0, -1): 0.2}, 0) == [[3, 3], None, [2, 2]]
    assert moves(bits, {(0, 0, 1): -0.5, (0, 1, -1): 0.1}, 4) == [[3, 2], None, [3, 2]]  # room 4 + 16 freed
    # an extra bit (room 20) buys 3-bit keys alone; a harmful or a useless move is never made
    assert moves([[2, 2], None, [2, 2]], {(2, 0, 1): -0.4, (0, 0, 1): -0.1}, 20) == [[2, 2], None, [3, 2]]
    assert moves([[2, 2], None, [2, 2]], {(2, 0, 1): 0.0, (0, 1, 1): 0.1}, 20) == [[2, 2], None, [2, 2]]
    assert moves([[3, 2], None, [3, 2]], {(2, 1, 1): -0.1, (0, 0, -1): 0.2}, 0) == [[3, 2], None, [3, 2]]


def _measured_layers(lines) -> set:
    return {int(x.split("layer ")[1].split()[0]) for x in lines if "->" in x}


def test_only_the_layers_the_policy_compresses_get_bits(reference_mode):
    """Layers a policy leaves fp16 are not measured, take no part in the budget and are None in the result, which
    then plans exactly the policy's compressed layers."""
    model, ids = tiny(layers=3), prompt(48, batch=2)
    lines = []
    bits = allocate_layer_bits(model, ids, 3, 3, progress=lines.append, policy=Policy(keep_layers=(1,)))
    assert bits[1] is None and sum(k + v for k, v in (bits[0], bits[2])) == 2 * (3 + 3)
    assert _measured_layers(lines) == {0, 2}
    assert allocate_layer_bits(model, ids, 4, 4, policy=Policy(keep_layers=(0,))) == (None, (4, 4), (4, 4))
    assert allocate_layer_bits(model, ids, 3, 2, policy=Policy(keep_layers=(0, 1, 2))) == (None,) * 3
    # Gemma-2-style: sliding-window layers (0, 2) beside full-attention ones are left alone by default
    gemma = tiny("gemma2", layers=4)
    lines = []
    bits = allocate_layer_bits(gemma, ids, 3, 2, progress=lines.append)
    assert bits[0] is None and bits[2] is None and sum(map(sum, (bits[1], bits[3]))) == 2 * (3 + 2)
    assert _measured_layers(lines) == {1, 3}
    plans = plan_layers(gemma.config, resolve("balanced", layer_bits=bits))
    assert [p.codec is None for p in plans] == [b is None for b in bits]
    # ... and all compressed (and measured) with compress_sliding=True
    bits = allocate_layer_bits(gemma, ids, 3, 2, rounds=0, policy=Policy(compress_sliding=True))
    assert bits == ((3, 2),) * 4


def test_fp16_layers_are_measured_as_the_uncompressed_model(reference_mode):
    """The measured cache is the prefill's with K/V replaced: all layers fp16 gives the uncompressed model exactly,
    sliding-window layers included (their positions and masks follow the tokens seen, not the tokens held)."""
    for model in (tiny(layers=2), tiny("gemma2", layers=4)):
        with torch.no_grad():
            cal = _Calibration(model, prompt(48, batch=2), 36)
            layers = len(model.model.layers)
            assert cal.loss([None] * layers) == pytest.approx(0.0, abs=1e-9)
            assert cal.loss([(2, 2)] * layers) > 0 and cal.loss([None] * layers) == pytest.approx(0.0, abs=1e-9)


def test_int_arguments_refuse_floats_and_bools():
    model, ids = tiny(layers=2), prompt(48, batch=1)
    for kwargs, name in ((dict(key_bits=3.0), "key_bits"), (dict(value_bits=True), "value_bits"),
                         (dict(extra_bits=True), "extra_bits"), (dict(extra_bits=1.0), "extra_bits"),
                         (dict(rounds=True), "rounds"), (dict(rounds=2.0), "rounds"),
                         (dict(prefix=True), "prefix"), (dict(prefix=36.0), "prefix"), (dict(prefix=0), "prefix")):
        with pytest.raises(ValueError, match=f"^{name} must be an int"):
            allocate_layer_bits(model, ids, **{"key_bits": 3, "value_bits": 2, **kwargs})
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        allocate_layer_bits(model, ids, policy="huge")


def test_too_little_calibration_input_names_input_ids_and_the_minimum():
    model, ids = tiny(layers=2), prompt(48, batch=2)
    for bad, kwargs, least in ((ids[:0], {}, 5), (ids[:, :4], {}, 5), (ids, dict(prefix=47), 49)):
        with pytest.raises(ValueError, match=f"input_ids must hold at least 1 chunk of at least {least} tokens"):
            allocate_layer_bits(model, bad, 3, 2, **kwargs)
