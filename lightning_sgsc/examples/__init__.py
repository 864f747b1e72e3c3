"""Example models and datamodules used by the demo, the Hydra app, the CLI and the experiments."""

from lightning_sgsc.examples.data import DigitsDataModule
from lightning_sgsc.examples.models import ClassifierModule, DigitsCNN, FashionCNN

__all__ = ["ClassifierModule", "DigitsCNN", "DigitsDataModule", "FashionCNN"]
