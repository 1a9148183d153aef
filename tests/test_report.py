"""report.html: written by training and eval, and loaded in a real headless browser."""
import os
import re
import shutil
import subprocess

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import abn_core.report as report
from abn_core import build_model
from abn_core.cli import run
from abn_core.report import line_chart, write_galleries
from tasks import classification

BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# Appended to a copy of the report: once everything has loaded, it records what the page holds.
CHECK = """<script>window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(img => !img.complete || img.naturalWidth === 0).length;
  const out = document.createElement('div');
  out.id = 'check';
  out.textContent = `images=${images.length} broken=${broken} tables=${document.querySelectorAll('table').length}`;
  document.body.appendChild(out);
});</script>"""


def browser():
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        if os.environ.get("ABN_REQUIRE_BROWSER") == "1":
            pytest.fail("ABN_REQUIRE_BROWSER=1 but no chromium is installed (apt-get install -y chromium)")
        pytest.skip("no headless browser (chromium) installed; .ci/run installs it")
    return found


def rendered_check(report):
    page = report.with_name("report_check.html")
    page.write_text(report.read_text().replace("</body>", CHECK + "</body>"))
    result = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'id="check">images=(\d+) broken=(\d+) tables=(\d+)<', result.stdout)
    assert found, f"browser did not render the page: {result.stderr[-500:]}"
    return tuple(int(g) for g in found.groups())


@pytest.mark.slow
def test_training_report_loads_with_every_image_and_table(tiny_run):
    report = tiny_run / "report.html"
    text = report.read_text()
    assert "http://" not in text and "https://" not in text and 'src="/' not in text  # relative links only
    for gallery in ("attention/test_best.png", "attention/test_worst.png", "report/curves_loss.png"):
        assert gallery in text and (tiny_run / gallery).is_file()
    images, broken, tables = rendered_check(report)
    assert images >= 6 and broken == 0 and tables >= 2


@pytest.mark.slow
def test_eval_writes_its_own_report(tiny_run, tmp_path):
    out = tmp_path / "eval"
    assert run(classification.TASK, ["eval", "--checkpoint", str(tiny_run), f"output_dir={out}"]) == 0
    images, broken, tables = rendered_check(out / "report.html")
    assert images >= 4 and broken == 0 and tables >= 2


def test_broken_image_is_detected(tmp_path):
    """The browser check itself can fail: a missing image counts as broken."""
    line_chart(tmp_path / "report" / "ok.png", [1, 2], {"a": [0.1, 0.3]}, "a")
    (tmp_path / "report.html").write_text('<html><body><table><tr><td>1</td></tr></table>'
                                          '<img src="report/ok.png"><img src="report/missing.png"></body></html>')
    assert rendered_check(tmp_path / "report.html") == (2, 1, 1)



def test_galleries_rank_images_by_confidence_in_the_truth(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", num_classes=2)
    dataset = [{"image": torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8)} for _ in range(3)]
    # Image 1 is the most confidently right (p(true) ~ 1), image 2 the most confidently wrong.
    pred = SimpleNamespace(logits=torch.tensor([[0.0, 0.0], [9.0, 0.0], [0.0, 9.0]]), targets=torch.tensor([0, 0, 0]))
    cfg = {"eval": {"max_attention_images": 1}, "data": {"mean": [0.5] * 3, "std": [0.25] * 3}, "model": {"channels_last": False}}
    written = write_galleries(model, dataset, pred, ["a", "b"], False, cfg, tmp_path, "test", torch.device("cpu"))
    assert sorted(p.name for p in written) == ["test_best.png", "test_class_a.png", "test_worst.png"]
    shown = {}
    monkeypatch.setattr(report, "save_grid", lambda path, rows, **kw: shown.setdefault(path.stem, rows) and path)
    write_galleries(model, dataset, pred, ["a", "b"], False, cfg, tmp_path, "test", torch.device("cpu"))
    for gallery, index in (("test_best", 1), ("test_worst", 2)):
        assert np.array_equal(shown[gallery][0][0], dataset[index]["image"].numpy())
