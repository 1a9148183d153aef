"""What a task plugin tells the engine: its data and whether it is multi-label."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .data import ImageDataset


@dataclass
class TaskData:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset | None
    class_names: list[str]  # classes, or attributes when multi_label
    multi_label: bool
    notes: list[str] = field(default_factory=list)  # printed at start, e.g. how the validation split was made
    select_last_epoch: bool = False  # val is part of training (data.train_on_trainval): keep the last epoch, not the best

    @property
    def selection_metric(self) -> str:
        return "mean_accuracy" if self.multi_label else "accuracy"


@dataclass(frozen=True)
class Task:
    name: str  # also the name of the default config, configs/<name>.yaml
    build_data: Callable[[dict[str, Any]], TaskData]
    demo_note: str = ""  # printed when a run uses the built-in demo data
