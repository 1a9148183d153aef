"""ABN's training objective: att_weight * L(attention branch) + L(perception branch)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import ABNOutput


class ABNLoss(nn.Module):
    """Cross-entropy (single-label) or BCE-with-logits (multi-label) on both branches.

    ``label_smoothing`` follows torch's cross-entropy definition; for multi-label targets it moves
    each 0/1 target towards 0.5 by the same amount. ``pos_weight`` (T,) weighs positives per attribute.
    """

    def __init__(
        self,
        multi_label: bool = False,
        att_weight: float = 1.0,
        label_smoothing: float = 0.0,
        pos_weight: torch.Tensor | None = None,
    ):
        super().__init__()
        self.multi_label = multi_label
        self.att_weight = att_weight
        self.label_smoothing = label_smoothing
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def branch_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if not self.multi_label:
            return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
        soft = targets.float() * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(logits, soft, pos_weight=self.pos_weight)

    def forward(self, out: ABNOutput, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        loss_att = self.branch_loss(out.att_logits, targets)
        loss_per = self.branch_loss(out.logits, targets)
        return {"loss": self.att_weight * loss_att + loss_per, "loss_att": loss_att, "loss_per": loss_per}
