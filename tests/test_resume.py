"""A run SIGKILLed at chosen moments (mid-epoch, inside a checkpoint write) and resumed with
train.resume=auto ends bit-identical to an uninterrupted run."""
import json
import signal

import pytest
from runs import TINY, assert_same_results, finished_run, run_cli

ARGS = ["train.epochs=2", "train.checkpoint_every_steps=1", "data.min_scale=0.3", *TINY]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("baseline") / "run", ARGS)


def _crash_then_resume(out, crash_at, resume_args=()):
    crashed = run_cli([f"output_dir={out}", *ARGS], env={"ABN_SUITE_CRASH_AT": crash_at})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr  # the hook fired: the run really died there
    resumed = run_cli([f"output_dir={out}", *ARGS, *resume_args])
    assert resumed.returncode == 0, resumed.stderr
    return resumed.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "crash_at, resumed_at, resume_args",
    [
        ("e2b3", "after epoch 1, batch 2", []),  # mid-epoch: the batches already seen are skipped
        ("save-1.0-moved_old", "after epoch 1, batch 0", []),  # inside the swap: last/ missing, last.tmp/ complete
        ("save-1.2-filled", "after epoch 1, batch 1", []),  # half-written last.tmp/: the previous checkpoint is used
        ("e2b2", "after epoch 1, batch 1", ["data.num_workers=2"]),  # augmentations do not depend on the workers
    ],
)
def test_killed_run_resumes_bit_identical(uninterrupted, tmp_path, crash_at, resumed_at, resume_args):
    out = tmp_path / "run"
    stdout = _crash_then_resume(out, crash_at, resume_args)
    assert f"resumed from {out / 'checkpoints' / 'last'} {resumed_at}" in stdout
    assert_same_results(uninterrupted, out)
    assert not (out / "checkpoints" / "last.tmp").exists() and not (out / "checkpoints" / "last.old").exists()
    assert json.loads((out / "checkpoints/last/progress.json").read_text())["epochs_done"] == 2
