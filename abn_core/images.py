"""Reading images the way every part of the suite must: EXIF-upright, RGB, decoded in full."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# A truncated download must be an error, not a silently grey-padded image.
Image.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(ValueError):
    """An image file exists but cannot be decoded (truncated, corrupt, not an image)."""


def open_rgb(path: str | Path, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image as an upright RGB PIL image, fully decoded.

    Handles grayscale, CMYK, palette and alpha images, PNG data behind a .jpg name and EXIF
    orientation. ``draft_size`` lets JPEG decoding skip detail that a later resize would drop.
    Raises ImageDecodeError naming the path when the file cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", draft_size)
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Composite transparency on white instead of exposing undefined RGB under alpha.
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return img.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image {path}: {exc}") from exc


def load_rgb_array(path: str | Path, draft_size: tuple[int, int] | None = None) -> np.ndarray:
    """The image at ``path`` as an H x W x 3 uint8 array (see open_rgb)."""
    return np.asarray(open_rgb(path, draft_size))
