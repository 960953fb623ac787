"""The benchmark script runs end to end (no timing assertions: timings belong in its output, not in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_mode_prints_the_table():
    runs = ROOT / "runs" / "mnist_mlp"
    before = sorted(runs.iterdir()) if runs.exists() else []
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["plain", "template", "per_sample"]
    for row in rows[2:]:
        seconds = float(row.split("|")[2])
        assert seconds > 0
    assert (sorted(runs.iterdir()) if runs.exists() else []) == before  # run folders stay in the temp dir
