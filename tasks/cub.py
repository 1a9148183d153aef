"""CUB-200-2011 fine-grained bird recognition with ABN: ``accelerate launch -m tasks.cub data.root=DIR``.

DIR is the output of ``python data_prep/cub.py --src CUB_200_2011.tgz --out DIR``. Its boxes and
part locations give the localisation scores (pointing_game, energy_in_box, pointing_game_parts).
Lighter head: ``--config configs/cub_light.yaml``; quick CPU check: ``--config configs/cub_smoke.yaml``.
"""
from __future__ import annotations

import sys

from abn_core.cli import run
from abn_core.task import Task
from tasks.common import single_label_data

TASK = Task(
    name="cub",
    build_data=single_label_data,
    demo_note="For CUB-200-2011: python data_prep/cub.py --src CUB_200_2011.tgz --out DIR, then data.root=DIR.",
)

if __name__ == "__main__":
    sys.exit(run(TASK))
