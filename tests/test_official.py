"""The authors' ABN checkpoints: key mapping, equivalence with their model, conversion, model.pretrained sources.

Official checkpoints are made here from the official key list (tests/data/official_abn_state_dict_keys.json,
a copy of shared/reference/) with random tensors of exactly those shapes; the authors' forward pass is
re-implemented independently in tests/official_reference.py.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_reference import official_abn_resnet  # noqa: E402
from single_thread import one_thread  # noqa: E402, F401  (autouse)

from abn_core import CheckpointError, build_model, load_official_checkpoint, load_pretrained, read_state_dict  # noqa: E402
from abn_core.checkpoints import save_best_weights  # noqa: E402
from abn_core.convert import main as convert_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEYS = json.loads((Path(__file__).resolve().parent / "data" / "official_abn_state_dict_keys.json").read_text())
ARCHS = ("resnet18", "resnet50")
# The official attention-branch modules and where our paper head keeps them (written out independently of
# abn_core.official); every other official key is spelled the same in our model.
EXPECTED_NAMES = {official: "attention_branch." + ours for official, ours in {
    "att_layer4": "stage", "bn_att": "bn_stage", "att_conv": "tail.conv_reduce", "bn_att2": "tail.bn_reduce",
    "att_conv3": "tail.conv_map", "bn_att3": "tail.bn_map", "att_conv2": "tail.conv_logits"}.items()}


def ours(official_key: str) -> str:
    module, rest = official_key.split(".", 1)
    return f"{EXPECTED_NAMES.get(module, module)}.{rest}"


def random_official_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the official shapes, BN statistics calibrated so activations stay near unit scale
    (the attention map is then neither all 0 nor all 1, and the comparison means something)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in KEYS[arch].items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0, dtype=torch.int64)
        elif len(shape) > 1:  # conv / fc weights, He-scaled
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith((".weight", "running_var")):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    with torch.device("meta"):
        ref = official_abn_resnet(arch)
    ref.load_state_dict(state, assign=True)
    for module in ref.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0  # running statistics := this batch's
    with torch.no_grad():
        ref.train()(torch.randn(4, 3, 64, 64, generator=g))
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    for key in state:
        if key.endswith("num_batches_tracked"):  # distinct values, so a misplaced counter is noticed
            state[key] = torch.randint(1, 10**6, (), generator=g, dtype=torch.int64)
    return state


def save_official(state: dict[str, torch.Tensor], path: Path, **torch_save_kwargs) -> Path:
    """As the authors' training script saves: DataParallel names inside {'state_dict': ...} plus training state."""
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "momentum": 0.9, "weight_decay": 1e-4, "params": list(range(5))}]}
    checkpoint = {
        "epoch": 90, "arch": "resnet", "best_prec1": torch.tensor(76.9), "optimizer": optimizer,
        "state_dict": {"module." + k: v for k, v in state.items()},
    }
    torch.save(checkpoint, path, **torch_save_kwargs)
    return path


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """official(arch) -> (official state dict, path of a checkpoint saved the authors' way), made once."""
    made = {}

    def get(arch: str):
        if arch not in made:
            state = random_official_state(arch, seed=ARCHS.index(arch))
            made[arch] = state, save_official(state, tmp_path_factory.mktemp(arch) / "model_best.pth.tar")
        return made[arch]

    return get


@pytest.fixture(scope="module")
def resnet18():
    """One 1000-class resnet18 paper ABN for the error cases (a refused load changes nothing)."""
    return build_model("resnet18", 1000, attention="paper")


def assert_holds(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every official tensor sits, unchanged, at its expected place in the model, and nothing else is there."""
    own = model.state_dict()
    assert sorted(own) == sorted(ours(k) for k in state)
    for key, value in state.items():
        assert own[ours(key)].dtype == value.dtype, key
        assert torch.equal(own[ours(key)], value), f"{key} did not land in {ours(key)}"


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_model_has_the_official_keys_and_shapes(arch):
    with torch.device("meta"):
        ref = official_abn_resnet(arch)
    assert {k: list(v.shape) for k, v in ref.state_dict().items()} == KEYS[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_official_tensor_lands_where_it_belongs_and_outputs_match(arch, official):
    state, path = official(arch)
    model = build_model(arch, 1000, attention="paper")
    report = load_official_checkpoint(model, path)
    assert_holds(model, state)
    assert len(report["loaded"]) == len(KEYS[arch]) and report["defaulted"] == []
    assert report["renamed"] == {k: ours(k) for k in state if k.split(".")[0] in EXPECTED_NAMES}

    # The authors' forward pass with the same weights gives the same logits, attention logits and map.
    ref = official_abn_resnet(arch)
    ref.load_state_dict(state)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref_att_logits, ref_logits, (ref_attention, _, _) = ref.eval()(images)
        out = model.eval()(images)
    assert 0.05 < ref_attention.mean() < 0.95 and ref_attention.std() > 0.01  # not a saturated map
    assert ref_logits.shape == out.logits.shape == (2, 1000)
    assert ref_attention.shape == out.attention.shape == (2, 1, 4, 4)
    for name, mine, theirs in (("logits", out.logits, ref_logits), ("att_logits", out.att_logits, ref_att_logits),
                               ("attention", out.attention, ref_attention)):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()), msg=name)


def test_bare_state_dicts_and_pytorch_0_4_era_files_load(official, resnet18, tmp_path):
    state, _ = official("resnet18")
    bare = tmp_path / "bare.pth"
    torch.save(state, bare)
    load_official_checkpoint(resnet18, bare)
    assert_holds(resnet18, state)

    # Old serialization with a numpy best_prec1 as numpy 1.x names it, and no num_batches_tracked
    # (PyTorch 0.4.0 had none): still read weights-only, the counters keep the model's values.
    resnet18.load_state_dict({k: torch.zeros_like(v) for k, v in resnet18.state_dict().items()})
    np = pytest.importorskip("numpy")
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    old = tmp_path / "old.pth.tar"
    torch.save({"state_dict": {"module." + k: v for k, v in no_counters.items()}, "best_prec1": np.float64(76.9), "epoch": 90},
               old, _use_new_zipfile_serialization=False, pickle_protocol=2)
    old.write_bytes(old.read_bytes().replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))
    report = load_official_checkpoint(resnet18, old)
    assert report["defaulted"] == sorted(ours(k) for k in state if k.endswith("num_batches_tracked"))
    own = resnet18.state_dict()
    assert all(torch.equal(own[ours(k)], v) for k, v in no_counters.items())


def _edited(state, drop=(), add=None, reshape=None):
    edited = {k: v for k, v in state.items() if k not in drop} | (add or {})
    if reshape:
        edited[reshape] = torch.zeros(tuple(state[reshape].shape) + (2,))
    return edited


@pytest.mark.parametrize(
    "edit, named",
    [
        (dict(drop=["att_conv2.weight"]), ["missing", "att_conv2.weight", "attention_branch.tail.conv_logits.weight"]),
        (dict(drop=["layer4.1.bn2.running_var"]), ["missing", "layer4.1.bn2.running_var"]),
        (dict(add={"att_extra.weight": torch.zeros(3)}), ["unexpected", "att_extra.weight"]),
        (dict(reshape="bn_att3.weight"), ["wrong shape", "bn_att3.weight", "(1, 2)"]),
    ],
    ids=["missing-head-key", "missing-backbone-key", "extra-key", "wrong-shape"],
)
def test_mismatches_are_refused_naming_the_keys(edit, named, official, resnet18, tmp_path):
    state, _ = official("resnet18")
    before = {k: v.clone() for k, v in resnet18.state_dict().items()}
    path = save_official(_edited(state, **edit), tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(resnet18, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for text in named:
        assert text in message
    assert all(torch.equal(v, before[k]) for k, v in resnet18.state_dict().items())  # nothing loaded


def test_wrong_model_is_refused(official):
    _, path = official("resnet18")
    with pytest.raises(CheckpointError, match=r"fc\.weight \(1000, 512\) vs model \(10, 512\).*num_classes=1000"):
        load_official_checkpoint(build_model("resnet18", 10), path)
    with pytest.raises(CheckpointError, match="attention='paper'"):
        load_official_checkpoint(build_model("resnet18", 1000, attention="light"), path)


def test_untrusted_or_broken_files_are_refused(tmp_path, capfd):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    crafted = tmp_path / "crafted.pth"
    torch.save({"state_dict": {"conv1.weight": Payload()}}, crafted)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    model = build_model("cifar_resnet20", 10)
    for path in (crafted, garbage, tmp_path / "absent.pth"):
        with pytest.raises(CheckpointError, match=str(path.name)):
            load_official_checkpoint(model, path)
    assert "code ran" not in capfd.readouterr().out


def test_convert_cli_writes_what_model_pretrained_reads(official, tmp_path, capsys):
    state, path = official("resnet18")
    out = tmp_path / "converted" / "abn_resnet18.safetensors"
    assert convert_main(["--official", str(path), "--backbone", "resnet18", "--num-classes", "1000", "--out", str(out)]) == 0
    assert "model.pretrained=" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["source"] == str(path)
    assert sorted(read_state_dict(out)) == sorted(ours(k) for k in state)

    model = build_model("resnet18", 1000, pretrained=str(out))  # what model.pretrained=OUT does
    assert_holds(model, state)
    report = load_pretrained(build_model("resnet18", 1000), "resnet18", str(out))
    assert report["new"] == [] and report["shape_mismatch"] == [] and report["from_last_stage"] == []
    assert "newly initialised: none" in capsys.readouterr().out

    # --num-classes defaults to the checkpoint's
    again = tmp_path / "again.safetensors"
    assert convert_main(["--official", str(path), "--backbone", "resnet18", "--out", str(again)]) == 0
    assert read_state_dict(again)["fc.weight"].shape == (1000, 512)


@pytest.mark.parametrize(
    "args, out_name, expected",
    [
        (["--backbone", "resnet18", "--num-classes", "10"], "out.safetensors", "fc.weight (1000, 512) vs model (10, 512)"),
        (["--backbone", "resnet50"], "out.safetensors", "fc.weight (1000, 512) vs model (1000, 2048): the checkpoint is for another backbone"),
        (["--backbone", "resnet34"], "out.safetensors", "the checkpoint is for another backbone; missing: att_layer4.2.bn1.bias"),
        (["--backbone", "resnet18"], "out.pth", ".safetensors"),
        (["--backbone", "resnet9000"], "out.safetensors", "resnet9000"),
    ],
    ids=["classes", "architecture", "depth", "out-suffix", "backbone"],
)
def test_convert_cli_errors_are_one_line(args, out_name, expected, official, tmp_path, capsys):
    _, path = official("resnet18")
    out = tmp_path / out_name
    assert convert_main(["--official", str(path), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err
    assert not out.exists()


def test_convert_module_reports_a_missing_file_without_traceback(tmp_path):
    absent = tmp_path / "absent.pth.tar"
    proc = subprocess.run(
        [sys.executable, "-m", "abn_core.convert", "--official", str(absent), "--backbone", "resnet50", "--out", str(tmp_path / "o.safetensors")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: ") and str(absent) in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_model_pretrained_takes_official_checkpoints_directly(official):
    """The raw official file as model.pretrained: mapped, not silently ignored; another class count keeps
    the backbone and the attention stage from the file and starts the class-sized layers afresh."""
    state, path = official("resnet18")
    report = load_pretrained(build_model("resnet18", 1000), "resnet18", str(path))
    assert report["new"] == [] and len(report["loaded"]) == len(state)

    model = build_model("resnet18", 10)
    report = load_pretrained(model, "resnet18", str(path))
    own = model.state_dict()
    class_sized = {"fc.weight", "fc.bias", "attention_branch.tail.conv_reduce.weight", "attention_branch.tail.conv_logits.weight",
                   "attention_branch.tail.conv_map.weight"} | {f"attention_branch.tail.bn_reduce.{s}" for s in
                                                               ("weight", "bias", "running_mean", "running_var")}
    assert set(report["new"]) == class_sized
    assert len(report["shape_mismatch"]) == len(class_sized)
    assert report["from_last_stage"] == []
    for key in ("att_layer4.1.conv2.weight", "bn_att.running_var", "bn_att3.weight", "layer3.0.conv1.weight"):
        assert torch.equal(own[ours(key)], state[key])


def test_model_pretrained_takes_our_run_checkpoints(tmp_path):
    trained = build_model("cifar_resnet20", 7, multi_label=True)
    with torch.no_grad():
        for value in trained.state_dict().values():
            value.copy_(torch.randint_like(value, 1, 100) if value.dtype == torch.int64 else torch.randn_like(value))
    save_best_weights(trained, tmp_path / "run", {"epoch": 3})
    fresh = build_model("cifar_resnet20", 7, multi_label=True)
    report = load_pretrained(fresh, "cifar_resnet20", str(tmp_path / "run" / "checkpoints" / "best" / "model.safetensors"))
    assert report["new"] == [] and report["from_last_stage"] == []
    expected = trained.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in fresh.state_dict().items())


def test_model_pretrained_reports_what_a_torchvision_state_dict_leaves_new(tmp_path, capsys):
    torchvision_model = torchvision.models.resnet18(weights=None)  # 1000 classes
    path = tmp_path / "resnet18_torchvision.pth"
    torch.save(torchvision_model.state_dict(), path)
    model = build_model("resnet18", 10)
    report = load_pretrained(model, "resnet18", str(path))
    tv, own = torchvision_model.state_dict(), model.state_dict()
    stage = [k for k in own if k.startswith("attention_branch.stage.")]
    assert report["from_last_stage"] == sorted(stage)
    for key in stage:  # the attention stage copy starts from layer4's weights
        assert torch.equal(own[key], tv["layer4." + key.removeprefix("attention_branch.stage.")])
    assert set(report["new"]) == {k for k in own if k.startswith(("fc.", "attention_branch.bn_stage.", "attention_branch.tail."))}
    assert sorted(m.split()[0] for m in report["shape_mismatch"]) == ["fc.bias", "fc.weight"]
    printed = capsys.readouterr().out
    assert "newly initialised: attention_branch, fc" in printed and "attention_branch.stage initialised from layer4" in printed
