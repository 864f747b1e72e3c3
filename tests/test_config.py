"""Every argument check of the callback, the OK configurations first, then each bad one."""

import pytest
from torch.utils.data import TensorDataset

from lightning_sgsc import SafetyGuidedQuantization, SGSCTypeError, SGSCValueError
from lightning_sgsc.config import FeedbackConfig, LossWeights
from tests.helpers.models import blob_data

OK = [
    {},  # OK
    {"init_bits": 2},  # OK
    {"init_bits": 16.0},  # OK
    {"init_bits": 2, "init_headroom": 0},  # OK
    {"init_bits": 8, "init_headroom": 6},  # OK: the most room at 8 bits
    {"bit_weight": lambda epoch: 0.1 * epoch},  # OK: schedules
    {"preservation_weight": 0.0, "preservation_size": 0},  # OK: no preservation at all
    {"preservation_data": blob_data(8)},  # OK
    {"threshold": 0.0, "restore_fraction": 1.0, "restore_bits": 1, "min_channels": 0},  # OK
    {"include": ["net.*"], "exclude": ["net.head"]},  # OK
    {"reference": "first"},  # OK
    {"preservation_batch_size": None},  # OK: the training batch, at most 32
    {"preservation_batch_size": 1},  # OK
]

BAD = [
    ({"init_bits": 1}, SGSCValueError, r"`init_bits` must be in \[2, 16\], got 1\."),
    ({"init_bits": 32}, SGSCValueError, r"`init_bits` must be in \[2, 16\], got 32\."),
    (
        {"init_bits": 4, "init_headroom": 3},
        SGSCValueError,
        r"`init_headroom` must be a number from 0 to init_bits - 2 = 2 \(or None\), got 3\.",
    ),
    ({"l1_weight": -0.1}, SGSCValueError, r"`l1_weight` must be in \[0, inf\), got -0.1\."),
    ({"bit_weight": -1}, SGSCValueError, r"`bit_weight` must be in \[0, inf\), got -1\."),
    ({"preservation_weight": -2.0}, SGSCValueError, r"`preservation_weight` must be in \[0, inf\), got -2.0\."),
    (
        {"preservation_weight": 1.0, "preservation_size": 0},
        SGSCValueError,
        r"`preservation_weight` must be 0 when there is no preservation data, got 1.0\. Pass `preservation_data=`",
    ),
    ({"quantizer_lr": 0}, SGSCValueError, r"`quantizer_lr` must be a number > 0, got 0\."),
    (
        {"preservation_loss": "kl"},
        SGSCValueError,
        r"`preservation_loss` must be one of \('distill', 'labels'\), got 'kl'\.",
    ),
    ({"distill_temperature": 0}, SGSCValueError, r"`distill_temperature` must be a number > 0, got 0\."),
    ({"compile_quantizer": "yes"}, SGSCTypeError, r"`compile_quantizer` must be True or False, got 'yes'\."),
    (
        {"preservation_data": [1, 2]},
        SGSCTypeError,
        r"`preservation_data` must be a PreservationSet, torch Dataset or DataLoader",
    ),
    ({"preservation_size": -1}, SGSCValueError, r"`preservation_size` must be an integer >= 0, got -1\."),
    (
        {"preservation_batch_size": 0},
        SGSCValueError,
        r"`preservation_batch_size` must be an integer >= 1 or None, got 0\.",
    ),
    (
        {"preservation_batch_size": 8.0},
        SGSCValueError,
        r"`preservation_batch_size` must be an integer >= 1 or None, got 8\.0\.",
    ),
    ({"threshold": -0.1}, SGSCValueError, r"`threshold` must be in \[0, inf\), got -0.1\."),
    ({"restore_fraction": 0}, SGSCValueError, r"`restore_fraction` must be in \(0, 1\], got 0\."),
    ({"restore_fraction": 1.5}, SGSCValueError, r"`restore_fraction` must be in \(0, 1\], got 1.5\."),
    ({"restore_bits": 0.5}, SGSCValueError, r"`restore_bits` must be in \[1, 16\], got 0.5\."),
    ({"min_channels": -1}, SGSCValueError, r"`min_channels` must be an integer >= 0, got -1\."),
    ({"reference": "last"}, SGSCValueError, r"`reference` must be one of 'best', 'first', got 'last'\."),
    ({"include": "net.*"}, SGSCTypeError, r"`include` must be a list of fnmatch patterns"),
    ({"init_bits": float("nan")}, SGSCValueError, r"`init_bits` must be a finite number, got nan\."),
    (
        {"preservation_every_n_steps": 0},
        SGSCValueError,
        r"`preservation_every_n_steps` must be an integer >= 1, got 0\.",
    ),
]


@pytest.mark.parametrize("kwargs", OK)
def test_ok_configurations(kwargs):
    SafetyGuidedQuantization(**kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD)
def test_bad_configurations(kwargs, error, match):
    with pytest.raises(error, match=match):
        SafetyGuidedQuantization(**kwargs)


def test_feedback_mode_is_checked():
    with pytest.raises(SGSCValueError, match=r"`mode` must be one of 'max', 'min', got 'up'\."):
        FeedbackConfig(mode="up")


def test_a_schedule_returning_a_bad_value_names_the_epoch():
    weights = LossWeights(bit_weight=lambda epoch: -1.0)
    with pytest.raises(SGSCValueError, match=r"`bit_weight\(3\)` must be in \[0, inf\), got -1.0\."):
        weights.at(3)


def test_empty_preservation_dataset_is_an_error(tmp_path):
    import torch

    from tests.helpers.models import TinyClassifier, cpu_trainer

    cb = SafetyGuidedQuantization(preservation_data=TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0).long()))
    with pytest.raises(SGSCValueError, match=r"`preservation_data` must be a non-empty Dataset or DataLoader"):
        cpu_trainer(tmp_path, [cb]).fit(TinyClassifier())
