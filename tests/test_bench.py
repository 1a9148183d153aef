"""bench/run.py runs end to end at minimal sizes and writes bench.json in the documented shape."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RATIOS = {
    "abn_paper_vs_backbone_step", "abn_light_vs_backbone_step", "official_abn_vs_backbone_step",
    "abn_paper_vs_official_step", "multilabel_shared_vs_single_step", "multilabel_fold_vs_loop_step",
    "eval_bf16_channels_last_vs_fp32_time", "prepared_vs_raw_loading_time", "prepared_vs_raw_loading_time_all_cores",
}


@pytest.mark.slow
def test_tiny_bench_writes_every_ratio_with_its_raw_times_models_and_machine(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--tiny", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert set(result) >= {"ratios", "raw", "machine", "models"}
    assert set(result["ratios"]) == RATIOS
    for name, value in result["ratios"].items():
        assert value > 0
        assert {"ratio", "a_seconds", "b_seconds", "repeats"} <= set(result["raw"][name])
    assert result["raw"]["multilabel_fold_vs_loop_step"]["a_peak_bytes"] > 0
    assert result["raw"]["multilabel_fold_vs_loop_step"]["b_peak_bytes"] > 0
    for name in ("backbone", "abn_paper", "abn_light", "official_abn", "multilabel_shared", "multilabel_per_attribute"):
        assert result["models"][name]["params"] > 0 and result["models"][name]["gflops"] > 0
    # The paper head adds a full stage copy; the light head must cost less than it.
    assert result["models"]["abn_light"]["params"] < result["models"]["abn_paper"]["params"]
    assert result["models"]["abn_paper"]["params"] == result["models"]["official_abn"]["params"]
    assert result["machine"]["mode"] == "tiny"
    assert "| `abn_paper_vs_backbone_step` |" in done.stdout
