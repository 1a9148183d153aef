"""The Attention Branch Network: feature extractor -> attention branch -> attention mechanism -> perception."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import BACKBONES, BackboneSpec, stage_channels
from .errors import ConfigError
from .heads import ATTENTION_HEADS, MAP_INITS, LightAttentionBranch, PaperAttentionBranch

PERCEPTION_MODES = ("shared", "per_attribute")


class ABNOutput(NamedTuple):
    logits: torch.Tensor  # perception branch, N x classes (or N x T attributes)
    att_logits: torch.Tensor  # attention branch, same shape
    attention: torch.Tensor  # attention maps M(x) in [0, 1], N x T x h x w (T = 1 single-label)


class ABN(nn.Module):
    """ABN on a registered backbone.

    Backbone modules keep their torchvision names (``conv1`` ... ``layer4``, ``fc``), so
    ``model.load_state_dict(torchvision_state, strict=False)`` fills everything but the attention branch.

    Multi-label perception (T attributes, T maps):
    - ``shared``: the last stage runs once on g(x); attribute t pools the final features weighted by
      (1 + M_t) and applies its own row of ``fc``. Costs about one single-label ABN.
    - ``per_attribute`` (the authors' design): the last stage runs on g(x) * (1 + M_t) for every t,
      attributes folded into the batch ``perception_chunk`` at a time.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        num_classes: int,
        attention: str = "paper",
        multi_label: bool = False,
        perception: str = "shared",
        attention_width: int = 256,
        perception_chunk: int = 8,
        attention_map_init: str = "positive",
    ):
        super().__init__()
        backbone = spec.build()
        self.extractor_names = spec.extractor
        self.last_stage_name = spec.last_stage
        for name in (*spec.extractor, spec.last_stage):
            self.add_module(name, getattr(backbone, name))
        in_channels, out_channels = stage_channels(self.last_stage)
        self.fc = nn.Linear(out_channels, num_classes)
        self.multi_label = multi_label
        self.perception = perception
        self.perception_chunk = max(1, perception_chunk)
        num_maps = num_classes if multi_label else 1
        if attention == "paper":
            self.attention_branch = PaperAttentionBranch(self.last_stage, out_channels, num_classes, num_maps,
                                                         attention_map_init)
        else:
            self.attention_branch = LightAttentionBranch(in_channels, attention_width, num_classes, num_maps,
                                                         attention_map_init)

    @property
    def last_stage(self) -> nn.Module:
        return getattr(self, self.last_stage_name)

    @property
    def num_maps(self) -> int:
        return self.attention_branch.tail.bn_map.num_features

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """g(x): the feature extractor's output, on which both branches run."""
        x = images
        for name in self.extractor_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, images: torch.Tensor, attention: torch.Tensor | None = None) -> ABNOutput:
        """Run both branches. ``attention`` (N x T x h' x w', any size) replaces the produced maps
        in the perception branch, for attention editing; ``out.attention`` then returns it, resized."""
        features = self.forward_features(images)
        att_logits, maps = self.attention_branch(features)
        if attention is not None:
            maps = F.interpolate(attention.to(features.dtype), size=features.shape[-2:], mode="bilinear", align_corners=False)
        return ABNOutput(self.forward_perception(features, maps), att_logits, maps)

    def forward_perception(self, features: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        if not self.multi_label:
            # g'(x) = g(x) * M(x) + g(x); M is not detached, as in the authors' code.
            return self.fc(self.last_stage(features * maps + features).mean(dim=(2, 3)))
        if self.perception == "shared":
            return self._shared_perception(features, maps)
        return self._per_attribute_perception(features, maps)

    def _shared_perception(self, features: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        final = self.last_stage(features)
        # Plain ints (not traced shape values) so ONNX export at a fixed image size sees constants.
        weights = 1.0 + F.adaptive_avg_pool2d(maps, tuple(int(s) for s in final.shape[-2:]))
        # Score every location with every attribute's classifier row first (N x T x h x w, small),
        # so the N x T x C attended feature vectors are never materialised.
        scores = torch.einsum("tc,nchw->nthw", self.fc.weight.to(final.dtype), final)
        return (weights * scores).mean(dim=(2, 3)) + self.fc.bias

    def _per_attribute_perception(self, features: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        n, c, h, w = features.shape
        logits = []
        for start in range(0, maps.shape[1], self.perception_chunk):
            chunk = maps[:, start : start + self.perception_chunk]
            t = chunk.shape[1]
            attended = features.unsqueeze(1) * (1.0 + chunk.unsqueeze(2))  # N x t x C x h x w
            pooled = self.last_stage(attended.reshape(n * t, c, h, w)).mean(dim=(2, 3)).reshape(n, t, -1)
            rows = slice(start, start + t)
            logits.append(torch.einsum("ntc,tc->nt", pooled, self.fc.weight[rows].to(pooled.dtype)) + self.fc.bias[rows])
        return torch.cat(logits, dim=1)


def build_model(
    backbone: str,
    num_classes: int,
    attention: str = "paper",
    multi_label: bool = False,
    pretrained: str | None = None,
    perception: str = "shared",
    attention_width: int = 256,
    perception_chunk: int = 8,
    attention_map_init: str = "positive",
) -> ABN:
    """Build an ABN. ``pretrained``: a torchvision weights name (e.g. ``IMAGENET1K_V2``) or a local file."""
    from .weights import load_pretrained  # weights imports this module

    if backbone not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if attention not in ATTENTION_HEADS:
        raise ConfigError(f"model.attention: unknown attention head {attention!r}; choose one of {', '.join(ATTENTION_HEADS)}")
    if perception not in PERCEPTION_MODES:
        raise ConfigError(f"model.perception: unknown mode {perception!r}; choose one of {', '.join(PERCEPTION_MODES)}")
    if attention_map_init not in MAP_INITS:
        raise ConfigError(f"model.attention_map_init: unknown init {attention_map_init!r}; choose one of {', '.join(MAP_INITS)}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be positive, got {num_classes}")
    model = ABN(BACKBONES[backbone], num_classes, attention, multi_label, perception, attention_width, perception_chunk,
                attention_map_init)
    if pretrained:
        load_pretrained(model, backbone, pretrained)
    return model
