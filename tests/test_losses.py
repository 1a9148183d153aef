"""Multi-label loss options: balanced pos_weight, focal loss, and how the train.* keys choose them."""
import copy
import math

import numpy as np
import pytest
import torch

from abn_core.config import load_config
from abn_core.errors import ConfigError
from abn_core.losses import ABNLoss, balanced_pos_weight, binary_focal_loss, loss_from_cfg
from abn_core.model import ABNOutput


def test_balanced_pos_weight_is_negatives_over_positives_clamped():
    labels = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]])
    # 3 negatives / 1 positive; no positive (inf -> upper bound); no negative (0 -> lower bound)
    torch.testing.assert_close(balanced_pos_weight(labels), torch.tensor([3.0, 100.0, 0.01]))


def test_focal_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = 0.5 and p = 0.75
    targets = torch.tensor([[1.0, 0.0]])  # p_target = 0.5 and 0.25
    expected = (0.5**2 * math.log(2.0) + 0.75**2 * math.log(4.0)) / 2
    assert binary_focal_loss(logits, targets, gamma=2.0).item() == pytest.approx(expected)


def test_focal_loss_weighs_positives_by_pos_weight():
    logits, targets = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    loss = binary_focal_loss(logits, targets, gamma=1.0, pos_weight=torch.tensor([3.0, 3.0]))
    assert loss.item() == pytest.approx((3 * 0.5 * math.log(2.0) + 0.5 * math.log(2.0)) / 2)


def test_focal_loss_with_gamma_zero_is_bce():
    logits, targets = torch.randn(5, 4), torch.randint(0, 2, (5, 4)).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(binary_focal_loss(logits, targets, gamma=0.0), bce)


def _cfg(**train):
    cfg = copy.deepcopy(load_config("classification", None, []))  # the plain defaults (celeba's demo balances)
    cfg["train"].update(train)
    return cfg


def test_train_keys_choose_focal_loss_with_balanced_weights():
    labels = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], dtype=np.float32)
    loss = loss_from_cfg(_cfg(loss="focal", focal_gamma=2.0, pos_weight="balanced"), True, labels)
    torch.testing.assert_close(loss.pos_weight, torch.tensor([3.0, 1 / 3]))
    logits = torch.tensor([[0.0, math.log(3.0)]])
    out = ABNOutput(logits, logits, torch.zeros(1, 2, 2, 2))
    expected = 2 * binary_focal_loss(logits, torch.tensor([[1.0, 0.0]]), 2.0, torch.tensor([3.0, 1 / 3]))
    torch.testing.assert_close(loss(out, torch.tensor([[1.0, 0.0]]))["loss"], expected)


def test_default_keys_give_plain_bce():
    loss = loss_from_cfg(_cfg(), True, np.ones((2, 3), dtype=np.float32))
    assert isinstance(loss, ABNLoss) and loss.focal_gamma == 0 and loss.pos_weight is None


@pytest.mark.parametrize("key,value", [("loss", "focal"), ("pos_weight", "balanced")])
def test_multi_label_options_are_refused_for_single_label_tasks(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        loss_from_cfg(_cfg(**{key: value}), False, np.zeros(4, dtype=np.int64))


def test_unknown_loss_name_is_a_config_error():
    with pytest.raises(ConfigError, match="train.loss"):
        load_config("celeba", None, ["train.loss=hinge"])
