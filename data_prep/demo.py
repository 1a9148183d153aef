"""The built-in demo data: small procedurally drawn datasets written in the prepared formats.

Single-label (``classification``): one object on a cluttered grey background; its kind is the class.
Multi-label (``multilabel``): 1-3 objects of different kinds; attribute k = "kind k is present".
Object boxes are kept (``bbox_*`` columns) so tests can check that attention lands on the objects.
Built once, deterministically, into a cache directory (``ABN_SUITE_CACHE``, default ~/.cache/abn-suite).

Run ``python data_prep/demo.py --out DIR [--kind single|multi]`` to write a copy somewhere else.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.common import write_json  # noqa: E402

VERSION = 1
IMAGE_SIZE = 64
KINDS = (  # (name, RGB colour, shape): distinct hues on a grey background
    ("red_disk", (220, 40, 40), "disk"),
    ("green_square", (40, 190, 60), "square"),
    ("blue_triangle", (50, 80, 230), "triangle"),
    ("yellow_cross", (230, 210, 40), "cross"),
    ("magenta_ring", (210, 50, 200), "ring"),
    ("cyan_disk", (40, 200, 210), "disk"),
    ("orange_square", (240, 140, 30), "square"),
    ("purple_triangle", (130, 50, 180), "triangle"),
    ("lime_cross", (150, 230, 60), "cross"),
    ("pink_ring", (250, 140, 170), "ring"),
)
SPLIT_SIZES = {"single": {"train": 1200, "test": 300}, "multi": {"train": 1200, "valid": 200, "test": 300}}


def cache_root() -> Path:
    return Path(os.environ.get("ABN_SUITE_CACHE", Path.home() / ".cache" / "abn-suite"))


def _background(rng: np.random.Generator) -> Image.Image:
    base = rng.normal(128, 18, size=(IMAGE_SIZE // 4, IMAGE_SIZE // 4, 1)).clip(40, 215)
    texture = np.kron(base, np.ones((4, 4, 1))) + rng.normal(0, 10, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    image = Image.fromarray(np.repeat(texture.clip(0, 255), 3, axis=2).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 9)):  # grey clutter: lines and blobs the model must learn to ignore
        grey = int(rng.integers(30, 230))
        x, y = rng.integers(0, IMAGE_SIZE, size=2)
        if rng.random() < 0.5:
            dx, dy = rng.integers(-30, 30, size=2)
            draw.line([(x, y), (x + dx, y + dy)], fill=(grey,) * 3, width=int(rng.integers(1, 4)))
        else:
            r = int(rng.integers(3, 9))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(grey,) * 3)
    return image


def _draw_object(draw: ImageDraw.ImageDraw, kind: int, box: tuple[int, int, int, int]) -> None:
    _, colour, shape = KINDS[kind]
    x, y, w, h = box
    x2, y2 = x + w - 1, y + h - 1
    if shape == "disk":
        draw.ellipse([x, y, x2, y2], fill=colour)
    elif shape == "square":
        draw.rectangle([x, y, x2, y2], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x + w / 2, y), (x, y2), (x2, y2)], fill=colour)
    elif shape == "cross":
        draw.rectangle([x + w // 3, y, x + 2 * w // 3, y2], fill=colour)
        draw.rectangle([x, y + h // 3, x2, y + 2 * h // 3], fill=colour)
    else:
        draw.ellipse([x, y, x2, y2], outline=colour, width=max(2, w // 5))


def _place(rng: np.random.Generator, taken: list[tuple[int, int, int, int]]) -> tuple[int, int, int, int]:
    """A random box of 12-18 px that does not overlap earlier ones (best effort)."""
    for _ in range(50):
        size = int(rng.integers(12, 19))
        x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size, size=2))
        if all(x + size <= a or a + c <= x or y + size <= b or b + d <= y for a, b, c, d in taken):
            return x, y, size, size
    return x, y, size, size


def draw_image(rng: np.random.Generator, kinds: Sequence[int]) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """A cluttered background with one object per kind in ``kinds``; returns the image and their boxes."""
    image = _background(rng)
    draw = ImageDraw.Draw(image)
    boxes: list[tuple[int, int, int, int]] = []
    for kind in kinds:
        boxes.append(_place(rng, boxes))
        _draw_object(draw, kind, boxes[-1])
    return image, boxes


def _write_single(out: Path, rng: np.random.Generator) -> None:
    rows = []
    for split, count in SPLIT_SIZES["single"].items():
        for i in range(count):
            kind = i % len(KINDS)
            image, [box] = draw_image(rng, [kind])
            rel = f"images/{KINDS[kind][0]}/{split}_{i:05d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            image.save(out / rel)
            rows.append({"image_id": len(rows) + 1, "path": rel, "label": kind, "class_name": KINDS[kind][0], "split": split,
                         "bbox_x": float(box[0]), "bbox_y": float(box[1]), "bbox_w": float(box[2]), "bbox_h": float(box[3]),
                         "width": IMAGE_SIZE, "height": IMAGE_SIZE})
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    write_json(out / "prep_info.json", {"task": "classification", "source": "demo", "demo_version": VERSION,
                                        "class_names": [k[0] for k in KINDS], "counts": SPLIT_SIZES["single"]})


def _write_multi(out: Path, rng: np.random.Generator) -> None:
    names = [k[0] for k in KINDS]
    total = sum(SPLIT_SIZES["multi"].values())
    packed = np.lib.format.open_memmap(out / "images_uint8.npy", mode="w+", dtype=np.uint8, shape=(total, IMAGE_SIZE, IMAGE_SIZE, 3))
    rows = []
    for split, count in SPLIT_SIZES["multi"].items():
        for _ in range(count):
            kinds = rng.choice(len(KINDS), size=int(rng.integers(1, 4)), replace=False)
            image, boxes = draw_image(rng, kinds)
            packed[len(rows)] = np.asarray(image)
            name = f"{len(rows) + 1:06d}.png"
            row = {"image": name, "path": f"images/{name}", "split": split} | {n: 0 for n in names}
            for kind, box in zip(kinds, boxes):
                row[names[kind]] = 1
                row |= {f"bbox_{names[kind]}_{c}": float(v) for c, v in zip("xywh", box)}
            rows.append(row)
    packed.flush()
    del packed
    box_columns = [f"bbox_{n}_{c}" for n in names for c in "xywh"]
    pd.DataFrame(rows, columns=["image", "path", "split", *names, *box_columns]).to_csv(out / "manifest.csv", index=False)
    write_json(out / "prep_info.json", {"task": "celeba", "source": "demo", "demo_version": VERSION, "attributes": names,
                                        "packed": {"file": "images_uint8.npy", "height": IMAGE_SIZE, "width": IMAGE_SIZE, "count": total},
                                        "counts": SPLIT_SIZES["multi"]})


def build_demo(kind: str, out: Path) -> Path:
    """Write the ``kind`` ('single' or 'multi') demo dataset into ``out`` (replaced if present)."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(2019 if kind == "single" else 1812)
    (_write_single if kind == "single" else _write_multi)(tmp, rng)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def ensure_demo(kind: str) -> Path:
    """The cached demo dataset of ``kind``, built on first use."""
    out = cache_root() / f"demo-{kind}-v{VERSION}"
    if not (out / "prep_info.json").is_file():
        print(f"[demo] building the {kind}-label demo dataset in {out} (once)")
        build_demo(kind, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--kind", choices=("single", "multi"), default="single")
    args = parser.parse_args(argv)
    build_demo(args.kind, args.out)
    print(f"wrote the {args.kind}-label demo dataset to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
