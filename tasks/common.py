"""Reading prepared datasets (manifest.csv + prep_info.json) and image folders into TaskData.

Shared by the task plugins: single-label manifests (classification, CUB), multi-label manifests
(CelebA), torchvision-style image folders, and the demo data (written in the same formats).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from abn_core.data import FileImages, ImageDataset, PackedImages, stratified_holdout
from abn_core.errors import DataError
from abn_core.images import IMAGE_SUFFIXES
from abn_core.task import TaskData

VAL_NAMES = ("val", "valid", "validation")
BOX_COLUMNS = ["bbox_x", "bbox_y", "bbox_w", "bbox_h"]


def data_root(cfg: dict[str, Any], demo_kind: str) -> Path:
    """``data.root`` as a directory (building the demo data when it is ``demo``)."""
    root = cfg["data"]["root"]
    if root == "demo":
        from data_prep.demo import ensure_demo

        return ensure_demo(demo_kind)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root: {root} is not a directory (give a data_prep output, an image folder, or demo)")
    return path


def read_manifest(root: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    manifest = root / "manifest.csv"
    try:
        frame = pd.read_csv(manifest)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{manifest}: cannot be read as CSV ({str(exc).splitlines()[0]})") from exc
    if frame.empty:
        raise DataError(f"{manifest}: has no rows")
    info_path = root / "prep_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return frame, info


def _require(frame: pd.DataFrame, columns: list[str], manifest: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{manifest}: missing column(s) {', '.join(missing)}")


def _image_source(root: Path, frame: pd.DataFrame, info: dict[str, Any]) -> FileImages | PackedImages:
    """Packed array when data_prep wrote one, else image files (checked to exist, naming the first missing)."""
    paths = frame["path"].astype(str).tolist()
    if "packed" in info:
        return PackedImages(root / info["packed"]["file"], paths)
    for line, rel in enumerate(paths, start=2):
        if not (root / rel).is_file():
            raise DataError(f"{root / 'manifest.csv'}:{line}: image {root / rel} does not exist")
    return FileImages(root, paths)


def _split_rows(frame: pd.DataFrame, labels: np.ndarray, cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[str]]:
    """(train, val, test) row indices; validation held out of train when the data has none."""
    split = frame["split"].astype(str).str.lower()
    train = np.flatnonzero(split == "train")
    val = np.flatnonzero(split.isin(VAL_NAMES))
    test = np.flatnonzero(split == "test")
    if len(train) == 0:
        raise DataError("manifest.csv: no rows with split 'train'")
    notes = []
    if len(val) == 0:
        keep, hold = stratified_holdout(labels[train], cfg["data"]["val_fraction"], cfg["seed"])
        train, val = train[keep], train[hold]
        notes.append(f"validation = {cfg['data']['val_fraction']:.0%} of train, stratified (the data has no validation split)")
    if len(test) == 0:
        notes.append("the data has no test split: final results are on the validation split")
    if cfg["data"]["train_on_trainval"]:
        train = np.concatenate([train, val])
        notes.append("data.train_on_trainval: training on train + validation; the last epoch is kept (validation scores are not held out)")
    limit = cfg["data"]["max_per_split"]
    if limit > 0:
        train, val, test = (_spread(rows, limit) for rows in (train, val, test))
        notes.append(f"data.max_per_split={limit}: a subset of every split (smoke run)")
    return train, val, (test if len(test) else None), notes


def _spread(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` rows, evenly spaced so that class-sorted data keeps every class."""
    if len(rows) <= limit:
        return rows
    return rows[np.linspace(0, len(rows) - 1, num=limit).round().astype(int)]


def _boxes(frame: pd.DataFrame, groups: list[list[str]]) -> np.ndarray | None:
    """N x T x 4 boxes from column groups (x, y, w, h per map); None when no group is present."""
    if not any(all(c in frame.columns for c in group) for group in groups):
        return None
    boxes = np.full((len(frame), len(groups), 4), np.nan, dtype=np.float32)
    for t, group in enumerate(groups):
        if all(c in frame.columns for c in group):
            boxes[:, t] = frame[group].to_numpy(dtype=np.float32)
    return boxes


def _part_points(frame: pd.DataFrame) -> np.ndarray | None:
    """N x P x 2 part locations from ``part_<k>_x, part_<k>_y, part_<k>_visible`` columns (CUB);
    NaN where a part is not visible; None when the manifest has no parts."""
    part_ids = sorted({int(m.group(1)) for c in frame.columns if (m := re.fullmatch(r"part_(\d+)_visible", c))})
    if not part_ids:
        return None
    xy = np.stack([frame[[f"part_{k}_x", f"part_{k}_y"]].to_numpy(dtype=np.float32) for k in part_ids], axis=1)
    visible = np.stack([frame[f"part_{k}_visible"].to_numpy() > 0 for k in part_ids], axis=1)
    return np.where(visible[..., None], xy, np.nan).astype(np.float32)


def _datasets(source, rows, targets, cfg, boxes, points=None) -> tuple[ImageDataset, ImageDataset, ImageDataset | None]:
    train, val, test = rows
    return (
        ImageDataset(source, train, targets, True, cfg),
        ImageDataset(source, val, targets, False, cfg, boxes, points),
        ImageDataset(source, test, targets, False, cfg, boxes, points) if test is not None else None,
    )


def single_label_data(cfg: dict[str, Any]) -> TaskData:
    """A single-label prepared dataset (manifest with label, class_name, split) or an image folder."""
    root = data_root(cfg, "single")
    if not (root / "manifest.csv").is_file():
        return image_folder_data(root, cfg)
    frame, info = read_manifest(root)
    _require(frame, ["path", "label", "split"], root / "manifest.csv")
    labels = frame["label"].to_numpy()
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise DataError(f"{root / 'manifest.csv'}: column label must hold class ids 0, 1, ...")
    class_names = info.get("class_names") or _names_from_manifest(frame)
    if labels.max() >= len(class_names):
        raise DataError(f"{root / 'manifest.csv'}: label {labels.max()} but only {len(class_names)} class names")
    *rows, notes = _split_rows(frame, labels, cfg)
    source = _image_source(root, frame, info)
    train, val, test = _datasets(source, rows, labels.astype(np.int64), cfg, _boxes(frame, [BOX_COLUMNS]), _part_points(frame))
    return TaskData(train, val, test, list(class_names), multi_label=False, notes=notes)


def _names_from_manifest(frame: pd.DataFrame) -> list[str]:
    if "class_name" not in frame.columns:
        return [str(i) for i in range(int(frame["label"].max()) + 1)]
    pairs = frame[["label", "class_name"]].drop_duplicates().sort_values("label")
    names = dict(zip(pairs["label"], pairs["class_name"].astype(str)))
    return [names.get(i, str(i)) for i in range(int(frame["label"].max()) + 1)]


def image_folder_data(root: Path, cfg: dict[str, Any]) -> TaskData:
    """torchvision ImageFolder layouts: root/<class>/*, or root/{train,val,test}/<class>/*."""
    split_dirs = {"train": root / "train"} | {"val": root / n for n in VAL_NAMES if (root / n).is_dir()}
    if (root / "test").is_dir():
        split_dirs["test"] = root / "test"
    if not split_dirs["train"].is_dir():
        split_dirs = {"train": root}
    class_names = sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir())
    if not class_names:
        raise DataError(f"data.root: {root} has no manifest.csv and no class folders (expected root/<class>/<image> or root/train/<class>/<image>)")
    index = {name: i for i, name in enumerate(class_names)}
    records = []
    for split, folder in split_dirs.items():
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            if class_dir.name not in index:
                raise DataError(f"{class_dir}: class folder not present in {split_dirs['train']}")
            for file in sorted(class_dir.rglob("*")):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    records.append({"path": str(file.relative_to(root)), "label": index[class_dir.name], "split": split})
    if not records:
        raise DataError(f"data.root: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    frame = pd.DataFrame(records)
    labels = frame["label"].to_numpy(dtype=np.int64)
    *rows, notes = _split_rows(frame, labels, cfg)
    train, val, test = _datasets(FileImages(root, frame["path"].tolist()), rows, labels, cfg, None)
    return TaskData(train, val, test, class_names, multi_label=False, notes=notes)


def multi_label_data(cfg: dict[str, Any]) -> TaskData:
    """A multi-label prepared dataset: manifest with path, split and one 0/1 column per attribute."""
    root = data_root(cfg, "multi")
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DataError(f"data.root: {manifest} not found (prepare the data with data_prep first)")
    frame, info = read_manifest(root)
    _require(frame, ["path", "split"], manifest)
    attributes = info.get("attributes") or _attribute_columns(frame)
    _require(frame, attributes, manifest)
    targets = frame[attributes].to_numpy()
    if not np.isin(targets, (0, 1)).all():
        bad_row, bad_col = np.argwhere(~np.isin(targets, (0, 1)))[0]
        raise DataError(f"{manifest}:{bad_row + 2}: attribute {attributes[bad_col]} must be 0 or 1, got {targets[bad_row, bad_col]}")
    *rows, notes = _split_rows(frame, targets, cfg)
    box_groups = [[f"bbox_{a}_{c}" for c in "xywh"] for a in attributes]
    train, val, test = _datasets(_image_source(root, frame, info), rows, targets.astype(np.float32), cfg, _boxes(frame, box_groups))
    return TaskData(train, val, test, list(attributes), multi_label=True, notes=notes,
                    select_last_epoch=cfg["data"]["train_on_trainval"])


def _attribute_columns(frame: pd.DataFrame) -> list[str]:
    """Without prep_info.json: every column that is not an id, path, split, landmark or box."""
    skip = {"image", "path", "split", "image_id", "identity", "width", "height"}
    return [c for c in frame.columns if c not in skip and not c.startswith("bbox_") and not c.endswith(("_x", "_y"))]
