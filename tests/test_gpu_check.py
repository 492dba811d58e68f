"""`benchmarks/gpu_check.py --dry-run`: the prepared GPU check runs end to end on CPU at tiny shapes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_completes_every_section_and_its_float32_parities_hold(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check-dry-run.json").read_text())
    sections = ["matmul_peak", "parity_dense", "parity_moe", "parity_attention", "parity_dca", "sft",
                "packed_attention", "dca_memory"]
    assert all(name in report and "error" not in report[name] for name in sections)
    for name in ("parity_dense", "parity_moe", "parity_attention", "parity_dca"):
        float32 = {k: v for k, v in report[name].items() if k.startswith("float32") and k.endswith("diff")}
        assert float32 and max(float32.values()) < 1e-5, (name, float32)
    assert report["parity_attention"]["float32_kernel"] == "fused-segments"
    sft = report["sft"]
    assert sft["attention_kernel"] == "fused-segments" and sft["samples_per_row"] == 4
    assert sft["losses"][-1] < sft["losses"][0]  # the steps train
