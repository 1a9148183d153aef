import subprocess
import sys

import pytest

from abn_core.cli import run
from abn_core.config import load_config
from abn_core.errors import ConfigError

from conftest import REPO
from tasks.classification import TASK


def test_defaults_task_yaml_and_overrides_layer():
    cfg = load_config("classification", overrides=["data.root=/data/x", "train.epochs=3", "train.lr=1", "model.pretrained=null"])
    assert cfg["data"]["root"] == "/data/x"
    assert cfg["train"]["epochs"] == 3 and isinstance(cfg["train"]["lr"], float)
    assert cfg["model"]["pretrained"] is None
    assert cfg["model"]["backbone"] == "resnet50"  # the demo section applies only to data.root=demo


def test_demo_section_applies_when_data_root_is_demo_and_cli_still_wins():
    cfg = load_config("classification", overrides=["train.epochs=2"])
    assert cfg["data"]["root"] == "demo"
    assert cfg["model"]["backbone"] != "resnet50"  # the demo's small model
    assert cfg["train"]["epochs"] == 2


def test_text_keys_keep_yaml_words_as_text():
    cfg = load_config("classification", overrides=["train.mixed_precision=no", "output_dir=123"])
    assert cfg["train"]["mixed_precision"] == "no"
    assert cfg["output_dir"] == "123"


def test_config_file_is_applied_and_validated(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  epochs: 4\nmodel:\n  attention: light\n")
    cfg = load_config("celeba", good, ["train.epochs=5"])
    assert cfg["train"]["epochs"] == 5 and cfg["model"]["attention"] == "light"
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  epochs: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*'trian.epochs'.*did you mean 'train.epochs'"):
        load_config("celeba", bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", r"unknown config key 'train.epoch'; did you mean 'train.epochs'"),
        ("train.epochs=three", r"train.epochs must be int, got 'three'"),
        ("train.epochs=2.5", r"train.epochs must be int"),
        ("data.hflip=maybe", r"data.hflip must be bool"),
        ("model.attention=fancy", r"model.attention must be one of paper, light"),
        ("train.optimizer=adam", r"train.optimizer must be one of sgd, adamw"),
        ("epochs", r"expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("classification", overrides=[override])


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    for args, expected in [
        (["train.lr=fast"], "train.lr must be float"),
        (["trainn.lr=0.1"], "did you mean 'train.lr'"),
        ([f"data.root={tmp_path / 'missing'}"], f"data.root: {tmp_path / 'missing'} is not a directory"),
        (["eval"], "eval needs --checkpoint"),
        (["eval", "--checkpoint", str(tmp_path / "nope")], "no such run directory or checkpoint"),
    ]:
        assert run(TASK, args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def _run(*args):
    return subprocess.run([sys.executable, "-m", "tasks.classification", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_module_entry_point_exits_non_zero_with_one_line():
    result = _run("train.epochs=three")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: command line: train.epochs must be int, got 'three' (str)"]


def test_debug_flag_shows_the_traceback():
    result = _run("--debug", "train.lr=fast")
    assert result.returncode != 0 and "Traceback" in result.stderr
