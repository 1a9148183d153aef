"""Grad-CAM, CAM and deletion/insertion AUC against hand-computed cases; eval.compare_cam end to end."""
import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn as nn

from abn_core import ConfigError, build_model
from abn_core.cam import compare_scores, compare_summary, deletion_insertion, perception_maps
from abn_core.cli import run
from runs import TINY
from tasks import celeba, classification


class GapFc(nn.Module):
    """logits = fc(GAP(last_stage(x))), the head shape ABN's perception branch has."""

    multi_label = False

    def __init__(self, last_stage: nn.Module, weight: torch.Tensor):
        super().__init__()
        self.last_stage = last_stage
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, images, attention=None):
        return SimpleNamespace(logits=self.fc(self.last_stage(images).mean(dim=(2, 3))))


class Square(nn.Module):
    def forward(self, x):
        return x * x


def test_cam_and_gradcam_of_a_linear_head_by_hand():
    # Two channels on a 2 x 2 grid; class 0 weighs channel 0 by 2 and channel 1 by -1.
    a = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]], [[2.0, 2.0], [0.0, 1.0]]]])
    model = GapFc(nn.Identity(), torch.tensor([[2.0, -1.0], [0.5, 0.5]]))
    maps = perception_maps(model, a, torch.tensor([0]))
    # CAM = 2*A0 - A1
    assert torch.allclose(maps["cam"][0], torch.tensor([[0.0, -2.0], [0.0, 5.0]]))
    # d logit / d A_k = w_k / 4 everywhere, so alpha = (0.5, -0.25): Grad-CAM = ReLU(0.5*A0 - 0.25*A1)
    assert torch.allclose(maps["gradcam"][0], torch.tensor([[0.0, 0.0], [0.0, 1.25]]))


def test_gradcam_of_a_nonlinear_stage_by_hand():
    # The hook reads the stage's output A = x^2; the gradient w.r.t. A (not x) weighs the channels.
    x = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]]])
    model = GapFc(Square(), torch.tensor([[-4.0]]))
    maps = perception_maps(model, x, torch.tensor([0]))
    assert torch.allclose(maps["gradcam"][0], torch.zeros(2, 2))  # alpha = -1: everything negative
    assert torch.allclose(maps["cam"][0], torch.tensor([[-4.0, -16.0], [0.0, -4.0]]))


class LeftHalfScore(nn.Module):
    """Class 0's logit is the sum of the left half of channel 0; class 1's is 0."""

    def forward(self, images, attention=None):
        left = images[:, 0, :, : images.shape[-1] // 2].sum(dim=(1, 2))
        return SimpleNamespace(logits=torch.stack([left, torch.zeros_like(left)], dim=1))


def test_deletion_and_insertion_auc_by_hand():
    images = torch.full((1, 1, 2, 4), 0.5)  # left half sums to 2: p0 = sigmoid(2) with everything present
    good = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]])  # the evidence first
    target = torch.tensor([0])
    deletion, insertion = deletion_insertion(LeftHalfScore(), images, good, target, steps=2)
    full, half = torch.sigmoid(torch.tensor(2.0)), torch.tensor(0.5)
    # Deletion curve at 0, 1/2, 1: full, 0.5, 0.5; insertion: 0.5, full, full. Trapezoids of width 1/2.
    assert torch.allclose(deletion, torch.stack([(full + half) / 4 + (half + half) / 4]))
    assert torch.allclose(insertion, torch.stack([(half + full) / 4 + (full + full) / 4]))
    bad_deletion, bad_insertion = deletion_insertion(LeftHalfScore(), images, 1 - good, target, steps=2)
    assert bad_deletion > deletion and bad_insertion < insertion


def test_compare_cam_refuses_multi_label():
    model = build_model("cifar_resnet20", num_classes=3, multi_label=True)
    cfg = {"data": {"image_size": 16}, "eval": {"pointing_tolerance": 3, "deletion_steps": 2}}
    with pytest.raises(ConfigError, match="eval.compare_cam"):
        compare_scores(model, torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), None, cfg)


def test_compare_cam_on_a_multi_label_task_stops_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(celeba.TASK, ["train", f"output_dir={out}", "eval.compare_cam=true", *TINY]) == 2
    assert "eval.compare_cam: supported for single-label tasks only" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


def test_gradcam_and_cam_play_the_part_pointing_game():
    # One channel with one bright cell at x=2, y=1: both maps of the only scoring class peak there.
    images = torch.zeros(2, 1, 4, 4)
    images[:, 0, 1, 2] = 1.0
    model = GapFc(nn.Identity(), torch.tensor([[1.0], [0.0]]))
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0]]]).expand(2, 1, 4)
    points = torch.tensor([[[2.5, 1.5], [math.nan, math.nan]], [[0.5, 3.5], [3.5, 3.5]]])  # hit; two misses
    cfg = {"data": {"image_size": 4}, "eval": {"pointing_tolerance": 1.0, "deletion_steps": 2}}
    predicted = model(images).logits.argmax(dim=1)
    scores = compare_scores(model, images, torch.zeros(2, 1, 4, 4), predicted, boxes, cfg, points)
    for method in ("gradcam", "cam"):
        assert scores[f"parts_{method}"].flatten().tolist() == [1.0, 0.0]
    summary = compare_summary(scores, torch.zeros(2, 1, dtype=torch.long))
    assert summary["pointing_game_parts_gradcam"] == summary["pointing_game_parts_cam"] == 0.5
    assert "pointing_game_parts_cam" not in compare_summary(compare_scores(model, images, torch.zeros(2, 1, 4, 4), predicted, boxes, cfg),
                                                             torch.zeros(2, 1, dtype=torch.long))


def test_perception_maps_on_an_abn_match_its_feature_grid():
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=4).eval()
    images = torch.randn(2, 3, 32, 32)
    maps = perception_maps(model, images, torch.tensor([1, 3]))
    assert maps["gradcam"].shape == maps["cam"].shape == (2, 8, 8)
    assert (maps["gradcam"] >= 0).all() and all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_eval_compare_cam_reports_contract_metrics(tiny_run, tmp_path):
    out = tmp_path / "cam"
    assert run(classification.TASK, ["eval", "--checkpoint", str(tiny_run), f"output_dir={out}",
                                      "eval.compare_cam=true", "eval.deletion_steps=4"]) == 0
    summary = pd.read_csv(out / "results/test_summary.csv").set_index("metric")["value"]
    names = ["pointing_game_gradcam", "energy_in_box_gradcam", "pointing_game_cam", "energy_in_box_cam",
             "deletion_auc", "insertion_auc", "deletion_auc_gradcam", "insertion_auc_gradcam"]
    assert set(names) <= set(summary.index)
    assert summary[names].between(0, 1).all()
