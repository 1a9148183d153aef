"""Run-directory checkpoints: ``checkpoints/last/`` (full training state) and ``checkpoints/best/`` (weights)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from .errors import CheckpointError
from .weights import read_state_dict

BEST_WEIGHTS = "model.safetensors"


class Progress:
    """Counters saved with the training state (registered for checkpointing)."""

    def __init__(self) -> None:
        self.epochs_done = 0
        self.step = 0
        self.best_value = float("-inf")
        self.best_epoch = -1

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` into place so ``final`` is always either the old or the new complete copy."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_training_state(accelerator: Accelerator, run_dir: Path) -> None:
    """Write checkpoints/last/ via a temporary directory (every process must call this)."""
    final = run_dir / "checkpoints" / "last"
    tmp = final.with_name("last.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def save_best_weights(model: torch.nn.Module, run_dir: Path, info: dict[str, Any]) -> None:
    """Write checkpoints/best/ (main process only): weights as safetensors and what they scored."""
    final = run_dir / "checkpoints" / "best"
    tmp = final.with_name("best.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / BEST_WEIGHTS))
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    _replace_dir(tmp, final)


def find_weights(checkpoint: str | Path) -> tuple[Path, Path]:
    """(run directory, weights file) for a run directory or a checkpoint inside it."""
    path = Path(checkpoint)
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = path / "checkpoints" / "best"
    if path.is_dir():
        candidates = [path / BEST_WEIGHTS, path / "model.safetensors", path / "pytorch_model.bin"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise CheckpointError(f"--checkpoint {checkpoint}: no model weights in {path}")
        path = found
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {checkpoint}: no such run directory or checkpoint file")
    run_dir = next((p for p in path.parents if (p / "config.yaml").is_file()), None)
    if run_dir is None:
        raise CheckpointError(f"--checkpoint {checkpoint}: no config.yaml in any folder above it (is it inside a run directory?)")
    return run_dir, path


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load weights strictly; a mismatch (e.g. another number of classes) names the tensors."""
    state = read_state_dict(path)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state))
    if wrong or missing:
        detail = "; ".join(wrong[:3] + [f"missing {', '.join(missing[:3])}"] * bool(missing))
        raise CheckpointError(f"{path}: does not fit this model ({detail})")
    model.load_state_dict(state)
