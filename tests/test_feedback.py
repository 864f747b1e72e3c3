import math

import pytest
import torch
from torch import nn

from lightning_sgsc import quantize_
from lightning_sgsc.config import Feedback, Preservation
from lightning_sgsc.feedback import (
    Action,
    Decision,
    FeedbackPolicy,
    apply_decision,
    enforce_min_channels,
    low_bit_channels,
    mask_pruned_grads_,
    prune_channels_,
    raise_precision_,
    select_top,
    taylor_restore_scores,
    zero_bit_channels,
)
from tests.helpers.models import TinyConvNet


def test_policy_prunes_while_the_metric_holds_and_restores_when_it_drops():
    policy = FeedbackPolicy(Feedback(threshold=0.02))
    first = policy.decide(0.90)  # the first measurement sets the reference and decides nothing
    assert first.action is Action.SKIP and first.reason.startswith("the first measurement")
    assert policy.decide(0.95).action is Action.PRUNE and policy.reference.value == 0.95  # best so far
    d = policy.decide(0.94)
    assert d.action is Action.PRUNE and d.degradation == pytest.approx(0.01)
    d = policy.decide(0.92)
    assert d.action is Action.RESTORE and d.degradation == pytest.approx(0.03) and d.reference == 0.95


def test_policy_for_loss_metrics_and_first_reference():
    policy = FeedbackPolicy(Feedback(threshold=0.1, reference="first"), direction="min")
    assert policy.decide(2.0).action is Action.SKIP
    assert policy.decide(1.5).action is Action.PRUNE and policy.reference.value == 2.0  # "first" never moves
    assert policy.decide(2.05).action is Action.PRUNE
    assert policy.decide(2.2).action is Action.RESTORE


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_policy_skips_non_finite_metrics_without_touching_the_reference(bad):
    policy = FeedbackPolicy(Feedback())
    policy.decide(0.9)
    assert policy.decide(bad).action is Action.SKIP
    assert policy.reference.value == 0.9


def test_policy_state_round_trips():
    a = FeedbackPolicy(Feedback())
    a.decide(0.7)
    b = FeedbackPolicy(Feedback())
    b.load_state_dict(a.state_dict())
    assert b.reference.value == 0.7


def test_select_top_takes_the_ceil_fraction_with_highest_scores_across_layers():
    candidates = {"a": torch.tensor([True, False, True]), "b": torch.tensor([True, True])}
    scores = {"a": torch.tensor([0.1, 9.0, 0.5]), "b": torch.tensor([0.3, 0.2])}
    sel = select_top(scores, candidates, 0.5)  # ceil(0.5 * 4) = 2: a[2]=0.5 and b[0]=0.3; a[1] is no candidate
    assert sel["a"].tolist() == [False, False, True] and sel["b"].tolist() == [True, False]


def _zero_bits(net, layer, channels):
    with torch.no_grad():
        layer.bits[channels] = -0.5


def test_prune_freezes_channels_and_clears_adam_state_so_they_stay_zero():
    torch.manual_seed(0)
    net = TinyConvNet()
    quantize_(net, init_bits=4)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    for _ in range(3):  # build up momentum first
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    conv = net.features[0]
    _zero_bits(net, conv, [1, 2])
    assert prune_channels_(net, zero_bit_channels(net), [opt]) == 2
    for _ in range(5):
        opt.zero_grad()
        (nn.functional.cross_entropy(net(x), y) + conv.weight.abs().sum()).backward()
        mask_pruned_grads_(net)  # the callback does this in on_before_optimizer_step
        opt.step()
    assert conv.pruned.tolist() == [False, True, True, False]
    assert torch.equal(conv.weight[1:3], torch.zeros_like(conv.weight[1:3]))
    assert torch.equal(conv.bias[1:3], torch.zeros(2))  # the channel outputs exactly zero: removable at export
    assert torch.equal(conv.bits[1:3], torch.zeros(2))
    assert bool((conv.weight[0] != 0).any())


def test_min_channels_keeps_the_strongest_channel_alive():
    net = TinyConvNet()
    quantize_(net)
    conv = net.features[0]
    with torch.no_grad():
        conv.weight[2] *= 10  # the largest norm
    _zero_bits(net, conv, [0, 1, 2, 3])
    prune, keep = enforce_min_channels(net, zero_bit_channels(net), min_channels=1)
    assert keep["features.0"].tolist() == [False, False, True, False]
    assert prune["features.0"].tolist() == [True, True, False, True]


def test_apply_decision_restores_the_channel_that_matters_most_to_the_preservation_loss():
    torch.manual_seed(0)
    net = TinyConvNet()
    quantize_(net, init_bits=6)
    head = net.head
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(-1)
        head.weight[1] *= 0.01  # output 1 matters little, output 0 is the one the loss depends on
    _zero_bits(net, head, [0, 1])

    def scores():
        return taylor_restore_scores(net, [(x, y)], bits=2, loss=lambda b: nn.functional.cross_entropy(net(b[0]), b[1]))

    decision = Decision(Action.RESTORE, metric=0.5, reference=0.9, degradation=0.4)
    event = apply_decision(net, decision, Feedback(restore_fraction=0.5, restore_bits=3), scores)
    assert event.restored == 1 and event.zero_bit == 2
    assert head.bits[:2].tolist() == [3.0, -0.5]  # the important channel came back at restore_bits
    q = head.quantized_weight()[0]
    assert bool((q != 0).any())


def test_apply_decision_prune_skip_and_counts():
    net = TinyConvNet()
    quantize_(net)
    _zero_bits(net, net.head, [0])
    skip = apply_decision(net, Decision(Action.SKIP, math.nan, None, math.nan), Feedback(), dict)
    assert (skip.restored, skip.pruned, skip.zero_bit) == (0, 0, 1)
    event = apply_decision(net, Decision(Action.PRUNE, 0.9, 0.9, 0.0), Feedback(), dict)
    assert (event.action, event.pruned) == ("prune", 1)
    assert net.head.pruned.tolist() == [True, False, False]
    off = Feedback(prune=False)
    _zero_bits(net, net.head, [1])
    assert apply_decision(net, Decision(Action.PRUNE, 0.9, 0.9, 0.0), off, dict).pruned == 0


def test_a_prune_that_would_empty_a_layer_counts_the_spared_channel_as_kept_alive_not_restored():
    net = TinyConvNet()
    quantize_(net)
    conv = net.features[0]
    _zero_bits(net, conv, list(range(conv.out_channels_)))
    event = apply_decision(net, Decision(Action.PRUNE, 0.9, 0.9, 0.0), Feedback(min_channels=1), dict)
    assert (event.restored, event.kept_alive, event.pruned) == (0, 1, conv.out_channels_ - 1)
    assert int((~conv.pruned).sum()) == 1 and float(conv.bits[~conv.pruned][0]) == Feedback().restore_bits


def test_over_a_budget_a_holding_metric_prunes_nothing_and_in_the_cool_down_nothing_acts():
    policy = FeedbackPolicy(Feedback(threshold=0.01))
    policy.decide(0.9)
    held = policy.decide(0.9, may_prune=False)
    assert held.action is Action.SKIP and "budget" in held.reason
    assert policy.decide(0.5, may_prune=False).action is Action.RESTORE  # a drop still restores
    frozen = policy.decide(0.5, may_act=False)
    assert frozen.action is Action.SKIP and "cool-down" in frozen.reason


def test_the_first_check_prunes_nothing_in_a_fit(tmp_path):
    from tests.helpers.models import TinyClassifier, aggressive_callback, cpu_trainer

    torch.manual_seed(0)
    cb = aggressive_callback(preservation_warmup_epochs=0, quantizer_lr=0.5)
    cpu_trainer(tmp_path, [cb], max_epochs=2, limit_train_batches=6).fit(TinyClassifier(lr=0.05))
    first = cb.history[0]
    assert first["zero_bit"] > 0 and first["pruned"] == 0 and first["action"] == "skip"  # on main: pruned at once


def test_a_drop_within_the_measurements_noise_prunes_instead_of_restoring():
    policy = FeedbackPolicy(Feedback(threshold=0.005))
    policy.decide(0.97)
    assert policy.decide(0.955, noise=0.02).action is Action.PRUNE  # 1.5 points: within two standard errors
    assert policy.decide(0.94, noise=0.02).action is Action.RESTORE  # 3 points: beyond them
    assert policy.decide(0.96).action is Action.RESTORE  # no noise given: the threshold alone, as before


def test_the_noise_margin_is_two_standard_errors_of_the_difference_of_two_measurements():
    # the loop compares a measurement with an earlier one; both carry binomial noise over the same n examples
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    from lightning_sgsc.preservation.lifecycle import PreservationManager
    from lightning_sgsc.preservation.set import PreservationSet

    class Judged(nn.Module):
        preservation_metric_mode = "max"

        def preservation_evaluate(self, batches: object) -> float:
            return 0.9

    manager = PreservationManager(Preservation())
    manager.set = PreservationSet.from_data(TensorDataset(torch.zeros(400, 2), torch.zeros(400, dtype=torch.long)))
    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda value, src=0: value))
    assert manager.metric(trainer, Judged(), recalibrate=False) == 0.9
    assert manager.noise == pytest.approx(2 * (2 * 0.9 * 0.1 / 400) ** 0.5)  # 0.0424: 2 SE of one would be 0.03


def test_a_repair_raises_the_low_bit_channel_whose_requantization_helps_the_loss_most():
    # over the budget, precision goes back to 1- and 2-bit channels too, not only zero-bit ones
    torch.manual_seed(0)
    net = TinyConvNet()
    quantize_(net, init_bits=6)
    head, conv = net.head, net.features[0]
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(-1)
        head.bits[:] = torch.tensor([1.0, 2.0, 6.0])  # a 1-bit channel, a 2-bit one, a 6-bit one (no candidate)
        head.weight[1] *= 0.01  # the 2-bit channel hardly matters to the loss
        conv.bits[:2] = torch.tensor([0.0, 0.0])
        conv.pruned[1] = True  # pruned: never a candidate
    candidates = low_bit_channels(net, max_bits=2.0)
    assert candidates["head"].tolist() == [True, True, False]
    assert candidates["features.0"][:2].tolist() == [True, False]
    scores = taylor_restore_scores(net, [(x, y)], bits=4, loss=lambda b: nn.functional.cross_entropy(net(b[0]), b[1]))
    chosen = select_top({"head": scores["head"]}, {"head": candidates["head"]}, fraction=0.5)
    assert chosen["head"].tolist() == [True, False, False]  # the channel the loss depends on
    assert raise_precision_(net, chosen, bits=4) == 1
    assert head.bits.tolist() == [4.0, 2.0, 6.0]
    raise_precision_(net, {"head": torch.tensor([False, False, True])}, bits=4)
    assert head.bits.tolist() == [4.0, 2.0, 6.0]  # raising never lowers a channel above the target
