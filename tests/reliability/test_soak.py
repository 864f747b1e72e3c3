"""20 epochs with aggressive settings: memory stays flat, buffers and history stay bounded."""

import os

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_sgsc import Feedback, Preservation, Quantization, SafetyGuidedQuantization, model_size
from lightning_sgsc.examples import ClassifierModule, DigitsCNN, DigitsDataModule
from tests.helpers.models import cpu_trainer


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Memory(Callback):
    def __init__(self) -> None:
        self.rss: list[int] = []
        self.draws: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.rss.append(_rss_bytes())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc for RSS")
def test_twenty_aggressive_epochs_keep_memory_flat(tmp_path):
    cb = SafetyGuidedQuantization(
        init_bits=4,
        bit_weight=1.0,
        quantization=Quantization(lr=0.05),
        feedback=Feedback(threshold=0.0, restore_fraction=0.5, max_history=5),
        preservation=Preservation(warmup_epochs=0),
    )
    memory = Memory()
    trainer = cpu_trainer(tmp_path, [cb, memory], max_epochs=20, limit_train_batches=None, limit_val_batches=None)
    pl.seed_everything(0, verbose=False)  # the same run whatever ran before it in the session
    module = ClassifierModule(DigitsCNN(), lr=3e-3)
    trainer.fit(module, DigitsDataModule())
    after = memory.rss[2:]
    assert max(after) <= 1.10 * min(after), [r // 2**20 for r in memory.rss]
    assert len(cb.history) == 5 and cb.history[-1]["epoch"] == 19  # bounded, newest kept
    assert len(cb.preservation_set) == 256  # the set does not grow
    # the loop acted: channels were pruned for good (counted on the model: the bounded history may show only the
    # last, quiet checks)
    assert model_size(module).pruned_channels > 0
