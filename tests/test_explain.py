"""explain: CLI on a trained run (CSV, overlays, odd image formats, attention editing) and the API."""
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from abn_core import build_model, explain
from abn_core.cli import run
from abn_core.explain import write_explanations
from tasks import classification


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """A folder of awkward inputs: grayscale JPEG, CMYK JPEG, RGBA PNG, a wide and a tiny image."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), "L").save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 255, (33, 45, 4), dtype=np.uint8), "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (20, 300, 3), dtype=np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (7, 9, 3), dtype=np.uint8)).save(folder / "tiny.png")
    return folder


@pytest.mark.slow
def test_explain_cli_writes_predictions_and_overlays(tiny_run, odd_images, tmp_path):
    out = tmp_path / "explained"
    assert run(classification.TASK, ["explain", "--checkpoint", str(tiny_run), "--top-k", "2", str(odd_images), f"output_dir={out}"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["image", "attention", "rank", "label", "probability"]
    assert table["image"].nunique() == 5 and (table["attention"] == "abn").all()
    assert table.groupby("image")["rank"].apply(list).map(lambda r: r == [1, 2]).all()
    assert table.groupby("image")["probability"].apply(lambda p: p.is_monotonic_decreasing).all()
    assert table["probability"].between(0, 1).all()
    for stem in ("gray", "cmyk", "alpha", "wide", "tiny"):
        assert Image.open(out / "explain" / f"{stem}.png").size[0] > 0


def test_explain_under_a_multi_process_launcher_writes_from_the_main_process_only(tiny_run, odd_images, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what accelerate launch / torchrun set in the second process
    out = tmp_path / "explained"
    assert run(classification.TASK, ["explain", "--checkpoint", str(tiny_run), str(odd_images), f"output_dir={out}"]) == 0
    assert not out.exists()


@pytest.mark.slow
def test_attention_mask_changes_the_used_map(tiny_run, odd_images, tmp_path):
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[:, :20] = 255  # attend to the left half only
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "edited"
    image = str(odd_images / "cmyk.jpg")
    assert run(classification.TASK, ["explain", "--checkpoint", str(tiny_run), image, "--attention-mask",
                                      str(tmp_path / "mask.png"), f"output_dir={out}"]) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert sorted(table["attention"].unique()) == ["abn", "edited"]
    assert (out / "explain" / "cmyk.png").is_file()


def test_explain_api_uses_the_given_mask_as_attention():
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=3)
    picture = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    mask = np.zeros((48, 64, 3), dtype=np.uint8)
    mask[:, 32:] = 255
    cfg = {"data": {"image_size": 32, "resize_size": 32, "eval_mode": "resize", "mean": [0.5] * 3, "std": [0.25] * 3}}
    abn, edited = explain(model, [picture], cfg, attention_mask=mask)
    assert (abn.attention_source, edited.attention_source) == ("abn", "edited")
    # The edited map is the mask at feature resolution: zero on the left half, one on the right.
    used = edited.maps[0]
    assert used[:, : used.shape[1] // 2 - 1].max() < 1e-6 and used[:, used.shape[1] // 2 + 1 :].min() > 1 - 1e-6
    assert not torch.allclose(abn.probabilities, edited.probabilities)
    assert torch.isclose(abn.probabilities.sum(), torch.tensor(1.0))


def test_multi_label_overlay_grid_shows_each_present_attribute(tmp_path):
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=3, multi_label=True)
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([20.0, -20.0, 20.0]))  # attributes 0 and 2 present, 1 absent
    Image.fromarray(np.full((30, 30, 3), 128, dtype=np.uint8)).save(tmp_path / "face.png")
    cfg = {"data": {"image_size": 32, "resize_size": 32, "eval_mode": "resize", "mean": [0.5] * 3, "std": [0.25] * 3}}
    single = build_model("cifar_resnet20", num_classes=3, multi_label=True)
    with torch.no_grad():
        single.fc.bias.fill_(-20.0)  # nothing present: the grid shows the most probable attribute alone
    write_explanations(single, [tmp_path / "face.png"], cfg, ["a", "b", "c"], tmp_path / "none", top_k=5)
    write_explanations(model, [tmp_path / "face.png"], cfg, ["a", "b", "c"], tmp_path / "out", top_k=5)
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(table) == 3 and table["rank"].tolist() == [1, 2, 3]  # every attribute listed
    assert table.iloc[-1]["label"] == "b"
    two = Image.open(tmp_path / "out" / "explain" / "face.png").size
    one = Image.open(tmp_path / "none" / "explain" / "face.png").size
    assert two == (2 * one[0], one[1])  # two tiles (a and c) side by side instead of one
