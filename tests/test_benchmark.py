"""The benchmark script runs end to end (no timing assertions: timings belong in its output, not in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_mode_prints_both_tables():
    runs = ROOT / "runs" / "mnist_mlp"
    before = sorted(runs.iterdir()) if runs.exists() else []
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    tables = result.stdout.split("\n\n")
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    mnist = ["pipeline", "plain", "lightning_minimal", "template", "per_sample"]
    cifar = ["pipeline", "plain", "template", "loader", "loader_albumentations"]
    assert names == mnist + cifar, tables
    for row in rows:
        if not row.startswith("| pipeline"):
            assert float(row.split("|")[2]) > 0 and float(row.split("|")[3]) > 0
    assert (sorted(runs.iterdir()) if runs.exists() else []) == before  # run folders stay in the temp dir
