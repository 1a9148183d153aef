import math

import numpy as np
import pytest
import torch

from abn_core.data import stratified_holdout
from abn_core.losses import ABNLoss
from abn_core.metrics import localisation_scores, localisation_summary, multi_label_tables, single_label_tables
from abn_core.model import ABNOutput


def test_single_label_tables_match_hand_counts():
    # 3 classes; predictions (argmax): 0,0,1,2,2,1 for targets 0,0,1,1,2,2.
    logits = torch.tensor([[5., 1, 0], [4, 2, 1], [0, 3, 1], [1, 0, 2], [0, 1, 9], [2, 6, 1]])
    att = torch.tensor([[1., 0, 0]] * 6)  # always predicts class 0
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    tables = single_label_tables(logits, att, targets, ["a", "b", "c"])
    summary = dict(zip(tables["summary"]["metric"], tables["summary"]["value"]))
    assert summary["accuracy"] == pytest.approx(4 / 6)
    assert summary["mean_class_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert summary["att_branch_accuracy"] == pytest.approx(2 / 6)
    assert summary["top5_accuracy"] == pytest.approx(1.0)  # top-k capped at 3 classes
    per_class = tables["per_class"].set_index("class_name")
    assert per_class.loc["b", "accuracy"] == pytest.approx(0.5)
    assert per_class.loc["b", "precision"] == pytest.approx(0.5)  # predicted b twice, right once
    assert per_class.loc["c", "precision"] == pytest.approx(0.5)
    assert per_class["support"].tolist() == [2, 2, 2]


def test_multi_label_tables_match_hand_counts():
    # attribute 0: targets 1,1,0,0 predicted 1,0,0,1 ; attribute 1: all right.
    probs = torch.tensor([[0.9, 0.8], [0.2, 0.1], [0.3, 0.7], [0.6, 0.2]])
    logits = torch.logit(probs)
    targets = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]])
    tables = multi_label_tables(logits, logits, targets, ["x", "y"])
    rows = tables["per_attribute"].set_index("attribute")
    assert rows.loc["x", "accuracy"] == pytest.approx(0.5)
    assert rows.loc["x", "balanced_accuracy"] == pytest.approx(0.5)  # TPR 1/2, TNR 1/2
    assert rows.loc["x", "precision"] == pytest.approx(0.5)
    assert rows.loc["x", "positive_rate"] == pytest.approx(0.5)
    # AP of x: scores 0.9(+) 0.6(-) 0.3(-) 0.2(+): precision at the positives 1/1 and 2/4.
    assert rows.loc["x", "average_precision"] == pytest.approx((1 + 0.5) / 2)
    assert rows.loc["y", "accuracy"] == 1.0 and rows.loc["y", "f1"] == 1.0
    summary = dict(zip(tables["summary"]["metric"], tables["summary"]["value"]))
    assert summary["mean_accuracy"] == pytest.approx(0.75)
    assert summary["mAP"] == pytest.approx((0.75 + 1.0) / 2)


def test_localisation_scores_on_constructed_maps():
    size = 16
    maps = torch.zeros(3, 1, 4, 4)
    maps[0, 0, 0, 0] = 1.0  # peak in the top-left cell -> upsampled peak near (1.5, 1.5)
    maps[1, 0, 3, 3] = 1.0  # peak bottom-right
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0]], [[0.0, 0.0, 4.0, 4.0]], [[math.nan] * 4]])
    scores = localisation_scores(maps, boxes, size, tolerance=2.0)
    assert scores["pointing"][0, 0] == 1 and scores["pointing"][1, 0] == 0
    assert torch.isnan(scores["pointing"][2, 0])
    assert scores["uniform"][0, 0] == pytest.approx(16 / 256)
    assert 0.5 < scores["energy"][0, 0] <= 1.0 and scores["energy"][1, 0] < 0.05
    # A uniform map scores exactly the box's area share.
    flat = localisation_scores(torch.full((1, 1, 4, 4), 0.5), boxes[:1], size, 2.0)
    assert flat["energy"][0, 0] == pytest.approx(16 / 256)
    summary = localisation_summary(scores, torch.tensor([[0], [1], [1]]))
    assert summary["pointing_game"] == pytest.approx((1.0 + 0.0) / 2)  # mean of per-class rates


def test_pointing_tolerance_reaches_pixels_near_the_box():
    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, 8, 8] = 1.0  # peak at pixel centre (8.5, 8.5)
    boxes = torch.tensor([[[0.0, 0.0, 5.0, 16.0]]])  # x in [0, 5): 3.5 px from the peak
    assert localisation_scores(maps, boxes, 16, 3.0)["pointing"][0, 0] == 0
    assert localisation_scores(maps, boxes, 16, 4.0)["pointing"][0, 0] == 1


def test_loss_is_weighted_sum_of_branch_losses():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    att = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    targets = torch.tensor([0, 1])
    out = ABNOutput(logits, att, torch.zeros(2, 1, 2, 2))
    losses = ABNLoss(att_weight=0.5)(out, targets)
    ce = lambda z, y: -torch.log_softmax(z, 1)[range(2), y].mean()  # noqa: E731
    assert losses["loss_per"] == pytest.approx(ce(logits, targets).item())
    assert losses["loss"] == pytest.approx(0.5 * ce(att, targets).item() + ce(logits, targets).item())
    smoothed = ABNLoss(label_smoothing=0.2)(out, targets)
    soft = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    assert smoothed["loss_per"] == pytest.approx(-(soft * torch.log_softmax(logits, 1)).sum(1).mean().item())


def test_multi_label_loss_is_bce_on_both_branches():
    logits = torch.tensor([[2.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0]])
    out = ABNOutput(logits, torch.zeros(1, 2), torch.zeros(1, 2, 2, 2))
    losses = ABNLoss(multi_label=True)(out, targets)
    bce = -(torch.log(torch.sigmoid(torch.tensor(2.0))) + torch.log(1 - torch.sigmoid(torch.tensor(-1.0)))) / 2
    assert losses["loss_per"] == pytest.approx(bce.item())
    assert losses["loss_att"] == pytest.approx(math.log(2))


def test_stratified_holdout_keeps_class_proportions():
    labels = np.array([0] * 50 + [1] * 20 + [2] * 2)
    keep, hold = stratified_holdout(labels, 0.1, seed=0)
    assert sorted(np.concatenate([keep, hold]).tolist()) == list(range(72))
    assert np.bincount(labels[hold]).tolist() == [5, 2, 1]
    again = stratified_holdout(labels, 0.1, seed=0)[1]
    assert again.tolist() == hold.tolist()


def test_attributes_without_positives_are_nan_and_left_out_of_means():
    logits = torch.tensor([[2.0, -1.0, 1.0], [-2.0, -1.0, 1.0], [1.0, 3.0, -1.0], [-1.0, -2.0, 2.0]])
    targets = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])  # 'none' never, 'all' always positive
    tables = multi_label_tables(logits, logits, targets, ["a", "none", "all"])
    rows = tables["per_attribute"].set_index("attribute")
    assert rows.loc["none", ["balanced_accuracy", "precision", "recall", "f1", "average_precision"]].isna().all()
    assert rows.loc["none", "accuracy"] == pytest.approx(0.75)  # one false positive: accuracy stays defined
    assert np.isnan(rows.loc["all", "balanced_accuracy"]) and rows.loc["all", "recall"] == pytest.approx(0.75)
    summary = dict(zip(tables["summary"]["metric"], tables["summary"]["value"]))
    assert summary["mean_balanced_accuracy"] == pytest.approx(1.0)  # only 'a' has both classes
    assert summary["mean_f1"] == pytest.approx((1.0 + 2 * 0.75 / 1.75) / 2)
    assert summary["mAP"] == pytest.approx(1.0)
