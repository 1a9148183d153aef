"""Result tables from gathered predictions (torchmetrics), and attention localisation scores."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
    multilabel_accuracy,
    multilabel_average_precision,
    multilabel_f1_score,
    multilabel_precision,
    multilabel_recall,
    multilabel_specificity,
)


def single_label_tables(
    logits: torch.Tensor, att_logits: torch.Tensor, targets: torch.Tensor, class_names: list[str]
) -> dict[str, pd.DataFrame]:
    """``summary`` (metric, value) and ``per_class`` tables for N x C logits and N labels."""
    num_classes = len(class_names)
    args = dict(num_classes=num_classes, validate_args=False)
    summary = {
        "accuracy": multiclass_accuracy(logits, targets, average="micro", **args),
        "top5_accuracy": multiclass_accuracy(logits, targets, average="micro", top_k=min(5, num_classes), **args),
        "mean_class_accuracy": multiclass_accuracy(logits, targets, average="macro", **args),
        "att_branch_accuracy": multiclass_accuracy(att_logits, targets, average="micro", **args),
    }
    per_class = pd.DataFrame(
        {
            "class_name": class_names,
            "accuracy": multiclass_accuracy(logits, targets, average=None, **args).numpy(),
            "support": torch.bincount(targets, minlength=num_classes).numpy(),
            "precision": multiclass_precision(logits, targets, average=None, **args).numpy(),
            "recall": multiclass_recall(logits, targets, average=None, **args).numpy(),
            "f1": multiclass_f1_score(logits, targets, average=None, **args).numpy(),
        }
    )
    return {"summary": _summary_frame(summary), "per_class": per_class}


def multi_label_tables(
    logits: torch.Tensor, att_logits: torch.Tensor, targets: torch.Tensor, attribute_names: list[str]
) -> dict[str, pd.DataFrame]:
    """``summary`` and ``per_attribute`` tables for N x T logits and 0/1 targets (threshold 0.5)."""
    probs, targets = torch.sigmoid(logits.float()), targets.long()
    args = dict(num_labels=len(attribute_names), average=None, validate_args=False)
    recall = multilabel_recall(probs, targets, **args)
    # Undefined where the split has no positives (or, for balanced accuracy, no negatives) of an
    # attribute: NaN, left out of the means, instead of torchmetrics' 0.
    has_pos = targets.sum(dim=0) > 0
    has_both = has_pos & (targets.sum(dim=0) < len(targets))

    def defined(values: torch.Tensor, where: torch.Tensor) -> np.ndarray:
        return torch.where(where, values.float(), torch.tensor(math.nan)).numpy()

    per_attribute = pd.DataFrame(
        {
            "attribute": attribute_names,
            "accuracy": multilabel_accuracy(probs, targets, **args).numpy(),
            "balanced_accuracy": defined((recall + multilabel_specificity(probs, targets, **args)) / 2, has_both),
            "precision": defined(multilabel_precision(probs, targets, **args), has_pos),
            "recall": defined(recall, has_pos),
            "f1": defined(multilabel_f1_score(probs, targets, **args), has_pos),
            "average_precision": defined(multilabel_average_precision(probs, targets, **args), has_pos),
            "positive_rate": targets.float().mean(dim=0).numpy(),
        }
    )
    att_probs = torch.sigmoid(att_logits.float())
    summary = {
        "mean_accuracy": per_attribute["accuracy"].mean(),
        "mean_balanced_accuracy": np.nanmean(per_attribute["balanced_accuracy"]),
        "mean_f1": np.nanmean(per_attribute["f1"]),
        "mAP": np.nanmean(per_attribute["average_precision"]),
        "att_branch_mean_accuracy": multilabel_accuracy(att_probs, targets, **args).mean(),
    }
    return {"summary": _summary_frame(summary), "per_attribute": per_attribute}


def _summary_frame(values: dict[str, float | torch.Tensor]) -> pd.DataFrame:
    return pd.DataFrame({"metric": list(values), "value": [float(v) for v in values.values()]})


def localisation_scores(maps: torch.Tensor, boxes: torch.Tensor, size: int, tolerance: float) -> dict[str, torch.Tensor]:
    """Per (image, map) scores of attention maps against boxes, in network-input pixels.

    maps: N x T x h x w, upsampled (bilinear) to the S x S input (``size``); boxes: N x T x 4, x y w h
    in that input. Returns N x T tensors ``pointing`` (1 if some box pixel lies within ``tolerance``
    px of the map's argmax, else 0), ``energy`` (share of the min-max-normalised map inside the box)
    and ``uniform`` (the box's area share: what a uniform map scores); NaN where no box.
    """
    n, t = maps.shape[:2]
    flat = _upsampled(maps, size).flatten(2)
    low, high = flat.min(dim=2, keepdim=True).values, flat.max(dim=2, keepdim=True).values
    spread = high - low
    # A constant map is uniform attention (all ones), not zero attention.
    norm = torch.where(spread > 1e-12, (flat - low) / spread.clamp_min(1e-12), torch.ones_like(flat)).reshape(n, t, size, size)
    peak_x, peak_y = _peaks(flat, size)
    x1, y1 = boxes[..., 0], boxes[..., 1]
    x2, y2 = x1 + boxes[..., 2], y1 + boxes[..., 3]
    valid = torch.isfinite(boxes).all(dim=-1) & (boxes[..., 2] > 0) & (boxes[..., 3] > 0)
    # Distance from the peak to the nearest box pixel (0 inside the box).
    dx = torch.clamp(torch.maximum(x1 - peak_x, peak_x - x2), min=0)
    dy = torch.clamp(torch.maximum(y1 - peak_y, peak_y - y2), min=0)
    pointing = (torch.hypot(dx, dy) <= tolerance).float()
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    in_x = (coords[None, None, :] >= x1[..., None]) & (coords[None, None, :] < x2[..., None])  # N x T x S
    in_y = (coords[None, None, :] >= y1[..., None]) & (coords[None, None, :] < y2[..., None])
    mask = (in_y[..., :, None] & in_x[..., None, :]).float()  # mask[y1:y2, x1:x2]
    energy = (norm * mask).sum(dim=(2, 3)) / norm.sum(dim=(2, 3)).clamp_min(1e-12)
    uniform = mask.sum(dim=(2, 3)) / float(size * size)
    nan = torch.full_like(energy, math.nan)
    return {name: torch.where(valid, value, nan) for name, value in
            {"pointing": pointing, "energy": energy, "uniform": uniform}.items()}


def _upsampled(maps: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(maps.float(), size=(size, size), mode="bilinear", align_corners=False)


def _peaks(flat: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) pixel centres of the argmax of N x T x (S*S) flattened maps."""
    peak = flat.argmax(dim=2)
    return (peak % size).float() + 0.5, (peak // size).float() + 0.5


def part_pointing_scores(maps: torch.Tensor, points: torch.Tensor, size: int, tolerance: float) -> torch.Tensor:
    """N x T part pointing game: 1 if the upsampled map's argmax lies within ``tolerance`` px of any
    visible part (points: N x P x 2, x y in the S x S input, NaN where invisible), else 0; NaN when
    an image has no visible part."""
    peak_x, peak_y = _peaks(_upsampled(maps, size).flatten(2), size)  # N x T
    dist = torch.hypot(peak_x[..., None] - points[:, None, :, 0], peak_y[..., None] - points[:, None, :, 1])  # N x T x P
    hit = (torch.nan_to_num(dist, nan=math.inf) <= tolerance).any(dim=2).float()
    any_visible = torch.isfinite(points).all(dim=2).any(dim=1)[:, None].expand_as(hit)
    return torch.where(any_visible, hit, torch.full_like(hit, math.nan))


def _class_mean(hits: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean of the finite ``hits`` per class (``groups``), then over classes."""
    valid = torch.isfinite(hits)
    hits, classes = hits[valid], groups[valid]
    return float(torch.stack([hits[classes == c].mean() for c in torch.unique(classes)]).mean())


def localisation_summary(scores: dict[str, torch.Tensor], groups: torch.Tensor) -> dict[str, float]:
    """Pointing games averaged over classes (``groups``: N x T class of each score), energy over images.

    ``scores`` holds localisation_scores' tensors and, optionally, ``parts`` (part_pointing_scores).
    """
    summary = {}
    valid = torch.isfinite(scores["pointing"])
    if valid.any():
        summary = {
            "pointing_game": _class_mean(scores["pointing"], groups),
            "energy_in_box": float(scores["energy"][valid].mean()),
            "energy_in_box_uniform": float(scores["uniform"][valid].mean()),
        }
    if "parts" in scores and torch.isfinite(scores["parts"]).any():
        summary["pointing_game_parts"] = _class_mean(scores["parts"], groups)
    return summary
