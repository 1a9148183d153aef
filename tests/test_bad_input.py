"""Bad input stops with one line naming the key or path (exit 2), or is skipped and reported when asked."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from runs import TINY
from single_thread import one_thread  # noqa: F401

from abn_core.cli import run
from tasks import classification

CORRUPT = "train/a/broken.jpg"


@pytest.fixture(scope="module")
def folder_with_a_corrupt_image(tmp_path_factory):
    """train/val/test image folders of 2 classes; one train 'JPEG' does not decode."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def _train(root, out, *extra):
    return run(classification.TASK, ["train", f"data.root={root}", f"output_dir={out}", "train.epochs=1", *TINY, "train.batch_size=4", *extra])


@pytest.mark.slow
def test_undecodable_training_image_fails_naming_it(folder_with_a_corrupt_image, tmp_path, capsys):
    assert _train(folder_with_a_corrupt_image, tmp_path / "run") == 2
    line = _error_line(capsys)
    assert line.startswith("error: ") and "broken.jpg" in line


@pytest.mark.slow
def test_undecodable_training_image_is_skipped_and_reported(folder_with_a_corrupt_image, tmp_path, capsys):
    assert _train(folder_with_a_corrupt_image, tmp_path / "run", "data.on_bad_image=skip") == 0
    assert f"skipped 1 undecodable image(s): {CORRUPT}" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "run/metrics.csv")["epoch"].tolist() == [1]


@pytest.mark.slow
def test_resume_with_another_number_of_classes_names_the_mismatch(folder_with_a_corrupt_image, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(classification.TASK, ["train", f"output_dir={out}", "train.epochs=1", *TINY]) == 0  # demo: 10 classes
    capsys.readouterr()
    assert _train(folder_with_a_corrupt_image, out, "train.epochs=2", "data.on_bad_image=skip") == 2
    line = _error_line(capsys)
    assert "model.safetensors: does not fit this model" in line and "another number of classes" in line


def test_empty_data_root_and_manifest_with_missing_image_name_the_path(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(empty, tmp_path / "run") == 2
    assert f"data.root: {empty} has no manifest.csv and no class folders" in _error_line(capsys)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    pd.DataFrame({"path": ["there.png", "gone.png"], "label": [0, 1], "split": ["train", "train"]}).to_csv(prepared / "manifest.csv", index=False)
    Image.new("RGB", (8, 8)).save(prepared / "there.png")
    assert _train(prepared, tmp_path / "run") == 2
    assert f"manifest.csv:3: image {prepared / 'gone.png'} does not exist" in _error_line(capsys)
