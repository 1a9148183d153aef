"""Tiny fake CUB-200-2011 datasets in the exact on-disk layout of the real release.

Each image is dark noise with one bright rectangle (the "bird") in its class colour at a random
place; the bounding box is exactly that rectangle and the part locations are points inside it, so
tests can check that boxes (and attention) land on the object. Annotations refer to the STORED
pixels, as in the real release (which has no EXIF orientation tags); images written with an EXIF
orientation therefore show the object elsewhere once turned upright.

    make_cub_folder(root, n_classes=5, images_per_class=6) -> root        (root/CUB_200_2011/...)
    make_cub_tgz(root, ...) -> root / "CUB_200_2011.tgz"                   (same members as the real archive)
    object_mask(rgb_array) -> bool mask of the object's pixels             (works for grayscale copies too)
"""
from __future__ import annotations

import colorsys
import random
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Real CUB part names (the first ones); several contain spaces, which parsers must survive.
PART_NAMES = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
              "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat"]

BACKGROUND_MAX = 40      # background pixels are noise in 0..BACKGROUND_MAX
OBJECT_MIN_LUMA = 110    # every class colour is at least this bright, even in grayscale
ORIENTATION_TAG = 0x0112


def class_colour(class_id: int, n_classes: int) -> tuple[int, int, int]:
    """The RGB colour of class ``class_id`` (1-based): evenly spaced hues, bright enough to find."""
    r, g, b = colorsys.hsv_to_rgb((class_id - 1) / n_classes, 0.55, 1.0)
    return round(r * 255), round(g * 255), round(b * 255)


def object_mask(rgb: np.ndarray) -> np.ndarray:
    """H x W bool mask of the object's pixels in an H x W x 3 (or H x W) uint8 image."""
    luma = rgb.astype(np.float32) if rgb.ndim == 2 else rgb.astype(np.float32) @ [0.299, 0.587, 0.114]
    return luma > (BACKGROUND_MAX + OBJECT_MIN_LUMA) / 2


def make_cub_folder(root: str | Path, n_classes: int = 5, images_per_class: int = 6, size: int = 64,
                    seed: int = 0, n_parts: int = 4, quirks: bool = True, exif_rotated: int = 0,
                    shuffle_rows: bool = False, box_fraction: tuple[float, float] = (0.3, 0.5),
                    distractors: int = 0) -> Path:
    """Write a fake CUB release under ``root`` (root/attributes.txt, root/CUB_200_2011/...); return root.

    Image sides are random in [0.7 * size, size]. With ``quirks`` one image each is saved as
    grayscale JPEG, CMYK JPEG and PNG data under a .jpg name. ``exif_rotated`` images carry EXIF
    orientations 2..8 in turn. ``shuffle_rows`` shuffles the line order of every per-image file
    (the real files are sorted by id; parsers must join by id anyway). ``n_parts=0``: no parts/.
    ``box_fraction``: the object's side as a (min, max) fraction of the image's side.
    ``distractors``: hollow outlines in other classes' colours drawn beside the object, so that a
    model must find the filled object to classify (colour alone does not decide the class).
    """
    rng = random.Random(seed)
    root = Path(root)
    cub = root / "CUB_200_2011"
    (cub / "images").mkdir(parents=True, exist_ok=True)
    (root / "attributes.txt").write_text("".join(f"{i} has_fake_attribute::{i}\n" for i in range(1, 4)))

    class_names = [f"{c:03d}.Fake_bird_{c}" for c in range(1, n_classes + 1)]
    rows = _layout(rng, class_names, images_per_class)
    special = _special_images(rng, len(rows), quirks, exif_rotated)
    part_ids = list(range(1, n_parts + 1))

    for row in rows:
        others = [class_colour(c, n_classes) for c in range(1, n_classes + 1) if c != row["class_id"]]
        row.update(_draw(rng, cub / "images" / row["path"], size, class_colour(row["class_id"], n_classes),
                         special.get(row["image_id"], "rgb"), part_ids, box_fraction,
                         rng.sample(others, min(distractors, len(others)))))

    def write(name: str, lines: list[str]) -> None:
        if shuffle_rows:
            rng.shuffle(lines)
        (cub / name).parent.mkdir(parents=True, exist_ok=True)
        (cub / name).write_text("".join(line + "\n" for line in lines))

    by_id = sorted(rows, key=lambda r: r["image_id"])
    write("images.txt", [f"{r['image_id']} {r['path']}" for r in by_id])
    write("image_class_labels.txt", [f"{r['image_id']} {r['class_id']}" for r in by_id])
    write("train_test_split.txt", [f"{r['image_id']} {r['is_training']}" for r in by_id])
    write("bounding_boxes.txt", [f"{r['image_id']} " + " ".join(f"{v:.1f}" for v in r["box"]) for r in by_id])
    (cub / "classes.txt").write_text("".join(f"{c} {name}\n" for c, name in enumerate(class_names, 1)))
    if part_ids:
        (cub / "parts").mkdir(exist_ok=True)
        (cub / "parts" / "parts.txt").write_text("".join(f"{p} {PART_NAMES[p - 1]}\n" for p in part_ids))
        write("parts/part_locs.txt", [f"{r['image_id']} {p} {x:.1f} {y:.1f} {v}"
                                      for r in by_id for p, (x, y, v) in zip(part_ids, r["parts"])])
    return root


def make_cub_tgz(root: str | Path, **kwargs) -> Path:
    """Write ``root/CUB_200_2011.tgz`` holding a make_cub_folder dataset (kwargs as there)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "CUB_200_2011.tgz"
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_cub_folder(tmp, **kwargs)
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(folder / "attributes.txt", arcname="attributes.txt")
            tar.add(folder / "CUB_200_2011", arcname="CUB_200_2011")
    return archive


def _layout(rng: random.Random, class_names: list[str], per_class: int) -> list[dict]:
    """Ids run class by class (as in CUB) but not in file-name order within a class."""
    rows, next_id = [], 1
    for class_id, name in enumerate(class_names, 1):
        # File names capitalise differently from the folder, as in the real data.
        files = sorted(f"Fake_Bird_{class_id}_{n:04d}_{rng.randint(100, 99999)}.jpg" for n in range(per_class))
        order = list(range(per_class))
        while per_class > 1 and order == sorted(order):
            rng.shuffle(order)
        train = set(rng.sample(range(per_class), (per_class + 1) // 2))
        for position, file_index in enumerate(order):
            rows.append({"image_id": next_id + position, "path": f"{name}/{files[file_index]}",
                         "class_id": class_id, "is_training": int(file_index in train)})
        next_id += per_class
    return rows


def _special_images(rng: random.Random, n_images: int, quirks: bool, exif_rotated: int) -> dict[int, str]:
    kinds = (["gray", "cmyk", "png"] if quirks else []) + [f"exif{2 + i % 7}" for i in range(exif_rotated)]
    if len(kinds) > n_images:
        raise ValueError(f"{len(kinds)} special images asked for but only {n_images} images")
    return dict(zip(rng.sample(range(1, n_images + 1), len(kinds)), kinds))


def _draw_outlines(rng: random.Random, image: Image.Image, box: tuple[int, int, int, int],
                   colours: list[tuple[int, int, int]]) -> None:
    """Hollow rectangles of the object's size in ``colours``, away from the object (best effort)."""
    x0, y0, w, h = box
    draw = ImageDraw.Draw(image)
    for colour in colours:
        for _ in range(20):
            x, y = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
            if x + w <= x0 or x0 + w <= x or y + h <= y0 or y0 + h <= y:
                draw.rectangle([x, y, x + w - 1, y + h - 1], outline=colour, width=max(1, min(w, h) // 6))
                break


def _draw(rng: random.Random, path: Path, size: int, colour: tuple[int, int, int], kind: str,
          part_ids: list[int], box_fraction: tuple[float, float],
          distractor_colours: list[tuple[int, int, int]] = ()) -> dict:
    """Write one image; return its box (x, y, w, h) and parts [(x, y, visible)] in stored pixels."""
    width, height = rng.randint(int(size * 0.7), size), rng.randint(int(size * 0.7), size)
    low, high = box_fraction
    box_w, box_h = (rng.randint(max(4, int(side * low)), max(4, int(side * high))) for side in (width, height))
    x0, y0 = rng.randint(0, width - box_w), rng.randint(0, height - box_h)

    noise = np.random.default_rng(rng.randint(0, 2**31)).integers(0, BACKGROUND_MAX + 1, (height, width, 3))
    pixels = noise.astype(np.uint8)
    pixels[y0:y0 + box_h, x0:x0 + box_w] = colour
    image = Image.fromarray(pixels)
    _draw_outlines(rng, image, (x0, y0, box_w, box_h), distractor_colours)

    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "gray":
        image.convert("L").save(path, "JPEG", quality=92)
    elif kind == "cmyk":
        image.convert("CMYK").save(path, "JPEG", quality=92)
    elif kind == "png":
        image.save(path, "PNG")
    elif kind.startswith("exif"):
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = int(kind[4:])
        image.save(path, "JPEG", quality=92, exif=exif.tobytes())
    else:
        image.save(path, "JPEG", quality=92)

    parts = []
    for _ in part_ids:
        visible = rng.random() < 0.8
        # Keep parts away from the box edge so they stay inside it after any rounding.
        parts.append((float(rng.randint(x0 + 1, x0 + box_w - 2)), float(rng.randint(y0 + 1, y0 + box_h - 2)), 1)
                     if visible else (0.0, 0.0, 0))
    return {"box": (float(x0), float(y0), float(box_w), float(box_h)), "parts": parts, "size": (width, height)}
