"""benchmarks/plan_calibration.py --quick: the measurement machinery works and plan stays near what it measures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from longctx.config import RunConfig, load_config
from longctx.plan import model_shape, parameter_inventory

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "plan_calibration.py"


def test_quick_calibration_measures_and_compares(tmp_path):
    out = tmp_path / "calibration.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["shape"], r["seq_len"], r["training"], r["zero"]) for r in rows] == [
        ("tiny", 256, "lora", "3"),
        ("tiny", 1024, "lora", "3"),
    ]
    init = json.dumps(report["shapes"]["tiny"])
    cfg = load_config(RunConfig, None, [f"model.init={init}"])
    total_params = sum(g.numel * g.count for g in parameter_inventory(model_shape(cfg), cfg))
    for row in rows:
        # exact parts: one rank holds every fp32 weight, and the optimizer 12 bytes per trainable parameter
        assert row["measured_parameter_bytes"] == 4 * total_params
        assert row["measured_optimizer_bytes"] == row["plan_optimizer_bytes"] > 0
        assert row["measured_peak_bytes"] > row["measured_static_bytes"] > row["measured_parameter_bytes"]
        assert abs(row["peak_error_without_buckets"]) < 0.5, row  # a sanity bound, the real figures are in results/
    assert report["rows"][1]["measured_peak_bytes"] > report["rows"][0]["measured_peak_bytes"]  # grows with N
    assert report["summary"]["optimizer_bytes_exact"] is True
