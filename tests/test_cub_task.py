"""tasks.cub: eval geometry for boxes and parts, localisation metrics by hand, and a tiny run end to end."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from abn_core.cli import run
from abn_core.config import load_config
from abn_core.data import EvalGeometry
from abn_core.metrics import localisation_scores, localisation_summary, part_pointing_scores
import cub_acceptance
from cub_fixture import make_cub_folder, object_mask
from data_prep import cub as prep_cub
from tasks import cub


def test_geometry_maps_boxes_and_points_through_resize_and_centre_crop():
    # 200 x 100 image, shorter side 100 -> 60: resized 120 x 60, 50 px centre crop at (35, 5).
    geometry = EvalGeometry(image_size=50, resize_size=60, mode="resize_crop")
    box = geometry.map_boxes(np.array([[100.0, 50.0, 50.0, 20.0]]), width=200, height=100)
    np.testing.assert_allclose(box, [[25.0, 25.0, 25.0, 12.0]], atol=1e-4)  # right edge 55 clipped to 50
    points = geometry.map_points(np.array([[100.0, 50.0], [10.0, 10.0], [np.nan, np.nan]]), width=200, height=100)
    np.testing.assert_allclose(points[:2], [[25.0, 25.0], [-29.0, 1.0]], atol=1e-4)  # outside the crop stays outside
    assert np.isnan(points[2]).all()


def test_geometry_call_returns_the_crop_the_network_saw():
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    out, boxes, crop = EvalGeometry(50, 60, "resize_crop")(image, np.array([[100.0, 50.0, 50.0, 20.0]]))
    assert out.shape == (50, 50, 3)
    np.testing.assert_allclose(boxes, [[25.0, 25.0, 25.0, 12.0]], atol=1e-4)
    np.testing.assert_allclose(crop, [35 / 0.6, 5 / 0.6, 50 / 0.6, 50 / 0.6], atol=1e-3)


def _peaked_map() -> torch.Tensor:
    """4 x 4 map (1 x 1 x 4 x 4): 1 at row 1, column 2; 0.5 at row 3, column 0; 0 elsewhere."""
    attention = torch.zeros(1, 1, 4, 4)
    attention[0, 0, 1, 2], attention[0, 0, 3, 0] = 1.0, 0.5
    return attention


def test_localisation_scores_by_hand():
    box = torch.tensor([[[2.0, 0.0, 2.0, 2.0]]])  # x 2..4, y 0..2: holds the peak
    scores = localisation_scores(_peaked_map(), box, size=4, tolerance=0)
    assert scores["pointing"].item() == 1.0
    assert scores["energy"].item() == pytest.approx(1.0 / 1.5)
    assert scores["uniform"].item() == pytest.approx(4 / 16)
    far = localisation_scores(_peaked_map(), torch.tensor([[[0.0, 2.0, 1.0, 1.0]]]), size=4, tolerance=0)
    assert far["pointing"].item() == 0.0 and far["energy"].item() == 0.0


def test_part_pointing_hits_within_tolerance_of_any_visible_part():
    # Peak centre (2.5, 1.5); the visible part (0.5, 3.5) is 2 * sqrt(2) = 2.83 px away.
    points = torch.tensor([[[0.5, 3.5], [math.nan, math.nan]]])
    assert part_pointing_scores(_peaked_map(), points, size=4, tolerance=2.8).item() == 0.0
    assert part_pointing_scores(_peaked_map(), points, size=4, tolerance=2.9).item() == 1.0
    invisible = torch.full((1, 2, 2), math.nan)
    assert math.isnan(part_pointing_scores(_peaked_map(), invisible, size=4, tolerance=10).item())


def test_summary_averages_pointing_over_classes_and_skips_missing_parts():
    # Class 0: hits 1, 1, 0 (2/3); class 1: hit 0. Class mean 1/3, not the image mean 2/4.
    scores = {
        "pointing": torch.tensor([[1.0], [1.0], [0.0], [0.0]]),
        "energy": torch.tensor([[0.5], [0.5], [0.1], [0.1]]),
        "uniform": torch.tensor([[0.2], [0.2], [0.2], [0.2]]),
        "parts": torch.tensor([[1.0], [math.nan], [0.0], [1.0]]),
    }
    groups = torch.tensor([[0], [0], [0], [1]])
    summary = localisation_summary(scores, groups)
    assert summary["pointing_game"] == pytest.approx((2 / 3 + 0) / 2)
    assert summary["energy_in_box"] == pytest.approx(0.3)
    assert summary["energy_in_box_uniform"] == pytest.approx(0.2)
    assert summary["pointing_game_parts"] == pytest.approx((1 / 2 + 1) / 2)
    assert "pointing_game_parts" not in localisation_summary({k: v for k, v in scores.items() if k != "parts"}, groups)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny CUB release (4 classes, 3 parts, shuffled rows, quirky files) through data_prep."""
    src, out = tmp_path_factory.mktemp("cub_src"), tmp_path_factory.mktemp("cub_prepared")
    make_cub_folder(src, n_classes=4, images_per_class=6, size=64, n_parts=3, shuffle_rows=True)
    assert prep_cub.main(["--src", str(src), "--out", str(out), "--short-side", "48", "--workers", "0"]) == 0
    return out


def test_eval_items_carry_parts_inside_their_boxes(prepared):
    # The fixture draws every visible part inside the object's box; both must survive resize + crop alike.
    cfg = load_config("cub", None, [f"data.root={prepared}", "data.image_size=32", "data.resize_size=40"])
    data = cub.TASK.build_data(cfg)
    visible_seen = 0
    for index in range(len(data.test)):
        item = data.test[index]
        (x, y, w, h), points = item["box"][0].tolist(), item["points"]
        assert points.shape == (3, 2)
        inside_crop = [p for p in points.tolist() if not math.isnan(p[0]) and 0 <= p[0] < 32 and 0 <= p[1] < 32]
        for px, py in inside_crop:
            assert x - 0.5 <= px <= x + w + 0.5 and y - 0.5 <= py <= y + h + 0.5
        visible_seen += len(inside_crop)
    assert visible_seen > 0


def test_a_map_of_the_object_itself_scores_as_localised(prepared):
    # Oracle attention: the object's own pixels in the image the network sees, pooled to 8 x 8 like a
    # backbone map. If boxes and maps were mapped differently it would miss its box.
    cfg = load_config("cub", None, [f"data.root={prepared}", "data.image_size=32", "data.resize_size=40"])
    data = cub.TASK.build_data(cfg)
    items = [data.test[i] for i in range(len(data.test))]
    images = torch.stack([item["image"] for item in items]).numpy()
    masks = torch.from_numpy(np.stack([object_mask(image) for image in images])).float()[:, None]
    maps = torch.nn.functional.avg_pool2d(masks, 4)
    scores = localisation_scores(maps, torch.stack([item["box"] for item in items]), size=32, tolerance=0)
    valid = torch.isfinite(scores["pointing"])
    assert valid.sum() >= len(items) // 2
    assert scores["pointing"][valid].mean() == 1.0
    assert scores["energy"][valid].mean() > 2 * scores["uniform"][valid].mean()


@pytest.mark.slow
def test_cub_run_writes_every_output(prepared, tmp_path):
    out = tmp_path / "run"
    args = ["train", f"data.root={prepared}", f"output_dir={out}", "model.backbone=cifar_resnet20", "model.pretrained=null", "data.image_size=32",
            "data.resize_size=40", "data.num_workers=0", "train.epochs=1", "train.batch_size=8", "eval.batch_size=8",
            "eval.save_maps=true", "eval.max_attention_images=4", "data.val_fraction=0.25"]
    assert run(cub.TASK, args) == 0

    summary = pd.read_csv(out / "results/test_summary.csv").set_index("metric")["value"]
    assert list(summary.index) == ["accuracy", "top5_accuracy", "mean_class_accuracy", "att_branch_accuracy",
                                   "pointing_game", "energy_in_box", "energy_in_box_uniform", "pointing_game_parts"]
    assert summary.between(0, 1).all()
    per_class = pd.read_csv(out / "results/test_per_class.csv")
    assert list(per_class.columns) == ["class_name", "accuracy", "support", "precision", "recall", "f1"]
    manifest = pd.read_csv(prepared / "manifest.csv")
    test_rows = manifest[manifest["split"] == "test"]
    assert per_class["support"].sum() == len(test_rows)
    markdown = (out / "results/test_per_class.md").read_text()
    accuracies = [float(line.split("|")[2]) for line in markdown.splitlines()[4:] if line.startswith("|")]
    assert accuracies == sorted(accuracies)  # worst class first

    assert (out / "attention/test_overlays.png").is_file()
    predicted_wrong = summary["accuracy"] < 1.0
    assert (out / "attention/test_confused.png").is_file() == predicted_wrong
    maps = np.load(out / "attention/test_maps.npz")
    n = len(test_rows)
    assert sorted(maps["paths"].tolist()) == sorted(test_rows["path"].tolist())
    assert maps["maps"].dtype == np.float16 and maps["maps"].shape[:2] == (n, 1) and maps["maps"].ndim == 4
    assert maps["crop_boxes"].shape == (n, 4)
    # The network saw a centre square of each prepared image: side = shorter side, inside the image.
    sizes = test_rows.set_index("path").loc[maps["paths"].tolist(), ["width", "height"]].to_numpy()
    x, y, w, h = maps["crop_boxes"].T
    np.testing.assert_allclose(w, sizes.min(axis=1) * 32 / 40, rtol=0.05)
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= sizes[:, 0] + 0.5).all() and (y + h <= sizes[:, 1] + 0.5).all()


@pytest.mark.slow
def test_a_short_run_from_scratch_puts_its_map_on_the_objects(tmp_path):
    # tests/cub_acceptance.py cut to 600 images and 6 epochs. With the authors' random-sign map init
    # this run ends with M on the background (pointing 0.16, energy 0.8x uniform where we measured it).
    src, prepared, out = tmp_path / "src", tmp_path / "prepared", tmp_path / "run"
    make_cub_folder(src, images_per_class=60, **cub_acceptance.DATA)
    assert prep_cub.main(["--src", str(src), "--out", str(prepared), "--short-side", cub_acceptance.SHORT_SIDE,
                          "--workers", "0"]) == 0
    args = ["train", f"data.root={prepared}", f"output_dir={out}", *cub_acceptance.TRAINING, "train.epochs=6",
            "eval.save_maps=false", "eval.max_attention_images=0"]
    assert run(cub.TASK, args) == 0
    summary = pd.read_csv(out / "results/test_summary.csv").set_index("metric")["value"]
    assert summary["accuracy"] > 0.3  # chance: 0.1
    assert summary["energy_in_box"] > 1.4 * summary["energy_in_box_uniform"]
    assert summary["pointing_game"] > 0.3


@pytest.mark.parametrize("extra", [None, "configs/cub_light.yaml", "configs/cub_smoke.yaml"])
def test_cub_configs_load_with_the_paper_recipe(extra):
    cfg = load_config("cub", extra, ["data.root=/data/cub"])  # a real root: the demo section stays out
    assert cfg["model"]["attention"] == ("light" if extra and "light" in extra else "paper")
    if extra is None:
        assert (cfg["data"]["image_size"], cfg["data"]["train_crop"], cfg["data"]["eval_mode"]) == (448, "resize_random_crop", "resize_crop")
        assert (cfg["model"]["backbone"], cfg["model"]["pretrained"]) == ("resnet50", "IMAGENET1K_V2")
        train = cfg["train"]
        assert (train["optimizer"], train["lr"], train["momentum"], train["weight_decay"], train["schedule"]) == ("sgd", 0.01, 0.9, 5e-4, "cosine")
        assert train["warmup_epochs"] > 0
