"""Run by tests/reliability/test_kill.py: a digits fit that may SIGKILL itself at a step, or resume from last.ckpt;
it saves the final state to <out>/final.pt."""

import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sgsc import Feedback, Preservation, Quantization, SafetyGuidedQuantization
from lightning_sgsc.examples import ClassifierModule, DigitsCNN, DigitsDataModule


class Kill(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:  # before this step's checkpoint: last.ckpt is the previous step's
            os.kill(os.getpid(), signal.SIGKILL)


def main(out: Path, kill_step: int, resume: bool) -> None:
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    callback = SafetyGuidedQuantization(
        quantization=Quantization(init_bits=4, lr=0.05),
        bit_weight=0.5,
        preservation=Preservation(size=64, warmup_epochs=1, every_n_steps=4),
        feedback=Feedback(threshold=0.0),
        seed=0,
    )
    saver = ModelCheckpoint(dirpath=out, save_last=True, every_n_train_steps=1, save_top_k=0)
    callbacks = [callback, saver] + ([Kill(kill_step)] if kill_step >= 0 else [])
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, default_root_dir=out, num_sanity_val_steps=0,
    )  # fmt: skip
    module = ClassifierModule(DigitsCNN(), lr=3e-3)
    trainer.fit(module, DigitsDataModule(seed=0), ckpt_path=out / "last.ckpt" if resume else None)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    extra = {"indices": callback.preservation.indices, "draws": callback.preservation.draws}
    torch.save({"state": state, "history": callback.history, **extra}, out / "final.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "resume")
