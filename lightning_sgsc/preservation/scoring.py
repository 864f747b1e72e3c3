"""Scoring candidate examples for the preservation set: one batched pass, three signals.

Images (class logits):

* ``gradcam``: mean Grad-CAM intensity (pytorch-grad-cam's ``GradCAM``, raw: without its per-image min-max
  scaling, so intensities compare across examples) at a target layer (default: the last Conv2d); high first.
* ``uncertainty``: ``1 - (p_top1 - p_top2)`` (margin) or the softmax entropy; the least certain first.
* ``kmeans``: not a score but a choice: k-means on penultimate embeddings (the input of the last Linear), the example
  nearest each centroid.

Text (token ids in, next-token logits out): ``uncertainty`` is the per-sequence loss, ``gradcam`` is the
gradient × input saliency on the token embeddings (the first ``nn.Embedding``), ``kmeans`` runs on mean hidden states.

The pass runs every batch through the model once forward and once backward (for Grad-CAM), batched; the logits of
that same forward give the uncertainty, a hook on the last Linear gives the embeddings.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sgsc.errors import SGSCTypeError, SGSCValueError, describe_rule


@dataclass
class PoolScores:
    """Per-example signals of a scored pool (index ``i`` is the ``i``-th example of the pool)."""

    logits: Tensor
    targets: Tensor
    embeddings: Tensor
    gradcam: Tensor | None
    loss: Tensor | None = None
    modality: str = "image"


class Strategy(ABC):
    """A way to choose examples: ``choose(scores, n, exclude, ...)`` returns pool positions, best first."""

    name: str

    @abstractmethod
    def scores(self, pool: PoolScores) -> Tensor:
        """One score per example (higher = more wanted); ``nan`` where the strategy gives none."""

    def choose(self, pool: PoolScores, n: int, taken: set[int], cap: dict[int, int] | None, seed: int) -> list[int]:
        """The ``n`` best examples not in ``taken`` (respecting per-class ``cap`` if given)."""
        order = torch.argsort(self.scores(pool), descending=True).tolist()
        return _take(order, n, taken, cap, pool.targets)


def _take(order: Iterable[int], n: int, taken: set[int], cap: dict[int, int] | None, targets: Tensor) -> list[int]:
    out: list[int] = []
    for i in order:
        if len(out) >= n:
            break
        if i in taken:
            continue
        if cap is not None:
            c = int(targets[i])
            if cap.get(c, 0) <= 0:
                continue
            cap[c] -= 1
        out.append(i)
        taken.add(i)
    return out


class GradCAMIntensity(Strategy):
    """Mean raw Grad-CAM intensity; needs a convolutional target layer."""

    name = "gradcam"

    def scores(self, pool: PoolScores) -> Tensor:
        if pool.gradcam is None:
            raise SGSCValueError("The pool was scored without Grad-CAM (no conv target layer).")
        return pool.gradcam


class Uncertainty(Strategy):
    """Least-confidence by margin (default) or entropy of the softmax."""

    name = "uncertainty"

    def __init__(self, kind: str = "margin") -> None:
        if kind not in ("margin", "entropy"):
            raise SGSCValueError(describe_rule("uncertainty", "'margin' or 'entropy'", kind))
        self.kind = kind

    def scores(self, pool: PoolScores) -> Tensor:
        if pool.modality == "text":
            assert pool.loss is not None
            return pool.loss  # per-sequence loss: the least predictable sequences first
        return uncertainty_scores(pool.logits, self.kind)


class KMeansDiversity(Strategy):
    """The examples nearest the centroids of k-means on the embeddings (MiniBatchKMeans above 10,000 examples)."""

    name = "kmeans"

    def scores(self, pool: PoolScores) -> Tensor:
        return torch.full((pool.embeddings.shape[0],), float("nan"))

    def choose(self, pool: PoolScores, n: int, taken: set[int], cap: dict[int, int] | None, seed: int) -> list[int]:
        if n <= 0:
            return []
        order = kmeans_representatives(pool.embeddings, n, seed)
        chosen = _take(order, n, taken, cap, pool.targets)
        if len(chosen) < n:  # duplicates with other strategies: fill with the next-nearest examples
            chosen += _take(
                torch.randperm(len(pool.targets), generator=torch.Generator().manual_seed(seed)).tolist(),
                n - len(chosen),
                taken,
                cap,
                pool.targets,
            )
        return chosen


class RandomChoice(Strategy):
    """A seeded random sample: the baseline the other strategies are measured against."""

    name = "random"

    def scores(self, pool: PoolScores) -> Tensor:
        return torch.full((pool.embeddings.shape[0],), float("nan"))

    def choose(self, pool: PoolScores, n: int, taken: set[int], cap: dict[int, int] | None, seed: int) -> list[int]:
        order = torch.randperm(len(pool.targets), generator=torch.Generator().manual_seed(seed)).tolist()
        return _take(order, n, taken, cap, pool.targets)


STRATEGIES: dict[str, type[Strategy]] = {
    "gradcam": GradCAMIntensity,
    "uncertainty": Uncertainty,
    "kmeans": KMeansDiversity,
    "random": RandomChoice,
}


def uncertainty_scores(logits: Tensor, kind: str = "margin") -> Tensor:
    """``1 - margin`` between the top two softmax probabilities, or the entropy; higher = less certain."""
    p = logits.float().softmax(-1)
    if kind == "entropy":
        return -(p * p.clamp_min(1e-12).log()).sum(-1)
    top2 = p.topk(2, dim=-1).values
    return 1.0 - (top2[:, 0] - top2[:, 1])


def kmeans_representatives(embeddings: Tensor, k: int, seed: int) -> list[int]:
    """For each of ``k`` clusters, the example nearest its centroid (in order of cluster size, largest first).

    BLAS runs single-threaded here: after a multi-threaded call OpenBLAS's worker threads busy-wait for a while
    (~0.1 s), and on a small machine they take the cores from the training steps that follow the scoring (measured
    on 2 CPU cores: the first steps after scoring ran at up to 2x their time). scikit-learn's k-means runs its own
    loop single-threaded in BLAS anyway; only its initialisation's distance products lose their threads."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    from threadpoolctl import threadpool_limits

    x = embeddings.float().numpy()
    k = min(k, x.shape[0])
    if x.shape[0] > 10_000:
        km: Any = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=1)
    else:
        km = KMeans(n_clusters=k, random_state=seed, n_init=1)
    with threadpool_limits(limits=1, user_api="blas"):
        labels = km.fit_predict(x)
    dist = ((x - km.cluster_centers_[labels]) ** 2).sum(1)
    reps = []
    for c in np.argsort(-np.bincount(labels, minlength=k)):
        members = np.nonzero(labels == c)[0]
        if members.size:
            reps.append(int(members[np.argmin(dist[members])]))
    return reps


# ---------------------------------------------------------------------------------------------------- the pass


def find_layer(
    model: nn.Module, name: str | None, kind: type[nn.Module], arg: str, first: bool = False
) -> tuple[str, nn.Module] | None:
    """The module called ``name``, or the last (``first``: the first) module of type ``kind`` when ``name`` is None."""
    if name is not None:
        modules = dict(model.named_modules())
        if name not in modules:
            candidates = [n for n, m in model.named_modules() if isinstance(m, kind)]
            raise SGSCValueError(
                describe_rule(arg, "the name of a module of the model", name)
                + f" Candidates ({kind.__name__}): {candidates}."
            )
        return name, modules[name]
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]
    return (found[0] if first else found[-1]) if found else None


def _raw_gradcam_class() -> type:
    from pytorch_grad_cam import GradCAM

    class RawGradCAM(GradCAM):  # type: ignore[misc]
        """GradCAM whose maps stay unscaled (pytorch-grad-cam min-max normalises each image to [0, 1])."""

        def compute_cam_per_layer(self, input_tensor: Tensor, targets: Any, eigen_smooth: bool) -> list[np.ndarray]:
            acts = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
            grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
            return [
                np.maximum(self.get_cam_image(input_tensor, layer, targets, a, g, eigen_smooth), 0)[:, None]
                for layer, a, g in zip(self.target_layers, acts, grads, strict=False)
            ]

        def aggregate_multi_layers(self, cam_per_target_layer: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(cam_per_target_layer, axis=1).mean(axis=1)

    return RawGradCAM


def score_pool(
    model: nn.Module,
    batches: Iterable[Any],
    target_layer: str | None = None,
    with_gradcam: bool = True,
    progress: bool = False,
    total: int | None = None,
    modality: str = "auto",
) -> PoolScores:
    """Runs the scoring pass over ``batches`` of ``(inputs, targets)``.

    ``modality``: ``"image"`` (class logits ``(B, C)``; Grad-CAM at a Conv2d), ``"text"`` (token ids in, logits
    ``(B, T, V)`` against next tokens ``(B, T)``; per-sequence loss for uncertainty, gradient × input on the token
    embeddings in Grad-CAM's place, mean hidden states for k-means) or ``"auto"`` (text when the inputs are integer
    token ids).
    """
    from tqdm.auto import tqdm

    if modality not in ("auto", "image", "text"):
        raise SGSCValueError(describe_rule("modality", "'auto', 'image' or 'text'", modality))
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise SGSCValueError(describe_rule("data", "a non-empty Dataset or DataLoader", "no batches")) from None
    if modality == "auto":
        modality = "text" if not torch.is_floating_point(first[0]) else "image"
    head = find_layer(model, None, nn.Linear, "embedding layer")
    if head is None:
        raise SGSCTypeError(
            describe_rule("model", "a classifier whose last Linear layer gives the logits", type(model).__name__)
        )
    kind: type[nn.Module] = nn.Embedding if modality == "text" else nn.Conv2d
    attention = (
        find_layer(model, target_layer, kind, "target_layer", first=modality == "text") if with_gradcam else None
    )
    if with_gradcam and attention is None:
        raise SGSCValueError(
            describe_rule("target_layer", f"a {kind.__name__} layer for the attention score (the model has none)", None)
            + " Set the 'gradcam' fraction to 0."
        )
    captured: list[Tensor] = []

    def keep_embedding(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        h = inputs[0].detach()
        captured.append((h.mean(1) if h.dim() == 3 else h.flatten(1)).float().cpu())

    hooks = [head[1].register_forward_hook(keep_embedding)]
    leaves: list[Tensor] = []

    def make_leaf(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        leaf = output.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    logits_all, targets_all, emb_all, attn_all, loss_all = [], [], [], [], []
    was_training = model.training
    model.eval()
    # The attention score needs d(output)/d(one activation) only: start the graph at that layer's output (a leaf that
    # requires grad) and freeze every parameter, so backward touches no weight and nothing below that layer.
    requires = {p: p.requires_grad for p in model.parameters()}
    if attention is not None:
        hooks.append(attention[1].register_forward_hook(make_leaf))
        for p in requires:
            p.requires_grad_(False)
    cam = _raw_gradcam_class()(model=model, target_layers=[attention[1]]) if attention and modality == "image" else None
    try:
        for batch in tqdm(
            itertools.chain([first], iterator),
            desc="[sgsc] scoring preservation candidates",
            disable=not progress,
            total=total,
        ):
            x, y = batch[0], batch[1]
            captured.clear()
            leaves.clear()
            if modality == "image":
                if cam is not None:
                    with torch.enable_grad():
                        maps = cam(input_tensor=x, targets=None)
                    logits = cam.outputs.detach()
                    attn_all.append(torch.from_numpy(maps.reshape(maps.shape[0], -1).mean(1)).float())
                else:
                    with torch.no_grad():
                        logits = model(x)
                _check_logits(logits, 2, "class logits of shape (batch, classes)")
            else:
                with torch.enable_grad():
                    logits = model(x)
                    _check_logits(logits, 3, "token logits of shape (batch, time, vocab)")
                    per_token = F.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none", ignore_index=-1)
                    valid = (y != -1).float()  # -1 marks padding
                    per_seq = (per_token * valid).sum(1) / valid.sum(1).clamp_min(1.0)
                    if leaves:
                        per_seq.sum().backward()
                        e = leaves[0]
                        assert e.grad is not None  # a leaf the loss depends on
                        attn_all.append((e.grad * e).abs().sum(-1).mean(-1).detach().float().cpu())
                loss_all.append(per_seq.detach().cpu())
                logits = logits.detach()
            logits_all.append(logits.float().cpu())
            targets_all.append(y.cpu())
            emb_all.append(captured[-1])
    finally:
        for h in hooks:
            h.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
        if cam is not None:
            cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return PoolScores(
        logits=torch.cat(logits_all),
        targets=torch.cat(targets_all),
        embeddings=torch.cat(emb_all),
        gradcam=torch.cat(attn_all) if attn_all else None,
        loss=torch.cat(loss_all) if loss_all else None,
        modality=modality,
    )


def _check_logits(logits: Any, dim: int, rule: str) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != dim:
        raise SGSCTypeError(describe_rule("model output", rule, getattr(logits, "shape", type(logits))))
