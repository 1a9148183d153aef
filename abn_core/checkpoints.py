"""Run-directory checkpoints: ``checkpoints/last/`` (full training state) and ``checkpoints/best/`` (weights).

Both are written with :func:`files.write_dir` (complete marker, atomic swap) by the main process only,
and every torch file is read with weights-only loading: a crafted pickle is refused and runs no code.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from .errors import CheckpointError
from .files import recover_dir, write_dir
from .weights import read_state_dict

BEST_WEIGHTS = "model.safetensors"
CRASH_ENV = "ABN_SUITE_CRASH_AT"


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process when ``$ABN_SUITE_CRASH_AT`` equals ``name``: ``e2b3`` after epoch
    2's third batch; ``save-1.0-filled`` inside the write of the state after 1 epoch and 0 batches
    (phases: filled, marked, moved_old, swapped)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Progress:
    """Where training stands; saved as progress.json next to the training state."""

    epochs_done: int = 0
    batches_done: int = 0  # batches of the current (unfinished) epoch already trained on
    step: int = 0  # optimizer steps since the start
    best_value: float = -math.inf
    best_epoch: int = -1
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.csv, one row per finished epoch
    loss_sums: list[float] = field(default_factory=lambda: [0.0] * 4)  # loss, att, per, batches counted (this epoch)
    skipped_images: list[str] = field(default_factory=list)  # undecodable, with data.on_bad_image=skip

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"best_value": _json_float(self.best_value)}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Progress":
        state = json.loads(text)
        state["best_value"] = float(state["best_value"])
        return cls(**state)


def _json_float(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def rng_state() -> dict[str, Any]:
    """python, numpy and torch RNG states as plain values and tensors (loadable weights-only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_torch_file(path: Path) -> Any:
    """``torch.load`` with weights_only=True; anything else (a crafted pickle, a corrupt file) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever the unpickler raised: refuse, never fall back to full unpickling
        raise CheckpointError(f"{path}: refused, not a weights-only torch file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_training_state(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress, run_dir: Path
) -> None:
    """Write checkpoints/last/ (main process; every process must call this)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tag = f"save-{progress.epochs_done}.{progress.batches_done}"  # state after N epochs and B batches

        def fill(directory: Path) -> None:
            save_file(_cpu_state(accelerator.unwrap_model(model)), str(directory / "model.safetensors"))
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")
            if accelerator.scaler is not None:
                torch.save(accelerator.scaler.state_dict(), directory / "scaler.pt")
            torch.save(rng_state(), directory / "rng.pt")
            (directory / "progress.json").write_text(progress.to_json())

        write_dir(run_dir / "checkpoints" / "last", fill, lambda phase: crash_point(f"{tag}-{phase}"))
    accelerator.wait_for_everyone()


def load_training_state(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path
) -> Progress:
    """Restore what :func:`save_training_state` wrote (on every process)."""
    load_weights(accelerator.unwrap_model(model), directory / "model.safetensors")
    optimizer.load_state_dict(load_torch_file(directory / "optimizer.pt"))
    if accelerator.scaler is not None and (directory / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(load_torch_file(directory / "scaler.pt"))
    set_rng_state(load_torch_file(directory / "rng.pt"))
    return Progress.from_json((directory / "progress.json").read_text())


def save_best_weights(model: torch.nn.Module, run_dir: Path, info: dict[str, Any]) -> None:
    """Write checkpoints/best/ (main process only): weights as safetensors and what they scored."""

    def fill(directory: Path) -> None:
        save_file(_cpu_state(model), str(directory / BEST_WEIGHTS))
        (directory / "info.json").write_text(json.dumps(info, indent=2) + "\n")

    write_dir(run_dir / "checkpoints" / "best", fill)


def find_weights(checkpoint: str | Path) -> tuple[Path, Path]:
    """(run directory, weights file) for a run directory or a checkpoint inside it."""
    path = Path(checkpoint)
    if path.is_dir() and (path / "checkpoints").is_dir():
        recover_dir(path / "checkpoints" / "best")
        path = path / "checkpoints" / "best"
    if path.is_dir():
        candidates = [path / BEST_WEIGHTS, path / "pytorch_model.bin"]
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
        raise CheckpointError(f"{path}: does not fit this model ({detail}); was it trained with another number of classes or backbone?")
    model.load_state_dict(state)
