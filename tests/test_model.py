import pytest
import torch
import torch.nn.functional as F
from torchvision import models

from abn_core import BACKBONES, ConfigError, build_model


def _step(model, size=(32, 32), batch=2):
    out = model(torch.randn(batch, 3, *size))
    (out.logits.sum() + out.att_logits.sum() + out.attention.sum()).backward()
    return out


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_shapes_and_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7)
    out = _step(model, size=(16, 16) if name.startswith("cifar") else (32, 32))
    assert out.logits.shape == (2, 7) and out.att_logits.shape == (2, 7)
    assert out.attention.shape[:2] == (2, 1)
    assert ((out.attention >= 0) & (out.attention <= 1)).all()
    for branch in (model.attention_branch, model.layer1, model.fc):
        grads = [p.grad for p in branch.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_paper_head_matches_reference_parameter_count():
    model = build_model("resnet50", num_classes=1000)
    total = sum(p.numel() for p in model.parameters())
    attention = sum(p.numel() for p in model.attention_branch.parameters())
    assert total == 43_584_866
    assert total - attention == 25_557_032 == sum(p.numel() for p in models.resnet50().parameters())


def test_paper_head_layers_follow_the_authors_code():
    model = build_model("resnet18", num_classes=5)
    branch = model.attention_branch
    assert all(m.stride == (1, 1) for m in branch.stage.modules() if isinstance(m, torch.nn.Conv2d))
    assert branch.tail.conv_map.kernel_size == (3, 3) and branch.tail.conv_map.out_channels == 1
    assert branch.tail.conv_reduce.out_channels == 5 and branch.tail.conv_logits.out_channels == 5
    # The attention map lives at the feature extractor's resolution (stride 16), not layer4's.
    out = model(torch.randn(1, 3, 96, 128))
    assert out.attention.shape == (1, 1, 6, 8)


@pytest.mark.parametrize("attention", ["paper", "light"])
def test_attention_convs_start_as_the_authors_initialise_them(attention):
    # He normal with fan_out, as the authors' code initialises every conv (PyTorch's default is far smaller).
    torch.manual_seed(0)
    tail = build_model("resnet18", num_classes=50, attention=attention).attention_branch.tail
    for conv in (tail.conv_reduce, tail.conv_map, tail.conv_logits):
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        expected = (2.0 / fan_out) ** 0.5
        # Root mean square, not std: the map conv keeps these magnitudes but starts non-negative.
        assert abs(conv.weight.square().mean().sqrt().item() / expected - 1) < 0.1, conv


def _map_vs_evidence_correlations(map_init: str, seed: int) -> torch.Tensor:
    """Per image: Pearson correlation between a fresh model's M and its summed class evidence a."""
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes=10, attention_map_init=map_init).train()  # batch statistics, as in training
    tail, evidence = model.attention_branch.tail, []
    tail.bn_reduce.register_forward_hook(lambda module, args, out: evidence.append(F.relu(out)))
    with torch.no_grad():
        maps = model(torch.randn(6, 3, 96, 96)).attention.flatten(1)
    # M mixes a 3x3 neighbourhood of a, so compare it with a's 3x3 box sum.
    summed = F.avg_pool2d(evidence[0].sum(1, keepdim=True), 3, stride=1, padding=1).flatten(1)
    centred = lambda t: t - t.mean(1, keepdim=True)  # noqa: E731
    return F.cosine_similarity(centred(maps), centred(summed), dim=1)


def test_maps_start_high_where_the_class_evidence_is():
    # The perception loss alone trains the map conv and at the start it does not care where M is high;
    # with the authors' random signs some seeds start (and, from scratch, stay) with M on the background.
    assert all((_map_vs_evidence_correlations("positive", seed) > 0.5).all() for seed in range(4))
    assert any((_map_vs_evidence_correlations("authors", seed) < 0).any() for seed in range(4))


def test_each_multi_label_map_starts_on_its_own_attribute():
    torch.manual_seed(0)
    weight = build_model("resnet18", num_classes=6, multi_label=True).attention_branch.tail.conv_map.weight
    own = torch.arange(6)
    assert (weight[own, own] >= 0).all()
    assert (weight < 0).any()  # weights from other attributes' evidence keep the authors' signs


def test_torchvision_state_dict_names_load_unchanged():
    model = build_model("resnet18", num_classes=1000)
    missing, unexpected = model.load_state_dict(models.resnet18().state_dict(), strict=False)
    assert unexpected == []
    assert all(key.startswith("attention_branch.") for key in missing)


@pytest.mark.parametrize("size", [(33, 47), (97, 61), (224, 160)])
def test_any_input_size_works(size):
    model = build_model("resnet18", num_classes=3, attention="light").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.logits.shape == (1, 3)
    assert out.attention.shape[-2:] == (-(-size[0] // 16), -(-size[1] // 16))


def test_light_head_is_much_cheaper_than_paper_head():
    paper = build_model("resnet50", num_classes=200)
    light = build_model("resnet50", num_classes=200, attention="light")
    count = lambda m: sum(p.numel() for p in m.attention_branch.parameters())  # noqa: E731
    assert count(light) * 10 < count(paper)


@pytest.mark.parametrize("attention", ["paper", "light"])
def test_multi_label_gives_one_map_per_attribute(attention):
    model = build_model("cifar_resnet20", num_classes=6, multi_label=True, attention=attention)
    out = _step(model)
    assert out.logits.shape == (2, 6) and out.att_logits.shape == (2, 6)
    assert out.attention.shape == (2, 6, 16, 16)


def _naive_per_attribute(model, features, maps):
    logits = []
    for t in range(maps.shape[1]):
        attended = features * (1 + maps[:, t : t + 1])
        pooled = model.last_stage(attended).mean(dim=(2, 3))
        logits.append(pooled @ model.fc.weight[t] + model.fc.bias[t])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_per_attribute_folding_equals_a_loop_over_attributes(chunk):
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=5, multi_label=True, perception="per_attribute", perception_chunk=chunk).eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out = model(images)
        expected = _naive_per_attribute(model, model.forward_features(images), out.attention)
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)


def test_shared_perception_pools_each_attribute_with_its_own_map():
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=4, multi_label=True).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(images)
        final = model.last_stage(model.forward_features(images))
        weights = 1 + F.adaptive_avg_pool2d(out.attention, final.shape[-2:])
        pooled = torch.einsum("nchw,nthw->ntc", final, weights) / (final.shape[2] * final.shape[3])
        expected = (pooled * model.fc.weight).sum(-1) + model.fc.bias
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)


def test_external_attention_replaces_the_map_in_perception():
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(images)
        zeros = model(images, attention=torch.zeros(2, 1, 4, 4))
        ones = model(images, attention=torch.ones(2, 1, 64, 64))
        expected = model.fc(model.last_stage(2 * features).mean(dim=(2, 3)))
    torch.testing.assert_close(ones.logits, expected)
    torch.testing.assert_close(zeros.logits, model.fc(model.last_stage(features).mean(dim=(2, 3))))
    assert ones.attention.shape == (2, 1, 16, 16) and ones.attention.min() == 1


def test_pretrained_local_file_initialises_stage_copy_from_last_stage(tmp_path, capsys):
    torch.manual_seed(0)
    reference = models.resnet18()
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", num_classes=10, pretrained=str(path))
    torch.testing.assert_close(model.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.testing.assert_close(model.attention_branch.stage[0].conv1.weight, reference.layer4[0].conv1.weight)
    assert not torch.equal(model.fc.weight[:1], reference.fc.weight[:1, :])  # 1000-way fc skipped
    report = capsys.readouterr().out
    assert "fc.weight" in report and "attention_branch" in report


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="model.backbone.*resnet50"):
        build_model("resnet51", 10)
    with pytest.raises(ConfigError, match="model.attention"):
        build_model("resnet18", 10, attention="fancy")
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build_model("resnet18", 10, pretrained="IMAGENET_NOPE")


def test_pretrained_run_directory_loads_its_best_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    trained = build_model("cifar_resnet20", num_classes=4)
    best = tmp_path / "run" / "checkpoints" / "best"
    best.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(best / "model.safetensors"))
    (tmp_path / "run" / "config.yaml").write_text("model:\n  backbone: cifar_resnet20\n")
    model = build_model("cifar_resnet20", num_classes=4, pretrained=str(tmp_path / "run"))
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
