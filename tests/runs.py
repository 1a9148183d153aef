"""Running the CLI in a subprocess (tests that kill runs or launch several processes) and comparing runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

# The smallest useful run: 16 px demo images, cifar_resnet20, 3 batches of 8 per epoch, no workers.
TINY = ["model.backbone=cifar_resnet20", "data.image_size=16", "data.resize_size=16", "data.max_per_split=24",
        "train.batch_size=8", "eval.batch_size=16", "eval.max_attention_images=2", "data.num_workers=0"]


def run_cli(args: list[str], launcher: list[str] | None = None, env: dict[str, str] | None = None,
            task: str = "classification", timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m tasks.<task> ARGS`` (or under ``launcher``, e.g. torchrun) from the repository root,
    one thread per process so that results do not depend on the machine's core count."""
    environment = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"} | (env or {})
    command = (launcher or [sys.executable]) + ["-m", f"tasks.{task}", *args]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


def finished_run(out: Path, args: list[str]) -> Path:
    """``out`` after a successful ``run_cli`` of ``args`` into it (a module fixture's baseline run)."""
    result = run_cli([f"output_dir={out}", *args])
    assert result.returncode == 0, result.stderr
    return out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = weights(a), weights(b)
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def assert_same_results(a: Path, b: Path) -> None:
    """Same metrics.csv rows and test tables (byte for byte), same best and last weights."""
    for rel in ["metrics.csv", "results/test_summary.csv", "results/test_per_class.csv"]:
        assert (a / rel).read_text() == (b / rel).read_text(), rel
    for rel in ["checkpoints/best/model.safetensors", "checkpoints/last/model.safetensors"]:
        assert_same_weights(a / rel, b / rel)
