"""Prepare CelebA (aligned & cropped) for the suite: verify the official files, pack the images.

    python data_prep/celeba.py --src PATH --out DIR [--size WxH] [--workers N]

PATH is the folder holding the official files, in torchvision's flat layout (also PATH/celeba/)
or the Google Drive layout (Anno/ Eval/ Img/img_align_celeba.zip or an extracted
Img/img_align_celeba/). Only list_attr_celeba.txt, list_eval_partition.txt and the images are
required; landmarks, boxes and identities are used when present.

DIR receives, in this order (a crashed run never looks complete):
  images_uint8.npy  all images as one (N, H, W, 3) uint8 array; row i = manifest row i
  manifest.csv      image, path, split, the 0/1 attribute columns, landmarks, identity
  prep_info.json    source, layout, counts, MD5s, options and the fingerprint that makes a
                    re-run with the same source and options a no-op
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import hashlib
import io
import json
import os
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from abn_core.images import ImageDecodeError, open_rgb
from data_prep.common import PrepError, at_line, default_workers, md5_file, print_summary, run_cli, write_json

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARKS_FILE = "list_landmarks_align_celeba.txt"
BBOX_FILE = "list_bbox_celeba.txt"
IDENTITY_FILE = "identity_CelebA.txt"
OPTIONAL_FILES = (LANDMARKS_FILE, BBOX_FILE, IDENTITY_FILE)
OFFICIAL_MD5 = {
    ATTR_FILE: "75e246fa4810816ffd6ee81facbd244c",
    PARTITION_FILE: "d32c9cbf5e040fd4025c592c306e6668",
    LANDMARKS_FILE: "cc24ecafdb5b50baae59b03474781f8c",
    BBOX_FILE: "00566efa6fedff7a56946cd1c10f1c16",
    IDENTITY_FILE: "32bd1bd63d3c78cd57e08160ec5ed1e2",
}
LANDMARK_NAMES = [
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
]
SPLITS = {0: "train", 1: "valid", 2: "test"}
IMAGE_FOLDER = "img_align_celeba"
PACKED_FILE = "images_uint8.npy"
MANIFEST_FILE = "manifest.csv"
INFO_FILE = "prep_info.json"
# Bump when the output format changes, so an old DIR is re-prepared instead of skipped.
PREP_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Finding the files


@dataclass(frozen=True)
class Source:
    root: Path
    layout: str  # "flat" or "drive"
    files: dict[str, Path]  # official text files found, by official name
    images: Path  # an img_align_celeba/ folder or img_align_celeba.zip

    @property
    def images_zipped(self) -> bool:
        return self.images.suffix.lower() == ".zip"


def locate_source(src: str | Path) -> Source:
    """Find the official files under ``src`` in the flat (torchvision) or Google Drive layout."""
    src = Path(src).expanduser()
    if not src.exists():
        raise PrepError(f"{src}: no such file or directory")
    if not src.is_dir():
        raise PrepError(f"{src}: expected the folder holding the CelebA files (flat, or Anno/ Eval/ Img/), not a file")
    for root in (src, src / "celeba"):  # torchvision's root holds celeba/
        if (root / "Anno" / ATTR_FILE).is_file():
            return _make_source(root, "drive", [root / "Anno", root / "Eval", root], [root / "Img", root])
        if (root / ATTR_FILE).is_file():
            return _make_source(root, "flat", [root], [root])
    raise PrepError(f"{src}: no {ATTR_FILE} found in {src}, {src / 'Anno'} or {src / 'celeba'}; "
                    "point --src at the folder with the official CelebA files")


def _make_source(root: Path, layout: str, text_dirs: list[Path], image_parents: list[Path]) -> Source:
    files = {}
    for name in (ATTR_FILE, PARTITION_FILE, *OPTIONAL_FILES):
        found = [folder / name for folder in text_dirs if (folder / name).is_file()]
        if found:
            files[name] = found[0]
    if PARTITION_FILE not in files:
        raise PrepError(f"{root}: {PARTITION_FILE} not found (looked in {', '.join(map(str, text_dirs))})")
    return Source(root, layout, files, _find_images(root, image_parents))


def _find_images(root: Path, parents: list[Path]) -> Path:
    """The extracted image folder when it holds files (faster to read), else the zip."""
    for parent in parents:
        folder = parent / IMAGE_FOLDER
        # Unzipping into a folder of the same name gives img_align_celeba/img_align_celeba/.
        if (folder / IMAGE_FOLDER).is_dir() and not any(folder.glob("*.jpg")):
            folder = folder / IMAGE_FOLDER
        if folder.is_dir() and any(folder.iterdir()):
            return folder
        if (parent / f"{IMAGE_FOLDER}.zip").is_file():
            return parent / f"{IMAGE_FOLDER}.zip"
    looked = ", ".join(f"{p / IMAGE_FOLDER}/ or {p / IMAGE_FOLDER}.zip" for p in parents)
    raise PrepError(f"{root}: no images found (looked for {looked})")


def list_images(source: Source) -> dict[str, str]:
    """File name (000001.jpg) -> its name inside the image folder or zip member name.

    Images are read straight from the zip into memory; nothing is extracted, so no member name
    ever becomes a path on disk and no member can escape.
    """
    if not source.images_zipped:
        return {entry.name: entry.name for entry in os.scandir(source.images) if entry.is_file()}
    try:
        with zipfile.ZipFile(source.images) as archive:
            members = [info.filename for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrepError(f"{source.images}: cannot read the zip file ({exc})") from exc
    found: dict[str, str] = {}
    for member in members:
        name = PurePosixPath(member).name
        if member.startswith("__MACOSX/") or name.startswith("._"):
            continue  # macOS resource forks, not images
        if name in found:
            raise PrepError(f"{source.images}: {name} occurs twice ({found[name]} and {member})")
        found[name] = member
    return found


# ---------------------------------------------------------------------------------------------
# Reading the text files


@dataclass
class Table:
    path: Path
    columns: list[str]
    values: dict[str, list[int]]  # file name -> values, in file order
    lines: dict[str, int]  # file name -> 1-based line number


def _attr_value(text: str) -> int:
    if text not in ("-1", "1"):
        raise ValueError("must be -1 or 1")
    return (int(text) + 1) // 2  # -1/1 -> 0/1, as torchvision does


def _partition_value(text: str) -> int:
    if text not in ("0", "1", "2"):
        raise ValueError("must be 0 (train), 1 (valid) or 2 (test)")
    return int(text)


def _int_value(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("is not an integer") from None


def read_table(
    path: Path,
    convert: Callable[[str], int],
    count_line: bool,
    columns: list[str] | None = None,
) -> Table:
    """Parse one official file: optional count line, header (when ``columns`` is None), rows.

    Fields are split on any run of whitespace (the files pad values to a fixed width and end
    lines with CRLF), so 1 or 2 spaces, trailing spaces and \\r never matter.
    """
    try:
        lines = path.read_bytes().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise PrepError(f"{path}: not a text file ({exc})") from exc
    first_row = 0
    count = None
    if count_line:
        fields = lines[0].split() if lines else []
        if len(fields) != 1 or not fields[0].isdigit():
            raise at_line(path, 1, f"expected the number of images on line 1, found {' '.join(fields)!r}")
        count = int(fields[0])
        first_row = 1
    if columns is None:
        # The real header ends with a space; split() drops the empty name torchvision keeps.
        columns = lines[first_row].split() if len(lines) > first_row else []
        if not columns or len(set(columns)) != len(columns):
            raise at_line(path, first_row + 1, "expected a header of distinct column names")
        first_row += 1
    table = Table(path, columns, {}, {})
    for line_no, line in enumerate(lines[first_row:], start=first_row + 1):
        fields = line.split()
        if fields:
            _add_row(table, fields, line_no, convert)
    if count is not None and count != len(table.values):
        raise at_line(path, 1, f"the count line says {count} images but the file has {len(table.values)} rows")
    return table


def _add_row(table: Table, fields: list[str], line_no: int, convert: Callable[[str], int]) -> None:
    name, values = fields[0], fields[1:]
    if len(values) != len(table.columns):
        raise at_line(table.path, line_no, f"expected {len(table.columns) + 1} fields (file name and "
                      f"{len(table.columns)} values), found {len(fields)}")
    if name in table.lines:
        raise at_line(table.path, line_no, f"duplicate file name {name} (first on line {table.lines[name]})")
    converted = []
    for column, text in zip(table.columns, values):
        try:
            converted.append(convert(text))
        except ValueError as exc:
            raise at_line(table.path, line_no, f"{name}: {column} value {text!r} {exc}") from None
    table.values[name] = converted
    table.lines[name] = line_no


def read_tables(source: Source) -> dict[str, Table]:
    """Every official text file present, parsed and validated, by official file name."""
    files = source.files
    tables = {
        ATTR_FILE: read_table(files[ATTR_FILE], _attr_value, count_line=True),
        PARTITION_FILE: read_table(files[PARTITION_FILE], _partition_value, count_line=False, columns=["partition"]),
    }
    if LANDMARKS_FILE in files:
        landmarks = read_table(files[LANDMARKS_FILE], _int_value, count_line=True)
        if landmarks.columns != LANDMARK_NAMES:
            raise at_line(landmarks.path, 2, f"expected the header {' '.join(LANDMARK_NAMES)!r}")
        tables[LANDMARKS_FILE] = landmarks
    if IDENTITY_FILE in files:
        tables[IDENTITY_FILE] = read_table(files[IDENTITY_FILE], _int_value, count_line=False, columns=["identity"])
    # list_bbox_celeba.txt holds in-the-wild boxes, wrong for aligned images: never read.
    return tables


def join_tables(tables: dict[str, Table]) -> list[str]:
    """The image names, sorted; every table must list exactly the images of the attribute file."""
    attr = tables[ATTR_FILE]
    if not attr.lines:
        raise at_line(attr.path, 3, "the file lists no images")
    for table in tables.values():
        for name, line_no in attr.lines.items():
            if name not in table.lines:
                raise at_line(attr.path, line_no, f"{name} is not listed in {table.path}")
        for name, line_no in table.lines.items():
            if name not in attr.lines:
                raise at_line(table.path, line_no, f"{name} is not listed in {attr.path}")
    return sorted(attr.lines)


def check_md5(source: Source) -> dict[str, dict[str, object]]:
    """MD5 of each official text file against the release's; converted copies differ, so only report."""
    result: dict[str, dict[str, object]] = {}
    for name, path in source.files.items():
        value = md5_file(path)
        result[name] = {"value": value, "expected": OFFICIAL_MD5[name], "ok": value == OFFICIAL_MD5[name]}
    return result


# ---------------------------------------------------------------------------------------------
# Images


_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _open_zip(path: str) -> zipfile.ZipFile:
    # One handle per process: a handle inherited through fork shares its file offset with the parent.
    key = (os.getpid(), path)
    if key not in _ZIPS:
        _ZIPS[key] = zipfile.ZipFile(path)
    return _ZIPS[key]


ImageJob = tuple[str, str, bool, tuple[int, int] | None]  # location, member, zipped, (W, H) or None


def decode_image(job: ImageJob) -> tuple[np.ndarray | None, tuple[int, int], str | None]:
    """(pixels H x W x 3, original (W, H), None) or (None, (0, 0), problem) for one image."""
    location, member, zipped, size = job
    try:
        data = io.BytesIO(_open_zip(location).read(member)) if zipped else Path(location) / member
        img = open_rgb(data)
    except (ImageDecodeError, OSError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        return None, (0, 0), str(exc.__cause__ or exc)
    original = img.size
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img), original, None


def _ordered_results(fn: Callable, items: Sequence, workers: int, desc: str) -> Iterator:
    """``fn`` over ``items`` on ``workers`` processes, yielded in order as they arrive.

    Unlike common.parallel_map this streams, so the packed array is written without holding all
    images in memory. Closing the generator early (an error) cancels the queued work.
    """
    with tqdm(total=len(items), desc=desc, unit="img") as bar:
        if workers <= 1 or len(items) < 2:
            for item in items:
                yield fn(item)
                bar.update()
            return
        pool = ProcessPoolExecutor(max_workers=workers)
        try:
            chunksize = max(1, min(64, len(items) // (workers * 8)))
            for result in pool.map(fn, items, chunksize=chunksize):
                yield result
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def pack_images(jobs: list[ImageJob], names: list[str], dest: Path, size: tuple[int, int], workers: int,
                location: Path) -> list[tuple[int, int]]:
    """Decode every image into one (N, H, W, 3) uint8 .npy at ``dest``; return the original sizes.

    The array is filled through a memory map, so memory use does not grow with N, and is moved
    into place only when complete.
    """
    width, height = size
    partial = dest.with_name(dest.name + ".partial")
    array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(jobs), height, width, 3))
    originals = []
    try:
        with closing(_ordered_results(decode_image, jobs, workers, "decoding images")) as results:
            for i, (pixels, original, problem) in enumerate(results):
                if problem is not None:
                    raise PrepError(f"{location / names[i]}: cannot decode image: {problem}")
                if pixels.shape[:2] != (height, width):
                    raise PrepError(f"{location / names[i]} is {original[0]}x{original[1]} but {names[0]} is "
                                    f"{width}x{height}; all images must share one size: pass --size WxH "
                                    f"(e.g. --size {width}x{height}) to resize them")
                array[i] = pixels
                originals.append(original)
        array.flush()
    except BaseException:
        del array
        partial.unlink(missing_ok=True)
        raise
    del array
    os.replace(partial, dest)
    return originals


# ---------------------------------------------------------------------------------------------
# Outputs


def build_manifest(names: list[str], tables: dict[str, Table], originals: list[tuple[int, int]],
                   size: tuple[int, int]) -> pd.DataFrame:
    """One row per image (sorted by name): image, path, split, attributes, landmarks, identity."""
    attr = tables[ATTR_FILE]
    partition = tables[PARTITION_FILE].values
    parts = [pd.DataFrame({
        "image": names,
        "path": [f"{IMAGE_FOLDER}/{name}" for name in names],
        "split": [SPLITS[partition[name][0]] for name in names],
    })]
    parts.append(pd.DataFrame([attr.values[name] for name in names], columns=attr.columns, dtype=np.int64))
    if LANDMARKS_FILE in tables:
        parts.append(_landmarks_frame(names, tables[LANDMARKS_FILE], originals, size))
    if IDENTITY_FILE in tables:
        identity = tables[IDENTITY_FILE].values
        parts.append(pd.DataFrame({"identity": [identity[name][0] for name in names]}))
    return pd.concat(parts, axis=1)


def _landmarks_frame(names: list[str], landmarks: Table, originals: list[tuple[int, int]],
                     size: tuple[int, int]) -> pd.DataFrame:
    """Landmarks in the prepared image's pixels: x scaled by new/old width, y by new/old height."""
    points = np.array([landmarks.values[name] for name in names], dtype=np.int64)
    old = np.array(originals, dtype=np.float64)  # (N, 2) = W, H
    if (old == size).all():
        return pd.DataFrame(points, columns=landmarks.columns)
    scale = np.tile(np.asarray(size, dtype=np.float64) / old, (1, points.shape[1] // 2))
    return pd.DataFrame(np.round(points * scale, 2), columns=landmarks.columns)


def write_manifest(manifest: pd.DataFrame, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    manifest.to_csv(partial, index=False)
    os.replace(partial, path)


def source_fingerprint(source: Source, md5: dict[str, dict[str, object]], options: dict) -> str:
    """A digest of what a prep run depends on: file contents or stats, layout and options."""
    if source.images_zipped:
        stat = source.images.stat()
        images = [source.images.name, stat.st_size, stat.st_mtime_ns]
    else:
        entries = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(source.images))
        images = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    payload = {"version": PREP_VERSION, "root": str(source.root.resolve()), "layout": source.layout,
               "images_at": str(source.images.resolve()), "images": images,
               "files": {name: entry["value"] for name, entry in md5.items()}, "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def already_prepared(out: Path, fingerprint: str) -> bool:
    """True when ``out`` is a complete preparation of the same source with the same options.

    Refuses a DIR that holds another task's preparation rather than overwriting it.
    """
    try:
        info = json.loads((out / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    if info.get("task") not in (None, "celeba"):
        raise PrepError(f"{out / INFO_FILE}: {out} holds a {info['task']!r} preparation; choose another --out")
    complete = (out / MANIFEST_FILE).is_file() and (out / PACKED_FILE).is_file()
    return complete and info.get("fingerprint") == fingerprint


def _positive_rate_range(manifest: pd.DataFrame, attributes: list[str]) -> str:
    rates = manifest[attributes].mean()
    return (f"{rates.min():.3f} ({rates.idxmin()}) .. {rates.max():.3f} ({rates.idxmax()})")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' or one int N (square N x N) -> (W, H)."""
    parts = text.lower().split("x")
    try:
        width, height = (int(parts[0]),) * 2 if len(parts) == 1 else map(int, parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected WxH (e.g. 178x218) or one int for a square size") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return width, height


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="folder with the official CelebA files (flat, or Anno/ Eval/ Img/)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--size", type=parse_size, default=None,
                        help="resize every image to WxH (or N for N x N); default: keep the original 178x218")
    parser.add_argument("--workers", type=int, default=default_workers(), help="decoding processes (default: all cores)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a data error")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    source = locate_source(args.src)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = {"size": list(args.size) if args.size else None}
    md5 = check_md5(source)
    fingerprint = source_fingerprint(source, md5, options)
    if already_prepared(out, fingerprint):
        print(f"{out} already holds {source.root} prepared with the same options; nothing to do.")
        return 0
    (out / INFO_FILE).unlink(missing_ok=True)  # from here on DIR must not look complete
    print(f"CelebA ({source.layout} layout) at {source.root}; images from {source.images}")
    warnings = [f"{source.files[name]}: MD5 {entry['value']} differs from the official {entry['expected']} "
                "(converted copies differ; the content checks still apply)"
                for name, entry in md5.items() if not entry["ok"]]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)

    tables = read_tables(source)
    names = join_tables(tables)
    jobs = _image_jobs(source, names, tables[ATTR_FILE], args.size)
    size = args.size or decode_image(jobs[0])[1]  # without --size, the first image sets the size
    originals = pack_images(jobs, names, out / PACKED_FILE, size, args.workers, source.images)
    manifest = build_manifest(names, tables, originals, size)
    write_manifest(manifest, out / MANIFEST_FILE)
    info = _prep_info(source, tables, manifest, md5, warnings, options, fingerprint, size, originals)
    write_json(out / INFO_FILE, info)
    _print_report(info, manifest, out)
    return 0


def _image_jobs(source: Source, names: list[str], attr: Table, size: tuple[int, int] | None) -> list[ImageJob]:
    available = list_images(source)
    for name in names:
        if name not in available:
            raise at_line(attr.path, attr.lines[name], f"image {name} not found in {source.images}")
    return [(str(source.images), available[name], source.images_zipped, size) for name in names]


def _prep_info(source: Source, tables: dict[str, Table], manifest: pd.DataFrame, md5: dict, warnings: list[str],
               options: dict, fingerprint: str, size: tuple[int, int], originals: list[tuple[int, int]]) -> dict:
    distinct = sorted(set(originals))
    return {
        "task": "celeba",
        "source": str(source.root.resolve()),
        "layout": source.layout,
        "images_from": {"path": str(source.images.resolve()), "kind": "zip" if source.images_zipped else "directory"},
        "files": {name: str(path.resolve()) for name, path in source.files.items()},
        "attributes": tables[ATTR_FILE].columns,
        "packed": {"file": PACKED_FILE, "height": size[1], "width": size[0], "count": len(manifest),
                   "dtype": "uint8", "layout": "NHWC"},
        "original_sizes": [list(s) for s in distinct],
        "counts": {split: int((manifest["split"] == split).sum()) for split in SPLITS.values()},
        "md5": md5,
        "warnings": warnings,
        "options": options,
        "optional_files": {name: name in source.files for name in OPTIONAL_FILES},
        "landmark_columns": LANDMARK_NAMES if LANDMARKS_FILE in tables else [],
        "notes": [f"{BBOX_FILE} holds in-the-wild boxes, not valid for aligned images; not used"],
        "fingerprint": fingerprint,
        "prep_version": PREP_VERSION,
    }


def _print_report(info: dict, manifest: pd.DataFrame, out: Path) -> None:
    rows = [("source", f"{info['source']} ({info['layout']} layout)")]
    rows += [(f"images {split}", count) for split, count in info["counts"].items()]
    rows += [("images total", info["packed"]["count"]),
             ("attributes", len(info["attributes"])),
             ("image size (W x H)", f"{info['packed']['width']}x{info['packed']['height']}"),
             ("positive rate range", _positive_rate_range(manifest, info["attributes"]))]
    rows += [(f"optional {name}", "present" if present else "absent") for name, present in info["optional_files"].items()]
    rows += [(f"MD5 {name}", "ok" if entry["ok"] else "MISMATCH (warning only)") for name, entry in info["md5"].items()]
    rows.append(("output", str(out)))
    print_summary("CelebA prepared", rows)


if __name__ == "__main__":
    # Run through the package module so worker processes unpickle data_prep.celeba functions, not __main__'s.
    from data_prep.celeba import main as package_main

    run_cli(package_main)
