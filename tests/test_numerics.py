"""A non-finite loss stops the run without saving over the last good checkpoint, or skips the step."""
import json
import math

import pandas as pd
import pytest
from runs import TINY
from safetensors.torch import load_file
from single_thread import one_thread  # noqa: F401

from abn_core.cli import run
from abn_core.engine import FAULT_ENV
from tasks import classification

ARGS = ["train.epochs=2", "train.checkpoint_every_steps=1", *TINY]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "e2b2")
    out = tmp_path / "run"
    assert run(classification.TASK, ["train", f"output_dir={out}", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: non-finite loss at epoch 2, batch 2")
    progress = json.loads((out / "checkpoints/last/progress.json").read_text())
    assert (progress["epochs_done"], progress["batches_done"]) == (1, 1)  # saved before the fault, nothing after
    weights = load_file(str(out / "checkpoints/last/model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())
    assert not (out / "results").exists()


@pytest.mark.slow
def test_non_finite_loss_can_skip_the_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "e1b2")
    out = tmp_path / "run"
    assert run(classification.TASK, ["train", f"output_dir={out}", "train.on_nonfinite=skip", *ARGS]) == 0
    assert "non-finite loss at epoch 1, batch 2: step skipped" in capsys.readouterr().out
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2] and all(math.isfinite(v) for v in metrics["loss"])
