"""Evaluation: predictions gathered across processes, result tables, attention overlays and maps."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .cam import compare_scores, compare_summary
from .data import ImageDataset, model_input
from .metrics import localisation_scores, localisation_summary, multi_label_tables, part_pointing_scores, single_label_tables
from .overlays import save_grid


@dataclass
class Predictions:
    """Everything evaluation keeps per sample, in dataset order, gathered from all processes."""

    logits: torch.Tensor
    att_logits: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    localisation: dict[str, torch.Tensor] | None
    maps: torch.Tensor | None  # N x T x h x w float16, when asked for
    cam: dict[str, torch.Tensor] | None = None  # eval.compare_cam per-image scores (cam.compare_scores)


@torch.no_grad()
def predict(
    accelerator: Accelerator, model: torch.nn.Module, loader: Any, cfg: dict[str, Any], desc: str, keep_maps: bool = False,
    compare_cam: bool = False,
) -> Predictions:
    """Run ``model`` over ``loader`` on every process; gather_for_metrics drops the padding samples
    that make the last batch even across processes, so every sample counts exactly once.
    ``compare_cam`` adds Grad-CAM/CAM scores (costly: final evaluation only)."""
    model.eval()
    has_boxes = loader.dataset.boxes is not None
    size = cfg["data"]["image_size"]
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False):
        images = model_input(batch["image"], cfg["data"], accelerator.device, cfg["model"]["channels_last"])
        with accelerator.autocast():
            out = model(images)
        record = {
            "logits": out.logits.float(),
            "att_logits": out.att_logits.float(),
            "targets": batch["target"],
            "indices": batch["index"],
        }
        if has_boxes:
            scores = localisation_scores(out.attention, batch["box"], size, cfg["eval"]["pointing_tolerance"])
            record |= {f"loc_{k}": v for k, v in scores.items()}
            if "points" in batch:
                record["loc_parts"] = part_pointing_scores(out.attention, batch["points"], size, cfg["eval"]["pointing_tolerance"])
        if compare_cam:
            boxes = batch["box"] if has_boxes else None
            cams = compare_scores(accelerator.unwrap_model(model), images, out.attention, out.logits.argmax(dim=1), boxes, cfg,
                                  batch.get("points"))
            record |= {f"cam_{k}": v for k, v in cams.items()}
        if keep_maps:
            record["maps"] = out.attention.to(torch.float16)
        for key, value in accelerator.gather_for_metrics(record).items():
            parts.setdefault(key, []).append(value.cpu())
    joined = {k: torch.cat(v) for k, v in parts.items()}
    order = torch.argsort(joined["indices"])
    joined = {k: v[order] for k, v in joined.items()}
    loc = {k.removeprefix("loc_"): v for k, v in joined.items() if k.startswith("loc_")} or None
    cam = {k.removeprefix("cam_"): v for k, v in joined.items() if k.startswith("cam_")} or None
    return Predictions(joined["logits"], joined["att_logits"], joined["targets"], joined["indices"], loc, joined.get("maps"), cam)


def result_tables(pred: Predictions, class_names: list[str], multi_label: bool) -> dict[str, pd.DataFrame]:
    """summary + per_class (or per_attribute) tables, with localisation scores when boxes exist."""
    if multi_label:
        tables = multi_label_tables(pred.logits, pred.att_logits, pred.targets, class_names)
    else:
        tables = single_label_tables(pred.logits, pred.att_logits, pred.targets.long(), class_names)
    t = len(class_names)
    groups = torch.arange(t).expand(len(pred.targets), t) if multi_label else pred.targets.long()[:, None]
    extra = localisation_summary(pred.localisation, groups) if pred.localisation is not None else {}
    if pred.cam is not None:
        extra |= compare_summary(pred.cam, groups)
    if extra:
        tables["summary"] = pd.concat([tables["summary"], pd.DataFrame({"metric": list(extra), "value": list(extra.values())})], ignore_index=True)
    return tables


def summary_dict(tables: dict[str, pd.DataFrame]) -> dict[str, float]:
    return dict(zip(tables["summary"]["metric"], tables["summary"]["value"]))


def write_tables(tables: dict[str, pd.DataFrame], results_dir: Path, split: str) -> str:
    """Write results/<split>_<table>.csv and .md; return the Markdown to print.

    Per-class tables are printed worst class first, where the problems are.
    """
    results_dir.mkdir(parents=True, exist_ok=True)
    printed = []
    for name, frame in tables.items():
        frame.to_csv(results_dir / f"{split}_{name}.csv", index=False)
        shown = frame
        if name == "per_class":
            shown = frame.sort_values(["accuracy", "support"], ascending=[True, False])
        if name == "per_attribute":
            mean_row = frame.drop(columns="attribute").mean(numeric_only=True).to_frame().T.assign(attribute="mean")
            shown = pd.concat([frame, mean_row[frame.columns]], ignore_index=True)
        markdown = f"### {split} {name.replace('_', ' ')}\n\n" + shown.to_markdown(index=False, floatfmt=".4f") + "\n"
        (results_dir / f"{split}_{name}.md").write_text(markdown)
        printed.append(markdown)
    return "\n".join(printed)


def save_maps(pred: Predictions, dataset: ImageDataset, path: Path) -> None:
    """attention/<split>_maps.npz: paths, maps (N x T x h x w float16), crop_boxes (N x 4)."""
    crops = np.stack([_crop_box(dataset, int(i)) for i in pred.indices])
    paths = np.array([dataset.name(int(i)) for i in pred.indices])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, paths=paths, maps=pred.maps.numpy(), crop_boxes=crops)


def _crop_box(dataset: ImageDataset, index: int) -> np.ndarray:
    image = dataset.source.load(int(dataset.rows[index]))
    return dataset.geometry(image, np.zeros((0, 4), dtype=np.float32))[2]


@torch.no_grad()
def write_overlays(
    model: torch.nn.Module, dataset: ImageDataset, pred: Predictions, names: list[str], multi_label: bool,
    cfg: dict[str, Any], out_dir: Path, split: str, device: torch.device,
) -> list[Path]:
    """PNG grids of (image | attention overlay) with true and predicted labels (main process only).

    Single-label: ``<split>_overlays.png`` with one sample per class, and ``<split>_confused.png`` with
    the most confidently misclassified samples. Multi-label: ``<split>_<attribute>.png`` per
    attribute, its positive images each with that attribute's own map.
    """
    limit = cfg["eval"]["max_attention_images"]
    if limit <= 0 or len(dataset) == 0:
        return []
    if not multi_label:
        return _single_label_overlays(model, dataset, pred, names, cfg, out_dir, split, device)
    pool = np.unique(np.linspace(0, len(dataset) - 1, num=min(len(dataset), limit * 4)).astype(int))
    images, out = run_on(model, dataset, pool, cfg, device)
    maps = out.attention.float().cpu()
    probs = torch.sigmoid(out.logits.float()).cpu()
    written = []
    for t, name in enumerate(names):
        positives = [k for k, i in enumerate(pool) if pred.targets[i, t] > 0][: max(1, limit // 2)]
        if positives:
            rows = [(images[k], maps[k, t], f"{name}: true 1 / p={probs[k, t]:.2f}") for k in positives]
            written.append(save_grid(out_dir / f"{split}_{name}.png", rows))
    return written


def run_on(model: torch.nn.Module, dataset: ImageDataset, indices: Iterable[int], cfg: dict[str, Any], device: torch.device) -> tuple[np.ndarray, Any]:
    """Display images (uint8) and model outputs for dataset items ``indices``."""
    batch = torch.stack([dataset[int(i)]["image"] for i in indices])
    model.eval()
    return batch.numpy(), model(model_input(batch, cfg["data"], device, cfg["model"]["channels_last"]))


def _single_label_overlays(
    model: torch.nn.Module, dataset: ImageDataset, pred: Predictions, names: list[str], cfg: dict[str, Any],
    out_dir: Path, split: str, device: torch.device,
) -> list[Path]:
    limit = cfg["eval"]["max_attention_images"]
    targets = pred.targets.long().numpy()
    per_class = np.array([np.flatnonzero(targets == c)[0] for c in np.unique(targets)][:limit])
    predicted = pred.logits.argmax(dim=1).numpy()
    confidence = torch.softmax(pred.logits.float(), dim=1).max(dim=1).values.numpy()
    wrong = np.flatnonzero(predicted != targets)
    confused = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    written = []
    for name, indices in (("overlays", per_class), ("confused", confused)):
        if len(indices) == 0:
            continue
        images, out = run_on(model, dataset, indices, cfg, device)
        maps = out.attention.float().cpu()
        rows = [(images[k], maps[k, 0], f"true: {names[targets[i]]} / pred: {names[predicted[i]]} ({confidence[i]:.2f})")
                for k, i in enumerate(indices)]
        written.append(save_grid(out_dir / f"{split}_{name}.png", rows))
    return written
