"""A run stopped and resumed from its checkpoint ends exactly where an uninterrupted run of the same seed ends."""

import torch
from torch.utils.data import DataLoader

from lightning_sgsc import SafetyGuidedQuantization
from tests.helpers.models import TinyClassifier, aggressive_callback, cpu_trainer


class InOrder(TinyClassifier):
    """Unshuffled training data: Lightning does not restore a shuffling DataLoader's generator mid-run."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)


def _callback() -> SafetyGuidedQuantization:
    return aggressive_callback()


def _state(model: TinyClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_matches_an_uninterrupted_run(tmp_path):
    kwargs = dict(limit_train_batches=4, limit_val_batches=2)
    torch.manual_seed(0)
    straight = InOrder(lr=0.05)
    cb_straight = _callback()
    cpu_trainer(tmp_path / "a", [cb_straight], max_epochs=4, **kwargs).fit(straight)

    torch.manual_seed(0)
    first = InOrder(lr=0.05)
    cb_first = _callback()
    trainer = cpu_trainer(tmp_path / "b", [cb_first], max_epochs=2, **kwargs)
    trainer.fit(first)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)

    torch.manual_seed(123)  # a different process state: nothing may depend on it
    resumed = InOrder(lr=0.05)  # float, unswapped: the callback swaps before the checkpoint's weights load
    cb_resumed = _callback()
    cpu_trainer(tmp_path / "c", [cb_resumed], max_epochs=4, **kwargs).fit(resumed, ckpt_path=ckpt)

    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bits, exponents, pruned masks, weights: bit for bit
    assert cb_resumed.history == cb_straight.history
    assert any(e["pruned"] or e["restored"] for e in cb_straight.history)  # the run did make decisions
    assert cb_resumed.preservation_set.indices.tolist() == cb_straight.preservation_set.indices.tolist()
    assert cb_resumed.preservation.draws == cb_straight.preservation.draws
