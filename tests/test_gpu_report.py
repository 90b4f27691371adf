"""benchmarks/gpu_report.py without a GPU: the one-line refusal and the report's tables (CI
runs the whole report with --dry-run; .ci/run)."""
import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")


def test_refuses_without_cuda_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_report.py"), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert run.stderr.strip().count("\n") == 0 and "no CUDA device" in run.stderr and "--dry-run" in run.stderr
    assert not list(tmp_path.iterdir())  # nothing written


def test_markdown_has_every_section():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from gpu_report import markdown
    finally:
        sys.path.pop(0)
    report = {"device": "NVIDIA H100", "dry_run": False, "date": "2026-12-07", "torch": "2.13.0", "triton": "3.8.0",
              "mamba_ssm": "not importable (ModuleNotFoundError)",
              "backends_skipped": {"mamba_ssm": "No module named 'mamba_ssm'"},
              "train_steps": [{"model": "imfuse", "window": "128x128x128", "parameters": 1234, "precision": "float32",
                               "seconds": 0.5, "peak_gib": 20.0},
                              {"model": "mam", "precision": "bf16 autocast", "skipped": "out of GPU memory"}],
              "imfuse_backends": [{"backend": "triton", "seconds": 0.5, "peak_gib": 20.0, "max_abs_difference": 0.0},
                                  {"backend": "torch", "seconds": 1.5, "peak_gib": 30.0, "max_abs_difference": 2e-6}],
              "scan_shape": (1310720, 32, 16),
              "scan": [{"backend": "triton", "seconds": 0.1, "vs_torch": 8.0}, {"backend": "torch", "seconds": 0.8, "vs_torch": 1.0}],
              "predict": {"case": "240x240x155", "seconds": 12.3, "peak_gib": 9.5},
              "loader": {"workers": 2, "patch": 128, "samples_per_second": 3.0, "training_steps_per_second": 2.0,
                         "loader_over_steps": 1.5}}
    text = markdown(report)
    assert "# GPU report (NVIDIA H100)" in text and "dry run" not in text
    assert "| imfuse | 128x128x128 | 1,234 | float32 | 0.500 | 20.0 |" in text
    assert "| mam |  |  | bf16 autocast | out of GPU memory | |" in text
    assert "length 1,310,720, d_inner 32, d_state 16" in text and "| triton | 0.1000 | 8.0x |" in text
    assert "240x240x155, four sequences: 12.3 s, peak 9.5 GiB" in text
    assert "3.0 samples/s with 2 workers at patch 128, against 2.0 IM-Fuse training steps/s (ratio 1.5" in text
    assert "scan backend mamba_ssm skipped: No module named 'mamba_ssm'" in text
