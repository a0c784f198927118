"""tools/gpu-check.sh on a machine without a GPU: it parses, runs, writes its summary under the directory it is
given and skips every CUDA step with a line saying why (the GPU run itself happens on a GPU machine)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu-check.sh"
STEPS = ("cuda-tests", "perf-train", "data-prepare", "epoch-ce", "epoch-lsskd")


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, PYTHON=sys.executable, FSL_BENCH=f"{sys.executable} -m fsl_lsskd.cli",
                PYTHONPATH=str(REPO), **env)
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=full, text=True, capture_output=True,
                          timeout=120)


def test_dry_run_skips_every_step_and_writes_its_summary(tmp_path):
    res = _run(tmp_path / "out", GPU_CHECK_DRY="1")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (tmp_path / "out" / "gpu-check.txt").read_text()
    for name in STEPS:
        assert f"SKIP {name}: dry run; would run: " in summary, summary
    assert "perf train --synthetic" in summary and "--precisions fp32,bf16" in summary
    assert "--image-size 64 --batch-size 64 --precision bf16 --device cuda --epochs 1" in summary
    assert summary.rstrip().endswith("done: every step that ran passed")
    assert not (tmp_path / "out" / "data").exists()  # a dry run generates no data


def test_without_cuda_every_cuda_step_is_skipped_with_a_reason(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the real check would run (tools/gpu-check.sh OUT)")
    res = _run(tmp_path / "out")
    assert res.returncode == 0, res.stdout + res.stderr
    summary = (tmp_path / "out" / "gpu-check.txt").read_text()
    assert "device: no CUDA GPU" in summary
    for name in STEPS:
        assert f"SKIP {name}: needs a CUDA GPU, none on this machine" in summary, summary
    assert "FAIL" not in summary


def test_without_an_output_directory_it_says_how_to_call_it():
    res = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, text=True, capture_output=True, timeout=60)
    assert res.returncode != 0 and "usage: tools/gpu-check.sh OUT_DIR" in res.stderr
