"""Benchmarks: ``python bench/run.py [--quick|--tiny] --out DIR [--threads N] [--clock wall|cpu]``.

Writes DIR/bench.json ({"ratios", "raw", "machine", "models"}) and prints a Markdown table. Every ratio
is time(A)/time(B), measured side by side in this process (warm-up, then the median of interleaved
repeats A, B, A, B, ...); step ratios time one training step (forward + backward + SGD).
--tiny only checks that everything runs (tests); --quick takes a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # official_reference: the authors' ABN-ResNet written again
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

from abn_core import build_model  # noqa: E402
from abn_core.config import load_config  # noqa: E402
from abn_core.data import FileImages, ImageDataset, PackedImages  # noqa: E402
from bench.measure import count_parameters, forward_gflops, interleaved_ratio, peak_step_memory, training_step  # noqa: E402
from official_reference import official_abn_resnet  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    backbone: str  # single-label comparisons (a torchvision ResNet the official code also builds)
    image_size: int
    batch: int
    classes: int
    multi_backbone: str  # the 40-attribute comparisons
    multi_image_size: int
    multi_batch: int
    attributes: int
    loading_images: int
    repeats: int


MODES = {
    "tiny": Sizes("resnet18", 32, 2, 10, "cifar_resnet20", 16, 2, 40, 4, 1),
    "quick": Sizes("resnet18", 96, 8, 200, "resnet18", 64, 4, 40, 512, 15),
    "full": Sizes("resnet50", 224, 16, 200, "resnet50", 224, 16, 40, 2048, 7),
}


def ce_pair(out: Any, targets: torch.Tensor) -> torch.Tensor:
    """ABN's single-label loss: attention branch + perception branch (ours or the official tuple)."""
    att_logits, logits = (out.att_logits, out.logits) if hasattr(out, "att_logits") else out[:2]
    return F.cross_entropy(att_logits, targets) + F.cross_entropy(logits, targets)


def bce_pair(out: Any, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.att_logits, targets) + F.binary_cross_entropy_with_logits(out.logits, targets)


def ce_plain(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, targets)


def batch(sizes: Sizes, multi: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if multi:
        images = torch.randn(sizes.multi_batch, 3, sizes.multi_image_size, sizes.multi_image_size, generator=generator)
        return images, torch.randint(0, 2, (sizes.multi_batch, sizes.attributes), generator=generator).float()
    images = torch.randn(sizes.batch, 3, sizes.image_size, sizes.image_size, generator=generator)
    return images, torch.randint(0, sizes.classes, (sizes.batch,), generator=generator)


def single_label_models(sizes: Sizes) -> dict[str, tuple[torch.nn.Module, Callable]]:
    torch.manual_seed(0)
    return {
        "backbone": (getattr(torchvision.models, sizes.backbone)(weights=None, num_classes=sizes.classes), ce_plain),
        "abn_paper": (build_model(sizes.backbone, sizes.classes, attention="paper"), ce_pair),
        "abn_light": (build_model(sizes.backbone, sizes.classes, attention="light"), ce_pair),
        "official_abn": (official_abn_resnet(sizes.backbone, sizes.classes), ce_pair),
    }


def multi_label_model(sizes: Sizes, perception: str, chunk: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(sizes.multi_backbone, sizes.attributes, multi_label=True, perception=perception, perception_chunk=chunk)


def multi_label_step(sizes: Sizes, chunk: int) -> Callable[[], None]:
    """Module-level (picklable) builder of a per_attribute step, for the peak-memory child process."""
    return training_step(multi_label_model(sizes, "per_attribute", chunk), *batch(sizes, multi=True), bce_pair)


def step_ratios(sizes: Sizes, clock: str, threads: int) -> tuple[dict[str, float], dict[str, Any], dict[str, Any]]:
    """The training-step ratios, their absolute times and the per-model parameters / GFLOPs."""
    ratios, raw, models = {}, {}, {}
    single = single_label_models(sizes)
    images, targets = batch(sizes, multi=False)
    steps = {name: training_step(model, images, targets, loss) for name, (model, loss) in single.items()}
    for name, (model, _) in single.items():
        models[name] = {"params": count_parameters(model), "gflops": forward_gflops(model, images[:1])}
    comparisons = {
        "abn_paper_vs_backbone_step": ("abn_paper", "backbone"),
        "abn_light_vs_backbone_step": ("abn_light", "backbone"),
        "official_abn_vs_backbone_step": ("official_abn", "backbone"),
        "abn_paper_vs_official_step": ("abn_paper", "official_abn"),
    }
    for ratio, (a, b) in comparisons.items():
        raw[ratio] = interleaved_ratio(steps[a], steps[b], sizes.repeats, clock=clock, label=ratio)
    del single, steps

    multi_images, multi_targets = batch(sizes, multi=True)
    shared = multi_label_model(sizes, "shared")
    torch.manual_seed(0)
    single_40 = build_model(sizes.multi_backbone, sizes.attributes, attention="paper")
    class_targets = multi_targets.argmax(dim=1)
    models["multilabel_shared"] = {"params": count_parameters(shared), "gflops": forward_gflops(shared, multi_images[:1])}
    raw["multilabel_shared_vs_single_step"] = interleaved_ratio(
        training_step(shared, multi_images, multi_targets, bce_pair),
        training_step(single_40, multi_images, class_targets, ce_pair),
        sizes.repeats, clock=clock, label="multilabel_shared_vs_single_step",
    )
    del shared, single_40
    folded = multi_label_model(sizes, "per_attribute", chunk=8)
    models["multilabel_per_attribute"] = {"params": count_parameters(folded), "gflops": forward_gflops(folded, multi_images[:1])}
    del folded
    raw["multilabel_fold_vs_loop_step"] = interleaved_ratio(
        multi_label_step(sizes, chunk=8), multi_label_step(sizes, chunk=1), sizes.repeats, clock=clock,
        label="multilabel_fold_vs_loop_step",
    )
    raw["multilabel_fold_vs_loop_step"] |= {
        "a_peak_bytes": peak_step_memory(functools.partial(multi_label_step, sizes, 8), threads=threads),
        "b_peak_bytes": peak_step_memory(functools.partial(multi_label_step, sizes, 1), threads=threads),
    }
    ratios.update({name: entry["ratio"] for name, entry in raw.items()})
    return ratios, raw, models


def eval_precision_ratio(sizes: Sizes, clock: str) -> dict[str, Any]:
    """Eval forward with channels_last + bf16 autocast vs plain fp32 (time ratio and throughput)."""
    torch.manual_seed(0)
    model = build_model(sizes.backbone, sizes.classes).eval()
    fast = build_model(sizes.backbone, sizes.classes).eval().to(memory_format=torch.channels_last)
    images, _ = batch(sizes, multi=False)
    images_cl = images.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def fp32() -> None:
        model(images)

    @torch.no_grad()
    def bf16_channels_last() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast(images_cl)

    entry = interleaved_ratio(bf16_channels_last, fp32, sizes.repeats, clock=clock, label="eval_bf16_channels_last_vs_fp32_time")
    entry["a_images_per_second"] = sizes.batch / entry["a_seconds"]
    entry["b_images_per_second"] = sizes.batch / entry["b_seconds"]
    return entry


def write_celeba_like(root: Path, count: int) -> tuple[list[str], Path]:
    """``count`` 178 x 218 JPEGs (smooth content plus grain, about CelebA's file size) and the same
    pixels packed into one uint8 array, as data_prep/celeba.py packs them."""
    rng = np.random.default_rng(0)
    packed = np.lib.format.open_memmap(root / "images_uint8.npy", mode="w+", dtype=np.uint8, shape=(count, 218, 178, 3))
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)).resize((178, 218), Image.Resampling.BICUBIC)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, size=(218, 178, 3)), 0, 255).astype(np.uint8)
        paths.append(f"{i + 1:06d}.jpg")
        Image.fromarray(pixels).save(root / paths[-1], quality=90)
        packed[i] = np.asarray(Image.open(root / paths[-1]).convert("RGB"))
    packed.flush()
    return paths, root / "images_uint8.npy"


def loading_ratios(sizes: Sizes) -> dict[str, dict[str, Any]]:
    """One pass of the CelebA training loader over packed data vs over the JPEGs (same transforms,
    workers and batch size), always wall-clock (the work happens in worker processes).

    ``prepared_vs_raw_loading_time`` uses one worker per core but one, the core left being the one
    the training process itself runs on; ``..._all_cores`` gives every core to workers (reported).
    """
    from abn_core.engine import make_train_loader  # imports accelerate: not needed by the peak-memory children

    cores = os.cpu_count() or 1
    results = {}
    with tempfile.TemporaryDirectory(prefix="abn-bench-") as tmp:
        root = Path(tmp)
        paths, packed = write_celeba_like(root, sizes.loading_images)
        rows = np.arange(len(paths))
        targets = np.zeros((len(paths), sizes.attributes), dtype=np.float32)
        for name, workers in (("prepared_vs_raw_loading_time", max(1, cores - 1)), ("prepared_vs_raw_loading_time_all_cores", cores)):
            cfg = load_config("celeba", overrides=[f"data.root={root}", f"data.num_workers={workers}", f"train.batch_size={min(32, len(paths))}"])
            loaders = [
                make_train_loader(ImageDataset(source, rows, targets, True, cfg), cfg)
                for source in (PackedImages(packed, paths), FileImages(root, paths))
            ]

            def one_pass(loader) -> Callable[[], None]:
                return lambda: sum(item["image"].shape[0] for item in loader)

            results[name] = interleaved_ratio(one_pass(loaders[0]), one_pass(loaders[1]), sizes.repeats, clock="wall", label=name)
            results[name] |= {"images": len(paths), "workers": workers}
            del loaders  # stops their persistent workers before the next pair starts
    return results


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and its bf16 instruction sets (Linux; empty elsewhere): bf16 speed depends on them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", []
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("model name", ""), sorted(f for f in fields.get("flags", "").split() if "bf16" in f)


def machine(threads: int, clock: str, mode: str) -> dict[str, Any]:
    model_name, bf16_flags = cpu_model()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": model_name,
        "cpu_bf16_flags": bf16_flags,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "threads": threads,
        "clock": clock,
        "mode": mode,
        "device": "cpu",
    }


# The goals of issue 7 (on CPU); ratios without one are reported for context.
TARGETS = {
    "abn_paper_vs_official_step": "<= 1 (not slower than the authors')",
    "abn_light_vs_backbone_step": "<= 1.3",
    "multilabel_shared_vs_single_step": "<= 1.2",
    "multilabel_fold_vs_loop_step": "< 0.9",
    "prepared_vs_raw_loading_time": "<= 0.5",
}


def markdown_table(ratios: dict[str, float], raw: dict[str, Any]) -> str:
    lines = ["| ratio | value | target | A (s) | B (s) |", "| --- | --- | --- | --- | --- |"]
    for name, value in ratios.items():
        target = TARGETS.get(name, "report")
        lines.append(f"| `{name}` | {value:.2f} | {target} | {raw[name]['a_seconds']:.4f} | {raw[name]['b_seconds']:.4f} |")
    fold = raw["multilabel_fold_vs_loop_step"]
    lines.append(f"\nPeak memory of one per_attribute step: folded {fold['a_peak_bytes'] / 2**20:.0f} MiB, loop {fold['b_peak_bytes'] / 2**20:.0f} MiB.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    size.add_argument("--tiny", action="store_true", help="minimal sizes: checks that everything runs")
    parser.add_argument("--out", required=True, type=Path, help="directory for bench.json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time (less sensitive to other load)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = MODES[mode]
    torch.set_num_threads(args.threads)
    ratios, raw, models = step_ratios(sizes, args.clock, args.threads)
    raw["eval_bf16_channels_last_vs_fp32_time"] = eval_precision_ratio(sizes, args.clock)
    raw |= loading_ratios(sizes)
    ratios |= {name: entry["ratio"] for name, entry in raw.items() if name not in ratios}
    result = {"ratios": ratios, "raw": raw, "machine": machine(args.threads, args.clock, mode), "models": models, "sizes": asdict(sizes)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(ratios, raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
