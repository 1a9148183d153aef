"""ABN's training objective: att_weight * L(attention branch) + L(perception branch)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .model import ABNOutput

POS_WEIGHT_RANGE = (0.01, 100.0)  # keeps attributes that are (almost) never or always positive finite


def balanced_pos_weight(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Per-attribute BCE ``pos_weight`` = negatives / positives in an N x T 0/1 training matrix,
    so positives and negatives of each attribute weigh the same; clamped to ``POS_WEIGHT_RANGE``."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    positives = labels.sum(dim=0)
    negatives = labels.shape[0] - positives
    return (negatives / positives).clamp(*POS_WEIGHT_RANGE).float()  # x / 0 = inf -> the upper bound


def binary_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of (1 - p_t)^gamma * BCE(logits, targets) (Lin et al., without the alpha term: use
    ``pos_weight`` for class balance). p_t is the probability given to the target; gamma = 0 is BCE."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
    probs = torch.sigmoid(logits)
    p_target = probs * targets + (1.0 - probs) * (1.0 - targets)
    return ((1.0 - p_target) ** gamma * bce).mean()


class ABNLoss(nn.Module):
    """Cross-entropy (single-label) or BCE-with-logits (multi-label) on both branches.

    ``label_smoothing`` follows torch's cross-entropy definition; for multi-label targets it moves
    each 0/1 target towards 0.5 by the same amount. Multi-label only: ``pos_weight`` (T,) weighs
    positives per attribute, ``focal_gamma`` > 0 turns BCE into the focal loss.
    """

    def __init__(
        self,
        multi_label: bool = False,
        att_weight: float = 1.0,
        label_smoothing: float = 0.0,
        pos_weight: torch.Tensor | None = None,
        focal_gamma: float = 0.0,
    ):
        super().__init__()
        self.multi_label = multi_label
        self.att_weight = att_weight
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def branch_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if not self.multi_label:
            return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        soft = targets.float() * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        if self.focal_gamma > 0:
            return binary_focal_loss(logits, soft, self.focal_gamma, self.pos_weight)
        return F.binary_cross_entropy_with_logits(logits, soft, pos_weight=self.pos_weight)

    def forward(self, out: ABNOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        loss_att = self.branch_loss(out.att_logits, targets)
        loss_per = self.branch_loss(out.logits, targets)
        return {"loss": self.att_weight * loss_att + loss_per, "loss_att": loss_att, "loss_per": loss_per}


def loss_from_cfg(cfg: dict[str, Any], multi_label: bool, train_targets: np.ndarray) -> ABNLoss:
    """The loss the ``train.*`` keys ask for; ``train_targets`` are the training split's labels
    (N x T for multi-label), from which ``train.pos_weight=balanced`` is computed."""
    t = cfg["train"]
    if not multi_label:
        for key, plain in (("loss", "bce"), ("pos_weight", "none")):
            if t[key] != plain:
                raise ConfigError(f"train.{key}: {t[key]!r} is for multi-label tasks (tasks.celeba); single-label tasks take {plain!r}")
    pos_weight = balanced_pos_weight(train_targets) if t["pos_weight"] == "balanced" else None
    gamma = t["focal_gamma"] if t["loss"] == "focal" else 0.0
    if t["loss"] == "focal" and gamma <= 0:
        raise ConfigError(f"train.focal_gamma: must be > 0 with train.loss=focal, got {gamma}")
    return ABNLoss(multi_label, t["att_weight"], t["label_smoothing"], pos_weight, gamma)
