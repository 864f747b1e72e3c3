"""Every argument check of the callback and its settings, the OK configurations first, then each bad one."""

import dataclasses
import inspect
import warnings

import pytest
from torch.utils.data import TensorDataset

from lightning_sgsc import (
    Budget,
    Feedback,
    Losses,
    Preservation,
    Quantization,
    SafetyGuidedQuantization,
    SGSCTypeError,
    SGSCValueError,
)
from lightning_sgsc.config import SETTINGS, field_help
from lightning_sgsc.settings import DEPRECATED, SHORTCUTS
from tests.helpers.models import blob_data

OK = [
    {},  # OK
    {"init_bits": 2},  # OK: a shortcut
    {"quantization": Quantization(init_bits=16.0)},  # OK: a group
    {"quantization": {"init_bits": 2, "init_headroom": 0}},  # OK: a group as a mapping (a config file's shape)
    {"quantization": Quantization(init_bits=8, init_headroom=6)},  # OK: the most room at 8 bits
    {"bit_weight": lambda epoch: 0.1 * epoch},  # OK: schedules
    {"losses": Losses(preservation_weight=0.0), "preservation_size": 0},  # OK: no preservation at all
    {"preservation_data": blob_data(8)},  # OK
    {"feedback": Feedback(threshold=0.0, restore_fraction=1.0, restore_bits=1, min_channels=0)},  # OK
    {"include": ["net.*"], "exclude": ["net.head"]},  # OK
    {"feedback": Feedback(reference="first")},  # OK
    {"preservation": Preservation(batch_size=None)},  # OK: the training batch, at most 32
    {"preservation": Preservation(batch_size=1), "preservation_size": 64},  # OK: a shortcut beside its group
    {"budget": Budget(max_drop=0.01, monitor="val/acc", mode="max"), "bit_weight": 0.5},  # OK
    {"max_drop": 0.01, "monitor": "val/loss", "mode": "min", "cooldown_fraction": 0.25},  # OK: shortcuts
    {"max_drop": 0.02},  # OK: the preservation metric is the signal
    {"budget": Budget(target_bytes=10_000), "preservation_size": 0},  # OK: a size budget needs no metric
    {"init_bits": 4, "quantization": Quantization(init_bits=4)},  # OK: set twice, to the same value
]

BAD = [
    ({"init_bits": 1}, SGSCValueError, r"`quantization.init_bits` must be in \[2, 16\], got 1\."),
    ({"init_bits": 32}, SGSCValueError, r"`quantization.init_bits` must be in \[2, 16\], got 32\."),
    (
        {"quantization": Quantization(init_bits=4, init_headroom=0), "init_bits": 8},
        SGSCValueError,
        r"`init_bits` must be left unset when `quantization=` sets quantization.init_bits \(4\), got 8\.",
    ),
    (
        {"quantization": {"init_bits": 4, "init_headroom": 3}},
        SGSCValueError,
        r"`quantization.init_headroom` must be a number from 0 to init_bits - 2 = 2 \(or None\), got 3\.",
    ),
    ({"losses": {"l1_weight": -0.1}}, SGSCValueError, r"`losses.l1_weight` must be in \[0, inf\), got -0.1\."),
    ({"bit_weight": -1}, SGSCValueError, r"`losses.bit_weight` must be in \[0, inf\), got -1\."),
    (
        {"losses": Losses(preservation_weight=1.0), "preservation_size": 0},
        SGSCValueError,
        r"`losses.preservation_weight` must be 0 or None when there is no preservation set, got 1.0\.",
    ),
    ({"quantization": {"lr": 0}}, SGSCValueError, r"`quantization.lr` must be a number > 0, got 0\."),
    (
        {"preservation": {"loss": "kl"}},
        SGSCValueError,
        r"`preservation.loss` must be one of \('distill', 'labels'\), got 'kl'\.",
    ),
    ({"preservation": {"temperature": 0}}, SGSCValueError, r"`preservation.temperature` must be a number > 0"),
    ({"quantization": {"compile": "yes"}}, SGSCTypeError, r"`quantization.compile` must be True or False"),
    (
        {"preservation_data": [1, 2]},
        SGSCTypeError,
        r"`preservation.data` must be a PreservationSet, torch Dataset or DataLoader",
    ),
    ({"preservation_size": -1}, SGSCValueError, r"`preservation.size` must be an integer >= 0, got -1\."),
    (
        {"preservation": {"batch_size": 0}},
        SGSCValueError,
        r"`preservation.batch_size` must be an integer >= 1 or None, got 0\.",
    ),
    (
        {"preservation": {"batch_size": 8.0}},
        SGSCValueError,
        r"`preservation.batch_size` must be an integer >= 1 or None, got 8\.0\.",
    ),
    (
        {"preservation": {"fractions": {"gradcam": 0.5}}},
        SGSCValueError,
        r"`preservation.fractions` must be shares that sum to 1",
    ),
    ({"feedback": {"threshold": -0.1}}, SGSCValueError, r"`feedback.threshold` must be in \[0, inf\), got -0.1\."),
    ({"feedback": {"restore_fraction": 0}}, SGSCValueError, r"`feedback.restore_fraction` must be in \(0, 1\]"),
    ({"feedback": {"restore_fraction": 1.5}}, SGSCValueError, r"`feedback.restore_fraction` must be in \(0, 1\]"),
    ({"feedback": {"restore_bits": 0.5}}, SGSCValueError, r"`feedback.restore_bits` must be in \[1, 16\], got 0.5"),
    ({"feedback": {"min_channels": -1}}, SGSCValueError, r"`feedback.min_channels` must be an integer >= 0"),
    ({"feedback": {"reference": "last"}}, SGSCValueError, r"`feedback.reference` must be one of 'best', 'first'"),
    ({"feedback": {"max_history": 0}}, SGSCValueError, r"`feedback.max_history` must be an integer >= 1, got 0\."),
    ({"include": "net.*"}, SGSCTypeError, r"`quantization.include` must be a list of fnmatch patterns"),
    ({"init_bits": float("nan")}, SGSCValueError, r"`quantization.init_bits` must be a finite number, got nan\."),
    (
        {"preservation": {"every_n_steps": 0}},
        SGSCValueError,
        r"`preservation.every_n_steps` must be an integer >= 1, got 0\.",
    ),
    (
        {"budget": {"max_drp": 0.01}},
        SGSCValueError,
        r"`budget` must be a Budget or a mapping of its fields .*, got 'max_drp'\. Did you mean 'max_drop'\?",
    ),
    ({"budget": 0.01}, SGSCTypeError, r"`budget` must be a lightning_sgsc.Budget, a mapping of its fields, or None"),
    ({"bit_wieght": 0.1}, SGSCTypeError, r"got 'bit_wieght'\. Did you mean 'bit_weight'\?"),
    ({"seed": "0"}, SGSCTypeError, r"`seed` must be an integer, got '0'\."),
]


@pytest.mark.parametrize("kwargs", OK)
def test_ok_configurations(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # none of these is an old spelling
        SafetyGuidedQuantization(**kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_configurations(kwargs, error, match):
    with pytest.raises(error, match=match):
        SafetyGuidedQuantization(**kwargs)


def test_a_shortcut_sets_its_field():
    cb = SafetyGuidedQuantization(
        init_bits=4, bit_weight=0.3, preservation_size=12, max_drop=0.02, cooldown_fraction=0.1
    )
    s = cb.settings
    assert (s.quantization.init_bits, s.losses.bit_weight, s.preservation.size) == (4, 0.3, 12)
    assert (s.budget.max_drop, s.budget.cooldown_fraction) == (0.02, 0.1)
    assert set(SHORTCUTS) <= set(inspect.signature(SafetyGuidedQuantization).parameters)


OLD_VALUES = {  # a value other than the default for each flat name of 0.2
    "quantizer_lr": 0.05,
    "init_headroom": 1.0,
    "compile_quantizer": True,
    "l1_weight": 0.1,
    "preservation_weight": 0.5,
    "preservation_batch_size": 16,
    "preservation_every_n_steps": 4,
    "preservation_source": blob_data(8),
    "preservation_fractions": {"uncertainty": 0.5, "kmeans": 0.5},
    "preservation_warmup_epochs": 0,
    "preservation_pool": 100,
    "balance_classes": True,
    "preservation_loss": "labels",
    "distill_temperature": 2.0,
    "recalibrate_norms": False,
    "threshold": 0.05,
    "restore_fraction": 0.5,
    "restore_bits": 4.0,
    "min_channels": 2,
    "prune": False,
    "reference": "first",
    "max_history": 10,
    "drop_type": "relative",
    "reference_value": 0.9,
    "target_bytes": 1000,
    "target_bits_per_weight": 2.0,
    "budget_warmup_checks": 2,
    "keep_best": False,
    "best_state_path": "best.pt",
}


def test_the_table_of_old_spellings_is_complete():
    assert set(OLD_VALUES) == set(DEPRECATED)


@pytest.mark.parametrize("old", sorted(DEPRECATED))
def test_every_old_flat_spelling_still_works_for_one_release_with_a_warning(old):
    group, field = DEPRECATED[old]
    value = OLD_VALUES[old]
    assert getattr(SETTINGS[group](), field) != value
    needs_budget = group == "budget" and old not in ("target_bytes", "target_bits_per_weight")
    extra = {"max_drop": 0.01} if needs_budget else {}
    with pytest.warns(FutureWarning, match=rf"`SafetyGuidedQuantization\({old}=...\)` is deprecated .*: use `{group}="):
        cb = SafetyGuidedQuantization(**{old: value}, **extra)
    assert getattr(getattr(cb.settings, group), field) == value


def test_an_old_spelling_and_its_group_that_disagree_are_refused():
    with pytest.warns(FutureWarning), pytest.raises(SGSCValueError, match=r"`quantizer_lr` must be left unset"):
        SafetyGuidedQuantization(quantization=Quantization(lr=0.1), quantizer_lr=0.2)


def test_every_field_is_documented_once_in_its_class_docstring():
    for name, cls in SETTINGS.items():
        documented = field_help(cls)
        assert set(documented) == {f.name for f in dataclasses.fields(cls)}, name
        assert all(len(text) > 10 for text in documented.values()), name


def test_a_schedule_returning_a_bad_value_names_the_epoch():
    weights = Losses(bit_weight=lambda epoch: -1.0)
    with pytest.raises(SGSCValueError, match=r"`losses.bit_weight\(3\)` must be in \[0, inf\), got -1.0\."):
        weights.at(3, has_preservation=True)


def test_empty_preservation_dataset_is_an_error(tmp_path):
    import torch

    from tests.helpers.models import TinyClassifier, cpu_trainer

    cb = SafetyGuidedQuantization(preservation_data=TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long()))
    with pytest.raises(SGSCValueError, match=r"`preservation_data` must be a non-empty Dataset or DataLoader"):
        cpu_trainer(tmp_path, [cb]).fit(TinyClassifier())
