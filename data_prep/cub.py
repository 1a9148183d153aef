"""Prepare CUB-200-2011 for the suite: verify, convert to RGB JPEG, scale boxes/parts, write manifest.csv.

    python data_prep/cub.py --src CUB_200_2011.tgz --out DIR
    python data_prep/cub.py --src FOLDER --out DIR     # FOLDER holds CUB_200_2011/ (or is it)

Annotation frame: CUB's boxes and part locations refer to the image's stored pixels. The real
release has no EXIF orientation tags; when a user's copy has one, the pixels are turned upright
(as everywhere in the suite) and the boxes and parts are turned with them, and the image is counted
under quirks "exif_rotated".
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
from PIL import Image

from abn_core.images import ImageDecodeError, open_rgb
from data_prep.common import (PrepError, at_line, default_workers, md5_file, parallel_map, print_summary,
                              run_cli, safe_extract_tar, write_json)

OFFICIAL_MD5 = "97eceeb196236b17998738112f37df78"
JPEG_QUALITY = 95
FORMAT_VERSION = 1
STATE_FILE = ".prep_in_progress.json"  # marks DIR as ours while a run is unfinished
EXTRACT_DIR = ".extracted_source"      # inside DIR, so a tgz never spills anywhere else
QUIRK_KEYS = ("grayscale", "cmyk", "other_mode", "png_as_jpg", "other_format", "exif_rotated", "boxes_clipped")
ANNOTATION_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
                    "bounding_boxes.txt", "parts/parts.txt", "parts/part_locs.txt")

Part = tuple[float, float, int]  # x, y, visible
Box = tuple[float, float, float, float]  # x, y, w, h


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python data_prep/cub.py", description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--src", required=True, help="CUB_200_2011.tgz, or a folder holding CUB_200_2011/ (or that folder itself)")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--short-side", type=int, default=512,
                        help="resize every image so its shorter side is exactly this many pixels, up or down, "
                             "so all images share one scale; 0 keeps the original sizes")
    parser.add_argument("--crop-bbox", action="store_true",
                        help="crop each image to its bounding box (before resizing); boxes and parts then describe the crop")
    parser.add_argument("--bbox-margin", type=float, default=0.0,
                        help="with --crop-bbox: widen the box by this fraction of its width/height on every side (clipped to the image)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="drop missing, truncated or undecodable images (listed in prep_info.json) instead of failing")
    parser.add_argument("--workers", type=int, default=default_workers(), help="parallel processes (0 or 1: none)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier preparation in --out made with other options or another source "
                             "(one with the same source and options is kept: re-running is a no-op)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for data errors")
    args = parser.parse_args(argv)
    if args.short_side < 0 or args.bbox_margin < 0 or args.workers < 0:
        parser.error("--short-side, --bbox-margin and --workers must not be negative")
    return args


def options_of(args: argparse.Namespace) -> dict[str, Any]:
    """The options that decide the output (a re-run with the same ones is a no-op)."""
    return {"short_side": args.short_side, "crop_bbox": args.crop_bbox,
            "bbox_margin": args.bbox_margin if args.crop_bbox else None,
            "skip_bad": args.skip_bad, "jpeg_quality": JPEG_QUALITY, "format_version": FORMAT_VERSION}


# ----------------------------------------------------------------------------- source

def find_cub_root(folder: Path) -> Path | None:
    """The CUB_200_2011 folder: ``folder`` itself or its child of that name."""
    for candidate in (folder, folder / "CUB_200_2011"):
        if (candidate / "images.txt").is_file():
            return candidate
    return None


def folder_fingerprint(cub_root: Path) -> dict[str, Any]:
    """Content of the annotation files plus name and size of every image (cheap, location-free)."""
    digest = hashlib.md5()
    for name in ANNOTATION_FILES:
        if (cub_root / name).is_file():
            digest.update(name.encode() + b"\0" + (cub_root / name).read_bytes())
    images = cub_root / "images"
    for dirpath, dirnames, filenames in os.walk(images):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            digest.update(f"{path.relative_to(images).as_posix()}\0{path.stat().st_size}\n".encode())
    return {"kind": "folder", "digest": digest.hexdigest()}


@dataclass
class Source:
    path: Path
    kind: str                      # "tgz" or "folder"
    fingerprint: dict[str, Any]
    md5: dict[str, Any] | None = None


def inspect_source(src: Path) -> Source:
    if not src.exists():
        raise PrepError(f"{src}: no such file or folder; --src takes CUB_200_2011.tgz or the folder holding CUB_200_2011/")
    if src.is_dir():
        cub_root = find_cub_root(src)
        if cub_root is None:
            raise PrepError(f"{src}: neither {src / 'images.txt'} nor {src / 'CUB_200_2011' / 'images.txt'} exists; "
                            "--src takes CUB_200_2011.tgz or the folder holding CUB_200_2011/")
        return Source(src.resolve(), "folder", folder_fingerprint(cub_root))
    if not tarfile.is_tarfile(src):
        raise PrepError(f"{src}: not a tar archive; --src takes CUB_200_2011.tgz or the folder holding CUB_200_2011/")
    print(f"checking md5 of {src} ...", flush=True)
    value = md5_file(src)
    md5 = {"value": value, "expected": OFFICIAL_MD5, "ok": value == OFFICIAL_MD5}
    if not md5["ok"]:
        # Tests and re-packed copies differ; the content checks below still guard the data.
        print(f"warning: md5 of {src} is {value}, the official CUB_200_2011.tgz has {OFFICIAL_MD5}; continuing",
              file=sys.stderr)
    fingerprint = {"kind": "tgz", "md5": value, "size": src.stat().st_size}
    return Source(src.resolve(), "tgz", fingerprint, md5)


def unpack(source: Source, out: Path) -> tuple[Path, str]:
    """(CUB_200_2011 folder to read, how to name it in messages); extracts a tgz into DIR."""
    if source.kind == "folder":
        root = find_cub_root(source.path)
        assert root is not None  # inspect_source checked
        return root, str(root)
    dest = out / EXTRACT_DIR
    safe_extract_tar(source.path, dest)
    root = find_cub_root(dest)
    if root is None:
        raise PrepError(f"{source.path}: the archive holds no CUB_200_2011/images.txt")
    inside = root.relative_to(dest).as_posix()  # "." when the archive has no top folder
    return root, str(source.path) if inside == "." else f"{source.path}/{inside}"


# ----------------------------------------------------------------------------- annotation files

class Reader:
    """Reads CUB text files below the CUB_200_2011 folder, naming them as the user knows them."""

    def __init__(self, root: Path, shown_root: str):
        self.root, self.shown_root = root, shown_root

    def shown(self, name: str) -> str:
        return f"{self.shown_root}/{name}"

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def rows(self, name: str, n_fields: int, what: str) -> list[tuple[int, list[str]]]:
        """(line number, fields) of each non-blank line; the last field takes the rest of the line."""
        path = self.root / name
        if not path.is_file():
            raise PrepError(f"{self.shown(name)}: file missing")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise PrepError(f"{self.shown(name)}: not UTF-8 text ({exc})") from exc
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            fields = line.split(maxsplit=n_fields - 1)
            if not fields:
                continue
            if len(fields) != n_fields:
                raise at_line(self.shown(name), line_no, f"expected {n_fields} fields ({what}), got {line!r}")
            rows.append((line_no, fields))
        return rows

    def number(self, name: str, line_no: int, text: str, what: str, kind: type = int) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)):
            raise at_line(self.shown(name), line_no, f"{what} must be {'an integer' if kind is int else 'a number'}, got {text!r}")
        return value

    def id_names(self, name: str, what: str, fields: str) -> dict[int, tuple[str, int]]:
        """{id: (text, line number)} of a two-column "<id> <text>" file; each id once."""
        found: dict[int, tuple[str, int]] = {}
        for line_no, (id_text, text) in self.rows(name, 2, fields):
            key = self.number(name, line_no, id_text, what)
            if key in found:
                raise at_line(self.shown(name), line_no, f"{what} {key} appears again (first on line {found[key][1]})")
            found[key] = (text, line_no)
        return found

    def by_image(self, name: str, n_fields: int, what: str, images: dict[int, str]) -> dict[int, tuple[int, list[str]]]:
        """Rows keyed by image id; every id of images.txt exactly once, no others."""
        seen: dict[int, tuple[int, list[str]]] = {}
        for line_no, fields in self.rows(name, n_fields, what):
            image_id = self.number(name, line_no, fields[0], "image id")
            if image_id in seen:
                raise at_line(self.shown(name), line_no, f"image id {image_id} appears again (first on line {seen[image_id][0]})")
            if image_id not in images:
                raise at_line(self.shown(name), line_no, f"image id {image_id} is not in images.txt")
            seen[image_id] = (line_no, fields[1:])
        missing = sorted(images.keys() - seen.keys())
        if missing:
            raise PrepError(f"{self.shown(name)}: no row for image id {missing[0]} ({images[missing[0]]}); "
                            f"{len(missing)} of the {len(images)} images in images.txt have none")
        return seen


@dataclass
class Record:
    image_id: int
    rel_path: str            # as in images.txt
    label: int               # 0-based
    split: str
    box: Box
    parts: list[Part] = field(default_factory=list)


@dataclass
class Annotations:
    records: list[Record]    # sorted by image id
    class_names: list[str]   # label order
    part_ids: list[int]
    part_names: list[str]


def read_images(reader: Reader) -> dict[int, str]:
    outputs: dict[str, int] = {}
    images = reader.id_names("images.txt", "image id", "<image_id> <path>")
    for rel, line_no in images.values():
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or "\\" in rel:
            raise at_line(reader.shown("images.txt"), line_no, f"path {rel!r} must be relative to images/ without '..'")
        output = output_rel_path(rel).lower()  # lower: case-insensitive file systems collide too
        if output in outputs:
            raise at_line(reader.shown("images.txt"), line_no, f"{rel} would overwrite the converted image of line {outputs[output]}")
        outputs[output] = line_no
    if not images:
        raise PrepError(f"{reader.shown('images.txt')}: lists no images")
    return {image_id: rel for image_id, (rel, _) in images.items()}


def read_classes(reader: Reader) -> list[str]:
    names = reader.id_names("classes.txt", "class id", "<class_id> <class_name>")
    expected = set(range(1, len(names) + 1))
    if set(names) != expected:
        raise PrepError(f"{reader.shown('classes.txt')}: class ids must run 1..{len(names)} without gaps; "
                        f"unexpected {sorted(set(names) - expected)[:5]}")
    return [names[i][0] for i in sorted(names)]


def read_parts(reader: Reader, images: dict[int, str]) -> tuple[list[int], list[str], dict[int, list[Part]]]:
    """Part ids, names and per-image locations (in part id order); empty when parts/ is absent."""
    has_names, has_locs = reader.exists("parts/parts.txt"), reader.exists("parts/part_locs.txt")
    if not (has_names or has_locs):
        return [], [], {}
    if not (has_names and has_locs):
        missing = "parts/part_locs.txt" if has_names else "parts/parts.txt"
        raise PrepError(f"{reader.shown(missing)}: file missing (the other parts file exists; parts need both)")
    names = {k: name for k, (name, _) in reader.id_names("parts/parts.txt", "part id", "<part_id> <part name>").items()}
    part_ids = sorted(names)
    locs = read_part_locs(reader, images, names)
    return part_ids, [names[p] for p in part_ids], {i: [p[k] for k in part_ids] for i, p in locs.items()}


def read_part_locs(reader: Reader, images: dict[int, str], names: dict[int, str]) -> dict[int, dict[int, Part]]:
    name = "parts/part_locs.txt"
    locs: dict[int, dict[int, Part]] = {image_id: {} for image_id in images}
    lines: dict[tuple[int, int], int] = {}
    for line_no, fields in reader.rows(name, 5, "<image_id> <part_id> <x> <y> <visible>"):
        image_id = reader.number(name, line_no, fields[0], "image id")
        part_id = reader.number(name, line_no, fields[1], "part id")
        x, y = (reader.number(name, line_no, v, "coordinate", float) for v in fields[2:4])
        visible = reader.number(name, line_no, fields[4], "visible flag")
        if image_id not in images:
            raise at_line(reader.shown(name), line_no, f"image id {image_id} is not in images.txt")
        if part_id not in names:
            raise at_line(reader.shown(name), line_no, f"part id {part_id} is not in parts/parts.txt")
        if visible not in (0, 1):
            raise at_line(reader.shown(name), line_no, f"visible flag must be 0 or 1, got {visible}")
        if (image_id, part_id) in lines:
            raise at_line(reader.shown(name), line_no, f"image id {image_id} part {part_id} appears again "
                                                       f"(first on line {lines[image_id, part_id]})")
        lines[image_id, part_id] = line_no
        locs[image_id][part_id] = (x, y, visible) if visible else (0.0, 0.0, 0)
    for image_id, parts in sorted(locs.items()):
        if len(parts) != len(names):
            missing = min(set(names) - parts.keys())
            raise PrepError(f"{reader.shown(name)}: no row for image id {image_id} ({images[image_id]}) "
                            f"part {missing} ({names[missing]})")
    return locs


def read_annotations(reader: Reader) -> Annotations:
    """Parse every CUB file, join them by image id and check that they agree."""
    images = read_images(reader)
    class_names = read_classes(reader)
    labels = reader.by_image("image_class_labels.txt", 2, "<image_id> <class_id>", images)
    splits = reader.by_image("train_test_split.txt", 2, "<image_id> <is_training>", images)
    boxes = reader.by_image("bounding_boxes.txt", 5, "<image_id> <x> <y> <width> <height>", images)
    part_ids, part_names, part_locs = read_parts(reader, images)

    records = []
    for image_id in sorted(images):
        line_no, (class_text,) = labels[image_id]
        class_id = reader.number("image_class_labels.txt", line_no, class_text, "class id")
        if not 1 <= class_id <= len(class_names):
            raise at_line(reader.shown("image_class_labels.txt"), line_no,
                          f"class id {class_id} out of range 1..{len(class_names)} (classes.txt lists {len(class_names)})")
        line_no, (flag,) = splits[image_id]
        if flag not in ("0", "1"):
            raise at_line(reader.shown("train_test_split.txt"), line_no, f"is_training must be 0 or 1, got {flag!r}")
        line_no, box_text = boxes[image_id]
        box = tuple(reader.number("bounding_boxes.txt", line_no, v, "box value", float) for v in box_text)
        if box[2] <= 0 or box[3] <= 0:
            raise at_line(reader.shown("bounding_boxes.txt"), line_no, f"box width and height must be positive, got {box[2]} x {box[3]}")
        records.append(Record(image_id, images[image_id], class_id - 1, "train" if flag == "1" else "test",
                              box, part_locs.get(image_id, [])))
    return Annotations(records, class_names, part_ids, part_names)


# ----------------------------------------------------------------------------- image conversion

def output_rel_path(rel: str) -> str:
    """Where images.txt's ``rel`` goes below DIR: same relative path under images/, always .jpg."""
    return (PurePosixPath("images") / rel).with_suffix(".jpg").as_posix()


@dataclass
class Job:
    image_id: int
    src: str
    dst: str
    box: Box
    parts: list[Part]
    short_side: int
    crop_bbox: bool
    bbox_margin: float


@dataclass
class Converted:
    image_id: int
    error: str | None = None
    quirks: list[str] = field(default_factory=list)
    width: int = 0
    height: int = 0
    box: Box = (0.0, 0.0, 0.0, 0.0)
    parts: list[Part] = field(default_factory=list)


def orient_point(x: float, y: float, width: int, height: int, orientation: int) -> tuple[float, float]:
    """Map a stored-pixel point to the upright frame, as PIL's ImageOps.exif_transpose moves pixels."""
    return {2: (width - x, y), 3: (width - x, height - y), 4: (x, height - y), 5: (y, x),
            6: (height - y, x), 7: (height - y, width - x), 8: (y, width - x)}.get(orientation, (x, y))


def orient_box(box: Box, width: int, height: int, orientation: int) -> Box:
    (ax, ay), (bx, by) = (orient_point(px, py, width, height, orientation)
                          for px, py in ((box[0], box[1]), (box[0] + box[2], box[1] + box[3])))
    return min(ax, bx), min(ay, by), abs(bx - ax), abs(by - ay)


def clip_box(box: Box, width: int, height: int) -> Box:
    x0, y0 = max(box[0], 0.0), max(box[1], 0.0)
    x1, y1 = min(box[0] + box[2], float(width)), min(box[1] + box[3], float(height))
    return x0, y0, x1 - x0, y1 - y0


def header_quirks(src: str) -> tuple[list[str], tuple[int, int], int]:
    """(quirks, stored size, EXIF orientation) read from the file header without decoding."""
    with Image.open(src) as raw:
        mode, fmt, size = raw.mode, raw.format, raw.size
        orientation = raw.getexif().get(0x0112, 1)
    quirks = []
    if mode in ("1", "L", "LA", "I", "I;16", "F"):
        quirks.append("grayscale")
    elif mode == "CMYK":
        quirks.append("cmyk")
    elif mode != "RGB":
        quirks.append("other_mode")
    if fmt != "JPEG":
        quirks.append("png_as_jpg" if fmt == "PNG" and src.lower().endswith((".jpg", ".jpeg")) else "other_format")
    if orientation in range(2, 9):
        quirks.append("exif_rotated")
    return quirks, size, orientation if orientation in range(2, 9) else 1


def convert_image(job: Job) -> Converted:
    """Decode, turn upright, crop/resize, save as RGB JPEG; boxes and parts follow the pixels."""
    try:
        image = open_rgb(job.src)
        quirks, (stored_w, stored_h), orientation = header_quirks(job.src)
    except FileNotFoundError:
        return Converted(job.image_id, error="file missing")
    except ImageDecodeError as exc:
        return Converted(job.image_id, error=f"cannot decode ({exc.__cause__ or exc})")

    box = orient_box(job.box, stored_w, stored_h, orientation)
    parts = [(*orient_point(x, y, stored_w, stored_h, orientation), 1) if v else (0.0, 0.0, 0) for x, y, v in job.parts]
    clipped = clip_box(box, image.width, image.height)
    if clipped[2] <= 0 or clipped[3] <= 0:
        return Converted(job.image_id, error=f"bounding box {job.box} lies outside the {stored_w}x{stored_h} image")
    if clipped != box:
        quirks.append("boxes_clipped")
    box = clipped

    if job.crop_bbox:
        image, box, parts = crop_to_box(image, box, parts, job.bbox_margin)
    if job.short_side:
        image, box, parts = resize_short_side(image, box, parts, job.short_side)

    Path(job.dst).parent.mkdir(parents=True, exist_ok=True)
    image.save(job.dst, "JPEG", quality=JPEG_QUALITY)
    return Converted(job.image_id, None, quirks, image.width, image.height, box, parts)


def crop_to_box(image: Image.Image, box: Box, parts: list[Part], margin: float) -> tuple[Image.Image, Box, list[Part]]:
    """Crop to the box widened by ``margin`` (clipped); parts that fall outside become invisible."""
    x0 = max(0, math.floor(box[0] - margin * box[2]))
    y0 = max(0, math.floor(box[1] - margin * box[3]))
    x1 = min(image.width, math.ceil(box[0] + box[2] + margin * box[2]))
    y1 = min(image.height, math.ceil(box[1] + box[3] + margin * box[3]))
    crop_w, crop_h = x1 - x0, y1 - y0
    moved = []
    for x, y, visible in parts:
        inside = visible and 0 <= x - x0 <= crop_w and 0 <= y - y0 <= crop_h
        moved.append((x - x0, y - y0, 1) if inside else (0.0, 0.0, 0))
    return image.crop((x0, y0, x1, y1)), (box[0] - x0, box[1] - y0, box[2], box[3]), moved


def resize_short_side(image: Image.Image, box: Box, parts: list[Part], short_side: int) -> tuple[Image.Image, Box, list[Part]]:
    scale = short_side / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if size == image.size:
        return image, box, parts
    # Per-axis factors, so rounding of the new size never shifts boxes off their pixels.
    sx, sy = size[0] / image.width, size[1] / image.height
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    parts = [(x * sx, y * sy, 1) if v else (0.0, 0.0, 0) for x, y, v in parts]
    return image.resize(size, Image.Resampling.LANCZOS), box, parts


def convert_all(annotations: Annotations, cub_root: Path, shown_root: str, out: Path,
                args: argparse.Namespace) -> tuple[list[tuple[Record, Converted]], dict[str, str]]:
    """Convert every image in parallel; (converted records, {skipped path: reason})."""
    jobs = [Job(r.image_id, str(cub_root / "images" / r.rel_path), str(out / output_rel_path(r.rel_path)),
                r.box, r.parts, args.short_side, args.crop_bbox, args.bbox_margin) for r in annotations.records]
    results = parallel_map(convert_image, jobs, args.workers, desc="converting images")
    kept, skipped = [], {}
    for record, result in zip(annotations.records, results):
        if result.error is None:
            kept.append((record, result))
            continue
        if not args.skip_bad:
            n_bad = sum(r.error is not None for r in results)
            raise PrepError(f"{shown_root}/images/{record.rel_path}: {result.error} "
                            f"({n_bad} bad image(s) in all; --skip-bad drops them)")
        skipped[record.rel_path] = result.error
    if not kept:
        raise PrepError(f"{shown_root}: no usable image left after skipping {len(skipped)} bad one(s)")
    return kept, skipped


# ----------------------------------------------------------------------------- outputs

def manifest_frame(rows: list[tuple[Record, Converted]], annotations: Annotations) -> pd.DataFrame:
    table = []
    for record, done in rows:
        row: dict[str, Any] = {
            "image_id": record.image_id, "path": output_rel_path(record.rel_path), "label": record.label,
            "class_name": annotations.class_names[record.label], "split": record.split,
            **{f"bbox_{k}": round(v, 3) for k, v in zip("xywh", done.box)}}
        for part_id, (x, y, visible) in zip(annotations.part_ids, done.parts):
            row.update({f"part_{part_id}_x": round(x, 3), f"part_{part_id}_y": round(y, 3), f"part_{part_id}_visible": visible})
        row.update(width=done.width, height=done.height)
        table.append(row)
    return pd.DataFrame(table)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write atomically, so a crashed run never leaves a manifest that looks complete."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def count_quirks(rows: list[tuple[Record, Converted]]) -> dict[str, int]:
    counts = dict.fromkeys(QUIRK_KEYS, 0)
    for _, done in rows:
        for quirk in done.quirks:
            counts[quirk] += 1
    return counts


def prep_info(source: Source, args: argparse.Namespace, annotations: Annotations,
              rows: list[tuple[Record, Converted]], skipped: dict[str, str]) -> dict[str, Any]:
    splits = [record.split for record, _ in rows]
    info: dict[str, Any] = {
        "task": "cub", "source": {"path": str(source.path), "kind": source.kind},
        "source_fingerprint": source.fingerprint, "options": options_of(args),
        "counts": {"train": splits.count("train"), "test": splits.count("test"), "images": len(rows),
                   "classes": len(annotations.class_names), "parts": len(annotations.part_ids)},
        "class_names": annotations.class_names, "quirks": count_quirks(rows),
        "skipped": sorted(skipped), "skipped_reasons": skipped,
        "notes": ["boxes and parts are in the prepared image's pixels (x, y top-left; after EXIF transpose, crop, resize)",
                  "invisible parts have x = y = 0 and visible = 0, as in part_locs.txt"],
    }
    if annotations.part_names:
        info["part_names"] = annotations.part_names
    if source.md5 is not None:
        info["md5"] = source.md5
    return info


def read_info(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "prep_info.json").read_text())
    except (OSError, ValueError):
        return None


def is_done(out: Path, options: dict[str, Any], source: Source) -> bool:
    info = read_info(out)
    return (info is not None and (out / "manifest.csv").is_file() and info.get("options") == options
            and info.get("source_fingerprint") == source.fingerprint)


def claim_out_dir(out: Path, options: dict[str, Any], overwrite: bool) -> None:
    """Make ``out`` ready for a fresh run, refusing to mix with another preparation."""
    if out.exists() and not out.is_dir():
        raise PrepError(f"{out} exists and is not a folder; choose another --out")
    ours_unfinished = (out / STATE_FILE).is_file() and not (out / "prep_info.json").is_file()
    if out.is_dir() and any(out.iterdir()) and not (ours_unfinished or overwrite):
        info = read_info(out)
        if info is None:
            held = "files that are not a finished CUB preparation"
        else:
            changed = sorted(k for k in options.keys() | info.get("options", {}).keys()
                             if options.get(k) != info.get("options", {}).get(k))
            held = f"a preparation made with other {'options (' + ', '.join(changed) + ')' if changed else 'source data'}"
        raise PrepError(f"{out} is not empty: it holds {held}; choose another --out or pass --overwrite")
    # Only what this script writes is removed; prep_info goes first so nothing looks finished meanwhile.
    for name in ("prep_info.json", "manifest.csv"):
        (out / name).unlink(missing_ok=True)
    for name in ("images", EXTRACT_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / STATE_FILE).write_text(json.dumps(options))


def summary_rows(info: dict[str, Any], out: Path) -> list[tuple[str, Any]]:
    md5 = info.get("md5")
    rows: list[tuple[str, Any]] = [
        ("source", info["source"]["path"]),
        ("md5", "n/a (folder)" if md5 is None else ("ok" if md5["ok"] else f"MISMATCH {md5['value']}")),
        ("train images", info["counts"]["train"]), ("test images", info["counts"]["test"]),
        ("classes", info["counts"]["classes"]), ("parts", info["counts"]["parts"])]
    rows += [(f"fixed: {name}", n) for name, n in info["quirks"].items() if n]
    rows += [("bad files skipped", len(info["skipped"])), ("output", out)]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    options = options_of(args)
    source = inspect_source(Path(args.src))
    if is_done(out, options, source):
        print(f"{out} already holds this preparation (same source and options); nothing to do")
        return 0
    claim_out_dir(out, options, args.overwrite)
    try:
        cub_root, shown_root = unpack(source, out)
        annotations = read_annotations(Reader(cub_root, shown_root))
        rows, skipped = convert_all(annotations, cub_root, shown_root, out, args)
    finally:
        shutil.rmtree(out / EXTRACT_DIR, ignore_errors=True)
    for path, reason in skipped.items():
        print(f"warning: skipped {path}: {reason}", file=sys.stderr)
    info = prep_info(source, args, annotations, rows, skipped)
    write_csv(manifest_frame(rows, annotations), out / "manifest.csv")
    write_json(out / "prep_info.json", info)  # last: its presence marks the run finished
    (out / STATE_FILE).unlink(missing_ok=True)
    print_summary("CUB-200-2011 prepared", summary_rows(info, out))
    return 0


if __name__ == "__main__":
    run_cli(main)
