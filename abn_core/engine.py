"""The training loop on Hugging Face Accelerate, and evaluation of a finished run."""
from __future__ import annotations

import csv
import json
import math
import platform
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import config as config_lib
from .checkpoints import Progress, find_weights, load_weights, save_best_weights, save_training_state
from .data import ImageDataset, seed_augmentations
from .errors import ConfigError
from .evaluation import predict, result_tables, save_maps, summary_dict, write_overlays, write_tables
from .losses import ABNLoss
from .model import ABN, build_model
from .report import write_galleries, write_report
from .task import Task, TaskData


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def make_accelerator(cfg: dict[str, Any]) -> Accelerator:
    """An Accelerator in CPU mode when no GPU exists: otherwise several launched processes on a
    GPU-less machine would each train alone instead of joining one gloo process group."""
    cpu = not has_accelerator()
    precision = cfg["train"]["mixed_precision"]
    if cpu and precision == "fp16":
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; use bf16 (or no) on CPU")
    return Accelerator(
        cpu=cpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg["train"]["grad_accum_steps"],
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def resolve_output_dir(accelerator: Accelerator, task: Task, cfg: dict[str, Any]) -> Path:
    """``output_dir``, or runs/<task>/<date-time> chosen once by the main process for all."""
    chosen = [cfg["output_dir"] or f"runs/{task.name}/{datetime.now():%Y%m%d-%H%M%S}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    cfg["output_dir"] = chosen[0]
    return Path(chosen[0])


def run_info(accelerator: Accelerator) -> dict[str, Any]:
    import accelerate
    import albumentations
    import torchmetrics
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "device": str(accelerator.device),
        "python": platform.python_version(),
        "versions": {m.__name__: m.__version__ for m in (torch, torchvision, accelerate, torchmetrics, albumentations)},
        "git_commit": commit or None,
        "started": datetime.now().isoformat(timespec="seconds"),
    }


def model_from_cfg(cfg: dict[str, Any], data: TaskData, pretrained: bool = True) -> ABN:
    m = cfg["model"]
    return build_model(
        m["backbone"], len(data.class_names), attention=m["attention"], multi_label=data.multi_label,
        pretrained=m["pretrained"] if pretrained else None, perception=m["perception"],
        attention_width=m["attention_width"], perception_chunk=m["perception_chunk"],
    )


def make_loader(dataset: ImageDataset, cfg: dict[str, Any], train: bool) -> DataLoader:
    workers = cfg["data"]["num_workers"]
    return DataLoader(
        dataset,
        batch_size=cfg["train"]["batch_size"] if train else cfg["eval"]["batch_size"],
        shuffle=train,
        drop_last=train and len(dataset) > cfg["train"]["batch_size"],
        num_workers=workers,
        pin_memory=has_accelerator(),
        persistent_workers=workers > 0,
        worker_init_fn=seed_augmentations if workers > 0 else None,
    )


def make_optimizer(model: torch.nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    t = cfg["train"]
    # No weight decay on BN and bias parameters, as is standard for ResNets.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if t["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=t["lr"])
    return torch.optim.SGD(groups, lr=t["lr"], momentum=t["momentum"], nesterov=False)


def lr_factor(step: int, steps_per_epoch: int, cfg: dict[str, Any]) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up, then cosine/step/constant."""
    t = cfg["train"]
    total = max(1, t["epochs"] * steps_per_epoch)
    warmup = int(t["warmup_epochs"] * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if t["schedule"] == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if t["schedule"] == "step":
        epoch = step / steps_per_epoch
        return t["step_gamma"] ** sum(epoch >= m for m in t["step_milestones"])
    return 1.0


def append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def announce(accelerator: Accelerator, task: Task, cfg: dict[str, Any], data: TaskData, run_dir: Path) -> None:
    if not accelerator.is_main_process:
        return
    if cfg["data"]["root"] == "demo":
        print(f"[demo] No dataset configured: training on the built-in demo data. {task.demo_note}")
    sizes = ", ".join(f"{name} {len(ds)}" for name, ds in (("train", data.train), ("val", data.val), ("test", data.test)) if ds is not None)
    print(f"{task.name}: {sizes} images, {len(data.class_names)} {'attributes' if data.multi_label else 'classes'}; "
          f"{accelerator.num_processes} process(es) on {accelerator.device}; run directory {run_dir}")
    for note in data.notes:
        print(f"note: {note}")


def train(task: Task, cfg: dict[str, Any]) -> Path:
    """Train, select the best epoch on validation data, evaluate it on test data. Returns the run directory."""
    accelerator = make_accelerator(cfg)
    run_dir = resolve_output_dir(accelerator, task, cfg)
    set_seed(cfg["seed"])
    with accelerator.main_process_first():
        data = task.build_data(cfg)
    model = model_from_cfg(cfg, data)
    if cfg["model"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    criterion = ABNLoss(data.multi_label, cfg["train"]["att_weight"], cfg["train"]["label_smoothing"])
    optimizer = make_optimizer(model, cfg)
    train_loader, val_loader = make_loader(data.train, cfg, True), make_loader(data.val, cfg, False)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    criterion = criterion.to(accelerator.device)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    announce(accelerator, task, cfg, data, run_dir)
    resume_from = _resume_path(cfg, run_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        if accelerator.is_main_process:
            print(f"resumed from {resume_from} after epoch {progress.epochs_done}")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_lib.dump(cfg))
        (run_dir / "run_info.json").write_text(json.dumps(run_info(accelerator), indent=2) + "\n")
    # Each process augments its own stream; model weights are already identical (DDP broadcast).
    set_seed(cfg["seed"] + 1000 * accelerator.process_index + progress.epochs_done)
    if cfg["data"]["num_workers"] == 0:
        data.train.transform.set_random_seed(cfg["seed"] + 1000 * accelerator.process_index + progress.epochs_done)
    steps_per_epoch = math.ceil(len(train_loader) / cfg["train"]["grad_accum_steps"])
    writer = _tensorboard(cfg, run_dir) if accelerator.is_main_process else None

    for epoch in range(progress.epochs_done, cfg["train"]["epochs"]):
        row = train_one_epoch(accelerator, model, criterion, optimizer, train_loader, cfg, progress, epoch, steps_per_epoch)
        val = summary_dict(result_tables(predict(accelerator, model, val_loader, cfg, "validating"), data.class_names, data.multi_label))
        row |= {f"val_{k}": v for k, v in val.items()}
        progress.epochs_done = epoch + 1
        score = val[data.selection_metric]
        if accelerator.is_main_process:
            append_row(run_dir / "metrics.csv", row)
            if writer is not None:
                for key, value in row.items():
                    writer.add_scalar(key, value, epoch + 1)
            print(f"epoch {epoch + 1}/{cfg['train']['epochs']}: loss {row['loss']:.4f}, val {data.selection_metric} {score:.4f}")
            if score > progress.best_value:
                save_best_weights(accelerator.unwrap_model(model), run_dir, {"epoch": epoch + 1, data.selection_metric: score})
        if score > progress.best_value:
            progress.best_value, progress.best_epoch = score, epoch + 1
        save_training_state(accelerator, run_dir)

    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    load_weights(accelerator.unwrap_model(model), run_dir / "checkpoints" / "best" / "model.safetensors")
    final_report(accelerator, model, data, cfg, run_dir, run_dir)
    model, optimizer = accelerator.free_memory(model, optimizer)  # avoids a gloo abort at exit
    accelerator.end_training()
    return run_dir


def train_one_epoch(
    accelerator: Accelerator, model: torch.nn.Module, criterion: ABNLoss, optimizer: torch.optim.Optimizer,
    loader: Any, cfg: dict[str, Any], progress: Progress, epoch: int, steps_per_epoch: int,
) -> dict[str, Any]:
    model.train()
    loader.set_epoch(epoch)
    base_lr = cfg["train"]["lr"]
    sums = torch.zeros(3, device=accelerator.device)
    batches = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", disable=not accelerator.is_main_process, leave=False)
    for batch in bar:
        for group in optimizer.param_groups:
            group["lr"] = base_lr * lr_factor(progress.step, steps_per_epoch, cfg)
        images = batch["image"]
        if cfg["model"]["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                out = model(images)
            losses = criterion(out, batch["target"])
            accelerator.backward(losses["loss"])
            if accelerator.sync_gradients and cfg["train"]["grad_clip"] > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg["train"]["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            progress.step += 1
        sums += torch.stack([losses[k].detach().float() for k in ("loss", "loss_att", "loss_per")])
        batches += 1
        bar.set_postfix(loss=f"{losses['loss'].item():.3f}")
    means = accelerator.reduce(sums / max(1, batches), reduction="mean").tolist()
    return {"epoch": epoch + 1, "loss": means[0], "loss_att": means[1], "loss_per": means[2], "lr": optimizer.param_groups[0]["lr"]}


def _resume_path(cfg: dict[str, Any], run_dir: Path) -> Path | None:
    resume = cfg["train"]["resume"]
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last"
        return last if last.is_dir() else None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume: {resume} is not a checkpoint directory (expected e.g. RUN/checkpoints/last)")
    return path


def _tensorboard(cfg: dict[str, Any], run_dir: Path) -> Any:
    if not cfg["train"]["tensorboard"]:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("train.tensorboard: the tensorboard package is not installed (pip install 'abn-suite[tensorboard]')") from exc
    return SummaryWriter(str(run_dir / "tensorboard"))


def final_report(
    accelerator: Accelerator, model: torch.nn.Module, data: TaskData, cfg: dict[str, Any], run_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Evaluate on test data (validation data when there is none): tables, overlays, galleries,
    optional maps, and report.html."""
    split, dataset = ("test", data.test) if data.test is not None else ("val", data.val)
    loader = accelerator.prepare(make_loader(dataset, cfg, False))
    pred = predict(accelerator, model, loader, cfg, f"evaluating {split}", keep_maps=cfg["eval"]["save_maps"],
                   compare_cam=cfg["eval"]["compare_cam"])
    tables = result_tables(pred, data.class_names, data.multi_label)
    if accelerator.is_main_process:
        markdown = write_tables(tables, out_dir / "results", split)
        write_overlays(accelerator.unwrap_model(model), dataset, pred, data.class_names, data.multi_label, cfg,
                       out_dir / "attention", split, accelerator.device)
        if cfg["eval"]["save_maps"]:
            save_maps(pred, dataset, out_dir / "attention" / f"{split}_maps.npz")
        write_galleries(accelerator.unwrap_model(model), dataset, pred, data.class_names, data.multi_label, cfg,
                        out_dir / "attention", split, accelerator.device)
        write_report(out_dir, cfg, run_dir / "metrics.csv")
        print("\n" + markdown)
        print(f"results written to {out_dir}")
    accelerator.wait_for_everyone()
    return summary_dict(tables)


def evaluate_checkpoint(task: Task, checkpoint: str, config_file: str | None, overrides: list[str]) -> Path:
    """``eval``: the run's config (plus overrides) and best weights, evaluated on test data."""
    run_dir, weights = find_weights(checkpoint)
    cfg = config_lib.load_config(task.name, config_file or run_dir / "config.yaml", overrides)
    out_dir = Path(cfg["output_dir"]) if any(o.startswith("output_dir=") for o in overrides) else run_dir
    cfg["output_dir"] = str(out_dir)
    accelerator = make_accelerator(cfg)
    with accelerator.main_process_first():
        data = task.build_data(cfg)
    model = model_from_cfg(cfg, data, pretrained=False)
    load_weights(model, weights)
    model = accelerator.prepare(model)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "run_info.json").write_text(json.dumps(run_info(accelerator) | {"checkpoint": str(weights)}, indent=2) + "\n")
    final_report(accelerator, model, data, cfg, run_dir, out_dir)
    accelerator.free_memory(model)
    accelerator.end_training()
    return out_dir
