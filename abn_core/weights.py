"""Loading weights into an ABN: torchvision weight names, torchvision/our state dicts on disk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision import models

from .backbones import BACKBONES
from .errors import CheckpointError, ConfigError
from .model import ABN


def _numpy_scalar_globals() -> list:
    """What unpickling numpy scalars needs (training scripts often save e.g. ``best_prec1`` as one next to
    the weights); plain values, no code. Files written under numpy 1.x name ``numpy.core.multiarray``."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    module = getattr(np, "dtypes", None)  # numpy >= 1.25
    dtypes = [getattr(module, n) for n in dir(module) if n.endswith("DType")] if module else []
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch file, never unpickling arbitrary objects.

    Unwraps ``{'state_dict': ...}`` / ``{'model': ...}`` (other entries such as ``epoch``, ``best_prec1``
    or ``optimizer`` are ignored) and DataParallel ``module.`` prefixes.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with torch.serialization.safe_globals(_numpy_scalar_globals()):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a crafted or corrupt file: refuse it, whatever the loader raised
        raise CheckpointError(f"{path}: not a loadable weights file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def torchvision_state_dict(backbone: str, weights_name: str) -> dict[str, torch.Tensor]:
    """Download (on users' machines) and return torchvision's weights ``weights_name`` for ``backbone``."""
    tv_name = BACKBONES[backbone].torchvision_name
    if tv_name is None:
        raise ConfigError(f"model.pretrained: torchvision has no weights for {backbone}; give a local file or null")
    enum = models.get_model_weights(tv_name)
    valid = [w.name for w in enum] + ["DEFAULT"]
    if weights_name not in valid:
        raise ConfigError(
            f"model.pretrained: {weights_name!r} is neither an existing file nor a torchvision weights name "
            f"for {backbone} ({', '.join(valid)})"
        )
    return enum[weights_name].get_state_dict(progress=True)


def load_pretrained(model: ABN, backbone: str, source: str) -> dict[str, list[str]]:
    """Fill ``model`` from ``source`` where names and shapes match: a weights file, a run directory
    (its best weights), or a torchvision weights name.

    The paper head's stage copy, when absent from the source, starts from the last stage's weights.
    Returns and prints which tensors were loaded, newly initialised, or skipped for shape.
    """
    from .checkpoints import find_weights  # checkpoints imports this module
    from .official import from_official_names, is_official_state  # official imports this module

    path = Path(source)
    if path.is_dir():
        path = find_weights(path)[1]
    state = read_state_dict(path) if path.exists() else torchvision_state_dict(backbone, source)
    if is_official_state(state):  # the authors' ABN checkpoint: att_layer4, bn_att, ... -> attention_branch.*
        state = from_official_names(state)
    own = model.state_dict()
    stage_prefix = "attention_branch.stage."
    copied = {}
    if not any(k.startswith(stage_prefix) for k in state):
        last = model.last_stage_name + "."
        copied = {stage_prefix + k[len(last):]: v for k, v in state.items() if k.startswith(last)}
        state = dict(state) | copied
    loaded, mismatched = {}, []
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            loaded[key] = value
        elif key in own:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
    if not loaded:
        raise CheckpointError(f"{source}: no tensor matches {backbone}'s parameter names and shapes")
    model.load_state_dict(loaded, strict=False)
    report = {
        "loaded": sorted(loaded),
        "new": sorted(k for k in own if k not in loaded),
        "shape_mismatch": mismatched,
        "from_last_stage": sorted(k for k in copied if k in loaded),
    }
    new_groups = sorted({k.split(".")[0] for k in report["new"]})
    print(
        f"pretrained {source}: loaded {len(loaded)} tensors; newly initialised: {', '.join(new_groups) or 'none'}"
        + (f"; attention_branch.stage initialised from {model.last_stage_name}" if report["from_last_stage"] else "")
        + (f"; skipped for shape: {', '.join(mismatched)}" if mismatched else "")
    )
    return report
