import io

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from abn_core.config import load_config
from abn_core.data import EpochSampler, EvalGeometry, FileImages, ImageDataset, PackedImages, collate_skipping_bad
from abn_core.errors import ConfigError, DataError
from abn_core.images import ImageDecodeError, load_rgb_array
from abn_core.overlays import jet, save_grid
from tasks.common import image_folder_data, multi_label_data, single_label_data


def test_eval_geometry_maps_boxes_and_reports_the_crop():
    geometry = EvalGeometry(image_size=100, resize_size=200, mode="resize_crop")
    image = np.zeros((400, 600, 3), dtype=np.uint8)  # H 400, W 600 -> 200 x 300, crop x0 = 100, y0 = 50
    image[100:200, 300:400] = 255
    boxes = np.array([[300, 100, 100, 100], [np.nan] * 4], dtype=np.float32)
    out, mapped, crop = geometry(image, boxes)
    assert out.shape == (100, 100, 3)
    np.testing.assert_allclose(mapped[0], [50, 0, 50, 50])
    assert np.isnan(mapped[1]).all()
    np.testing.assert_allclose(crop, [200, 100, 200, 200])  # the part of the 600 x 400 image the network saw
    ys, xs = np.nonzero(out[..., 0] > 127)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (50, 99, 0, 49)


def test_eval_geometry_clips_boxes_outside_the_crop_and_plain_resize():
    geometry = EvalGeometry(image_size=100, resize_size=200, mode="resize_crop")
    _, mapped, _ = geometry(np.zeros((400, 600, 3), np.uint8), np.array([[0, 100, 250, 100]], np.float32))
    np.testing.assert_allclose(mapped[0], [0, 0, 25, 50])
    square = EvalGeometry(image_size=50, resize_size=50, mode="resize")
    _, mapped, crop = square(np.zeros((200, 100, 3), np.uint8), np.array([[10, 20, 30, 40]], np.float32))
    np.testing.assert_allclose(mapped[0], [5, 5, 15, 10])
    np.testing.assert_allclose(crop, [0, 0, 100, 200])
    with pytest.raises(ConfigError, match="data.resize_size"):
        EvalGeometry(image_size=224, resize_size=200)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def test_images_load_as_upright_rgb_whatever_the_file(tmp_path):
    rgb = Image.new("RGB", (30, 20), (200, 30, 40))
    (tmp_path / "gray.jpg").write_bytes(_encode(rgb.convert("L"), "JPEG"))
    (tmp_path / "cmyk.jpg").write_bytes(_encode(rgb.convert("CMYK"), "JPEG"))
    (tmp_path / "png_named.jpg").write_bytes(_encode(rgb, "PNG"))
    (tmp_path / "palette.png").write_bytes(_encode(rgb.convert("P"), "PNG"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    (tmp_path / "rotated.jpg").write_bytes(_encode(rgb, "JPEG", exif=exif.tobytes()))
    for name in ("gray.jpg", "cmyk.jpg", "png_named.jpg", "palette.png"):
        array = load_rgb_array(tmp_path / name)
        assert array.shape == (20, 30, 3) and array.dtype == np.uint8, name
    assert load_rgb_array(tmp_path / "cmyk.jpg")[10, 15, 0] > 150  # still red after CMYK -> RGB
    assert load_rgb_array(tmp_path / "rotated.jpg").shape == (30, 20, 3)
    (tmp_path / "truncated.jpg").write_bytes(_encode(rgb, "JPEG")[:200])
    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        load_rgb_array(tmp_path / "truncated.jpg")
    with pytest.raises(DataError, match="missing.jpg"):
        FileImages(tmp_path, ["missing.jpg"]).load(0)


def _epoch_images(dataset, workers, epoch, world=1, rank=0):
    sampler = EpochSampler(len(dataset), 4, seed=0, rank=rank, world=world)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers, collate_fn=collate_skipping_bad)
    return torch.cat([b["image"] for b in loader]), torch.cat([b["index"] for b in loader])


def test_augmentations_differ_between_workers_and_epochs_and_ignore_worker_count(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", np.stack([image] * 8))
    cfg = load_config("classification", overrides=["data.image_size=32", "data.train_crop=random_resized", "data.min_scale=0.05"])
    dataset = ImageDataset(PackedImages(tmp_path / "images.npy", [f"{i}" for i in range(8)]), np.arange(8), np.zeros(8, np.int64), True, cfg)
    first, order = _epoch_images(dataset, workers=2, epoch=0)
    # Batch 0 comes from worker 0, batch 1 from worker 1: same input image, different crops.
    assert not torch.equal(first[0], first[4])
    second, second_order = _epoch_images(dataset, workers=2, epoch=1)
    assert not torch.equal(order, second_order)
    assert not torch.equal(first[torch.argsort(order)], second[torch.argsort(second_order)])  # same image, new crop
    again, again_order = _epoch_images(dataset, workers=0, epoch=0)  # no workers, as after a resume: identical
    assert torch.equal(again, first) and torch.equal(again_order, order)


def test_crop_position_and_flip_are_drawn_independently(tmp_path):
    # Red = row, green = column: a crop's first pixel gives its offset; green falling along a row, a flip.
    rows, columns = np.mgrid[0:64, 0:64]
    np.save(tmp_path / "images.npy", np.stack([rows, columns, np.zeros_like(rows)], axis=2).astype(np.uint8)[None])
    cfg = load_config("classification", overrides=["data.image_size=32", "data.resize_size=64", "data.train_crop=resize_random_crop"])
    dataset = ImageDataset(PackedImages(tmp_path / "images.npy", ["0"]), np.zeros(1), np.zeros(1, np.int64), True, cfg)
    crops = [dataset[(epoch, 0)]["image"] for epoch in range(300)]
    top = np.array([int(c[0, 0, 0]) for c in crops])
    flipped = np.array([int(c[0, 0, 1]) > int(c[0, -1, 1]) for c in crops])
    # With one seed per transform (albumentations' set_random_seed) the flip follows the crop's offset.
    for half in (top < 16, top >= 16):
        assert 0.3 < flipped[half].mean() < 0.7


def test_epoch_sampler_shards_disjointly_and_skips_seen_batches():
    ranks = [EpochSampler(21, batch_size=4, seed=3, rank=r, world=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(5)
    shares = [[i for _, i in sampler] for sampler in ranks]
    assert [len(s) for s in shares] == [8, 8] and not set(shares[0]) & set(shares[1])  # 2 full batches each, 5 dropped
    ranks[1].set_epoch(5, skip_batches=1)
    assert [i for _, i in ranks[1]] == shares[1][4:] and len(ranks[1]) == 4
    tiny = EpochSampler(3, batch_size=4, seed=0)  # smaller than one batch: wraps around to one full batch
    assert sorted({i for _, i in tiny}) == [0, 1, 2] and len(list(tiny)) == 4


def test_image_folder_layouts(tmp_path):
    cfg = load_config("classification", overrides=[f"data.root={tmp_path}", "data.val_fraction=0.25"])
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    data = image_folder_data(tmp_path, cfg)
    assert data.class_names == ["cat", "dog"]
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 8)
    assert any("validation = 25% of train" in n for n in data.notes)
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="bird: class folder not present"):
        image_folder_data(tmp_path, cfg)


def test_prepared_manifests_and_their_errors(tmp_path):
    cfg = load_config("classification", overrides=[f"data.root={tmp_path}"])
    (tmp_path / "a.png").write_bytes(_encode(Image.new("RGB", (8, 8)), "PNG"))
    (tmp_path / "manifest.csv").write_text("path,label,class_name,split\na.png,0,x,train\na.png,1,y,train\nb.png,1,y,test\n")
    with pytest.raises(DataError, match=r"manifest.csv:4: image .*b.png does not exist"):
        single_label_data(cfg)
    (tmp_path / "manifest.csv").write_text("path,split,p,q\na.png,train,0,1\na.png,test,1,2\n")
    with pytest.raises(DataError, match=r"manifest.csv:3: attribute q must be 0 or 1, got 2"):
        multi_label_data(cfg | {"data": cfg["data"] | {"root": str(tmp_path)}})


def test_demo_data_is_deterministic_and_boxes_cover_the_objects():
    cfg = load_config("celeba")
    data = multi_label_data(cfg)
    assert data.multi_label and len(data.class_names) == 10
    item = data.test[0]
    present = torch.nonzero(item["target"]).flatten()
    assert 1 <= len(present) <= 3
    assert torch.isfinite(item["box"][present]).all()
    absent = torch.nonzero(item["target"] == 0).flatten()
    assert torch.isnan(item["box"][absent]).all()
    image = data.test.source.load(int(data.test.rows[0]))
    x, y, w, h = (int(v) for v in data.test.boxes[data.test.rows[0], int(present[0])])
    patch = image[y : y + h, x : x + w].astype(int)
    saturation = patch.max(axis=2) - patch.min(axis=2)
    assert saturation.max() > 100  # the coloured object is inside its box; the clutter is grey


def test_overlay_grid_and_colour_map(tmp_path):
    assert tuple(jet(np.array(0.0))) == (0, 0, 128) and tuple(jet(np.array(1.0))) == (128, 0, 0)
    items = [(np.zeros((20, 20, 3), np.uint8), torch.rand(4, 4), f"true: {i}") for i in range(5)]
    path = save_grid(tmp_path / "grid.png", items, columns=2, min_width=40)
    with Image.open(path) as grid:
        # 3 rows of 2 pairs; each pair is two 40-px tiles plus a 4-px gap.
        assert grid.size == (2 * (2 * 40 + 4), 3 * (40 + 14 + 4))
