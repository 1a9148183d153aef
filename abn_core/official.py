"""The authors' released ABN checkpoints (machine-perception-robotics-group/attention_branch_network).

Their ImageNet ABN-ResNets keep torchvision's backbone names (conv1, bn1, layer1..layer4, fc) and add
``att_layer4, bn_att, att_conv, bn_att2, att_conv3, bn_att3, att_conv2``; our ``attention="paper"`` head
holds the same tensors under ``attention_branch.*``. Checkpoints are ``{'state_dict': ...}`` with
DataParallel ``module.`` prefixes (next to ``epoch``, ``best_prec1``, ``optimizer``), or bare state dicts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .heads import PaperAttentionBranch
from .weights import read_state_dict

# Official module -> ours; every other key (the backbone, fc) is spelled the same in both.
OFFICIAL_HEAD_NAMES: dict[str, str] = {
    "att_layer4": "attention_branch.stage",
    "bn_att": "attention_branch.bn_stage",
    "att_conv": "attention_branch.tail.conv_reduce",
    "bn_att2": "attention_branch.tail.bn_reduce",
    "att_conv3": "attention_branch.tail.conv_map",
    "bn_att3": "attention_branch.tail.bn_map",
    "att_conv2": "attention_branch.tail.conv_logits",
}
_OURS_TO_OFFICIAL = {ours: official for official, ours in OFFICIAL_HEAD_NAMES.items()}
_SHOWN = 6  # keys named per kind of mismatch before "(+N more)"


def official_to_ours(key: str) -> str:
    """Our name for an official state-dict key, e.g. ``att_conv.weight`` -> ``attention_branch.tail.conv_reduce.weight``."""
    module, _, rest = key.partition(".")
    return f"{OFFICIAL_HEAD_NAMES[module]}.{rest}" if module in OFFICIAL_HEAD_NAMES and rest else key


def ours_to_official(key: str) -> str:
    """The official name for one of our keys (the inverse of :func:`official_to_ours`)."""
    for ours, official in _OURS_TO_OFFICIAL.items():
        if key.startswith(ours + "."):
            return official + key[len(ours):]
    return key


def is_official_state(state: dict[str, Any]) -> bool:
    """Whether a state dict uses the official attention-branch names."""
    return any(key.partition(".")[0] in OFFICIAL_HEAD_NAMES for key in state)


def from_official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under our names."""
    return {official_to_ours(key): value for key, value in state.items()}


def _both_names(ours: str) -> str:
    official = ours_to_official(ours)
    return ours if official == ours else f"{official} (ours {ours})"


def _listing(kind: str, items: list[str]) -> str:
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return f"{kind}: {', '.join(items[:_SHOWN])}{more}"


def _hint(mapped: dict[str, tuple[str, torch.Tensor]], own: dict[str, torch.Tensor]) -> list[str]:
    """The likely cause of a mismatch: another backbone, or another number of classes."""
    theirs, ours = mapped.get("fc.weight", (None, None))[1], own.get("fc.weight")
    differ = theirs is not None and ours is not None and theirs.shape != ours.shape
    fc = f"fc.weight {tuple(theirs.shape)} vs model {tuple(ours.shape)}: " if differ else ""
    blocks = [{".".join(k.split(".")[:2]) for k in keys if k.startswith("layer")} for keys in (own, mapped)]
    if blocks[0] != blocks[1] or (fc and theirs.shape[1:] != ours.shape[1:]):  # e.g. layer3.10 only in a resnet101
        return [f"{fc}the checkpoint is for another backbone"]
    if fc:
        return [f"{fc}the checkpoint has {theirs.shape[0]} classes, build the model with num_classes={theirs.shape[0]}"]
    return []


def load_official_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> dict[str, Any]:
    """Load an official state dict (``module.`` prefixes already removed) into an ``attention="paper"`` ABN.

    Every key must map onto one of the model's, with the same shape, and every model tensor must be
    given; only ``num_batches_tracked`` counters may be absent (checkpoints from PyTorch 0.4.0 lack them;
    they do not affect inference) and keep their current value. Raises CheckpointError naming the keys.
    """
    if not isinstance(getattr(model, "attention_branch", None), PaperAttentionBranch):
        raise CheckpointError(f"{source}: the authors' ABN checkpoints need a model built with attention='paper'")
    own = model.state_dict()
    mapped = {official_to_ours(key): (key, value) for key, value in state.items()}
    if len(mapped) < len(state):
        twice = sorted(key for key in state if key != official_to_ours(key) and official_to_ours(key) in state)
        raise CheckpointError(f"{source}: holds tensors under both the official and our names ({', '.join(twice[:_SHOWN])})")
    unexpected = sorted(official for ours, (official, _) in mapped.items() if ours not in own)
    absent = sorted(k for k in own if k not in mapped)
    missing = [_both_names(k) for k in absent if not k.endswith(".num_batches_tracked")]
    wrong = [
        f"{_both_names(ours)} {tuple(value.shape)} vs model {tuple(own[ours].shape)}"
        for ours, (_, value) in sorted(mapped.items())
        if ours in own and value.shape != own[ours].shape
    ]
    if missing or unexpected or wrong:
        parts = [_listing(kind, items) for kind, items in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
        raise CheckpointError(f"{source}: not an official ABN checkpoint for this model ({'; '.join(_hint(mapped, own) + parts)})")
    defaulted = [k for k in absent if k.endswith(".num_batches_tracked")]
    model.load_state_dict({ours: value for ours, (_, value) in mapped.items()} | {k: own[k] for k in defaulted})
    return {
        "source": str(source),
        "loaded": sorted(mapped),
        "renamed": {official: ours for ours, (official, _) in sorted(mapped.items()) if official != ours},
        "defaulted": defaulted,
    }


def load_official_checkpoint(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the authors' released ABN checkpoint at ``path`` (weights only: nothing else is unpickled).

    Returns ``{'source', 'loaded': our keys, 'renamed': {official key: our key}, 'defaulted': keys the
    file lacked (num_batches_tracked only)}``; any other mismatch raises CheckpointError naming the keys.
    """
    return load_official_state(model, read_state_dict(path), path)
