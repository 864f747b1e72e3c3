"""Scoring candidate examples for the preservation set: one batched pass, three signals, for any task shape.

What the model does (the *modality*) is read off its inputs and outputs (:func:`infer_modality`), or given:

* ``image``: float inputs, class logits ``(batch, classes)``. ``gradcam`` is the mean Grad-CAM intensity
  (pytorch-grad-cam's ``GradCAM``, raw: without its per-image min-max scaling, so intensities compare across
  examples) at a target layer (default: the last Conv2d); ``uncertainty`` is ``1 - (p_top1 - p_top2)`` (margin) or
  the softmax entropy.
* ``text``: token ids in, class logits out (a BERT classifier). ``gradcam`` is the gradient × input saliency on the
  token embeddings (the first ``nn.Embedding``) of the predicted class's score; ``uncertainty`` the margin.
* ``tokens``: token ids in, next-token logits ``(batch, time, vocab)`` out. ``uncertainty`` is the per-sequence loss,
  ``gradcam`` the gradient × input saliency of that loss on the token embeddings.
* ``dense``: float inputs, per-position class scores ``(batch, classes, ...)`` (segmentation). ``uncertainty`` is the
  mean margin over positions; there is no Grad-CAM.

``kmeans`` is a choice rather than a score everywhere: k-means on penultimate embeddings (the input of the last
Linear, else of the last convolution, averaged over positions), the example nearest each centroid. A strategy the
model cannot serve (Grad-CAM without a Conv2d, saliency without an Embedding, Grad-CAM on dense outputs) is dropped
by :func:`usable_fractions`, its share given to the others, with one warning. Model outputs are reduced to one
tensor by :mod:`lightning_sgsc.outputs` (``logits`` of a ``ModelOutput``).

The pass runs every batch through the model once forward and, for the attention score, once backward; the logits of
that same forward give the uncertainty, a hook gives the embeddings.
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
from lightning_sgsc.outputs import MainOutput, OutputFn, main_output


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
        if pool.modality == "tokens":
            assert pool.loss is not None
            return pool.loss  # per-sequence loss: the least predictable sequences first
        if pool.modality == "dense":
            return uncertainty_scores(pool.logits.movedim(1, -1), self.kind).flatten(1).mean(1)
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
    return 1.0 - (top2[..., 0] - top2[..., 1])


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

MODALITIES = ("image", "text", "tokens", "dense")


def infer_modality(inputs: Tensor, logits: Tensor, targets: Tensor | None = None) -> str:
    """What a model does, from one batch: integer inputs are token ids (``tokens`` when the outputs have a time axis
    matching the inputs', else ``text``); float inputs give ``image`` for ``(batch, classes)`` outputs, else
    ``dense``."""
    if not torch.is_floating_point(inputs):
        per_token = logits.dim() == 3 and logits.shape[:2] == inputs.shape[:2]
        return "tokens" if per_token or (targets is not None and targets.dim() == 2 and logits.dim() == 3) else "text"
    return "image" if logits.dim() == 2 else "dense"


def attention_layer(model: nn.Module, modality: str, target_layer: str | None = None) -> tuple[str, nn.Module] | None:
    """Where the attention score is taken: the Grad-CAM layer (a Conv2d) for images, the token embeddings for text;
    ``None`` when the model has none (or, for dense outputs, always)."""
    if modality == "dense":
        return None
    kind: type[nn.Module] = nn.Conv2d if modality == "image" else nn.Embedding
    return find_layer(model, target_layer, kind, "target_layer", first=modality != "image")


def usable_fractions(
    model: nn.Module, fractions: dict[str, float], modality: str, target_layer: str | None = None
) -> tuple[dict[str, float], dict[str, str]]:
    """``fractions`` without the strategies the model cannot serve, their shares spread over the rest; and why each
    was dropped (``{}``: none)."""
    dropped: dict[str, str] = {}
    if fractions.get("gradcam", 0) > 0 and attention_layer(model, modality, target_layer) is None:
        dropped["gradcam"] = (
            "Grad-CAM has no class score on dense outputs"
            if modality == "dense"
            else f"the model has no {'Conv2d' if modality == 'image' else 'Embedding'} layer for the attention score"
        )
    kept = {k: v for k, v in fractions.items() if k not in dropped and v > 0}
    if not kept:
        kept = {"uncertainty": 0.5, "kmeans": 0.5}
    total = sum(kept.values())
    return {k: v / total for k, v in kept.items()}, dropped


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


def _embedding_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """The layer whose input is the penultimate embedding: the last Linear, else the last convolution."""
    found = find_layer(model, None, nn.Linear, "embedding layer") or find_layer(
        model, None, nn.modules.conv._ConvNd, "embedding layer"
    )
    if found is None:
        raise SGSCTypeError(
            describe_rule(
                "model", "a model with a Linear or convolutional layer before its outputs", type(model).__name__
            )
        )
    return found


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


class _Capture:
    """Hooks for one scoring pass: the penultimate embeddings, and (for the attention score) the attention layer's
    output as a leaf that requires grad, handed on as a copy so in-place operations after the layer
    (``Hardswish(inplace=True)``) change neither the leaf nor what Grad-CAM saved of it."""

    def __init__(self, model: nn.Module, attention: tuple[str, nn.Module] | None) -> None:
        self.embeddings: list[Tensor] = []
        self.leaves: list[Tensor] = []
        self.hooks = [_embedding_layer(model)[1].register_forward_hook(self._keep_embedding)]
        self.attention = attention
        if attention is not None:
            self.hooks.append(attention[1].register_forward_hook(self._make_leaf))

    def hand_on_copies(self) -> None:
        """Registered after Grad-CAM's own hooks, so Grad-CAM sees the leaf and the layers after see a copy."""
        if self.attention is not None:
            self.hooks.append(self.attention[1].register_forward_hook(lambda m, i, o: o.clone()))

    def _keep_embedding(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        h = inputs[0].detach()
        pooled = (
            h.mean(1) if h.dim() == 3 and isinstance(module, nn.Linear) else h.flatten(2).mean(-1) if h.dim() > 2 else h
        )
        self.embeddings.append(pooled.float().cpu())

    def _make_leaf(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        leaf = output.detach().requires_grad_(True)
        self.leaves.append(leaf)
        return leaf

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _score_image_batch(
    model: nn.Module, cam: Any, x: Tensor, output_fn: OutputFn | None
) -> tuple[Tensor, Tensor | None]:
    if cam is None:
        with torch.no_grad():
            return main_output(model(x), output_fn), None
    with torch.enable_grad():
        maps = cam(input_tensor=x, targets=None)
    logits = cam.outputs.detach()  # the model's main output: Grad-CAM runs a MainOutput wrapper
    return logits, torch.from_numpy(maps.reshape(maps.shape[0], -1).mean(1)).float()


def _score_text_batch(
    model: nn.Module, capture: _Capture, x: Tensor, y: Tensor, modality: str, output_fn: OutputFn | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Logits, the saliency (gradient × input on the token embeddings) and, for ``tokens``, the per-sequence loss."""
    with torch.enable_grad():
        logits = main_output(model(x), output_fn)
        if modality == "tokens":
            _check_logits(logits, 3, "token logits of shape (batch, time, vocab)")
            per_token = F.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none", ignore_index=-1)
            valid = (y != -1).float()  # -1 marks padding
            objective = per_token.mul(valid).sum(1) / valid.sum(1).clamp_min(1.0)
        else:
            _check_logits(logits, 2, "class logits of shape (batch, classes)")
            objective = logits.float().max(-1).values  # the predicted class's score
        saliency = None
        if capture.leaves:
            objective.sum().backward()
            e = capture.leaves[-1]
            assert e.grad is not None  # a leaf the objective depends on
            saliency = (e.grad * e).abs().sum(-1).mean(-1).detach().float().cpu()
    return logits.detach(), saliency, objective.detach().cpu() if modality == "tokens" else None


def score_pool(
    model: nn.Module,
    batches: Iterable[Any],
    target_layer: str | None = None,
    with_gradcam: bool = True,
    progress: bool = False,
    total: int | None = None,
    modality: str = "auto",
    output_fn: OutputFn | None = None,
) -> PoolScores:
    """Runs the scoring pass over ``batches`` of ``(inputs, targets)``.

    Args:
        model: the model to score with (eval mode during the pass; its parameters get no gradient).
        batches: ``(inputs, targets)`` pairs.
        target_layer: the attention score's layer (default: the last Conv2d, or the first Embedding for text).
        with_gradcam: compute the attention score.
        progress, total: a progress bar over ``total`` batches.
        modality: ``"auto"`` (:func:`infer_modality` on the first batch) or one of :data:`MODALITIES`.
        output_fn: which tensor of the model's output are the logits (default: :mod:`lightning_sgsc.outputs`).
    """
    from tqdm.auto import tqdm

    if modality not in ("auto", *MODALITIES):
        raise SGSCValueError(describe_rule("modality", f"'auto' or one of {MODALITIES}", modality))
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise SGSCValueError(describe_rule("data", "a non-empty Dataset or DataLoader", "no batches")) from None
    if modality == "auto":
        with torch.no_grad():
            modality = infer_modality(first[0], main_output(model(first[0][:2]), output_fn), first[1])
    attention = attention_layer(model, modality, target_layer) if with_gradcam else None
    if with_gradcam and attention is None:
        _, dropped = usable_fractions(model, {"gradcam": 1.0}, modality, target_layer)
        raise SGSCValueError(
            describe_rule("preservation.fractions", "shares the model can serve", {"gradcam": 1.0})
            + f" {dropped.get('gradcam', 'no attention layer')}: give 'gradcam' no share."
        )
    logits_all, targets_all, attn_all, loss_all = [], [], [], []
    was_training = model.training
    model.eval()
    # The attention score needs d(output)/d(one activation) only: start the graph at that layer's output (a leaf that
    # requires grad) and freeze every parameter, so backward touches no weight and nothing below that layer.
    requires = {p: p.requires_grad for p in model.parameters()}
    capture = _Capture(model, attention)
    cam = None
    if attention is not None:
        for p in requires:
            p.requires_grad_(False)
        if modality == "image":
            cam = _raw_gradcam_class()(model=MainOutput(model, output_fn), target_layers=[attention[1]])
    capture.hand_on_copies()
    try:
        for batch in tqdm(
            itertools.chain([first], iterator), desc="[sgsc] scoring preservation candidates", disable=not progress,
            total=total,
        ):  # fmt: skip
            x, y = batch[0], batch[1]
            capture.leaves.clear()
            if modality in ("image", "dense"):
                logits, attn = _score_image_batch(model, cam, x, output_fn)
                if modality == "image":
                    _check_logits(logits, 2, "class logits of shape (batch, classes)")
                elif logits.dim() < 3 or logits.shape[1] < 2:
                    _check_logits(logits, -1, "per-position class scores of shape (batch, classes >= 2, ...)")
                loss = None
            else:
                logits, attn, loss = _score_text_batch(model, capture, x, y, modality, output_fn)
            logits_all.append(logits.float().cpu())
            targets_all.append(y.cpu())
            if attn is not None:
                attn_all.append(attn)
            if loss is not None:
                loss_all.append(loss)
    finally:
        capture.remove()
        for p, flag in requires.items():
            p.requires_grad_(flag)
        if cam is not None:
            cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return PoolScores(
        logits=torch.cat(logits_all),
        targets=torch.cat(targets_all),
        embeddings=torch.cat(capture.embeddings),
        gradcam=torch.cat(attn_all) if attn_all else None,
        loss=torch.cat(loss_all) if loss_all else None,
        modality=modality,
    )


def _check_logits(logits: Any, dim: int, rule: str) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != dim:
        raise SGSCTypeError(
            describe_rule("model output", rule, getattr(logits, "shape", type(logits)))
            + " Set `preservation.modality` if the task was misread, or pass `output_fn`."
        )
