"""The benchmark script runs end to end (no timing assertions: timings belong in its output, not in tests)."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {
    "mnist": ["plain", "plain_template_kernels", "lightning_minimal", "template", "per_sample", "per_sample_lightning"],
    "cifar": ["plain", "template", "loader", "loader_albumentations"],
}


def run_benchmark(args: list[str], same_process: bool, monkeypatch, capsys) -> str:
    """The script's stdout. ``--same-process`` runs it here, as its ``__main__`` (a new interpreter costs 10-14 s of
    imports on a slow 2-core CPU); otherwise it runs in a new process, which starts one more per measurement."""
    command = [str(ROOT / "scripts" / "benchmark.py"), "--quick", *args]
    if not same_process:
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout
    from lifecycle.speedups import NVML_CUDA_CHECK

    monkeypatch.setenv(NVML_CUDA_CHECK, "1")  # as the script sets it; restored for the tests that follow
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [*command, "--same-process"])
    runpy.run_path(command[0], run_name="__main__")
    return capsys.readouterr().out


# A fresh process per run for one suite, every run in one process for the other: both paths, in half the time.
# The MNIST suite's six pipelines in fresh processes take the longest: slow (make test-all); CI runs the CIFAR one.
@pytest.mark.parametrize(
    ("suite", "same_process"), [pytest.param("mnist", False, marks=pytest.mark.slow), ("cifar", True)]
)
def test_benchmark_quick_mode_prints_the_table(suite, same_process, monkeypatch, capsys):
    runs = ROOT / "runs"
    before = sorted(runs.rglob("*")) if runs.exists() else []
    stdout = run_benchmark(["--suite", suite], same_process, monkeypatch, capsys)
    tables = [[row for row in table.splitlines() if "---" not in row] for table in stdout.split("\n\n")]
    tables = [[[cell.strip() for cell in row.split("|")[1:-1]] for row in t] for t in tables if t and t[0][:2] == "| "]
    rows = tables[0]
    assert [row[0] for row in rows] == ["pipeline", *PIPELINES[suite]], stdout
    for row in rows[1:]:  # median, ratio, best run, ratio: all positive numbers
        assert all(float(cell) > 0 for cell in row[1:5]), row
    assert float(rows[1][2]) == 1.0  # plain is the reference
    if suite == "mnist":  # the Lightning pipelines paired epoch by epoch with both plain loops
        assert [row[0] for row in tables[1]] == ["pipeline", "lightning_minimal", "template"], stdout
        for row in tables[1][1:]:
            assert float(row[1]) > 0, row
            for plain, ratio, bounds in (row[2:5], row[5:8]):
                low, high = (float(cell) for cell in bounds.split("-"))
                assert float(plain) > 0 and low <= float(ratio) <= high, row
    assert len(tables) == (2 if suite == "mnist" else 1), stdout
    assert ("alternating in one process" in stdout) == same_process
    assert (sorted(runs.rglob("*")) if runs.exists() else []) == before  # run folders stay in the temp dir
