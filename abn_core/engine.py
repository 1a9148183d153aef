"""The training loop on Hugging Face Accelerate, and evaluation of a finished run."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import config as config_lib
from .cam import check_compare_cam
from .checkpoints import (Progress, crash_point, find_weights, load_training_state, load_weights, save_best_weights,
                          save_training_state)
from .data import EpochSampler, ImageDataset, collate_skipping_bad, model_input
from .errors import ConfigError, DataError, NumericalError
from .files import atomic_write_text, is_complete, recover_dir
from .evaluation import predict, result_tables, save_maps, summary_dict, write_overlays, write_tables
from .losses import ABNLoss, loss_from_cfg
from .model import ABN, build_model
from .report import write_galleries, write_report
from .task import Task, TaskData

FAULT_ENV = "ABN_SUITE_FAULT_AT"  # test hook: "e1b2" makes epoch 1's second batch's loss NaN


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def make_accelerator(cfg: dict[str, Any]) -> Accelerator:
    """An Accelerator in CPU mode when no GPU exists: otherwise several launched processes on a
    GPU-less machine would each train alone instead of joining one gloo process group."""
    cpu = not has_accelerator()
    precision = cfg["train"]["mixed_precision"]
    if cpu and precision == "fp16":
        raise ConfigError("train.mixed_precision: fp16 needs a GPU; use bf16 (or no) on CPU")
    # Gradient accumulation is done by the training loop (Accelerate's would rescale the loss itself).
    return Accelerator(cpu=cpu, mixed_precision=precision)


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
        attention_map_init=m["attention_map_init"],
    )


def make_loader(dataset: ImageDataset, cfg: dict[str, Any]) -> DataLoader:
    """An evaluation loader (in dataset order; Accelerate shards it and gather_for_metrics drops the padding)."""
    workers = cfg["data"]["num_workers"]
    return DataLoader(dataset, batch_size=cfg["eval"]["batch_size"], shuffle=False, num_workers=workers,
                      pin_memory=has_accelerator(), persistent_workers=workers > 0)


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
    """Train, select the best epoch on validation data, evaluate it on test data. Returns the run directory.

    Resumes exactly (same data order, augmentations, RNG states, counters) from checkpoints/last.
    """
    accelerator = make_accelerator(cfg)
    run_dir = resolve_output_dir(accelerator, task, cfg)
    set_seed(cfg["seed"])
    with accelerator.main_process_first():
        data = task.build_data(cfg)
    if cfg["eval"]["compare_cam"]:
        check_compare_cam(data.multi_label)  # now, not after the whole training
    model = model_from_cfg(cfg, data)
    if cfg["model"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    criterion = loss_from_cfg(cfg, data.multi_label, data.train.targets[data.train.rows])
    optimizer = make_optimizer(model, cfg)
    train_loader = make_train_loader(data.train, cfg, accelerator.process_index, accelerator.num_processes)
    val_loader = make_loader(data.val, cfg)
    # The training loader stays unprepared: EpochSampler shards it itself, reproducibly on resume.
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    criterion = criterion.to(accelerator.device)
    announce(accelerator, task, cfg, data, run_dir)
    progress = _resume(accelerator, model, optimizer, cfg, run_dir)
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "config.yaml", config_lib.dump(cfg))
    write_run_info(accelerator, run_dir)
    steps_per_epoch = math.ceil(train_loader.sampler.batches_per_process / cfg["train"]["grad_accum_steps"])
    writer = _tensorboard(cfg, run_dir) if accelerator.is_main_process else None

    while progress.epochs_done < cfg["train"]["epochs"]:
        train_one_epoch(accelerator, model, criterion, optimizer, train_loader, cfg, progress, run_dir, steps_per_epoch)
        val = summary_dict(result_tables(predict(accelerator, model, val_loader, cfg, "validating"), data.class_names, data.multi_label))
        _finish_epoch(accelerator, model, optimizer, progress, val, data.selection_metric, cfg, run_dir, writer,
                      keep_last=data.select_last_epoch)

    if writer is not None:
        writer.close()
    accelerator.wait_for_everyone()
    _report_skipped(accelerator, progress)
    check_ranks_agree(accelerator, model)
    load_weights(accelerator.unwrap_model(model), run_dir / "checkpoints" / "best" / "model.safetensors")
    final_report(accelerator, model, data, cfg, run_dir, run_dir)
    teardown(accelerator, model, optimizer)
    return run_dir


def make_train_loader(dataset: ImageDataset, cfg: dict[str, Any], rank: int = 0, world: int = 1) -> DataLoader:
    """The training loader of process ``rank`` out of ``world``: its share of each epoch's seeded order."""
    batch_size, workers = cfg["train"]["batch_size"], cfg["data"]["num_workers"]
    sampler = EpochSampler(len(dataset), batch_size, cfg["seed"], rank, world)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_skipping_bad,
        pin_memory=has_accelerator(), persistent_workers=workers > 0,
    )


def train_one_epoch(
    accelerator: Accelerator, model: torch.nn.Module, criterion: ABNLoss, optimizer: torch.optim.Optimizer,
    loader: DataLoader, cfg: dict[str, Any], progress: Progress, run_dir: Path, steps_per_epoch: int,
) -> None:
    """Train on the rest of epoch ``progress.epochs_done``; losses (averaged over processes) are summed
    into ``progress.loss_sums``. With train.checkpoint_every_steps, checkpoints/last is also saved mid-epoch."""
    model.train()
    epoch, t = progress.epochs_done, cfg["train"]
    total = loader.sampler.batches_per_process
    loader.sampler.set_epoch(epoch, skip_batches=progress.batches_done)
    sums = torch.tensor(progress.loss_sums, dtype=torch.float32, device=accelerator.device)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", initial=progress.batches_done, total=total,
               disable=not accelerator.is_main_process, leave=False)
    for batch in bar:
        progress.skipped_images += batch["skipped"]
        boundary = (progress.batches_done + 1) % t["grad_accum_steps"] == 0 or progress.batches_done + 1 == total
        for group in optimizer.param_groups:
            group["lr"] = t["lr"] * lr_factor(progress.step, steps_per_epoch, cfg)
        losses = _forward_backward(accelerator, model, criterion, batch, cfg, boundary, f"e{epoch + 1}b{progress.batches_done + 1}")
        if losses is not None:
            sums += losses
        else:
            _skip_or_stop(accelerator, optimizer, cfg, f"epoch {epoch + 1}, batch {progress.batches_done + 1}")
        if boundary:
            if losses is not None:
                _optimizer_step(accelerator, model, optimizer, cfg)
            progress.step += 1
        progress.batches_done += 1
        crash_point(f"e{epoch + 1}b{progress.batches_done}")
        every = t["checkpoint_every_steps"]
        if boundary and every > 0 and progress.step % every == 0 and progress.batches_done < total:
            progress.loss_sums = sums.tolist()
            save_training_state(accelerator, model, optimizer, progress, run_dir)
    progress.loss_sums = sums.tolist()


def _forward_backward(
    accelerator: Accelerator, model: torch.nn.Module, criterion: ABNLoss, batch: dict[str, Any], cfg: dict[str, Any],
    boundary: bool, where: str,
) -> torch.Tensor | None:
    """Backward pass of one batch; returns (loss, loss_att, loss_per, 1) averaged over processes, or
    None (nothing backpropagated) when the loss is non-finite on any process."""
    if "image" not in batch:  # every image of the batch was skipped as undecodable: nothing to count
        if accelerator.num_processes > 1:  # the other processes would wait for this one's gradients forever
            raise DataError(f"every image of a training batch failed to decode ({', '.join(batch['skipped'])}); "
                            "data.on_bad_image=skip on several processes needs a decodable image in every batch")
        return torch.zeros(4, device=accelerator.device)
    images, targets = model_input(batch["image"], cfg["data"], accelerator.device, cfg["model"]["channels_last"]), batch["target"].to(accelerator.device)
    with contextlib.nullcontext() if boundary else accelerator.no_sync(model):
        with accelerator.autocast():
            out = model(images)
        losses = criterion(out, targets)
        if os.environ.get(FAULT_ENV) == where:
            losses["loss"] = losses["loss"] * float("nan")
        values = torch.stack([losses[k].detach().float() for k in ("loss", "loss_att", "loss_per")] + [torch.ones((), device=images.device)])
        values = accelerator.reduce(values, reduction="mean")  # the same decision on every process
        if not torch.isfinite(values).all():
            return None
        accelerator.backward(losses["loss"] / cfg["train"]["grad_accum_steps"])
    return values


def _skip_or_stop(accelerator: Accelerator, optimizer: torch.optim.Optimizer, cfg: dict[str, Any], where: str) -> None:
    """A non-finite loss: stop before anything is saved over checkpoints/last, or drop this step's gradients."""
    if cfg["train"]["on_nonfinite"] == "stop":
        raise NumericalError(f"non-finite loss at {where}: stopped; checkpoints/last still holds the last good state "
                             "(lower train.lr, set train.grad_clip, or train.on_nonfinite=skip)")
    optimizer.zero_grad(set_to_none=True)
    if accelerator.is_main_process:
        print(f"non-finite loss at {where}: step skipped (train.on_nonfinite=skip)")


def _optimizer_step(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: dict[str, Any]) -> None:
    if cfg["train"]["grad_clip"] > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg["train"]["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _finish_epoch(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
    val: dict[str, float], metric: str, cfg: dict[str, Any], run_dir: Path, writer: Any, keep_last: bool = False,
) -> None:
    """Record the epoch's row, keep the best weights (every epoch's when ``keep_last``: validation data was
    trained on), rewrite metrics.csv whole, save checkpoints/last."""
    loss, loss_att, loss_per, counted = progress.loss_sums
    counted = max(1.0, counted)
    row = {"epoch": progress.epochs_done + 1, "loss": loss / counted, "loss_att": loss_att / counted, "loss_per": loss_per / counted,
           "lr": optimizer.param_groups[0]["lr"]} | {f"val_{k}": float(v) for k, v in val.items()}
    progress.rows.append(row)
    progress.epochs_done, progress.batches_done, progress.loss_sums = progress.epochs_done + 1, 0, [0.0] * 4
    score = val[metric]
    better = score > progress.best_value or keep_last
    if accelerator.is_main_process:
        if better:
            save_best_weights(accelerator.unwrap_model(model), run_dir, {"epoch": progress.epochs_done, metric: score})
        atomic_write_text(run_dir / "metrics.csv", csv_text(progress.rows))
        if writer is not None:
            for key, value in row.items():
                writer.add_scalar(key, value, progress.epochs_done)
        print(f"epoch {progress.epochs_done}/{cfg['train']['epochs']}: loss {row['loss']:.4f}, val {metric} {score:.4f}")
    if better:
        progress.best_value, progress.best_epoch = score, progress.epochs_done
    save_training_state(accelerator, model, optimizer, progress, run_dir)


def csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _report_skipped(accelerator: Accelerator, progress: Progress) -> None:
    skipped = progress.skipped_images
    if accelerator.num_processes > 1:
        skipped = gather_object(skipped)
    skipped = sorted(set(skipped))
    if skipped and accelerator.is_main_process:
        print(f"data.on_bad_image=skip: skipped {len(skipped)} undecodable image(s): {', '.join(skipped[:20])}"
              + (" ..." if len(skipped) > 20 else ""))


def check_ranks_agree(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """After training on several processes: every rank must hold the same weights (per-tensor checksums)."""
    if accelerator.num_processes == 1:
        return
    sums = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(model).state_dict().values()])
    gathered = accelerator.gather(sums[None].to(accelerator.device))
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError("the processes' model weights differ after training (DDP lost synchronisation)")


def teardown(accelerator: Accelerator, *objects: Any) -> None:
    """Release prepared objects before ending: otherwise gloo sometimes aborts at exit (see ecosystem notes)."""
    accelerator.free_memory(*objects)
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _resume(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: dict[str, Any], run_dir: Path) -> Progress:
    if accelerator.is_main_process:  # put back a checkpoint a crash left half-swapped
        recover_dir(run_dir / "checkpoints" / "best")
        recover_dir(run_dir / "checkpoints" / "last")
    accelerator.wait_for_everyone()
    directory = _resume_path(cfg, run_dir)
    if directory is None:
        return Progress()
    progress = load_training_state(accelerator, model, optimizer, directory)
    if accelerator.is_main_process:
        print(f"resumed from {directory} after epoch {progress.epochs_done}, batch {progress.batches_done}")
    return progress


def _resume_path(cfg: dict[str, Any], run_dir: Path) -> Path | None:
    resume = cfg["train"]["resume"]
    if resume in (None, "", "null"):
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last"
        return last if is_complete(last) else None
    path = Path(resume)
    if not is_complete(path):
        raise ConfigError(f"train.resume: {resume} is not a complete checkpoint directory (expected e.g. RUN/checkpoints/last)")
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
    loader = accelerator.prepare(make_loader(dataset, cfg))
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


def write_run_info(accelerator: Accelerator, out_dir: Path, **extra: Any) -> None:
    """out_dir/run_info.json (main process): processes, device, precision, versions, commit, plus ``extra``."""
    if accelerator.is_main_process:
        atomic_write_text(Path(out_dir) / "run_info.json", json.dumps(run_info(accelerator) | extra, indent=2) + "\n")


def run_from_checkpoint(
    task: Task, checkpoint: str, config_file: str | None, overrides: list[str]
) -> tuple[dict[str, Any], Path, Path, Path]:
    """For eval/explain: (config, run directory, weights file, output directory) of ``--checkpoint``
    (a run directory or a weights file inside one). The run's own config.yaml is the base; results go
    to ``output_dir`` when it is overridden, else into the run directory."""
    run_dir, weights = find_weights(checkpoint)
    cfg = config_lib.load_config(task.name, config_file or run_dir / "config.yaml", overrides)
    out_dir = Path(cfg["output_dir"]) if any(o.startswith("output_dir=") for o in overrides) else run_dir
    cfg["output_dir"] = str(out_dir)
    return cfg, run_dir, weights, out_dir


def evaluate_checkpoint(task: Task, checkpoint: str, config_file: str | None, overrides: list[str]) -> Path:
    """``eval``: the run's config (plus overrides) and best weights, evaluated on test data."""
    cfg, run_dir, weights, out_dir = run_from_checkpoint(task, checkpoint, config_file, overrides)
    accelerator = make_accelerator(cfg)
    with accelerator.main_process_first():
        data = task.build_data(cfg)
    model = model_from_cfg(cfg, data, pretrained=False)
    load_weights(model, weights)
    model = accelerator.prepare(model)
    write_run_info(accelerator, out_dir, checkpoint=str(weights))
    final_report(accelerator, model, data, cfg, run_dir, out_dir)
    teardown(accelerator, model)
    return out_dir
