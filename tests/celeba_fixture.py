"""Tiny fake CelebA datasets in the exact byte layout of the official release.

What is copied from the real files (see shared/reference/datasets.md): CRLF line endings; the
count line; the attribute header with its trailing space; -1/1 values padded to width 2 (so one or
two spaces separate fields); fixed-width landmark and box rows; identity and partition files
without header; 178x218 RGB JPEGs named 000001.jpg, 000002.jpg, ...

Layouts:
- "flat"  (torchvision's): <root>/list_attr_celeba.txt, ..., <root>/img_align_celeba/*.jpg
- "drive" (Google Drive's): <root>/Anno/*.txt, <root>/Eval/list_eval_partition.txt,
  <root>/Img/img_align_celeba.zip (or the extracted <root>/Img/img_align_celeba/)

The same ``seed`` and ``n_images`` give byte-identical text files and images in both layouts.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ATTRIBUTE_NAMES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
]
LANDMARK_NAMES = [
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
]
IMAGE_WIDTH, IMAGE_HEIGHT = 178, 218
# Typical aligned-image landmark positions (x, y pairs) that the fake ones jitter around.
_LANDMARK_MEANS = np.array([69, 111, 108, 111, 88, 136, 72, 152, 105, 152])


def image_name(index: int) -> str:
    """File name of the 0-based ``index``-th image: 0 -> 000001.jpg."""
    return f"{index + 1:06d}.jpg"


def _crlf(lines: list[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("ascii")


def attr_file_bytes(names: list[str], values: np.ndarray) -> bytes:
    """list_attr_celeba.txt: count line, header with trailing space, width-2 padded -1/1 values."""
    rows = [image_name(i) + "".join(f" {v:2d}" for v in row) for i, row in enumerate(values)]
    return _crlf([str(len(values)), " ".join(names) + " ", *rows])


def partition_file_bytes(partitions: np.ndarray) -> bytes:
    return _crlf([f"{image_name(i)} {p}" for i, p in enumerate(partitions)])


def landmarks_file_bytes(landmarks: np.ndarray) -> bytes:
    # Fixed width as in the real file: "000001.jpg    69  109  106 ..."
    rows = [image_name(i) + f"{row[0]:6d}" + "".join(f"{v:5d}" for v in row[1:]) for i, row in enumerate(landmarks)]
    return _crlf([str(len(landmarks)), " ".join(LANDMARK_NAMES), *rows])


def bbox_file_bytes(boxes: np.ndarray) -> bytes:
    rows = [f"{image_name(i):<10}" + "".join(f"{v:6d}" for v in row) for i, row in enumerate(boxes)]
    return _crlf([str(len(boxes)), "image_id x_1 y_1 width height ", *rows])


def identity_file_bytes(identities: np.ndarray) -> bytes:
    return _crlf([f"{image_name(i)} {ident}" for i, ident in enumerate(identities)])


def jpeg_bytes(rng: np.random.Generator, size: tuple[int, int] = (IMAGE_WIDTH, IMAGE_HEIGHT)) -> bytes:
    """A smooth random RGB JPEG of ``size`` (W, H)."""
    coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _partitions(n_images: int) -> np.ndarray:
    """Contiguous 0/1/2 blocks (about 60/20/20) like the real file; every split non-empty for n >= 3."""
    n_train = max(1, round(n_images * 0.6))
    n_valid = max(1, round(n_images * 0.2))
    return np.array([0 if i < n_train else 1 if i < n_train + n_valid else 2 for i in range(n_images)])


def make_celeba(
    root: str | Path,
    layout: str = "flat",
    n_images: int = 30,
    zip_images: bool = True,
    optional_files: bool = True,
    seed: int = 0,
) -> Path:
    """Write a fake CelebA of ``n_images`` images under ``root`` and return ``root``.

    ``zip_images`` applies to the drive layout (Img/img_align_celeba.zip instead of the extracted
    Img/img_align_celeba/); the flat layout is always extracted, as torchvision expects.
    ``optional_files=False`` leaves out landmarks, boxes and identities.
    """
    if layout not in ("flat", "drive"):
        raise ValueError(f"layout must be 'flat' or 'drive', not {layout!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    attrs = rng.choice([-1, 1], size=(n_images, len(ATTRIBUTE_NAMES)))
    partitions = _partitions(n_images)
    landmarks = _LANDMARK_MEANS + rng.integers(-6, 7, size=(n_images, len(LANDMARK_NAMES)))
    boxes = np.column_stack([rng.integers(50, 200, size=(n_images, 2)), rng.integers(100, 400, size=(n_images, 2))])
    # Identities are disjoint across partitions in the real data.
    identities = 1 + np.arange(n_images) // 2 + 1000 * partitions
    images = {image_name(i): jpeg_bytes(rng) for i in range(n_images)}

    texts = {"list_attr_celeba.txt": attr_file_bytes(ATTRIBUTE_NAMES, attrs),
             "list_eval_partition.txt": partition_file_bytes(partitions)}
    if optional_files:
        texts["list_landmarks_align_celeba.txt"] = landmarks_file_bytes(landmarks)
        texts["list_bbox_celeba.txt"] = bbox_file_bytes(boxes)
        texts["identity_CelebA.txt"] = identity_file_bytes(identities)

    for name, data in texts.items():
        folder = root if layout == "flat" else root / ("Eval" if name == "list_eval_partition.txt" else "Anno")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    image_parent = root if layout == "flat" else root / "Img"
    image_parent.mkdir(parents=True, exist_ok=True)
    if layout == "drive" and zip_images:
        with zipfile.ZipFile(image_parent / "img_align_celeba.zip", "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("img_align_celeba/", b"")
            for name, data in images.items():
                archive.writestr(f"img_align_celeba/{name}", data)
    else:
        image_dir = image_parent / "img_align_celeba"
        image_dir.mkdir(exist_ok=True)
        for name, data in images.items():
            (image_dir / name).write_bytes(data)
    return root
