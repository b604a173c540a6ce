"""Oscillation tracking, dampening and iterative freezing (quant/oscillation.py), on plain convs."""

import pytest
import torch
from torch import nn

from yolo_qat.quant import QuantConv2d
from yolo_qat.quant.oscillation import Dampening, DelayedCosine, OscillationTracker, dampening_loss


def qconv(seed=0, bits=4, per_channel=False):
    torch.manual_seed(seed)
    return QuantConv2d.from_conv(nn.Conv2d(4, 8, 3), bits, bits, per_channel=per_channel)


def test_delayed_cosine_schedule():
    s = DelayedCosine(0.04, 0.01, start=0.25)
    assert s(0.0) is None and s(0.2499) is None
    assert s(0.25) == pytest.approx(0.04) and s(1.0) == pytest.approx(0.01)
    assert s(0.625) == pytest.approx(0.025)  # cosine midpoint
    vals = [s(0.25 + 0.75 * i / 10) for i in range(11)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_tracker_counts_sign_flips_only():
    conv = qconv()
    convs = {"c": conv}
    tr = OscillationTracker(convs, momentum=0.5)
    s = conv.weight_quantizer.scale
    with torch.no_grad():
        conv.weight.copy_(torch.zeros_like(conv.weight))
    tr = OscillationTracker(convs, momentum=0.5)
    # weight 0: 0 -> +1 -> 0 -> +1  (up, down = flip, up = flip)
    # weight 1: 0 -> +1 -> +2 -> +3  (monotone: never an oscillation)
    seq0, seq1 = [1, 0, 1], [1, 2, 3]
    f_expected = 0.0
    for t, (a, b) in enumerate(zip(seq0, seq1)):
        with torch.no_grad():
            conv.weight.view(-1)[0] = a * s
            conv.weight.view(-1)[1] = b * s
        tr.update(convs)
        osc = 1.0 if t >= 1 else 0.0
        f_expected = 0.5 * osc + 0.5 * f_expected
        f = tr.freq_0.view(-1)
        assert f[0].item() == pytest.approx(f_expected) and f[1].item() == 0.0
    assert f_expected == pytest.approx(0.75)
    stats = tr.layer_stats(0.5)["c"]
    assert stats["osc_share"] == pytest.approx(1 / conv.weight.numel())


def test_dampening_zero_in_warmup_positive_after_and_pulls_to_bin_centre():
    conv = qconv(1)
    damp = Dampening(final_lambda=0.1, start=0.25)
    assert damp.weight(0.1) == 0.0 and float(damp({"c": conv}, 0.1)) == 0.0
    assert not damp({"c": conv}, 0.1).requires_grad
    late = damp({"c": conv}, 0.8)
    assert late.item() > 0 and late.requires_grad
    assert damp.weight(1.0) == pytest.approx(0.1)
    # the loss value is the formula, and its gradient moves weights towards q(w)
    q = conv.weight_quantizer
    w = conv.weight.detach()
    s = q.scale
    ref = ((w / s).round().clamp(q.qmin, q.qmax) * s - w.clamp(q.qmin * s, q.qmax * s)).pow(2).sum()
    loss = dampening_loss({"c": conv})
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    before = (conv.quantized_weight().detach() - w).pow(2).sum()
    with torch.no_grad():
        conv.weight -= 0.1 * conv.weight.grad
    after = (conv.quantized_weight().detach() - conv.weight.detach()).pow(2).sum()
    assert after < before
    assert conv.weight_quantizer._scale.grad is not None


@pytest.mark.parametrize("per_channel", [False, True])
def test_freezing_freezes_oscillating_weights_and_keeps_their_codes(per_channel):
    conv = qconv(2, per_channel=per_channel)
    convs = {"c": conv}
    tr = OscillationTracker(convs, momentum=0.2)
    s = conv.weight_quantizer.scale.reshape(-1, 1, 1, 1) if per_channel else conv.weight_quantizer.scale
    idx = [0, 5, 17]
    base = conv.integer_weight().clone()
    for t in range(8):  # the chosen weights flip between two codes every step, the others stay put
        with torch.no_grad():
            w_int = base.clone().view(-1)
            for i in idx:
                w_int[i] = 0.0 if t % 2 == 0 else 1.0
            conv.weight.copy_(w_int.view_as(conv.weight) * s)
        tr.update(convs)
    assert tr.freeze(convs, None) == 0  # schedule off: nothing frozen
    n = tr.freeze(convs, 0.1)
    assert n == len(idx)
    frozen = tr.frozen_0.view(-1)
    assert frozen[idx].all() and int(frozen.sum()) == len(idx)
    codes = tr.frozen_int_0.view(-1)[idx].float()
    assert set(codes.tolist()) <= {0.0, 1.0}  # round(EMA of the integer value)
    tr.apply_frozen(convs)
    # An optimizer (and a scale change) moving everything must not change the frozen codes.
    for _ in range(5):
        with torch.no_grad():
            conv.weight.add_(torch.randn_like(conv.weight) * 0.5 * s)
            conv.weight_quantizer.set_scale(conv.weight_quantizer.scale * 1.1)
        tr.apply_frozen(convs)
        assert torch.equal(conv.integer_weight().view(-1)[idx], codes)
    # the tracker's state survives a state_dict round trip (it is checkpointed for resume)
    tr2 = OscillationTracker(convs, momentum=0.2)
    tr2.load_state_dict(tr.state_dict())
    assert torch.equal(tr2.frozen_0, tr.frozen_0) and torch.equal(tr2.frozen_int_0, tr.frozen_int_0)


def test_freezing_can_leave_the_8bit_layers_alone():
    """``max_bits``: an 8-bit layer (stem, head) whose weights all oscillate is frozen only when max_bits admits it."""
    convs = {"low": qconv(3, bits=4), "high": qconv(4, bits=8)}
    tr = OscillationTracker(convs, momentum=0.5)
    for t in range(6):  # every weight of both layers flips between codes 0 and 1 each step
        with torch.no_grad():
            for c in convs.values():
                c.weight.fill_(float(t % 2) * float(c.weight_quantizer.scale))
        tr.update(convs)
    n4 = tr.freeze(convs, 0.1, max_bits=4)
    assert n4 == convs["low"].weight.numel() and not tr.frozen_1.any()
    assert tr.freeze(convs, 0.1) == convs["high"].weight.numel()  # the default (8) freezes the 8-bit layer too
    with pytest.raises(ValueError, match="freeze_max_bits"):
        from yolo_qat.engine.config import QATConfig

        QATConfig(freeze_max_bits=1)
