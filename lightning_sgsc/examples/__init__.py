"""Example models and datamodules used by the demo, the Hydra app, the CLI and the experiments."""

from lightning_sgsc.examples.data import DigitsDataModule, IDXImageDataModule, MNIST10kDataModule, NamesDataModule
from lightning_sgsc.examples.models import (
    CharTransformer,
    ClassifierModule,
    DigitsCNN,
    FashionCNN,
    LanguageModule,
    gpt2_lm,
)

__all__ = [
    "CharTransformer",
    "ClassifierModule",
    "DigitsCNN",
    "DigitsDataModule",
    "FashionCNN",
    "IDXImageDataModule",
    "LanguageModule",
    "MNIST10kDataModule",
    "NamesDataModule",
    "gpt2_lm",
]
