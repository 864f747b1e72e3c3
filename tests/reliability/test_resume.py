"""A run stopped and resumed from its checkpoint ends exactly where an uninterrupted run of the same seed ends."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_sgsc import Budget, SafetyGuidedQuantization
from tests.helpers.models import TinyClassifier, aggressive_callback, cpu_trainer


class InOrder(TinyClassifier):
    """Unshuffled training data: Lightning does not restore a shuffling DataLoader's generator mid-run."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)


BUDGET = Budget(
    max_drop=0.1, monitor="val/acc", mode="max", warmup_checks=1, reference_fraction=0.25, cooldown_fraction=0.2
)


def _callback(budget: bool = False) -> SafetyGuidedQuantization:
    return aggressive_callback(**({"budget": BUDGET} if budget else {}))


class _StopAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _state(model: TinyClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("budget", [False, True], ids=["fixed_penalty", "budget"])
def test_resume_matches_an_uninterrupted_run(tmp_path, budget):
    kwargs = dict(limit_train_batches=4, limit_val_batches=2)
    torch.manual_seed(0)
    straight = InOrder(lr=0.05)
    cb_straight = _callback(budget)
    cpu_trainer(tmp_path / "a", [cb_straight], max_epochs=4, **kwargs).fit(straight)

    torch.manual_seed(0)
    first = InOrder(lr=0.05)
    cb_first = _callback(budget)
    saver = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True)  # mid-run, as users resume (before fit end)
    callbacks = [cb_first, saver, _StopAfter(2)]  # a 4-epoch run interrupted after 2 (the cool-down's schedule)
    trainer = cpu_trainer(tmp_path / "b", callbacks, max_epochs=4, enable_checkpointing=True, **kwargs)
    trainer.fit(first)
    ckpt = tmp_path / "b" / "last.ckpt"

    torch.manual_seed(123)  # a different process state: nothing may depend on it
    resumed = InOrder(lr=0.05)  # float, unswapped: the callback swaps before the checkpoint's weights load
    cb_resumed = _callback(budget)
    cpu_trainer(tmp_path / "c", [cb_resumed], max_epochs=4, **kwargs).fit(resumed, ckpt_path=ckpt)

    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bits, exponents, pruned masks, weights: bit for bit
    assert cb_resumed.history == cb_straight.history
    assert any(e["pruned"] or e["restored"] for e in cb_straight.history)  # the run did make decisions
    assert cb_resumed.preservation_set.indices.tolist() == cb_straight.preservation_set.indices.tolist()
    assert cb_resumed.preservation.draws == cb_straight.preservation.draws
    assert cb_resumed.loss_weights(3) == cb_straight.loss_weights(3)
    if budget:  # the controller, the best state kept and the cool-down resume exactly too
        a_state, b_state = cb_straight.state_dict()["budget"], cb_resumed.state_dict()["budget"]
        assert a_state["tracker"]["controller"] == b_state["tracker"]["controller"] and a_state["cooling"]
        assert a_state["tracker"]["best"] == b_state["tracker"]["best"]
