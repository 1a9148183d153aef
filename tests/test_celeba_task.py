"""tasks.celeba end to end on the multi-label demo data (10 kinds, attribute k = kind k present)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from single_thread import one_thread  # noqa: F401

from abn_core.cli import run
from abn_core.metrics import localisation_scores, localisation_summary
from data_prep.demo import KINDS, ensure_demo
from tasks import celeba

TINY = ["model.backbone=cifar_resnet20", "data.image_size=32", "data.resize_size=32", "data.num_workers=0",
        "train.batch_size=16", "eval.batch_size=64", "eval.max_attention_images=4"]


@pytest.mark.slow
def test_shared_perception_trains_on_trainval_with_focal_balanced_loss(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", f"output_dir={out}", "train.epochs=2", "data.max_per_split=32", "data.train_on_trainval=true",
            "train.loss=focal", "train.pos_weight=balanced", "eval.save_maps=true", *TINY]
    assert run(celeba.TASK, args) == 0
    printed = capsys.readouterr().out
    assert "train 32, val 32, test 32 images, 10 attributes" in printed and "data.train_on_trainval" in printed
    assert json.loads((out / "checkpoints/best/info.json").read_text())["epoch"] == 2  # the last, not the best
    per_attribute = pd.read_csv(out / "results/test_per_attribute.csv")
    assert per_attribute["attribute"].tolist() == [k[0] for k in KINDS]
    assert len(list((out / "attention").glob("test_*.png"))) >= 1
    assert np.load(out / "attention/test_maps.npz")["maps"].shape == (32, 10, 16, 16)
    assert (out / "results/test_summary.md").is_file() and (out / "metrics.csv").is_file()


def _chance_pointing(root, size: int, tolerance: float, split: str = "test") -> float:
    """The pointing game of random maps on the same kind of boxes: what chance scores."""
    frame = pd.read_csv(root / "manifest.csv")
    frame = frame[frame["split"] == split]
    names = [k[0] for k in KINDS]
    boxes = np.stack([frame[[f"bbox_{n}_{c}" for c in "xywh"]].to_numpy(np.float32) for n in names], axis=1)
    boxes = torch.from_numpy(boxes * size / 64.0)  # demo images are 64 px, resized whole
    maps = torch.rand(len(frame), len(names), size // 2, size // 2, generator=torch.Generator().manual_seed(0))
    scores = localisation_scores(maps, boxes, size, tolerance)
    return localisation_summary(scores, torch.arange(len(names)).expand(len(frame), -1))["pointing_game"]


@pytest.mark.slow
def test_short_run_recognises_attributes_and_each_map_points_at_its_own_object(tmp_path):
    out = tmp_path / "acceptance"
    args = ["train", f"output_dir={out}", "model.backbone=cifar_resnet20", "data.image_size=32", "data.resize_size=32",
            "data.max_per_split=400", "data.num_workers=0", "train.epochs=8", "train.batch_size=32",
            "train.pos_weight=balanced", "data.train_on_trainval=true", "eval.max_attention_images=0",
            "eval.pointing_tolerance=2"]
    assert run(celeba.TASK, args) == 0
    summary = pd.read_csv(out / "results/test_summary.csv").set_index("metric")["value"]
    assert summary["mean_balanced_accuracy"] > 0.7
    # pointing_game: per attribute, over the test images where it is present, its own map against its own box
    assert summary["pointing_game"] > 3 * _chance_pointing(ensure_demo("multi"), 32, 2.0)
    assert summary["energy_in_box"] > summary["energy_in_box_uniform"]
