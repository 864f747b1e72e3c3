"""BatchNorm next to quantized twins: links, exact zeros after the norm, removal, statistics that fit the weights."""

from __future__ import annotations

import dataclasses
import warnings

import lightning.pytorch as pl
import pytest
import torch

from lightning_sgsc import SafetyGuidedQuantization, prune_zero_channels, quantize_
from lightning_sgsc.examples import ClassifierModule, DigitsDataModule
from lightning_sgsc.feedback import mask_pruned_grads_, prune_channels_
from lightning_sgsc.norms import link_norms_, norms_after, recalibrate_norms_
from lightning_sgsc.quant import dequantize_, quantized_layers
from tests.helpers.zoo import ResidualBNCNN


def _linked() -> ResidualBNCNN:
    torch.manual_seed(0)
    net = ResidualBNCNN()
    quantize_(net, init_bits=6)
    link_norms_(net, lambda: net(torch.randn(2, 1, 8, 8)))
    return net


def test_each_twin_is_linked_to_the_batch_norm_that_reads_it():
    net = ResidualBNCNN()
    quantize_(net, init_bits=6)
    links = norms_after(net, lambda: net(torch.randn(2, 1, 8, 8)))
    assert links == {
        "stem.0": "stem.1",
        "block1.conv1": "block1.bn1",
        "block1.conv2": "block1.bn2",
        "block2.conv1": "block2.bn1",
        "block2.conv2": "block2.bn2",
        "block2.short.0": "block2.short.1",
    }  # the head reads no norm


def test_a_pruned_channel_is_exactly_zero_after_its_norm_in_both_modes_and_stays_frozen():
    net = _linked()
    conv, bn = net.block1.conv1, net.block1.bn1
    mask = torch.zeros(conv.out_channels_, dtype=torch.bool)
    mask[[1, 5]] = True
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    prune_channels_(net, {"block1.conv1": mask}, [opt])
    assert not bn.weight[mask].any() and not bn.bias[mask].any()
    assert all(not opt.state[bn.weight][k][mask].any() for k in ("exp_avg", "exp_avg_sq"))
    seen = []
    bn.register_forward_hook(lambda m, i, o: seen.append(o[:, mask]))
    for mode in (True, False):
        net.train(mode)
        net(torch.randn(4, 1, 8, 8))
    assert all(bool((o == 0).all()) for o in seen)
    opt.zero_grad()
    net.train()
    net(torch.randn(4, 1, 8, 8)).sum().backward()
    mask_pruned_grads_(net)
    assert not bn.weight.grad[mask].any() and not bn.bias.grad[mask].any()


def test_physical_pruning_removes_channels_through_a_batch_norm_exactly():
    net = _linked()
    prune_channels_(net, {"block1.conv1": torch.arange(16) < 6, "block2.conv1": torch.arange(32) % 2 == 0})
    dequantize_(net)
    net.eval()
    x = torch.randn(5, 1, 8, 8)
    report = prune_zero_channels(net, x)
    assert report.removed == {"block1.conv1": 6, "block2.conv1": 16}
    assert net.block1.bn1.num_features == 10 and net.block2.conv2.in_channels == 16
    assert report.max_abs_diff <= 1e-5 and report.macs_after < report.macs_before


def test_a_norm_with_a_nonzero_beta_blocks_removal():
    net = ResidualBNCNN()
    quantize_(net, init_bits=6)  # not linked: pruning leaves the norm's beta as it is
    with torch.no_grad():
        net.block1.bn1.bias.fill_(0.1)
    prune_channels_(net, {"block1.conv1": torch.arange(16) < 6})
    dequantize_(net)
    report = prune_zero_channels(net.eval(), torch.randn(5, 1, 8, 8))
    assert "block1.conv1" not in report.removed and report.kept_zero["block1.conv1"] == 6


def test_recalibration_gives_the_statistics_of_the_current_weights():
    net = _linked()
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        net.stem[1].running_mean.fill_(5.0)  # stale
    dropout_seen = torch.random.get_rng_state()
    assert recalibrate_norms_(net, [x[:32], x[32:]], net) == 6
    assert torch.equal(torch.random.get_rng_state(), dropout_seen)  # no random number drawn
    expected = net.stem[0](x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(net.stem[1].running_mean, expected, atol=1e-5, rtol=1e-5)
    assert net.stem[1].momentum == 0.1 and net.training  # settings and mode as they were


def _fit_on_digits(tmp_path, epochs, **overrides):
    """A residual BatchNorm CNN fitted on digits with the demo's settings, the preservation set built at once."""
    from lightning_sgsc.demo import DEMO_SETTINGS
    from lightning_sgsc.settings import merge_settings

    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(ResidualBNCNN(), lr=3e-3)
    cb = SafetyGuidedQuantization(**merge_settings(DEMO_SETTINGS, {"preservation": {"warmup_epochs": 0}}, overrides))
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[cb],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DigitsDataModule(seed=0))
    return module, cb, trainer


@pytest.mark.slow
def test_the_preservation_metric_of_a_batch_norm_net_does_not_follow_stale_statistics(tmp_path):
    # digits, the demo's settings, a residual CNN with BatchNorm: statistics that lag the weights (here made stale on
    # purpose) move the measured metric by many points; with recalibration it stays within 2 points
    module, cb, trainer = _fit_on_digits(tmp_path, epochs=3)
    fresh = cb.measure_preservation(trainer, module)
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def make_stale() -> None:
        with torch.no_grad():
            for norm in norms:
                norm.running_mean.add_(0.5 * norm.running_var.sqrt())

    make_stale()
    assert abs(cb.measure_preservation(trainer, module) - fresh) < 0.02
    cb.settings = dataclasses.replace(
        cb.settings, preservation=dataclasses.replace(cb.settings.preservation, recalibrate_norms=False)
    )
    make_stale()
    assert abs(cb.measure_preservation(trainer, module) - fresh) > 0.02  # what the loop judged without it
    assert len(quantized_layers(module)) == 7


def test_a_restored_channel_gets_statistics_of_its_returning_output(tmp_path):
    # a zero-bit channel's BatchNorm variance is ~0 after recalibration; a restore that kept those statistics would
    # scale the returning channel by ~1/sqrt(eps) in eval mode (the test accuracy fell to 10 % in bench/bn_feedback)
    module, cb, trainer = _fit_on_digits(tmp_path, epochs=1, feedback={"restore_fraction": 1.0})
    conv, norm = module.net.block1.conv1, module.net.block1.bn1
    with torch.no_grad():
        conv.bits[:4] = 0.0  # four channels at zero bits, not pruned
    cb.measure_preservation(trainer, module)
    assert bool((norm.running_var[:4] < 1e-6).all())  # the statistics of zero channels
    cb.policy.reference.value = 2.0  # any measurement is now a drop beyond the noise: the loop restores
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]  # outside the fit loop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cb._feedback(trainer, module)
    assert cb.history[-1]["restored"] >= 4 and bool((conv.bits[:4] > 0).all())
    assert bool((norm.running_var[:4] > 1e-4).all())  # recalibrated for the restored weights
