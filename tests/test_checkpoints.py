"""Crash-safe files: a checkpoint directory interrupted at any step of its write is recovered whole."""
import math

import pytest

from abn_core.checkpoints import Progress
from abn_core.files import atomic_write_text, is_complete, recover_dir, write_dir


class Killed(Exception):
    """Stands in for the process dying at a phase of the write."""


def _write(final, version, die_at=None):
    def fill(directory):
        (directory / "weights.bin").write_text(version)

    def hook(phase):
        if phase == die_at:
            raise Killed(phase)

    write_dir(final, fill, hook)


@pytest.mark.parametrize("die_at, survivor", [("filled", "old"), ("marked", "old"), ("moved_old", "new"), ("swapped", "new")])
def test_interrupted_directory_swap_recovers_a_complete_copy(tmp_path, die_at, survivor):
    final = tmp_path / "last"
    _write(final, "old")
    with pytest.raises(Killed):
        _write(final, "new", die_at)
    assert recover_dir(final) == final
    assert is_complete(final) and (final / "weights.bin").read_text() == survivor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # leftovers removed


def test_incomplete_directory_alone_is_not_resumable(tmp_path):
    final = tmp_path / "last"
    with pytest.raises(Killed):
        _write(final, "first", "filled")
    assert recover_dir(final) is None and not final.exists()


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "a\n")
    atomic_write_text(target, "b\n")
    assert target.read_text() == "b\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_progress_round_trips_through_json_exactly():
    progress = Progress(epochs_done=2, batches_done=1, step=7, rows=[{"epoch": 1, "loss": 0.1 + 0.2}], loss_sums=[1 / 3, 0.0, 2.5, 1.0])
    again = Progress.from_json(progress.to_json())
    assert again == progress and math.isinf(Progress.from_json(Progress().to_json()).best_value)
