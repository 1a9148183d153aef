import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory):
    """Demo data built once per test session, away from the user's cache."""
    cache = tmp_path_factory.mktemp("abn-cache")
    os.environ["ABN_SUITE_CACHE"] = str(cache)
    return cache


TINY_RUN = ["model.backbone=cifar_resnet20", "data.image_size=32", "data.resize_size=32", "data.max_per_split=32",
            "train.batch_size=16", "eval.batch_size=32", "eval.max_attention_images=4", "data.num_workers=0"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, demo_cache):
    """One tiny classification run on the demo data, shared by the explain/report/CAM tests."""
    from abn_core.cli import run
    from tasks import classification

    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert run(classification.TASK, ["train", f"output_dir={out}", "train.epochs=1", *TINY_RUN]) == 0
    return out
