"""Nothing a user is handed runs code: checkpoints load weights-only, YAML safely, archives stay inside."""
import io
import pathlib
import tarfile

import pytest
import torch
from runs import TINY
from single_thread import one_thread  # noqa: F401

from abn_core.cli import run
from abn_core.config import load_config
from abn_core.errors import ConfigError
from data_prep.common import PrepError, safe_extract_tar
from tasks import classification


class Payload:
    """Unpickling this writes a file: what a malicious checkpoint would do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.target), "pwned"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sec") / "run"
    assert run(classification.TASK, ["train", f"output_dir={out}", "train.epochs=1", *TINY]) == 0
    return out


@pytest.mark.slow
def test_crafted_pickle_in_the_training_state_is_refused_and_runs_nothing(finished_run, tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    torch.save({"state": Payload(marker)}, finished_run / "checkpoints/last/optimizer.pt")
    assert run(classification.TASK, ["train", f"output_dir={finished_run}", "train.epochs=2", *TINY]) == 2
    assert "optimizer.pt: refused" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.slow
def test_crafted_pickle_given_as_checkpoint_is_refused_and_runs_nothing(finished_run, tmp_path, capsys):
    marker = tmp_path / "pwned.txt"
    crafted = finished_run / "checkpoints" / "crafted.bin"
    torch.save(Payload(marker), crafted)
    assert run(classification.TASK, ["eval", "--checkpoint", str(crafted), f"output_dir={tmp_path / 'eval'}"]) == 2
    assert "not a loadable weights file" in capsys.readouterr().err
    assert not marker.exists()


def test_yaml_python_tags_are_not_constructed(tmp_path):
    config = tmp_path / "evil.yaml"
    config.write_text(f"train: !!python/object/apply:pathlib.Path.write_text [!!python/object/apply:pathlib.Path ['{tmp_path}/pwned'], 'x']\n")
    with pytest.raises(ConfigError, match="evil.yaml: not valid YAML"):
        load_config("classification", config)
    assert not (tmp_path / "pwned").exists()


def _tar_with(path, member, data=b"x", symlink_to=None):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(member)
        if symlink_to:
            info.type, info.linkname = tarfile.SYMTYPE, symlink_to
            tar.addfile(info)
        else:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("member, symlink_to", [("../outside.txt", None), ("/tmp/abs_outside.txt", None), ("link", "/etc")])
def test_archive_members_that_would_escape_are_refused_before_writing(tmp_path, member, symlink_to):
    archive = tmp_path / "evil.tar"
    _tar_with(archive, member, symlink_to=symlink_to)
    dest = tmp_path / "dest"
    with pytest.raises(PrepError, match="refusing"):
        safe_extract_tar(archive, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "outside.txt").exists()
