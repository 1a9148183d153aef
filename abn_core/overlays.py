"""Attention overlays: the map upsampled to the input, colour-mapped, blended, laid out in PNG grids."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

CAPTION_HEIGHT = 14


def jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with the jet colour map (blue low, red high)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).round().astype(np.uint8)


def blend(image: np.ndarray, attention: torch.Tensor, alpha: float = 0.5) -> np.ndarray:
    """Overlay one h x w map, min-max normalised and upsampled to the image, on an H x W x 3 image."""
    h, w = image.shape[:2]
    up = F.interpolate(attention.float()[None, None].cpu(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min()).clamp_min(1e-12)
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * jet(up.numpy()).astype(np.float32)
    return mixed.round().astype(np.uint8)


def _tile(image: np.ndarray, caption: str) -> Image.Image:
    h, w = image.shape[:2]
    tile = Image.new("RGB", (w, h + CAPTION_HEIGHT), "white")
    tile.paste(Image.fromarray(image), (0, CAPTION_HEIGHT))
    ImageDraw.Draw(tile).text((2, 1), caption, fill="black")
    return tile


def save_grid(
    path: str | Path, items: Sequence[tuple[np.ndarray, torch.Tensor, str]], columns: int = 4, min_width: int = 128
) -> Path:
    """Write a PNG grid of (image | overlay) pairs, ``columns`` pairs per row, each captioned
    (e.g. 'true: a / pred: b'). Small inputs are enlarged (nearest) to ``min_width`` so captions and
    maps stay readable."""
    pairs = []
    for image, attention, caption in items:
        scale = max(1, int(np.ceil(min_width / image.shape[1])))
        big = np.kron(image, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else image
        left, right = _tile(big, caption), _tile(blend(big, attention), "attention")
        pair = Image.new("RGB", (left.width + right.width + 4, max(left.height, right.height) + 4), "white")
        pair.paste(left, (0, 0))
        pair.paste(right, (left.width, 0))
        pairs.append(pair)
    cell_w, cell_h = max(p.width for p in pairs), max(p.height for p in pairs)
    columns = min(columns, len(pairs))
    rows = -(-len(pairs) // columns)
    grid = Image.new("RGB", (cell_w * columns, cell_h * rows), "white")
    for k, pair in enumerate(pairs):
        grid.paste(pair, ((k % columns) * cell_w, (k // columns) * cell_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
