"""Convert the authors' ABN checkpoint into a weights file the suite reads (``model.pretrained=OUT``).

    python -m abn_core.convert --official model_best.pth.tar --backbone resnet50 --num-classes 1000 --out abn_resnet50.safetensors

The checkpoint is read weights-only, mapped onto our names and checked key by key and shape by shape
(see abn_core.official); OUT is a safetensors file of our model's state dict.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from safetensors.torch import save_file

from .errors import CheckpointError, UserError
from .model import build_model
from .official import load_official_state
from .weights import read_state_dict


def exit_status(action: Callable[[], Any], debug: bool = False) -> int:
    """Run a command's ``action``: 0, or a UserError as one ``error: ...`` line on stderr and status 2."""
    try:
        action()
    except UserError as exc:
        if debug:
            raise
        text = str(exc).strip()
        print(f"error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


def convert_official(official: str | Path, backbone: str, out: str | Path, num_classes: int | None = None) -> dict[str, Any]:
    """Write the official checkpoint ``official`` as our ``backbone`` ABN's state dict to ``out`` (.safetensors).

    ``num_classes`` defaults to the checkpoint's (rows of ``fc.weight``). Returns the loading report.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: give a file name ending in .safetensors")
    state = read_state_dict(official)
    if num_classes is None:
        fc = state.get("fc.weight")
        if fc is None or fc.dim() != 2:
            raise CheckpointError(f"{official}: no fc.weight to read the number of classes from; give --num-classes")
        num_classes = fc.shape[0]
    model = build_model(backbone, num_classes, attention="paper")
    report = load_official_state(model, state, official)
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    metadata = {"source": str(official), "backbone": backbone, "num_classes": str(num_classes), "attention": "paper"}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out), metadata=metadata)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write ({exc.strerror or exc})") from exc
    print(
        f"converted {official}: {len(report['loaded'])} tensors ({len(report['renamed'])} renamed from the official "
        f"attention-branch names) -> {out}\nuse it with model.backbone={backbone} model.pretrained={out}"
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m abn_core.convert",
        description="Convert the authors' ABN checkpoint (ImageNet ABN-ResNet) into a safetensors file for model.pretrained.",
    )
    parser.add_argument("--official", required=True, help="the authors' checkpoint, e.g. model_best.pth.tar")
    parser.add_argument("--backbone", required=True, help="e.g. resnet50 (the checkpoint's architecture)")
    parser.add_argument("--num-classes", type=int, help="default: the checkpoint's (rows of fc.weight)")
    parser.add_argument("--out", required=True, help="output file, .safetensors")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = parser.parse_args(argv)
    return exit_status(lambda: convert_official(args.official, args.backbone, args.out, args.num_classes), args.debug)


if __name__ == "__main__":
    sys.exit(main())
