"""The benchmark script runs end to end (no timing assertions: timings belong in its output, not in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {
    "mnist": ["plain", "lightning_minimal", "template", "per_sample"],
    "cifar": ["plain", "template", "loader", "loader_albumentations"],
}


# A fresh process per run for one suite, every run in one process for the other: both paths, in half the time.
@pytest.mark.parametrize(("suite", "same_process"), [("mnist", False), ("cifar", True)])
def test_benchmark_quick_mode_prints_the_table(suite, same_process):
    runs = ROOT / "runs"
    before = sorted(runs.rglob("*")) if runs.exists() else []
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--suite", suite]
    result = subprocess.run(
        command + (["--same-process"] if same_process else []), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["pipeline", *PIPELINES[suite]], result.stdout
    for row in rows[1:]:  # median, ratio, best run, ratio: all positive numbers
        assert all(float(cell) > 0 for cell in row.split("|")[2:6]), row
    assert float(rows[1].split("|")[3]) == 1.0  # plain is the reference
    assert ("alternating in one process" in result.stdout) == same_process
    assert (sorted(runs.rglob("*")) if runs.exists() else []) == before  # run folders stay in the temp dir
