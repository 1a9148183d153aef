"""``explain``: predictions and attention overlays for any images, and attention editing.

Attention editing (Mitsuhara et al.): a user-drawn mask replaces the produced map M(x) in the
perception branch, so one can see how the decision changes when attention moves.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import cv2
import numpy as np
import pandas as pd
import torch

from . import config as config_lib
from .checkpoints import load_weights
from .data import eval_geometry, model_input
from .errors import DataError, UserError
from .images import IMAGE_SUFFIXES, ImageDecodeError, load_rgb_array
from .overlays import save_grid

ImageInput = str | Path | np.ndarray


@dataclass
class Explanation:
    """One image's result for one attention source (``abn``: the model's own map, ``edited``: a mask)."""

    image: np.ndarray  # the network input as H x W x 3 uint8 (after the eval resize/crop)
    attention_source: str  # abn | edited
    probabilities: torch.Tensor  # C class probabilities (softmax) or T attribute probabilities (sigmoid)
    maps: torch.Tensor  # T x h x w, the maps the perception branch used

    def ranked(self, top_k: int | None = None) -> list[tuple[int, float]]:
        """(class or attribute index, probability), most probable first."""
        order = torch.argsort(self.probabilities, descending=True)[:top_k]
        return [(int(i), float(self.probabilities[i])) for i in order]


def _as_array(image: ImageInput) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    try:
        return load_rgb_array(image)
    except ImageDecodeError as exc:
        raise DataError(str(exc)) from exc


def preprocess(images: Sequence[ImageInput], cfg: dict[str, Any], masks: Sequence[ImageInput] | None = None):
    """Network inputs (N x S x S x 3 uint8, for :func:`model_input`), their pictures as arrays, and
    masks mapped through the same resize/crop (N x 1 x S x S in [0, 1]) when given (one per image)."""
    geometry = eval_geometry(cfg)
    no_boxes = np.zeros((0, 4), dtype=np.float32)
    pictures, mask_maps = [], []
    for k, image in enumerate(images):
        array = _as_array(image)
        pictures.append(geometry(array, no_boxes)[0])
        if masks is not None:
            # The mask is drawn on the original image: stretch it to that size, then crop likewise.
            gray = _as_array(masks[k]).astype(np.float32).mean(axis=2) / 255.0
            gray = cv2.resize(gray, (array.shape[1], array.shape[0]), interpolation=cv2.INTER_LINEAR)
            mask_maps.append(torch.from_numpy(geometry(gray, no_boxes)[0]))
    mask_tensor = torch.stack(mask_maps)[:, None] if masks is not None else None
    return torch.from_numpy(np.stack(pictures)), pictures, mask_tensor


def default_config() -> dict[str, Any]:
    return config_lib.read_yaml(config_lib.CONFIG_DIR / "defaults.yaml")


@torch.no_grad()
def explain(
    model: torch.nn.Module,
    images: Sequence[ImageInput],
    cfg: dict[str, Any] | None = None,
    attention_mask: ImageInput | None = None,
) -> list[Explanation]:
    """Predict ``images`` (paths or H x W x 3 uint8 arrays, any size) with an ABN ``model``.

    ``cfg`` supplies the eval preprocessing (``data.*``; defaults.yaml when None). With
    ``attention_mask`` (a path or array, white = attend) every image is also predicted with that mask
    replacing the produced maps. Returns, per image, the ``abn`` explanation then the ``edited`` one.
    """
    cfg = cfg or default_config()
    device = next(model.parameters()).device
    masks = [attention_mask] * len(images) if attention_mask is not None else None
    batch, pictures, mask_maps = preprocess(images, cfg, masks)
    model.eval()
    runs = [("abn", None)]
    if mask_maps is not None:
        runs.append(("edited", mask_maps.expand(-1, model.num_maps, -1, -1).to(device)))
    results: list[list[Explanation]] = [[] for _ in images]
    for source, attention in runs:
        out = model(model_input(batch, cfg["data"], device), attention=attention)
        logits = out.logits.float().cpu()
        probs = torch.sigmoid(logits) if model.multi_label else torch.softmax(logits, dim=1)
        for k in range(len(images)):
            results[k].append(Explanation(pictures[k], source, probs[k], out.attention[k].float().cpu()))
    return [e for per_image in results for e in per_image]


def prediction_rows(name: str, explanation: Explanation, labels: list[str], top_k: int, multi_label: bool) -> list[dict[str, Any]]:
    """predictions.csv rows: top-k classes, or every attribute (most probable first)."""
    ranked = explanation.ranked(None if multi_label else top_k)
    return [
        {"image": name, "attention": explanation.attention_source, "rank": r + 1, "label": labels[i], "probability": round(p, 6)}
        for r, (i, p) in enumerate(ranked)
    ]


def overlay_items(explanation: Explanation, labels: list[str], multi_label: bool) -> list[tuple[np.ndarray, torch.Tensor, str]]:
    """(image, map, caption) tiles: single-label the top class; multi-label every attribute predicted
    present (p >= 0.5), each with its own map, or the most probable one when none is."""
    source = explanation.attention_source
    if not multi_label:
        index, prob = explanation.ranked(1)[0]
        return [(explanation.image, explanation.maps[0], f"{source}: {labels[index]} {prob:.2f}")]
    present = [(i, p) for i, p in explanation.ranked() if p >= 0.5] or explanation.ranked(1)
    return [(explanation.image, explanation.maps[i], f"{source}: {labels[i]} {p:.2f}") for i, p in present]


def collect_images(items: Sequence[str]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in the named folders."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise DataError(f"explain: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            found.extend(inside)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"explain: {item} is neither an image file, a folder nor a KEY=VALUE override")
    if not found:
        raise UserError("explain needs image files or folders, e.g. explain --checkpoint RUN photo.jpg")
    return found


def run_labels(run_dir: Path) -> tuple[list[str], bool] | None:
    """(class or attribute names, multi_label) from the run's result tables, so explaining needs no dataset."""
    results = run_dir / "results"
    for pattern, column, multi in (("*_per_attribute.csv", "attribute", True), ("*_per_class.csv", "class_name", False)):
        tables = sorted(results.glob(pattern))
        if tables:
            return pd.read_csv(tables[0])[column].astype(str).tolist(), multi
    return None


def explain_command(task: Any, checkpoint: str, config_file: str | None, items: Sequence[str], top_k: int,
                    attention_mask: str | None) -> Path | None:
    """``explain``: overlays under <out>/explain/ and <out>/predictions.csv (out: output_dir or the run).
    Under a multi-process launcher only the main process works (returns None elsewhere)."""
    from .engine import model_from_cfg, run_from_checkpoint  # engine imports evaluation, which is heavy

    if int(os.environ.get("RANK", "0")) > 0:
        return None  # the others would write the same files over each other
    overrides = [i for i in items if "=" in i and not Path(i).exists()]
    cfg, run_dir, weights, out_dir = run_from_checkpoint(task, checkpoint, config_file, overrides)
    paths = collect_images([i for i in items if i not in overrides])
    if attention_mask is not None and not Path(attention_mask).is_file():
        raise DataError(f"--attention-mask: no such file {attention_mask}")
    labels = run_labels(run_dir)
    if labels is None:
        data = task.build_data(cfg)
        labels = (data.class_names, data.multi_label)
    names, multi_label = labels
    model = model_from_cfg(cfg, SimpleNamespace(class_names=names, multi_label=multi_label), pretrained=False)
    load_weights(model, weights)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    return write_explanations(model, paths, cfg, names, out_dir, top_k, attention_mask)


def write_explanations(
    model: torch.nn.Module, paths: Sequence[Path], cfg: dict[str, Any], names: list[str], out_dir: Path, top_k: int,
    attention_mask: str | None = None, chunk: int = 16,
) -> Path:
    """predictions.csv and one overlay PNG per image (abn and, with a mask, edited side by side)."""
    overlay_dir = out_dir / "explain"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    per_image = 2 if attention_mask is not None else 1
    rows: list[dict[str, Any]] = []
    used: set[str] = set()
    for start in range(0, len(paths), chunk):
        part = paths[start : start + chunk]
        explanations = explain(model, part, cfg, attention_mask)
        for k, path in enumerate(part):
            mine = explanations[k * per_image : (k + 1) * per_image]
            tiles = [tile for e in mine for tile in overlay_items(e, names, model.multi_label)]
            for e in mine:
                rows.extend(prediction_rows(str(path), e, names, top_k, model.multi_label))
            stem = path.stem if path.stem not in used else f"{path.stem}_{start + k}"
            used.add(stem)
            save_grid(overlay_dir / f"{stem}.png", tiles, columns=len(tiles) if len(tiles) <= 2 else 4)
    csv_path = out_dir / "predictions.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "attention", "rank", "label", "probability"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"explained {len(paths)} image(s): {csv_path}, overlays in {overlay_dir}")
    return csv_path
