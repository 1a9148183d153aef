"""CelebA 40-attribute recognition with one attention map per attribute: ``accelerate launch -m tasks.celeba``.

With no data configured it trains on the multi-label demo data. For CelebA:
``python data_prep/celeba.py --src PATH --out DIR`` then ``data.root=DIR``.
"""
from __future__ import annotations

import sys

from abn_core.cli import run
from abn_core.task import Task
from tasks.common import multi_label_data

TASK = Task(
    name="celeba",
    build_data=multi_label_data,
    demo_note="For CelebA: python data_prep/celeba.py --src PATH --out DIR, then data.root=DIR.",
)

if __name__ == "__main__":
    sys.exit(run(TASK))
