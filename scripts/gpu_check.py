"""GPU check: what a lent GPU should confirm, in one run of a few minutes, written up as a Markdown report.

    bash scripts/gpu_check.sh                      # or `make gpu-check`: report in gpu_check.md
    python scripts/gpu_check.py --out report.md --cifar-dir D   # the CIFAR-10 recipe on real images (D: an image
                                                   # folder with train/ and test/, or the official pickles)

1. The machine: torch, CUDA, the GPUs.
2. Every experiment config: ``fit --trainer.fast_dev_run true`` under ``bf16-mixed``, ``--compile true`` and
   ``channels_last`` batches (where the datamodule has them), on generated data in each dataset's real on-disk
   format (transfer configs with random base weights: ImageNet weights are a download), several at a time.
3. The benchmark suites (``scripts/benchmark.py --suite mnist`` and ``--suite cifar``, one repetition).
4. The CIFAR-10 fast recipe (``configs/cifar10/fast.yaml``) end to end, with its wall time, then its Muon and
   residual variants (``-c configs/variants/cifar10_muon.yaml``, ``cifar10_residual.yaml``): on ``--cifar-dir`` when
   given, else on 50,000 generated images (the same compute, so the same time; its accuracy means nothing).
5. With 2+ GPUs: the DDP equivalence test of ``tests/test_ddp.py`` on NCCL (2 GPUs against 1).

Every step has a time limit; a failing step is a row of the report, not the end of the check. Run it on CPU with
``--accelerator cpu --precision 32-true --no-compile --configs mnist/mlp.yaml --skip bench,cifar,ddp`` to try it.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SKIP = {"logger", "sweeps", "trainer", "results", "variants"}  # snippets and presets, not experiments


def experiments(only: list[str] | None) -> list[Path]:
    configs = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not SKIP & set(p.parts))
    configs = [p for p in configs if p.name != "defaults.yaml" and p.parent != ROOT / "configs"]
    if only:
        configs = [p for p in configs if str(p.relative_to(ROOT / "configs")) in only]
    return configs


def write_data(root: Path, cifar_images: int = 6000) -> None:
    """Generated data for every datamodule, in one ``DATA_DIR`` (each dataset in its own sub-folder)."""
    from datamodules.synthetic import (
        write_cifar10,
        write_glove,
        write_image_folder,
        write_imdb,
        write_mnist,
        write_omniglot_torchvision_layout,
    )

    write_mnist(root, n_train=1024, n_test=256)
    write_cifar10(root, per_batch=cifar_images // 5, n_test=256)
    write_imdb(root, n_train=64, n_test=32)
    write_glove(root / "glove.txt", ["good", "bad", "movie"], dim=100)
    write_omniglot_torchvision_layout(root, size=35)
    write_image_folder(root / "folder", {"train": 24, "test": 4}, size=(150, 150), classes=("cats", "dogs"))


def config_args(config: Path, data: Path, options: argparse.Namespace) -> list[str]:
    """The fast_dev_run command line of one config on the generated data."""
    import importlib

    spec = yaml.safe_load(config.read_text())
    module, _, name = spec["data"]["class_path"].rpartition(".")
    datamodule = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    args = ["fit", "-c", str(config), "--trainer.fast_dev_run", "true", "--test_after_fit", "false"]
    args += ["--trainer.accelerator", options.accelerator, "--trainer.devices", "1"]
    args += ["--trainer.precision", options.precision, "--trainer.enable_progress_bar", "false"]
    if options.compile:
        args += ["--compile", "true"]
    if "channels_last" in datamodule:
        args += ["--data.init_args.channels_last", "true"]
    if "val_size" in datamodule:
        args += ["--data.init_args.val_size", "16"]
    model = str(spec.get("model", {}).get("class_path", ""))
    if model.endswith("TransferClassifier"):
        args += ["--model.init_args.weights", "random"]  # ImageNet weights are a download
    if "embedding_file" in config.read_text():
        args += ["--model.init_args.embedding_file", str(data / "glove.txt")]
    if name == "ImageFolderDataModule":
        args += ["--data.init_args.data_dir", str(data / "folder")]
    return args


def run(command: list[str], timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    start = time.time()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        code, output = "timeout", f"{expired.stdout or ''}{expired.stderr or ''}"
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
    return {"code": code, "seconds": time.time() - start, "output": output}


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (error or lines or [""])[-1][:200].replace("|", "\\|")


def check_configs(data: Path, options: argparse.Namespace, work: Path) -> list[str]:
    env = dict(os.environ, DATA_DIR=str(data), WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    jobs = []
    for config in experiments(options.configs):
        jobs.append((config, config_args(config, data, options)))

    def one(item):
        config, args = item
        folder = work / config.stem
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--one", *args]
        return config, run(command, options.config_timeout, env=env, cwd=folder)

    rows = ["| config | result | seconds | note |", "| --- | --- | --- | --- |"]
    with ThreadPoolExecutor(options.jobs) as pool:
        for config, result in pool.map(one, jobs):
            ok = {0: "ok", "timeout": "TIMEOUT"}.get(result["code"], "FAIL")
            note = "" if ok == "ok" else last_line(result["output"])
            name = config.relative_to(ROOT / "configs")
            rows.append(f"| {name} | {ok} | {result['seconds']:.0f} | {note} |")
            print(rows[-1], flush=True)
    passed = sum(" | ok | " in row for row in rows)
    return [f"{passed} of {len(jobs)} configs passed.", "", *rows]


def environment() -> list[str]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return [
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; host: {platform.node()}; python {platform.python_version()}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
        f"- GPUs: {len(gpus)} x {', '.join(sorted(set(gpus))) or 'none'}; CPU cores: {os.cpu_count()}",
    ]


def section(title: str, result: dict, limit: int = 6000) -> list[str]:
    status = "ok" if result["code"] == 0 else f"FAILED ({result['code']})"
    text = result["output"].strip()
    return [f"## {title}", "", f"{status}, {result['seconds']:.0f} s.", "", "```", text[-limit:], "```", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="the Markdown report")
    parser.add_argument("--cifar-dir", type=Path, help="real CIFAR-10 for the fast recipe (image folder or pickles)")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="without torch.compile")
    parser.add_argument("--jobs", type=int, default=4, help="configs checked at a time")
    parser.add_argument("--configs", nargs="*", help="only these (paths under configs/)")
    parser.add_argument("--skip", default="", help="comma-separated: configs,bench,cifar,ddp")
    parser.add_argument("--config-timeout", type=float, default=240)
    parser.add_argument("--one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)  # one config's fit
    options = parser.parse_args(argv)
    if options.one is not None:
        return one_config(options.one)
    skip = set(filter(None, options.skip.split(",")))
    started = time.time()
    report = ["# GPU check", "", *environment(), ""]
    with tempfile.TemporaryDirectory() as tmp:
        data, work = Path(tmp) / "data", Path(tmp) / "runs"
        write_data(data)
        if "configs" not in skip:
            flags = f"{options.precision}, compile {options.compile}, channels_last where the datamodule has it"
            report += [f"## Every config: fast_dev_run ({flags})", ""]
            report += [*check_configs(data, options, work), ""]
        python = [sys.executable, str(ROOT / "scripts" / "benchmark.py")]
        if "bench" not in skip:
            for suite in ("mnist", "cifar"):
                result = run([*python, "--suite", suite, "--reps", "1"], timeout=180, cwd=work.parent)
                report += section(f"Benchmark suite: {suite}", result)
        if "cifar" not in skip:
            report += cifar_recipe(options, Path(tmp))
        if "ddp" not in skip:
            report += ddp_equivalence()
    report += [f"Total: {time.time() - started:.0f} s."]
    options.out.write_text("\n".join(report) + "\n")
    print(f"report: {options.out}")
    return 0


def cifar_recipe(options: argparse.Namespace, tmp: Path) -> list[str]:
    from datamodules.synthetic import write_cifar10

    config = ROOT / "configs" / "cifar10" / "fast.yaml"
    if not config.is_file():
        return ["## CIFAR-10 fast recipe", "", f"skipped: {config.relative_to(ROOT)} does not exist.", ""]
    args = ["fit", "-c", str(config), "--trainer.accelerator", options.accelerator, "--trainer.devices", "1"]
    if options.cifar_dir is None:
        where = "50,000 generated images (time only: the accuracy of random images means nothing)"
        data = write_cifar10(tmp / "cifar_full", per_batch=10_000, n_test=10_000)
        args += ["--data.init_args.data_dir", str(data)]
    elif (options.cifar_dir / "train").is_dir():
        where = f"the image folders in {options.cifar_dir}"
        args += ["--data=datamodules.ImageFolderDataModule", "--data.init_args.data_dir", str(options.cifar_dir)]
        args += ["--data.init_args.image_size", "[32, 32]"]
    else:
        where = f"the CIFAR-10 pickles in {options.cifar_dir}"
        args += ["--data.init_args.data_dir", str(options.cifar_dir)]
    env = dict(os.environ, WANDB_MODE="offline")
    script = [sys.executable, str(Path(__file__).resolve()), "--one"]
    report = []
    for title, variant in (("", None), (", Muon variant (8 epochs)", "muon"), (", residual variant", "residual")):
        extra = ["-c", str(ROOT / "configs" / "variants" / f"cifar10_{variant}.yaml")] if variant else []
        result = run([*script, *args, *extra], 400, env=env, cwd=tmp)
        report += section(f"CIFAR-10 fast recipe{title} on {where}", result, limit=3000)
    return report


def ddp_equivalence() -> list[str]:
    import torch

    title = "DDP equivalence on NCCL (tests/test_ddp.py, 2 GPUs against 1)"
    if torch.cuda.device_count() < 2:
        return [f"## {title}", "", f"skipped: {torch.cuda.device_count()} GPU(s).", ""]
    env = dict(os.environ, DDP_TEST_ACCELERATOR="gpu")
    test = "tests/test_ddp.py::test_ddp_two_processes_equal_one_process_with_the_same_global_batch"
    result = run([sys.executable, "-m", "pytest", "-q", "-s", test], timeout=300, env=env, cwd=ROOT)
    return section(title, result, limit=3000)


def one_config(args: list[str]) -> int:
    """One fit in this process; the generated CIFAR-10 pickles have no official md5, so the check is off here."""
    from cli_errors import run_command
    from train import main as train_main

    from datamodules.synthetic import cifar10_md5_ignored

    with cifar10_md5_ignored():
        return run_command(lambda: train_main(args))


if __name__ == "__main__":
    sys.exit(main())
