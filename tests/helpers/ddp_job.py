"""Run by tests/reliability/test_ddp.py: two CPU processes (gloo) train with the callback; each rank saves its state."""

import sys
from pathlib import Path

import torch

from tests.helpers.models import TinyClassifier, aggressive_callback, cpu_trainer


class SkewedRanks(TinyClassifier):
    """Rank 1 measures its preservation set 0.3 lower: left alone, rank 1 would restore while rank 0 prunes."""

    def preservation_evaluate(self, batches):
        return super().preservation_evaluate(batches) - 0.3 * self.global_rank

    def validation_step(self, batch, batch_idx):  # the monitored metric differs by rank too (not synced)
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean() - 0.3 * self.global_rank)


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = SkewedRanks(lr=0.05)
    budget = {"max_drop": 0.05, "monitor": "val/acc", "mode": "max", "reference_fraction": 0.25}  # fixed at epoch 0
    callback = aggressive_callback(preservation_loss="labels", budget=budget)
    trainer = cpu_trainer(
        out, [callback], max_epochs=4, limit_train_batches=3, limit_val_batches=2, strategy="ddp", devices=2
    )
    trainer.fit(model)
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "history": callback.history,
            "indices": callback.preservation_set.indices.tolist(),
            "budget": callback.state_dict()["budget"]["tracker"]["controller"],
            "bit_weight": callback.loss_weights(trainer.current_epoch)["bits"],
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
