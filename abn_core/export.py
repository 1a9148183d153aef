"""Export a trained ABN as ONNX or TorchScript, with outputs ``logits``, ``att_logits`` and ``attention``.

    python -m abn_core.export --checkpoint RUN --format onnx|torchscript --out FILE [--image-size N]

RUN is a run directory or a checkpoint inside it. The model is rebuilt from the run's config.yaml
(``model.backbone``, ``attention``, ``perception``, ``attention_width``, ``perception_chunk``); the
number of classes comes from the weights (rows of ``fc.weight``), multi-label from the number of
attention maps (> 1). Input ``images``: N x 3 x S x S, normalised as in training, S fixed at export
(default ``data.image_size``), N dynamic. ONNX needs the optional extra: pip install "abn-suite[export]".
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from .checkpoints import find_weights, load_weights
from .config import read_yaml
from .convert import exit_status
from .errors import CheckpointError, ConfigError, UserError
from .model import ABN, build_model
from .weights import read_state_dict

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "att_logits", "attention")
EXAMPLE_BATCH = 2  # the exported graph takes any batch size


class ExportedABN(nn.Module):
    """ABN returning a plain tuple (logits, att_logits, attention) instead of ABNOutput."""

    def __init__(self, model: ABN):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.logits, out.att_logits, out.attention


def model_from_run(checkpoint: str | Path) -> tuple[ABN, dict[str, Any]]:
    """The run's model in eval mode, with its best weights, and the run's config."""
    run_dir, weights = find_weights(checkpoint)
    cfg = read_yaml(run_dir / "config.yaml")
    m = cfg.get("model")
    if not isinstance(m, dict) or not m.get("backbone"):
        raise ConfigError(f"{run_dir / 'config.yaml'}: no model.backbone; is it a run's config?")
    state = read_state_dict(weights)
    fc, maps = state.get("fc.weight"), state.get("attention_branch.tail.bn_map.weight")
    if fc is None or maps is None:
        raise CheckpointError(f"{weights}: no fc.weight / attention_branch.tail.bn_map.weight to read the classes from")
    model = build_model(
        m["backbone"], fc.shape[0], attention=m.get("attention", "paper"), multi_label=maps.shape[0] > 1,
        perception=m.get("perception", "shared"), attention_width=m.get("attention_width", 256),
        perception_chunk=m.get("perception_chunk", 8),
    )
    load_weights(model, weights)
    return model.eval(), cfg


def export_model(checkpoint: str | Path, fmt: str, out: str | Path, image_size: int | None = None, opset: int = 17) -> Path:
    """Write the run's model to ``out`` as ``fmt`` (onnx or torchscript); returns ``out``."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch's exporter needs it)
        except ImportError:
            raise UserError('--format onnx needs the onnx package: pip install "abn-suite[export]" (or use --format torchscript)') from None
    model, cfg = model_from_run(checkpoint)
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    size = image_size or data.get("image_size") or 224
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"image size {size!r}: give a positive integer (--image-size)")
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot create its folder ({exc.strerror or exc})") from exc
    wrapper = ExportedABN(model).eval()
    example = torch.randn(EXAMPLE_BATCH, 3, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit and the TorchScript-based ONNX exporter are deprecated; tracing fixes the image size on purpose.
        for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapper, example), str(out))
        else:
            axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
            torch.onnx.export(
                wrapper, (example,), str(out), dynamo=False, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes, opset_version=opset,
            )
    kind = f"{model.num_maps} attention maps (multi-label)" if model.multi_label else "1 attention map"
    print(
        f"exported {checkpoint} ({cfg['model']['backbone']}, {model.fc.out_features} outputs, {kind}) to {out} as {fmt}: "
        f"input {INPUT_NAME} N x 3 x {size} x {size} (N dynamic), outputs {', '.join(OUTPUT_NAMES)}"
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m abn_core.export", description="Export a trained ABN as ONNX or TorchScript.")
    parser.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint inside it")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output file (.onnx or .pt)")
    parser.add_argument("--image-size", type=int, help="input side in pixels (default: the run's data.image_size)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    args = parser.parse_args(argv)
    return exit_status(lambda: export_model(args.checkpoint, args.format, args.out, args.image_size, args.opset), args.debug)


if __name__ == "__main__":
    sys.exit(main())
