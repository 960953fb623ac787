"""scripts/results.py: runs a preset, writes the table, replaces only the README's results block."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from results import END, START, load_preset, main, replace_block

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def write_preset(path: Path) -> Path:
    preset = {
        "title": "Test preset",
        "max_time": "00:00:01:00",
        "experiments": [
            {"name": "Majority", "configs": ["configs/baselines/digits_majority.yaml"], "metric": "test/acc"},
            {
                "name": "MLP",
                "configs": ["configs/quickstart.yaml"],
                "args": ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3"],
                "metric": "test/acc",
                "baseline": "Majority",
                "reference": "98.3 % (book)",
            },
        ],
    }
    path.write_text(yaml.safe_dump(preset))
    return path


def test_preset_runs_and_fills_the_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n\n{START}\nold table\n{END}\n\n## Next section\n")
    rows = main([str(write_preset(tmp_path / "p.yaml")), "--readme", str(readme), "--output", str(tmp_path / "out")])
    assert set(rows) == {"Majority", "MLP"} and rows["MLP"]["epochs"] == 2
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n" + START) and text.endswith(END + "\n\n## Next section\n")
    assert "old table" not in text
    mlp_row = next(line for line in text.splitlines() if line.startswith("| MLP |"))
    cells = [c.strip() for c in mlp_row.strip("|").split("|")]
    assert cells[1] == "`test/acc`" and cells[2].endswith("%") and cells[4] == "98.3 % (book)"
    assert cells[3] == f"{100 * rows['Majority']['value']:.2f} %"  # the baseline beside the model
    with open(tmp_path / "out" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["experiment"] for r in table] == ["Majority", "MLP"]
    assert float(table[1]["value"]) == pytest.approx(rows["MLP"]["value"])


def test_missing_markers_are_explained(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    with pytest.raises(ValueError, match="results:start"):
        replace_block(readme, "| a |")
    assert readme.read_text() == "no markers here\n"


def test_bad_presets_are_explained(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump({"experiments": [{"name": "A", "configs": ["x.yaml"], "metric": "m", "baseline": "B"}]})
    )
    with pytest.raises(ValueError, match="names baseline 'B'"):
        load_preset(path)
    path.write_text("experiments: []\n")
    with pytest.raises(ValueError, match="experiments"):
        load_preset(path)


@pytest.mark.parametrize("preset", sorted((ROOT / "configs" / "results").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_presets_are_valid(preset, capsys):
    load_preset(preset)
    main([str(preset), "--dry_run"])
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python scripts/")]
    assert len(commands) == len(load_preset(preset)["experiments"])
    for line in commands:  # every referenced config exists
        configs = [part for part in line.split() if part.endswith(".yaml")]
        assert configs and all(Path(c).is_file() for c in configs)


def test_any_logged_metric_works_and_a_failing_experiment_is_a_row(tmp_path):
    preset = {
        "title": "Mixed",
        "experiments": [
            {"name": "MLP val", "configs": ["configs/quickstart.yaml"], "metric": "val/acc",
             "args": ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3"]},
            {"name": "Broken", "configs": ["configs/quickstart.yaml"], "metric": "test/acc",
             "args": ["--data.init_args.val_size", "5000"]},
            {"name": "MLP test", "configs": ["configs/quickstart.yaml"], "metric": "test/acc",
             "args": ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3"]},
        ],
    }  # fmt: skip
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump(preset))
    rows = main([str(path), "--output", str(tmp_path / "out")])
    assert 0.0 <= rows["MLP val"]["value"] <= 1.0 and 0.0 <= rows["MLP test"]["value"] <= 1.0
    with open(tmp_path / "runs/quickstart/version_0/metrics.csv") as f:  # the best epoch's val/acc
        logged = [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]
    assert rows["MLP val"]["value"] in logged
    assert rows["Broken"]["value"] is None and "val_size=5000" in rows["Broken"]["error"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| Broken | `test/acc` | failed: val_size=5000" in table and "| MLP test |" in table
