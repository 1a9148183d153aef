"""Generic image classification with ABN: ``python -m tasks.classification data.root=DIR``.

DIR is an image folder (root/<class>/*, or root/{train,val,test}/<class>/*), a prepared dataset
with manifest.csv, or ``demo``.
"""
from __future__ import annotations

import sys

from abn_core.cli import run
from abn_core.task import Task
from tasks.common import single_label_data

TASK = Task(
    name="classification",
    build_data=single_label_data,
    demo_note="For your own data: data.root=/path/to/imagefolder (root/<class>/<image> or root/{train,val,test}/<class>/<image>).",
)

if __name__ == "__main__":
    sys.exit(run(TASK))
