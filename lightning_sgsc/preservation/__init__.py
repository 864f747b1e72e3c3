"""The preservation set: what it holds (:mod:`.set`) and how it is chosen."""

from lightning_sgsc.preservation.set import PreservationSet

__all__ = ["PreservationSet"]
