"""``PreservationSet``: the examples the compressed model must keep right, held as tensors.

A set is small by design (hundreds to a few thousand examples), so it is collated once and batches are drawn by
indexing: no DataLoader or per-step collation on the training hot path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from lightning_sgsc.errors import SGSCTypeError, SGSCValueError, describe_rule

FORMAT_VERSION = 1


def _length(batch: Any) -> int:
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0]))
    if not sizes:
        raise SGSCTypeError(describe_rule("preservation data", "examples made of tensors", type(batch)))
    return sizes[0]


def _index(batch: Any, idx: Tensor) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t[idx.to(t.device)])


@dataclass
class PreservationSet:
    """Examples (any collated structure of tensors, e.g. ``(inputs, targets)``) with where they came from.

    Args:
        data: the collated examples; the first dimension of every tensor indexes examples.
        indices: index of each example in the source dataset (``-1`` where unknown).
        scores: per strategy, the score each example got (``nan`` where not scored).
        chosen_by: per example, the name of the strategy that chose it.
    """

    data: Any
    indices: Tensor
    scores: dict[str, Tensor] = field(default_factory=dict)
    chosen_by: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = _length(self.data)
        if n == 0:
            raise SGSCValueError(describe_rule("preservation_data", "a non-empty Dataset or DataLoader", "0 examples"))
        if self.indices.numel() != n:
            raise SGSCValueError(describe_rule("indices", f"one index per example ({n})", self.indices.numel()))

    def __len__(self) -> int:
        return int(self.indices.numel())

    @classmethod
    def from_data(cls, data: Dataset | DataLoader, indices: list[int] | None = None) -> PreservationSet:
        """Collates a whole Dataset (optionally the ``indices`` subset) or every batch of a DataLoader."""
        if isinstance(data, DataLoader):
            batches = list(data)
            if not batches:
                raise SGSCValueError(describe_rule("preservation_data", "a non-empty Dataset or DataLoader", data))
            merged = _concat(batches)
            n = _length(merged)
            return cls(merged, torch.full((n,), -1, dtype=torch.long))
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise SGSCTypeError(describe_rule("preservation_data", "a map-style Dataset or a DataLoader", type(data)))
        idx = list(range(len(data))) if indices is None else list(indices)  # type: ignore[arg-type]
        if not idx:
            raise SGSCValueError(describe_rule("preservation_data", "a non-empty Dataset or DataLoader", data))
        collated = default_collate([data[i] for i in idx])
        return cls(collated, torch.tensor(idx, dtype=torch.long))

    def batch(self, idx: Tensor) -> Any:
        """The examples at positions ``idx``."""
        return _index(self.data, idx)

    def batches(self, batch_size: int) -> Iterator[Any]:
        """Every example once, in order, in batches of ``batch_size``."""
        n = len(self)
        for start in range(0, n, batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, n)))

    def sampler(self, batch_size: int, seed: int, draws: int = 0) -> PreservationSampler:
        """Endless batches: seeded shuffled passes over the set, starting after ``draws`` batches."""
        return PreservationSampler(self, batch_size, seed, draws)

    def to(self, device: torch.device | str) -> PreservationSet:
        """A copy with every tensor on ``device``."""
        return PreservationSet(
            apply_to_collection(self.data, Tensor, lambda t: t.to(device)), self.indices, self.scores, self.chosen_by
        )

    # ------------------------------------------------------------------------------------------ save / load

    def save(self, path: str | Path) -> None:
        """Writes the set as safetensors (tensors) plus a JSON header; no pickle."""
        from safetensors.torch import save_file

        flat: dict[str, Tensor] = {}
        structure = _flatten(self.data, "data", flat)
        flat["indices"] = self.indices.contiguous()
        for name, score in self.scores.items():
            flat[f"score.{name}"] = score.contiguous()
        meta = {
            "format_version": str(FORMAT_VERSION),
            "structure": json.dumps(structure),
            "chosen_by": json.dumps(self.chosen_by),
        }
        save_file({k: v.detach().cpu().contiguous() for k, v in flat.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> PreservationSet:
        """Reads a set written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise SGSCValueError(
                    describe_rule("format_version", f"{FORMAT_VERSION}", meta.get("format_version"))
                    + f" {path} is not a preservation set written by this version."
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        data = _unflatten(json.loads(meta["structure"]), tensors)
        scores = {k[len("score.") :]: v for k, v in tensors.items() if k.startswith("score.")}
        return cls(data, tensors["indices"], scores, json.loads(meta["chosen_by"]))


class PreservationSampler:
    """Seeded shuffled passes over a :class:`PreservationSet`. Its whole state is the number of batches drawn, so a
    resumed run continues the exact same stream (:attr:`draws` goes into the checkpoint)."""

    def __init__(self, pset: PreservationSet, batch_size: int, seed: int, draws: int = 0) -> None:
        self.pset = pset
        self.batch_size = batch_size
        self.seed = seed
        self.draws = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._perm = torch.empty(0, dtype=torch.long)
        self._start = 0
        for _ in range(draws):  # replay the index stream only, no data is gathered
            self._next_indices()

    def _next_indices(self) -> Tensor:
        if self._start >= self._perm.numel():
            self._perm = torch.randperm(len(self.pset), generator=self._generator)
            self._start = 0
        idx = self._perm[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        self.draws += 1
        return idx

    def __iter__(self) -> PreservationSampler:
        return self

    def __next__(self) -> Any:
        return self.pset.batch(self._next_indices())


def _concat(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([b[k] for b in batches]) for k in first}
    raise SGSCTypeError(describe_rule("preservation batch", "tensors, or tuples/lists/dicts of tensors", type(first)))


def _flatten(obj: Any, prefix: str, out: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        out[prefix] = obj
        return {"tensor": prefix}
    if isinstance(obj, (list, tuple)):
        return {"list": [_flatten(v, f"{prefix}.{i}", out) for i, v in enumerate(obj)]}
    if isinstance(obj, dict):
        return {"dict": {str(k): _flatten(v, f"{prefix}.{k}", out) for k, v in obj.items()}}
    raise SGSCTypeError(describe_rule("preservation data", "tensors, or tuples/lists/dicts of tensors", type(obj)))


def _unflatten(structure: dict[str, Any], tensors: dict[str, Tensor]) -> Any:
    if "tensor" in structure:
        return tensors[structure["tensor"]]
    if "list" in structure:
        return [_unflatten(s, tensors) for s in structure["list"]]
    return {k: _unflatten(s, tensors) for k, s in structure["dict"].items()}
