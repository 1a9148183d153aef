"""A run end to end, on the demo data, with a tiny model: every contract file, eval, resume."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from abn_core.cli import run
from tasks import celeba, classification

TINY = ["model.backbone=cifar_resnet20", "data.image_size=32", "data.resize_size=32", "data.max_per_split=64",
        "train.batch_size=16", "eval.batch_size=32", "eval.max_attention_images=4"]


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cls"
    assert run(classification.TASK, ["train", f"output_dir={out}", "train.epochs=1", *TINY]) == 0
    return out


@pytest.mark.slow
def test_training_writes_every_contract_file(classification_run, capsys):
    out = classification_run
    for rel in ["config.yaml", "run_info.json", "metrics.csv", "results/test_summary.csv", "results/test_summary.md",
                "results/test_per_class.csv", "results/test_per_class.md", "attention/test_overlays.png",
                "checkpoints/best/model.safetensors", "checkpoints/best/info.json", "checkpoints/last"]:
        assert (out / rel).exists(), rel
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["output_dir"] == str(out) and config["model"]["backbone"] == "cifar_resnet20"
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["epoch"].tolist() == [1]
    assert {"loss", "loss_att", "loss_per", "lr", "val_accuracy", "val_pointing_game"} <= set(metrics.columns)
    summary = pd.read_csv(out / "results/test_summary.csv").set_index("metric")["value"]
    assert {"accuracy", "top5_accuracy", "mean_class_accuracy", "att_branch_accuracy", "pointing_game",
            "energy_in_box", "energy_in_box_uniform"} <= set(summary.index)
    per_class = pd.read_csv(out / "results/test_per_class.csv")
    assert list(per_class.columns) == ["class_name", "accuracy", "support", "precision", "recall", "f1"]
    assert per_class["support"].sum() == 64
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 1 and "torch" in info["versions"]


@pytest.mark.slow
def test_eval_of_a_run_reproduces_its_test_tables(classification_run, tmp_path):
    other = tmp_path / "eval"
    assert run(classification.TASK, ["eval", "--checkpoint", str(classification_run), f"output_dir={other}"]) == 0
    original = pd.read_csv(classification_run / "results/test_summary.csv")
    again = pd.read_csv(other / "results/test_summary.csv")
    pd.testing.assert_frame_equal(original, again)
    assert (other / "attention/test_overlays.png").is_file()


@pytest.mark.slow
def test_resume_auto_continues_a_finished_run(classification_run, capsys):
    assert run(classification.TASK, ["train", f"output_dir={classification_run}", "train.epochs=2", *TINY]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert pd.read_csv(classification_run / "metrics.csv")["epoch"].tolist() == [1, 2]


@pytest.mark.slow
def test_multi_label_run_writes_per_attribute_results_and_maps(tmp_path):
    out = tmp_path / "celeba"
    args = ["train", f"output_dir={out}", "train.epochs=1", "eval.save_maps=true", "model.perception=per_attribute", *TINY,
            "data.max_per_split=32"]
    assert run(celeba.TASK, args) == 0
    per_attribute = pd.read_csv(out / "results/test_per_attribute.csv")
    assert list(per_attribute.columns) == ["attribute", "accuracy", "balanced_accuracy", "precision", "recall", "f1",
                                           "average_precision", "positive_rate"]
    assert len(per_attribute) == 10
    summary = pd.read_csv(out / "results/test_summary.csv").set_index("metric")["value"]
    assert {"mean_accuracy", "mean_balanced_accuracy", "mean_f1", "mAP", "pointing_game"} <= set(summary.index)
    assert "| mean " in (out / "results/test_per_attribute.md").read_text()
    assert len(list((out / "attention").glob("test_*.png"))) >= 5
    maps = np.load(out / "attention/test_maps.npz")
    assert maps["maps"].shape == (32, 10, 16, 16) and maps["maps"].dtype == np.float16
    assert maps["crop_boxes"].shape == (32, 4) and len(maps["paths"]) == 32
    np.testing.assert_allclose(maps["crop_boxes"][0], [0, 0, 64, 64])  # demo images are 64 px, resized whole
