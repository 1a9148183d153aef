"""Dataset plumbing that knows no dataset: image sources, transforms, splits, loaders."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

from .errors import ConfigError, DataError
from .images import ImageDecodeError, load_rgb_array


class FileImages:
    """Images stored as files; ``paths`` relative to ``root``."""

    def __init__(self, root: str | Path, paths: Sequence[str]):
        self.root = Path(root)
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, row: int) -> str:
        return self.paths[row]

    def load(self, row: int) -> np.ndarray:
        path = self.root / self.paths[row]
        try:
            return load_rgb_array(path)
        except FileNotFoundError as exc:
            raise DataError(f"missing image {path}") from exc
        except ImageDecodeError as exc:
            raise DataError(str(exc)) from exc


class PackedImages:
    """Images packed as one N x H x W x 3 uint8 .npy array, memory-mapped (one open per worker)."""

    def __init__(self, array_path: str | Path, paths: Sequence[str]):
        self.array_path = Path(array_path)
        self.paths = list(paths)
        self._array: np.ndarray | None = None
        if not self.array_path.is_file():
            raise DataError(f"missing packed image array {self.array_path}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__ | {"_array": None}  # workers re-open the map instead of pickling pages

    def name(self, row: int) -> str:
        return self.paths[row]

    def load(self, row: int) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.array_path, mmap_mode="r")
            if self._array.ndim != 4 or self._array.shape[0] != len(self.paths) or self._array.shape[3] != 3:
                raise DataError(f"{self.array_path}: shape {self._array.shape} does not match {len(self.paths)} manifest rows x H x W x 3")
        return np.array(self._array[row])


@dataclass
class EvalGeometry:
    """The deterministic resize (+ centre crop) of evaluation, with the box arithmetic it implies."""

    image_size: int
    resize_size: int
    mode: str = "resize_crop"

    def __post_init__(self) -> None:
        if self.mode == "resize_crop" and self.resize_size < self.image_size:
            raise ConfigError(f"data.resize_size ({self.resize_size}) must be >= data.image_size ({self.image_size}) for eval_mode resize_crop")

    def plan(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized width, resized height, crop x0, crop y0)."""
        if self.mode == "resize":
            return self.image_size, self.image_size, 0, 0
        scale = self.resize_size / min(width, height)
        new_w, new_h = max(self.image_size, round(width * scale)), max(self.image_size, round(height * scale))
        return new_w, new_h, (new_w - self.image_size) // 2, (new_h - self.image_size) // 2

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image resized and cropped; boxes (T x 4, x y w h, NaN rows kept) mapped and clipped to the
        crop; the crop region in the original image's pixels (x y w h)."""
        height, width = image.shape[:2]
        new_w, new_h, x0, y0 = self.plan(width, height)
        interpolation = cv2.INTER_AREA if new_w < width else cv2.INTER_LINEAR
        resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
        out = resized[y0 : y0 + self.image_size, x0 : x0 + self.image_size]
        sx, sy = new_w / width, new_h / height
        crop = np.array([x0 / sx, y0 / sy, self.image_size / sx, self.image_size / sy], dtype=np.float32)
        return np.ascontiguousarray(out), self.map_boxes(boxes, width, height), crop

    def map_boxes(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """T x 4 boxes (x y w h) of a width x height image into network-input pixels, clipped to the crop."""
        x1, y1 = self.map_points(boxes[:, :2], width, height, clip=True).T
        x2, y2 = self.map_points(boxes[:, :2] + boxes[:, 2:4], width, height, clip=True).T
        return np.stack([x1, y1, x2 - x1, y2 - y1], axis=1).astype(np.float32)

    def map_points(self, points: np.ndarray, width: int, height: int, clip: bool = False) -> np.ndarray:
        """P x 2 points (x y) of a width x height image into network-input pixels (NaN stays NaN).

        Unclipped, points outside the crop land outside [0, image_size); ``clip`` pins them to its edge.
        """
        new_w, new_h, x0, y0 = self.plan(width, height)
        mapped = np.asarray(points, dtype=np.float32) * np.array([new_w / width, new_h / height], dtype=np.float32)
        mapped = mapped - np.array([x0, y0], dtype=np.float32)
        return np.clip(mapped, 0, self.image_size) if clip else mapped


def as_image_tensor(image: np.ndarray) -> torch.Tensor:
    """An H x W x 3 uint8 array as a tensor of the same layout. Batches stay uint8 and channels-last
    until :func:`model_input`: a quarter of float32's bytes to collate, pass between processes and
    copy to the device, and no per-image transpose."""
    return torch.from_numpy(np.ascontiguousarray(image))


def model_input(
    images: torch.Tensor, data_cfg: dict[str, Any], device: torch.device | str | None = None, channels_last: bool = False,
) -> torch.Tensor:
    """N x H x W x 3 uint8 images (as loaders yield them) -> float32 N x 3 x H x W on ``device``,
    normalised by ``data_cfg``'s mean and std exactly as albumentations' Normalize: (pixel - 255 mean)
    / (255 std). ``channels_last`` keeps that memory layout, which comes free from the loaders' layout."""
    mean = torch.tensor(data_cfg["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    inverse_std = 1.0 / (torch.tensor(data_cfg["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0)
    pixels = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    pixels = pixels.sub_(mean).mul_(inverse_std)
    return pixels if channels_last else pixels.contiguous()


def train_transform(cfg: dict[str, Any]) -> A.Compose:
    """The training augmentation pipeline described by ``cfg['data']``."""
    data = cfg["data"]
    size = (data["image_size"], data["image_size"])
    crop = {
        "random_resized": lambda: [A.RandomResizedCrop(size=size, scale=(data["min_scale"], 1.0))],
        "resize_random_crop": lambda: [A.SmallestMaxSize(max_size=data["resize_size"]), A.RandomCrop(*size, pad_if_needed=True)],
        "resize": lambda: [A.Resize(*size)],
    }[data["train_crop"]]()
    steps = crop + ([A.HorizontalFlip(p=0.5)] if data["hflip"] else [])
    if data["color_jitter"] > 0:
        j = data["color_jitter"]
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=0.0, p=0.8))
    return A.Compose(steps, strict=True)


def eval_geometry(cfg: dict[str, Any]) -> EvalGeometry:
    """The deterministic resize (+ crop) that evaluation, explain and the localisation metrics share."""
    data = cfg["data"]
    return EvalGeometry(data["image_size"], data["resize_size"], data["eval_mode"])


@dataclass
class ImageDataset(Dataset):
    """Rows ``rows`` of an image source with their targets; ``boxes`` (rows x T x 4) only for eval.

    Images are H x W x 3 uint8 tensors (see :func:`model_input`).
    Training items: image, target, index. Evaluation items add ``box`` (mapped into the network
    input, NaN where absent), ``crop_box`` (the region of the stored image the network saw) and,
    with ``points`` (rows x P x 2, NaN where invisible), ``points`` mapped into the network input.
    """

    source: FileImages | PackedImages
    rows: np.ndarray
    targets: np.ndarray  # per source row: int labels (N,) or 0/1 attributes (N, T)
    train: bool
    cfg: dict[str, Any]
    boxes: np.ndarray | None = None  # per source row: (N, T, 4) x y w h, NaN where absent
    points: np.ndarray | None = None  # per source row: (N, P, 2) x y, e.g. CUB parts, NaN where invisible
    transform: A.Compose | None = field(init=False, default=None)  # training augmentation
    geometry: EvalGeometry | None = field(init=False, default=None)  # evaluation resize/crop

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        if self.train:
            self.transform = train_transform(self.cfg)
        else:
            self.geometry = eval_geometry(self.cfg)

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, index: int) -> str:
        return self.source.name(int(self.rows[index]))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``key``: an index, or (epoch, index) from :class:`EpochSampler` for training items, whose
        augmentation is then seeded by (seed, epoch, index): reproducible on resume and with any
        number of workers, different across epochs (albumentations would otherwise replay one stream)."""
        epoch, index = key if isinstance(key, tuple) else (None, key)
        row = int(self.rows[index])
        try:
            image = self.source.load(row)
        except DataError:
            if self.train and self.cfg["data"]["on_bad_image"] == "skip":
                return {"bad_image": self.name(index)}
            raise
        target = torch.as_tensor(self.targets[row])
        if self.train:
            if epoch is not None:
                seed = derived_seed(self.cfg["seed"], epoch, index)
                # One stream shared by every transform: set_random_seed would give each transform its
                # own generator with the SAME seed, correlating e.g. crop position and flip.
                self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
            return {"image": as_image_tensor(self.transform(image=image)["image"]), "target": target, "index": index}
        boxes = self.boxes[row] if self.boxes is not None else np.full((1, 4), np.nan, dtype=np.float32)
        height, width = image.shape[:2]
        image, boxes, crop = self.geometry(image, boxes)
        item = {
            "image": as_image_tensor(image),
            "target": target,
            "index": index,
            "box": torch.from_numpy(boxes),
            "crop_box": torch.from_numpy(crop),
        }
        if self.points is not None:
            item["points"] = torch.from_numpy(self.geometry.map_points(self.points[row], width, height))
        return item


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions 0..N-1 into (keep, holdout) with ``fraction`` of every class held out.

    ``labels``: class ids (N,) or, for multi-label data, a 0/1 matrix whose rows are grouped by
    their rarest positive attribute. Every class with 2+ samples keeps at least one on each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {fraction}")
    labels = np.asarray(labels)
    if labels.ndim == 2:
        frequency = labels.sum(axis=0)
        rarity = np.where(labels > 0, frequency[None, :], np.inf)
        labels = np.where(labels.any(axis=1), rarity.argmin(axis=1), -1)
    rng = np.random.default_rng(seed)
    holdout = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = int(round(len(members) * fraction))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        holdout.extend(members[:count].tolist())
    mask = np.zeros(len(labels), dtype=bool)
    mask[holdout] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, index, ...): independent streams, same on any machine."""
    high, low = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(high) << 31) ^ int(low)


class EpochSampler(Sampler):
    """This process's share of one epoch's shuffled training order, as (epoch, index) keys.

    The order is a permutation seeded by (seed, epoch) alone, so it is the same whatever the number
    of dataloader workers and after a resume; ``skip_batches`` drops the batches already trained on
    (mid-epoch resume). Every process gets ``batches_per_process`` full batches (drop_last), the
    permutation wrapping around when the data is smaller than one batch per process.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.batches_per_process = max(1, size // (batch_size * world))
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return (self.batches_per_process - self.skip_batches) * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng(derived_seed(self.seed, self.epoch)).permutation(self.size)
        needed = self.batches_per_process * self.batch_size * self.world
        order = np.resize(order, needed)  # wraps around when the data is smaller than one round
        mine = order[self.rank :: self.world][self.skip_batches * self.batch_size :]
        return iter([(self.epoch, int(i)) for i in mine])


def collate_skipping_bad(items: list[dict[str, Any]]) -> dict[str, Any]:
    """default_collate over the decodable items; ``skipped`` lists the paths of the others."""
    good = [item for item in items if "bad_image" not in item]
    batch = default_collate(good) if good else {}
    batch["skipped"] = [item["bad_image"] for item in items if "bad_image" in item]
    return batch
