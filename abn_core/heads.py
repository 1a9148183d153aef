"""Attention branches: g(x) -> (attention logits, attention maps M(x)).

``paper`` is the authors' head exactly; ``light`` replaces the stride-1 copy of the last stage (the
bulk of ABN's extra cost) by one small conv block, for explanations at close to the backbone's cost.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import set_stride_one


class AttentionTail(nn.Module):
    """What both heads share: 1x1 conv to K channels, then the map and the GAP logits.

    ``a = ReLU(BN(conv_reduce(x)))``; ``M = sigmoid(BN(conv_map(a)))`` (3x3, as the authors' code);
    ``att_logits = GAP(conv_logits(a))``. Single-label: K = classes, one map. Multi-label: K = T
    attributes and T maps, one per attribute. ``map_init``: ``authors`` is their signed He-normal
    init exactly; ``positive`` (default) starts each map's weights on its own evidence non-negative.
    """

    def __init__(self, in_channels: int, num_classes: int, num_maps: int, map_init: str = "positive"):
        super().__init__()
        self.conv_reduce = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(num_classes)
        self.conv_map = nn.Conv2d(num_classes, num_maps, kernel_size=3, padding=1, bias=False)
        self.bn_map = nn.BatchNorm2d(num_maps)
        self.conv_logits = nn.Conv2d(num_classes, num_classes, kernel_size=1, bias=False)
        reset_parameters(self)  # the authors initialise these convs like the backbone's, not with PyTorch's default
        if map_init == "positive":
            with torch.no_grad():
                _make_map_weights_start_on_their_evidence(self.conv_map.weight)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.relu(self.bn_reduce(self.conv_reduce(features)))
        attention = torch.sigmoid(self.bn_map(self.conv_map(a)))
        # GAP before the 1x1 conv: both are linear, so this equals the authors' GAP(conv(a)) with
        # the same weights, at 1/(h*w) of the conv's cost.
        att_logits = self.conv_logits(a.mean(dim=(2, 3), keepdim=True)).flatten(1)
        return att_logits, attention


class PaperAttentionBranch(nn.Module):
    """The authors' head: stride-1 copy of the last stage, BN, then the tail.

    Official names map as: att_layer4 -> stage, bn_att -> bn_stage, att_conv -> tail.conv_reduce,
    bn_att2 -> tail.bn_reduce, att_conv3 -> tail.conv_map, bn_att3 -> tail.bn_map,
    att_conv2 -> tail.conv_logits.
    """

    def __init__(self, last_stage: nn.Module, out_channels: int, num_classes: int, num_maps: int,
                 map_init: str = "positive"):
        super().__init__()
        self.stage = set_stride_one(copy.deepcopy(last_stage))
        reset_parameters(self.stage)
        self.bn_stage = nn.BatchNorm2d(out_channels)
        self.tail = AttentionTail(out_channels, num_classes, num_maps, map_init)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tail(self.bn_stage(self.stage(features)))


class LightAttentionBranch(nn.Module):
    """A cheap head: 1x1 conv down to ``width``, one 3x3 conv, then the tail.

    At 224 px on ResNet-50 this adds about 0.2 GFLOPs instead of the paper head's 7 GFLOPs, at the
    price of a shallower attention branch (maps are built from layer3 features with little extra
    context; the paper head's full stage copy sees a larger receptive field).
    """

    def __init__(self, in_channels: int, width: int, num_classes: int, num_maps: int, map_init: str = "positive"):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        reset_parameters(self.block)
        self.tail = AttentionTail(width, num_classes, num_maps, map_init)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tail(self.block(features))


ATTENTION_HEADS = ("paper", "light")
MAP_INITS = ("positive", "authors")


def _make_map_weights_start_on_their_evidence(weight: torch.Tensor) -> None:
    """Make non-negative the map conv's weights (maps x K x 3 x 3) from the evidence a map stands for:
    all K classes for the single-label map, attribute t's own channel for map t.

    Only the perception loss trains this conv, and at the start it has no preference for where M is
    high (measured on the CUB acceptance data: the gradient favours the object in half the images at
    init, in 90 % once trained, but is then too small to flip a sign). With random signs M's polarity
    is a coin flip: most of our runs from scratch ended with less of M on the object than a uniform map
    would put there. Started on the (ReLU, so non-negative) evidence, M begins high where the evidence
    is; training may still change it."""
    if weight.shape[0] == 1:
        weight.abs_()
    else:
        own = torch.arange(weight.shape[0])
        weight[own, own] = weight[own, own].abs()


def reset_parameters(module: nn.Module) -> None:
    """Fresh init as torchvision and the authors' code do it: He normal (fan_out) convs, BN to identity.

    PyTorch's default init makes the attention tail's convs many times smaller (the map conv 8x with 10
    classes, 35x with 200); behind a BatchNorm the effective learning rate grows with the inverse
    square of the weight norm, so the map's mixing weights would be reshuffled far faster."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            nn.init.kaiming_normal_(sub.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(sub, nn.BatchNorm2d):
            sub.reset_parameters()
            sub.reset_running_stats()
