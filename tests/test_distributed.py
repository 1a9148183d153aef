"""Two CPU processes (gloo) launched by accelerate and by torchrun: synchronised training, evaluation
tables identical to one process (test set not a multiple of processes x batch), only rank 0 writes."""
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from runs import TINY, finished_run, run_cli

# 22 test images with eval batches of 4 on 2 processes: the last round is padded, the padding must not count.
ARGS = ["train.epochs=1", *TINY, "data.max_per_split=22", "eval.batch_size=4", "train.batch_size=4"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
ACCELERATE = [shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29518"]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    return finished_run(tmp_path_factory.mktemp("single") / "run", ARGS)


def _assert_clean_two_process_exit(result, out: Path):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr and "Traceback" not in result.stderr
    info = json.loads((out / "run_info.json").read_text())
    assert info["num_processes"] == 2 and info["distributed_type"] == "DistributedType.MULTI_CPU"
    assert result.stdout.count("results written to") == 1  # only the main process prints (and writes)


@pytest.mark.slow
def test_torchrun_eval_on_two_processes_gives_the_single_process_tables(single_process_run, tmp_path):
    out = tmp_path / "eval2"
    result = run_cli(["eval", "--checkpoint", str(single_process_run), f"output_dir={out}", "eval.batch_size=4"], launcher=TORCHRUN)
    _assert_clean_two_process_exit(result, out)
    for table in ("test_summary.csv", "test_per_class.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / "results" / table), pd.read_csv(single_process_run / "results" / table))
    assert pd.read_csv(out / "results/test_per_class.csv")["support"].sum() == 22


@pytest.mark.slow
def test_accelerate_launch_trains_two_synchronised_processes(tmp_path):
    out = tmp_path / "train2"
    result = run_cli([f"output_dir={out}", *ARGS], launcher=ACCELERATE)
    # The run checks itself that both ranks end with identical weights (it fails otherwise).
    _assert_clean_two_process_exit(result, out)
    assert "2 process(es) on cpu" in result.stdout
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "last"]
