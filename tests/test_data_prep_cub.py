"""data_prep/cub.py on tiny fake CUB releases written in the real on-disk layout."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cub_fixture import make_cub_folder, make_cub_tgz, object_mask  # noqa: E402

from data_prep import cub  # noqa: E402
from data_prep.common import PrepError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = dict(n_classes=4, images_per_class=5, size=56, seed=3, n_parts=4, exif_rotated=7)
BASE_COLUMNS = ["image_id", "path", "label", "class_name", "split", "bbox_x", "bbox_y", "bbox_w", "bbox_h"]


def prep(src: Path, out: Path, *extra: str) -> int:
    return cub.main(["--src", str(src), "--out", str(out), "--workers", "1", "--short-side", "64", *extra])


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_cub_folder(tmp_path_factory.mktemp("cub_src"), **DATA)


@pytest.fixture(scope="module")
def prepared(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "out"
    assert cub.main(["--src", str(src), "--out", str(out), "--workers", "2", "--short-side", "64"]) == 0
    return out


@pytest.fixture
def src_copy(src, tmp_path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "src"))


def object_box(path: Path) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(object_mask(np.asarray(Image.open(path).convert("RGB"))))
    return xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()


def test_manifest_columns_labels_and_info(prepared, src):
    manifest = pd.read_csv(prepared / "manifest.csv")
    parts = [f"part_{k}_{c}" for k in range(1, 5) for c in ("x", "y", "visible")]
    assert list(manifest.columns) == BASE_COLUMNS + parts + ["width", "height"]
    assert manifest["image_id"].tolist() == list(range(1, 21))
    # Joined by id: each row's label is the class of the folder it came from, split as in the file.
    assert (manifest["class_name"] == manifest["path"].str.split("/").str[1]).all()
    assert (manifest["label"] == manifest["class_name"].str[:3].astype(int) - 1).all()
    split_file = dict(line.split() for line in read_lines(src / "CUB_200_2011" / "train_test_split.txt"))
    assert [("train" if split_file[str(i)] == "1" else "test") for i in manifest["image_id"]] == manifest["split"].tolist()

    info = json.loads((prepared / "prep_info.json").read_text())
    assert info["task"] == "cub" and "md5" not in info
    assert info["counts"] == {"train": (manifest["split"] == "train").sum(), "test": (manifest["split"] == "test").sum(),
                              "images": 20, "classes": 4, "parts": 4}
    assert info["class_names"] == [f"{c:03d}.Fake_bird_{c}" for c in range(1, 5)]
    assert info["part_names"] == ["back", "beak", "belly", "breast"]
    assert {k: v for k, v in info["quirks"].items() if v} == {"grayscale": 1, "cmyk": 1, "png_as_jpg": 1, "exif_rotated": 7}
    assert info["skipped"] == [] and info["options"]["short_side"] == 64


def test_images_are_rgb_jpeg_and_boxes_follow_the_object(prepared):
    manifest = pd.read_csv(prepared / "manifest.csv")
    for row in manifest.itertuples():
        with Image.open(prepared / row.path) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (row.width, row.height))
        assert min(row.width, row.height) == 64
        found = object_box(prepared / row.path)
        box = (row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h)
        # Upscaling rings a pixel or two past the edge; a wrong scale, join or rotation misses by far more.
        assert np.allclose(found, box, atol=2.5), (row.path, found, box)
        for k in range(1, 5):
            if getattr(row, f"part_{k}_visible"):
                x, y = getattr(row, f"part_{k}_x"), getattr(row, f"part_{k}_y")
                assert box[0] <= x <= box[0] + box[2] and box[1] <= y <= box[1] + box[3]


def test_tgz_and_shuffled_rows_give_the_same_manifest(prepared, tmp_path):
    archive = make_cub_tgz(tmp_path / "archive", **DATA)
    assert prep(archive, tmp_path / "from_tgz") == 0
    assert (tmp_path / "from_tgz" / "manifest.csv").read_bytes() == (prepared / "manifest.csv").read_bytes()
    info = json.loads((tmp_path / "from_tgz" / "prep_info.json").read_text())
    assert info["md5"]["expected"] == cub.OFFICIAL_MD5 and info["md5"]["ok"] is False
    assert len(info["md5"]["value"]) == 32
    assert sorted(p.name for p in (tmp_path / "from_tgz").iterdir()) == ["images", "manifest.csv", "prep_info.json"]

    shuffled = make_cub_folder(tmp_path / "shuffled", shuffle_rows=True, **DATA)
    assert prep(shuffled / "CUB_200_2011", tmp_path / "from_shuffled") == 0  # the CUB folder itself works too
    assert (tmp_path / "from_shuffled" / "manifest.csv").read_bytes() == (prepared / "manifest.csv").read_bytes()


def test_no_parts_gives_no_part_columns(tmp_path):
    src = make_cub_folder(tmp_path / "src", n_classes=2, images_per_class=2, size=40, n_parts=0, quirks=False)
    assert prep(src, tmp_path / "out") == 0
    assert list(pd.read_csv(tmp_path / "out" / "manifest.csv").columns) == BASE_COLUMNS + ["width", "height"]
    assert "part_names" not in json.loads((tmp_path / "out" / "prep_info.json").read_text())


def test_missing_label_row_names_the_file(src_copy, tmp_path):
    labels = src_copy / "CUB_200_2011" / "image_class_labels.txt"
    lines = read_lines(labels)
    labels.write_text("".join(lines[:6] + lines[7:]))
    with pytest.raises(PrepError, match=r"image_class_labels\.txt: no row for image id 7 "):
        prep(src_copy, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_duplicated_id_names_file_and_line(src_copy, tmp_path):
    boxes = src_copy / "CUB_200_2011" / "bounding_boxes.txt"
    lines = read_lines(boxes)
    boxes.write_text("".join(lines[:3] + [lines[1]] + lines[3:]))
    with pytest.raises(PrepError, match=r"bounding_boxes\.txt:4: image id 2 appears again \(first on line 2\)"):
        prep(src_copy, tmp_path / "out")


@pytest.mark.parametrize("name, line, bad, message", [
    ("image_class_labels.txt", 3, "3 99\n", r"image_class_labels\.txt:3: class id 99 out of range 1\.\.4"),
    ("images.txt", 2, "2 ../../escape.jpg\n", r"images\.txt:2: path '\.\./\.\./escape\.jpg' must be relative"),
    ("images.txt", 3, "2 001.Fake_bird_1/other.jpg\n", r"images\.txt:3: image id 2 appears again \(first on line 2\)"),
    ("parts/part_locs.txt", 5, "2 1 3.0 4.0 7\n", r"part_locs\.txt:5: visible flag must be 0 or 1"),
])
def test_bad_rows_name_file_and_line(src_copy, tmp_path, name, line, bad, message):
    path = src_copy / "CUB_200_2011" / name
    lines = read_lines(path)
    lines[line - 1] = bad
    path.write_text("".join(lines))
    with pytest.raises(PrepError, match=message):
        prep(src_copy, tmp_path / "out")


def plain_jpeg(src: Path) -> str:
    """images.txt path of an image stored as an ordinary RGB JPEG without EXIF."""
    for line in read_lines(src / "CUB_200_2011" / "images.txt"):
        rel = line.split()[1]
        with Image.open(src / "CUB_200_2011" / "images" / rel) as image:
            if image.format == "JPEG" and image.mode == "RGB" and not image.getexif():
                return rel
    raise AssertionError("fixture has no plain JPEG")


def test_truncated_jpeg_fails_or_is_skipped(src_copy, tmp_path):
    rel = plain_jpeg(src_copy)
    image = src_copy / "CUB_200_2011" / "images" / rel
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(PrepError, match=f"images/{rel}: cannot decode"):
        prep(src_copy, tmp_path / "out")
    assert not (tmp_path / "out" / "prep_info.json").exists()

    # The failed run left only its own unfinished output, so a plain re-run may reuse the folder.
    assert prep(src_copy, tmp_path / "out", "--skip-bad") == 0
    manifest = pd.read_csv(tmp_path / "out" / "manifest.csv")
    info = json.loads((tmp_path / "out" / "prep_info.json").read_text())
    assert len(manifest) == 19 and f"images/{rel}" not in manifest["path"].tolist()
    assert info["skipped"] == [rel] and info["counts"]["images"] == 19
    assert not (tmp_path / "out" / "images" / rel).exists()


def test_script_exit_status_and_one_line_error(src_copy, tmp_path):
    rel = plain_jpeg(src_copy)
    (src_copy / "CUB_200_2011" / "images" / rel).unlink()
    result = subprocess.run([sys.executable, str(REPO / "data_prep" / "cub.py"), "--src", str(src_copy),
                             "--out", str(tmp_path / "out"), "--workers", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"images/{rel}: file missing" in errors[0]
    assert "Traceback" not in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "data_prep.cub", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=60)
    assert help_text.returncode == 0 and "--short-side" in help_text.stdout


def test_tar_member_escaping_is_refused(src, tmp_path):
    archive = tmp_path / "evil" / "CUB_200_2011.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "CUB_200_2011", arcname="CUB_200_2011")
        payload = b"gotcha"
        member = tarfile.TarInfo("CUB_200_2011/../../escaped.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    out = tmp_path / "work" / "out"
    with pytest.raises(PrepError, match="escaped.txt"):
        prep(archive, out)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (out / "manifest.csv").exists() and not (out / cub.EXTRACT_DIR).exists()


def test_rerun_is_a_noop_and_other_options_need_overwrite(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert prep(src, out) == 0
    first = next((out / "images").rglob("*.jpg"))
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert prep(src, out) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp

    with pytest.raises(PrepError, match=r"other options \(short_side\).*another --out or pass --overwrite"):
        cub.main(["--src", str(src), "--out", str(out), "--workers", "1", "--short-side", "32"])
    assert cub.main(["--src", str(src), "--out", str(out), "--workers", "1", "--short-side", "32", "--overwrite"]) == 0
    manifest = pd.read_csv(out / "manifest.csv")
    assert (manifest[["width", "height"]].min(axis=1) == 32).all()
    assert json.loads((out / "prep_info.json").read_text())["options"]["short_side"] == 32


def test_foreign_non_empty_out_is_refused(src, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PrepError, match="not empty"):
        prep(src, tmp_path / "out")


@pytest.mark.parametrize("margin", ["0", "0.25"])
def test_crop_bbox_boxes_describe_the_crop(src, tmp_path, margin):
    out = tmp_path / "out"
    assert prep(src, out, "--crop-bbox", "--bbox-margin", margin, "--short-side", "0") == 0
    manifest = pd.read_csv(out / "manifest.csv")
    originals = {int(line.split()[0]): [float(v) for v in line.split()[1:]]
                 for line in read_lines(src / "CUB_200_2011" / "bounding_boxes.txt")}
    for row in manifest.itertuples():
        box = (row.bbox_x, row.bbox_y, row.bbox_w, row.bbox_h)
        assert sorted(box[2:]) == sorted(originals[row.image_id][2:])  # unscaled; EXIF turns may swap w, h
        assert 0 <= box[0] and 0 <= box[1] and box[0] + box[2] <= row.width and box[1] + box[3] <= row.height
        assert np.allclose(object_box(out / row.path), box, atol=1.0), row.path
        if margin == "0":
            assert box == (0, 0, row.width, row.height)
        else:
            assert row.width > box[2] or row.height > box[3]  # context kept around the box
        for k in range(1, 5):
            if getattr(row, f"part_{k}_visible"):
                assert 0 <= getattr(row, f"part_{k}_x") <= row.width and 0 <= getattr(row, f"part_{k}_y") <= row.height


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_point_moves_like_exif_transpose(tmp_path, orientation):
    pixels = np.zeros((6, 10, 3), np.uint8)
    pixels[1, 7] = 255  # stored pixel x=7, y=1: centre (7.5, 1.5)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "a.png", exif=exif.tobytes())
    from abn_core.images import open_rgb
    upright = np.asarray(open_rgb(tmp_path / "a.png"))
    ys, xs = np.nonzero(upright[..., 0] > 128)
    assert cub.orient_point(7.5, 1.5, 10, 6, orientation) == (xs[0] + 0.5, ys[0] + 0.5)
