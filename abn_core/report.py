"""report.html: one self-contained page per run directory (config, curves, tables, attention galleries).

Everything is linked relatively (report/*.png, attention/*.png), so the folder can be moved or
zipped; curves are drawn with PIL, which the suite already needs, so no plotting dependency.
"""
from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from . import config as config_lib
from .data import ImageDataset
from .evaluation import run_on
from .overlays import save_grid

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
CHART_SIZE, MARGIN, LEGEND_WIDTH = (680, 300), 40, 200
PER_CLASS_IMAGES = 4
GALLERY_WIDTH = 224  # wide enough for "true: ... / pred: ... 0.93" captions


def line_chart(path: Path, x: Sequence[float], series: dict[str, Sequence[float]], title: str) -> Path:
    """A PNG line chart of ``series`` over ``x`` with a legend and the y range written on the axis."""
    width, height = CHART_SIZE
    image = Image.new("RGB", CHART_SIZE, "white")
    draw = ImageDraw.Draw(image)
    values = np.array([v for ys in series.values() for v in ys if np.isfinite(v)] or [0.0])
    low, high = float(values.min()), float(values.max())
    high = high if high > low else low + 1.0
    x_low, x_high = min(x), max(x) if max(x) > min(x) else min(x) + 1

    def point(xv: float, yv: float) -> tuple[float, float]:
        px = MARGIN + (xv - x_low) / (x_high - x_low) * (width - 2 * MARGIN - LEGEND_WIDTH)
        py = height - MARGIN - (yv - low) / (high - low) * (height - 2 * MARGIN)
        return px, py

    draw.rectangle([MARGIN, MARGIN, width - MARGIN - LEGEND_WIDTH, height - MARGIN], outline="black")
    draw.text((MARGIN, 8), title, fill="black")
    draw.text((2, MARGIN - 12), f"{high:.3g}", fill="black")
    draw.text((2, height - MARGIN), f"{low:.3g}", fill="black")
    draw.text((width - MARGIN - LEGEND_WIDTH - 40, height - MARGIN + 6), f"epoch {x_high:g}", fill="black")
    for k, (name, ys) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [point(xv, yv) for xv, yv in zip(x, ys) if np.isfinite(yv)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((width - LEGEND_WIDTH - MARGIN + 8, MARGIN + 12 * k), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def learning_curves(metrics_csv: Path, out_dir: Path) -> list[Path]:
    """report/curves_<group>.png for losses, learning rate and validation metrics of metrics.csv."""
    if not metrics_csv.is_file():
        return []
    frame = pd.read_csv(metrics_csv)
    if frame.empty or "epoch" not in frame.columns:
        return []
    groups = {
        "loss": [c for c in frame.columns if c.startswith("loss")],
        "lr": [c for c in frame.columns if c == "lr"],
        "validation": [c for c in frame.columns if c.startswith("val_")],
    }
    epochs = frame["epoch"].astype(float).tolist()
    return [
        line_chart(out_dir / "report" / f"curves_{group}.png", epochs, {c: frame[c].astype(float).tolist() for c in columns}, group)
        for group, columns in groups.items() if columns
    ]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] or "class"


@torch.no_grad()
def write_galleries(
    model: torch.nn.Module, dataset: ImageDataset, pred: Any, names: list[str], multi_label: bool,
    cfg: dict[str, Any], out_dir: Path, split: str, device: torch.device,
) -> list[Path]:
    """attention/<split>_best.png and _worst.png (most / least confident in the truth) and, for
    single-label data, <split>_class_<name>.png for the worst classes (main process only)."""
    limit = cfg["eval"]["max_attention_images"]
    if limit <= 0 or len(dataset) == 0:
        return []
    if multi_label:
        error = (torch.sigmoid(pred.logits.float()) - pred.targets.float()).abs()
        confidence = 1 - error.mean(dim=1)
    else:
        confidence = torch.softmax(pred.logits.float(), dim=1).gather(1, pred.targets.long()[:, None])[:, 0]
    order = torch.argsort(confidence, descending=True)
    galleries = {"best": order[:limit], "worst": order.flip(0)[:limit]}
    if not multi_label:
        labels = pred.targets.long()
        accuracy = [(float((pred.logits[labels == c].argmax(1) == c).float().mean()), c) for c in labels.unique().tolist()]
        for _, c in sorted(accuracy)[:limit]:
            galleries[f"class_{_safe_name(names[c])}"] = torch.nonzero(labels == c)[:PER_CLASS_IMAGES, 0]
    written = []
    for gallery, indices in galleries.items():
        images, out = run_on(model, dataset, indices, cfg, device)
        rows = [_gallery_item(images[k], out, k, pred, int(i), names, multi_label) for k, i in enumerate(indices)]
        written.append(save_grid(out_dir / f"{split}_{gallery}.png", rows, min_width=GALLERY_WIDTH))
    return written


def _gallery_item(image: np.ndarray, out: Any, k: int, pred: Any, index: int, names: list[str], multi_label: bool):
    if not multi_label:
        probs = torch.softmax(out.logits[k].float(), dim=0).cpu()
        guess = int(probs.argmax())
        return image, out.attention[k, 0].float().cpu(), f"true: {names[int(pred.targets[index])]} / pred: {names[guess]} {probs[guess]:.2f}"
    # The attribute the model got most wrong (or most right) on this image, with its own map.
    probs = torch.sigmoid(out.logits[k].float()).cpu()
    t = int((probs - pred.targets[index].float()).abs().argmax())
    return image, out.attention[k, t].float().cpu(), f"{names[t]}: true {int(pred.targets[index, t])} / p={probs[t]:.2f}"


def _table_html(csv_path: Path) -> str:
    frame = pd.read_csv(csv_path)
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="", border=0, classes="table")


def _images_html(paths: Sequence[Path], root: Path) -> str:
    return "\n".join(
        f'<figure><img src="{html.escape(p.relative_to(root).as_posix())}" alt="{html.escape(p.stem)}">'
        f"<figcaption>{html.escape(p.stem)}</figcaption></figure>"
        for p in paths
    )


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}figure{display:inline-block;margin:6px}
img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"""


def write_report(out_dir: Path, cfg: dict[str, Any], metrics_csv: Path | None = None) -> Path:
    """Write ``out_dir/report.html`` from what the run directory holds (results/, attention/) plus the
    resolved ``cfg`` and the learning curves of ``metrics_csv`` (default out_dir/metrics.csv)."""
    out_dir = Path(out_dir)
    curves = learning_curves(metrics_csv or out_dir / "metrics.csv", out_dir)
    # Summaries first: the headline numbers, then the per-class / per-attribute detail.
    tables = sorted((out_dir / "results").glob("*.csv"), key=lambda p: ("_summary" not in p.stem, p.stem))
    overlays = sorted((out_dir / "attention").glob("*.png"))
    ranked = [p for p in overlays if p.stem.endswith(("_best", "_worst"))]
    per_group = [p for p in overlays if p not in ranked]
    sections = [
        f"<h1>ABN run report: {html.escape(out_dir.name)}</h1>",
        "<h2>Learning curves</h2>", _images_html(curves, out_dir) or "<p>no metrics.csv (evaluation only)</p>",
        "<h2>Results</h2>",
        *(f"<h3>{html.escape(p.stem.replace('_', ' '))}</h3>\n{_table_html(p)}" for p in tables),
        "<h2>Attention: best and worst</h2>", _images_html(ranked, out_dir),
        "<h2>Attention per class / attribute</h2>", _images_html(per_group, out_dir),
        "<h2>Resolved config</h2>", f"<pre>{html.escape(config_lib.dump(cfg))}</pre>",
    ]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>ABN report {html.escape(out_dir.name)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(sections) + "\n</body></html>\n")
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
