"""data_prep/celeba.py on tiny fake CelebA copies in the real byte layout (tests/celeba_fixture.py)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torchvision
from PIL import Image

from abn_core.images import load_rgb_array
from celeba_fixture import ATTRIBUTE_NAMES, LANDMARK_NAMES, make_celeba
from data_prep import celeba
from data_prep.common import PrepError, md5_file

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 30
BASE_COLUMNS = ["image", "path", "split"]
# Lines before the first row (count line, header) in each file the prep reads.
HEADER_LINES = {"list_attr_celeba.txt": 2, "list_eval_partition.txt": 0,
                "list_landmarks_align_celeba.txt": 2, "identity_CelebA.txt": 0}


class IntegrityTrustingCelebA(torchvision.datasets.CelebA):
    """torchvision's loader; its MD5 check would reject generated files, so trust them."""

    def _check_integrity(self) -> bool:
        return True


def prep(src: Path, out: Path, *extra: str, workers: int = 1) -> dict:
    assert celeba.main(["--src", str(src), "--out", str(out), "--workers", str(workers), *extra]) == 0
    return json.loads((out / "prep_info.json").read_text())


def read_manifest(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "manifest.csv")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """The same fake CelebA in three layouts; "flat" is torchvision's root (it holds celeba/)."""
    base = tmp_path_factory.mktemp("celeba")
    make_celeba(base / "flat" / "celeba", layout="flat", n_images=N_IMAGES)
    make_celeba(base / "drive_zip", layout="drive", n_images=N_IMAGES, zip_images=True)
    make_celeba(base / "drive_dir", layout="drive", n_images=N_IMAGES, zip_images=False)
    return {"flat": base / "flat", "drive_zip": base / "drive_zip", "drive_dir": base / "drive_dir"}


@pytest.fixture(scope="module")
def prepared(datasets, tmp_path_factory) -> dict[str, Path]:
    """Each layout prepared once; the zipped one with two worker processes."""
    out = tmp_path_factory.mktemp("prepared")
    for name, src in datasets.items():
        prep(src, out / name, workers=2 if name == "drive_zip" else 1)
    return {name: out / name for name in datasets}


@pytest.fixture
def small(tmp_path) -> Path:
    """A fresh flat copy with 12 images, for tests that break it."""
    return make_celeba(tmp_path / "src", layout="flat", n_images=12)


def test_fixture_has_the_real_byte_layout(datasets):
    attr = (datasets["flat"] / "celeba" / "list_attr_celeba.txt").read_bytes()
    lines = attr.split(b"\r\n")
    assert lines[0] == str(N_IMAGES).encode() and lines[1].endswith(b"Young ") and lines[-1] == b""
    assert b"  1" in lines[2] and b" -1" in lines[2] and b"\n" not in attr.replace(b"\r\n", b"")
    for name in ("list_attr_celeba.txt", "list_landmarks_align_celeba.txt"):
        flat = (datasets["flat"] / "celeba" / name).read_bytes()
        assert (datasets["drive_zip"] / "Anno" / name).read_bytes() == flat


@pytest.mark.parametrize("layout", ["flat", "drive_zip", "drive_dir"])
def test_manifest_agrees_with_torchvision(datasets, prepared, layout):
    manifest = read_manifest(prepared[layout])
    info = json.loads((prepared[layout] / "prep_info.json").read_text())
    assert info["layout"] == ("flat" if layout == "flat" else "drive")
    assert info["attributes"] == ATTRIBUTE_NAMES
    assert list(manifest.columns) == BASE_COLUMNS + ATTRIBUTE_NAMES + LANDMARK_NAMES + ["identity"]
    for split in ("train", "valid", "test"):
        ds = IntegrityTrustingCelebA(str(datasets["flat"]), split=split, target_type="attr")
        assert ds.attr_names[-1] == "" and ds.attr_names[:-1] == ATTRIBUTE_NAMES  # torchvision keeps a 41st
        rows = manifest[manifest["split"] == split]
        assert len(rows) > 0 and info["counts"][split] == len(rows)
        assert list(rows["image"]) == list(ds.filename)
        np.testing.assert_array_equal(rows[ATTRIBUTE_NAMES].to_numpy(), ds.attr.numpy())
        np.testing.assert_array_equal(rows[LANDMARK_NAMES].to_numpy(), ds.landmarks_align.numpy())
        np.testing.assert_array_equal(rows["identity"].to_numpy(), ds.identity.numpy()[:, 0])
    assert list(manifest["path"]) == [f"img_align_celeba/{name}" for name in manifest["image"]]


def _original_image(src: Path, name: str) -> np.ndarray:
    zipped = src / "Img" / "img_align_celeba.zip"
    if zipped.exists():
        with zipfile.ZipFile(zipped) as archive:
            return np.asarray(Image.open(io.BytesIO(archive.read(f"img_align_celeba/{name}"))).convert("RGB"))
    folder = next(p for p in (src / "celeba", src / "Img", src) if (p / "img_align_celeba").is_dir())
    return load_rgb_array(folder / "img_align_celeba" / name)


@pytest.mark.parametrize("layout", ["flat", "drive_zip"])
def test_packed_rows_equal_decoded_jpegs(datasets, prepared, layout):
    info = json.loads((prepared[layout] / "prep_info.json").read_text())
    packed = np.load(prepared[layout] / info["packed"]["file"], mmap_mode="r")
    assert packed.dtype == np.uint8 and packed.shape == (N_IMAGES, 218, 178, 3)
    assert (info["packed"]["height"], info["packed"]["width"], info["packed"]["count"]) == (218, 178, N_IMAGES)
    for i, name in enumerate(read_manifest(prepared[layout])["image"]):
        np.testing.assert_array_equal(packed[i], _original_image(datasets[layout], name))


def test_only_attributes_partition_and_images(tmp_path):
    src = make_celeba(tmp_path / "src", layout="drive", n_images=10, optional_files=False)
    info = prep(src, tmp_path / "out")
    assert list(read_manifest(tmp_path / "out").columns) == BASE_COLUMNS + ATTRIBUTE_NAMES
    assert info["optional_files"] == {name: False for name in celeba.OPTIONAL_FILES}
    assert set(info["md5"]) == {"list_attr_celeba.txt", "list_eval_partition.txt"}
    assert info["packed"]["count"] == 10


def test_rows_are_joined_by_file_name_not_position(small, tmp_path):
    prep(small, tmp_path / "ref")
    reference = read_manifest(tmp_path / "ref")
    # Each file gets its rows in a different order: any join by position would mix images up.
    for (name, header_lines), seed in zip(HEADER_LINES.items(), range(4)):
        lines = (small / name).read_bytes().split(b"\r\n")
        rows = lines[header_lines:-1]
        order = np.random.default_rng(seed).permutation(len(rows))
        (small / name).write_bytes(b"\r\n".join(lines[:header_lines] + [rows[i] for i in order] + [b""]))
    prep(small, tmp_path / "out")
    pd.testing.assert_frame_equal(read_manifest(tmp_path / "out"), reference)


def _edit_line(path: Path, line_no: int, edit) -> None:
    """Replace 1-based line ``line_no`` of a CRLF file by ``edit(old_line)`` (None deletes it)."""
    lines = path.read_bytes().split(b"\r\n")
    new = edit(lines[line_no - 1])
    lines[line_no - 1:line_no] = [] if new is None else [new]
    path.write_bytes(b"\r\n".join(lines))


def _set_first_value(value: bytes):
    return lambda line: line[:10] + b" " + value.rjust(2) + line[13:]


# (file, line, edit, words the message must hold); attribute row i sits on line i + 2.
VIOLATIONS = {
    "wrong column count": ("list_attr_celeba.txt", 5, lambda line: line[:-3], ["fields"]),
    "value 0": ("list_attr_celeba.txt", 4, _set_first_value(b"0"), ["000002.jpg", "'0'", "-1 or 1"]),
    "value 2": ("list_attr_celeba.txt", 4, _set_first_value(b"2"), ["'2'"]),
    "duplicate file name": ("list_attr_celeba.txt", 6, lambda line: b"000003.jpg" + line[10:], ["duplicate", "000003.jpg"]),
    "count mismatch": ("list_attr_celeba.txt", 1, lambda line: b"13", ["13"]),
    "bad partition value": ("list_eval_partition.txt", 3, lambda line: line[:-1] + b"3", ["000003.jpg", "'3'"]),
    "extra partition row": ("list_eval_partition.txt", 13, lambda line: b"000099.jpg 0\r\n", ["000099.jpg"]),
    "landmark column count": ("list_landmarks_align_celeba.txt", 7, lambda line: line[:-5], ["fields"]),
}


@pytest.mark.parametrize("case", VIOLATIONS)
def test_violation_names_file_and_line(small, tmp_path, case):
    file_name, line_no, edit, words = VIOLATIONS[case]
    _edit_line(small / file_name, line_no, edit)
    with pytest.raises(PrepError) as caught:
        celeba.main(["--src", str(small), "--out", str(tmp_path / "out"), "--workers", "1"])
    message = str(caught.value)
    assert "\n" not in message and f"{file_name}:{line_no}:" in message
    assert all(word in message for word in words), message
    assert not (tmp_path / "out" / "prep_info.json").exists()


def test_image_missing_from_partition_names_it(small, tmp_path):
    _edit_line(small / "list_eval_partition.txt", 5, lambda line: None)
    with pytest.raises(PrepError, match=r"list_attr_celeba\.txt:7: 000005\.jpg is not listed in .*list_eval_partition"):
        prep(small, tmp_path / "out")


def test_missing_image_names_it(small, tmp_path):
    (small / "img_align_celeba" / "000007.jpg").unlink()
    with pytest.raises(PrepError, match=r"list_attr_celeba\.txt:9: image 000007\.jpg not found"):
        prep(small, tmp_path / "out")


def test_undecodable_image_names_it(small, tmp_path):
    image = small / "img_align_celeba" / "000004.jpg"
    image.write_bytes(image.read_bytes()[:400])  # a truncated download
    with pytest.raises(PrepError, match=r"000004\.jpg: cannot decode"):
        prep(small, tmp_path / "out")
    assert not list((tmp_path / "out").glob("images_uint8*"))  # the partial array is removed


def test_mixed_sizes_need_size_option(small, tmp_path):
    Image.new("RGB", (200, 250), "red").save(small / "img_align_celeba" / "000006.jpg")
    with pytest.raises(PrepError, match=r"000006\.jpg is 200x250 .*--size"):
        prep(small, tmp_path / "out")
    info = prep(small, tmp_path / "out", "--size", "178x218")
    assert info["original_sizes"] == [[178, 218], [200, 250]]
    landmarks = read_manifest(tmp_path / "out").set_index("image").loc["000006.jpg", LANDMARK_NAMES]
    original = (small / "list_landmarks_align_celeba.txt").read_text().splitlines()[7].split()[1:]
    expected = np.array(original, dtype=float) * np.tile([178 / 200, 218 / 250], 5)
    np.testing.assert_allclose(landmarks.to_numpy(dtype=float), expected, atol=0.01)


def test_cli_error_is_one_line_without_traceback(small, tmp_path):
    _edit_line(small / "list_attr_celeba.txt", 4, _set_first_value(b"0"))
    result = subprocess.run([sys.executable, "data_prep/celeba.py", "--src", str(small), "--out", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "list_attr_celeba.txt:4:" in errors[0]


def test_cli_module_run_with_workers(small, tmp_path):
    result = subprocess.run([sys.executable, "-m", "data_prep.celeba", "--src", str(small), "--out",
                             str(tmp_path / "out"), "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "CelebA prepared" in result.stdout and "positive rate range" in result.stdout
    assert len(read_manifest(tmp_path / "out")) == 12


def test_md5_mismatch_is_a_recorded_warning(small, tmp_path, monkeypatch, capsys):
    attr_md5 = md5_file(small / "list_attr_celeba.txt")
    monkeypatch.setitem(celeba.OFFICIAL_MD5, "list_attr_celeba.txt", attr_md5)  # pretend it is the official file
    info = prep(small, tmp_path / "out")
    assert info["md5"]["list_attr_celeba.txt"] == {"value": attr_md5, "expected": attr_md5, "ok": True}
    partition = info["md5"]["list_eval_partition.txt"]
    assert partition["ok"] is False and partition["expected"] == "d32c9cbf5e040fd4025c592c306e6668"
    assert partition["value"] == md5_file(small / "list_eval_partition.txt")
    stderr = capsys.readouterr().err
    assert "warning:" in stderr and "list_eval_partition.txt: MD5" in stderr and "list_attr_celeba.txt: MD5" not in stderr
    assert any("list_eval_partition.txt" in warning for warning in info["warnings"])


def test_rerun_is_a_no_op_until_source_or_options_change(small, tmp_path, capsys):
    out = tmp_path / "out"
    prep(small, out)
    stamps = {name: (out / name).stat().st_mtime_ns for name in ("images_uint8.npy", "manifest.csv", "prep_info.json")}
    capsys.readouterr()
    prep(small, out)
    assert "nothing to do" in capsys.readouterr().out
    assert {name: (out / name).stat().st_mtime_ns for name in stamps} == stamps

    prep(small, out, "--size", "64")
    assert "nothing to do" not in capsys.readouterr().out
    assert np.load(out / "images_uint8.npy", mmap_mode="r").shape == (12, 64, 64, 3)

    _edit_line(small / "identity_CelebA.txt", 2, lambda line: line.split()[0] + b" 777")
    prep(small, out, "--size", "64")
    assert "nothing to do" not in capsys.readouterr().out
    assert read_manifest(out).loc[1, "identity"] == 777


def test_refuses_a_dir_prepared_for_another_task(small, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "prep_info.json").write_text(json.dumps({"task": "cub"}))
    with pytest.raises(PrepError, match="holds a 'cub' preparation"):
        prep(small, tmp_path / "out")


def test_crashed_run_does_not_look_complete(small, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prep(small, out)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(celeba, "write_manifest", crash)
    with pytest.raises(RuntimeError):
        prep(small, out, "--size", "64")
    assert not (out / "prep_info.json").exists()
    monkeypatch.undo()
    prep(small, out)  # not skipped: the previous info is gone
    assert np.load(out / "images_uint8.npy", mmap_mode="r").shape == (12, 218, 178, 3)


@pytest.mark.parametrize("size, scale", [("89x109", (0.5, 0.5)), ("64", (64 / 178, 64 / 218))])
def test_size_resizes_images_and_landmarks(datasets, prepared, tmp_path, size, scale):
    info = prep(datasets["flat"], tmp_path / "out", "--size", size)
    width, height = round(178 * scale[0]), round(218 * scale[1])
    packed = np.load(tmp_path / "out" / "images_uint8.npy", mmap_mode="r")
    assert packed.shape == (N_IMAGES, height, width, 3)
    assert (info["packed"]["width"], info["packed"]["height"]) == (width, height)
    assert info["options"]["size"] == [width, height]
    original = load_rgb_array(datasets["flat"] / "celeba" / "img_align_celeba" / "000001.jpg")
    assert abs(float(packed[0].mean()) - float(original.mean())) < 3  # same picture, smaller
    resized = read_manifest(tmp_path / "out")[LANDMARK_NAMES].to_numpy(dtype=float)
    unresized = read_manifest(prepared["flat"])[LANDMARK_NAMES].to_numpy(dtype=float)
    np.testing.assert_allclose(resized, unresized * np.tile(scale, 5), atol=0.006)


def test_source_layout_errors(tmp_path):
    with pytest.raises(PrepError, match="no list_attr_celeba.txt"):
        celeba.locate_source(tmp_path)
    src = make_celeba(tmp_path / "src", layout="drive", n_images=4)
    (src / "Img" / "img_align_celeba.zip").unlink()
    with pytest.raises(PrepError, match="no images found"):
        celeba.locate_source(src)
    (src / "Eval" / "list_eval_partition.txt").unlink()
    with pytest.raises(PrepError, match="list_eval_partition.txt not found"):
        celeba.locate_source(src)


def test_nested_image_folder_found(tmp_path):
    """Kaggle's extracted copy nests img_align_celeba/img_align_celeba/."""
    src = make_celeba(tmp_path / "src", layout="flat", n_images=4)
    shutil.move(src / "img_align_celeba", tmp_path / "inner")
    (src / "img_align_celeba").mkdir()
    shutil.move(tmp_path / "inner", src / "img_align_celeba" / "img_align_celeba")
    assert prep(src, tmp_path / "out")["packed"]["count"] == 4
