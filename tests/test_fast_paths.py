"""Speed fixes must not change what the model computes."""
import albumentations as A
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2

from abn_core.data import model_input
from abn_core.heads import AttentionTail
from single_thread import one_thread  # noqa: F401


def authors_att_logits(tail: AttentionTail, features: torch.Tensor) -> torch.Tensor:
    """The authors' order: 1x1 conv on the full map, then global average pooling."""
    a = F.relu(tail.bn_reduce(tail.conv_reduce(features)))
    return tail.conv_logits(a).mean(dim=(2, 3))


def test_pooling_before_logits_conv_matches_the_authors_order_in_values_and_gradients():
    torch.manual_seed(0)
    tail = AttentionTail(in_channels=16, num_classes=7, num_maps=1)
    features = torch.randn(3, 16, 5, 6)
    for training in (True, False):
        tail.train(training)
        ours, _ = tail(features)
        theirs = authors_att_logits(tail, features)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        grad_ours = torch.autograd.grad(ours.square().sum(), tail.conv_logits.weight)[0]
        grad_theirs = torch.autograd.grad(theirs.square().sum(), tail.conv_logits.weight)[0]
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_model_input_matches_albumentations_normalize_then_to_tensor(channels_last):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    images = np.random.default_rng(0).integers(0, 256, size=(2, 9, 7, 3)).astype(np.uint8)
    per_image = A.Compose([A.Normalize(mean=mean, std=std), ToTensorV2()], strict=True)
    reference = torch.stack([per_image(image=image)["image"] for image in images])
    ours = model_input(torch.from_numpy(images), {"mean": mean, "std": std}, channels_last=channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, 9, 7) and ours.is_contiguous(memory_format=layout)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
