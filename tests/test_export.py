"""python -m abn_core.export: run directory -> TorchScript / ONNX with logits, att_logits, attention outputs.

The exported models run on another batch size than the export example (2) and must give what the
PyTorch model gives. ONNX tests need the optional extra (pip install "abn-suite[export]") and skip without it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from single_thread import one_thread  # noqa: E402, F401  (autouse)

from abn_core import build_model  # noqa: E402
from abn_core.checkpoints import save_best_weights  # noqa: E402
from abn_core.export import EXAMPLE_BATCH, main as export_main  # noqa: E402

MODELS = {  # name: (build_model keyword arguments, image size)
    "single-paper": (dict(backbone="cifar_resnet20", num_classes=5, attention="paper"), 32),
    "multi-paper-per-attribute": (
        dict(backbone="cifar_resnet20", num_classes=4, multi_label=True, attention="paper", perception="per_attribute",
             perception_chunk=3), 32),
    "multi-light-shared": (dict(backbone="resnet18", num_classes=3, multi_label=True, attention="light", attention_width=16), 64),
}
BATCH = 3
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
assert BATCH != EXAMPLE_BATCH


def make_run(root: Path, name: str) -> Path:
    """A run directory as training leaves it (config.yaml, checkpoints/best/) with random weights and BN statistics."""
    kwargs, size = MODELS[name]
    torch.manual_seed(0)
    model = build_model(**kwargs)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("running_var"):
                value.uniform_(0.5, 1.5)
            elif key.endswith(("running_mean", "bias")):
                value.normal_(0, 0.1)
    run = root / name
    save_best_weights(model, run, {"epoch": 1})
    model_cfg = {k: v for k, v in kwargs.items() if k not in ("num_classes", "multi_label")} | {"pretrained": None}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model_cfg, "data": {"image_size": size}}))
    return run


def expected_outputs(run: Path, name: str, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What the PyTorch model gives, rebuilt here from the test's own description of the run."""
    model = build_model(**MODELS[name][0])
    model.load_state_dict(load_file(str(run / "checkpoints" / "best" / "model.safetensors")))
    with torch.no_grad():
        return tuple(model.eval()(images))


def images_for(name: str, batch: int = BATCH) -> torch.Tensor:
    size = MODELS[name][1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def assert_same(got, expected) -> None:
    assert len(got) == 3
    for label, mine, theirs in zip(("logits", "att_logits", "attention"), got, expected):
        torch.testing.assert_close(torch.as_tensor(mine), theirs, rtol=1e-4, atol=1e-5, msg=label)


@pytest.mark.parametrize("name", list(MODELS))
def test_torchscript_export_runs_any_batch_size(name, tmp_path, capsys):
    run = make_run(tmp_path, name)
    out = tmp_path / "exported" / "model.pt"
    assert export_main(["--checkpoint", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert "outputs logits, att_logits, attention" in capsys.readouterr().out
    loaded = torch.jit.load(str(out))
    for batch in (BATCH, 1):
        images = images_for(name, batch)
        with torch.no_grad():
            assert_same(loaded(images), expected_outputs(run, name, images))
    assert loaded(images_for(name))[2].shape[:2] == (BATCH, MODELS[name][0]["num_classes"] if "multi" in name else 1)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(name, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    run = make_run(tmp_path, name)
    out = tmp_path / "model.onnx"
    assert export_main(["--checkpoint", str(run), "--format", "onnx", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "att_logits", "attention"]
    (images_input,) = session.get_inputs()
    assert images_input.name == "images" and isinstance(images_input.shape[0], str)  # symbolic batch axis
    images = images_for(name)
    assert_same(session.run(None, {"images": images.numpy()}), expected_outputs(run, name, images))


def test_checkpoint_file_and_image_size_option(tmp_path):
    run = make_run(tmp_path, "single-paper")
    out = tmp_path / "model.pt"
    weights = run / "checkpoints" / "best" / "model.safetensors"
    assert export_main(["--checkpoint", str(weights), "--format", "torchscript", "--out", str(out), "--image-size", "40"]) == 0
    images = torch.randn(BATCH, 3, 40, 40)
    with torch.no_grad():
        got = torch.jit.load(str(out))(images)
    assert got[2].shape == (BATCH, 1, 20, 20)
    assert_same(got, expected_outputs(run, "single-paper", images))


def test_onnx_without_the_extra_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    run = make_run(tmp_path, "single-paper")
    out = tmp_path / "model.onnx"
    assert export_main(["--checkpoint", str(run), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "abn-suite[export]" in err
    assert not out.exists()


@pytest.mark.parametrize("problem", ["no-config", "no-model-section", "weights-of-another-model"])
def test_unusable_runs_are_one_line_errors(problem, tmp_path, capsys):
    run = make_run(tmp_path, "single-paper")
    expected = {"no-config": "config.yaml", "no-model-section": "model.backbone", "weights-of-another-model": "does not fit"}[problem]
    if problem == "no-config":
        (run / "config.yaml").unlink()
    elif problem == "no-model-section":
        (run / "config.yaml").write_text(yaml.safe_dump({"data": {"image_size": 32}}))
    else:  # the config names another backbone than the weights were trained with
        (run / "config.yaml").write_text(yaml.safe_dump({"model": {"backbone": "cifar_resnet32"}}))
    out = tmp_path / "model.pt"
    assert export_main(["--checkpoint", str(run), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err
    assert not out.exists()

