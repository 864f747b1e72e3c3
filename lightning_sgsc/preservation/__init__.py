"""The preservation set: what it holds (:mod:`.set`), how candidates are scored (:mod:`.scoring`) and chosen
(:mod:`.build`)."""

from lightning_sgsc.preservation.build import build_preservation_set
from lightning_sgsc.preservation.scoring import STRATEGIES, Strategy
from lightning_sgsc.preservation.set import PreservationSet

__all__ = ["STRATEGIES", "PreservationSet", "Strategy", "build_preservation_set"]
