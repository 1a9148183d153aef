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
