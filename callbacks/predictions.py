"""What ``predict`` returns, printed and written to the run directory, for every topic.

- Classifiers: ``predictions.csv`` with one row per input: ``id``, ``label`` (the class name where the datamodule
  has ``classes``), ``probability`` (of that label), and each class's probability (multiclass) or P(class 1)
  (binary). Regressors: ``id``, ``value``.
- Few-shot episodes (``labels`` + ``probabilities`` per query): the same columns, ``id`` = ``<episode>-<query>``.
- Models that return images (autoencoders, GANs): ``predictions.pt``, one tensor in input order.

``id`` is the input's position in the prediction set, or the datamodule's ``predict_ids`` when it has them (the
IMDB datamodule's line numbers of a ``predict_file``). Under DDP every rank's share is gathered to rank zero,
put back in input order and de-duplicated (the distributed sampler pads). ``scripts/train.py`` adds it to
every ``predict``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor

from callbacks.images import run_dir

__all__ = ["PredictionWriter"]


def _rows(output: Any, task: str | None, classes: Sequence[str] | None) -> list[dict[str, Any]] | None:
    """Table rows of one batch's output; None for outputs that are not scores (images, ...)."""
    if isinstance(output, Mapping) and "probabilities" in output:
        return _rows(output["probabilities"], "multiclass", None)
    if not isinstance(output, Tensor) or output.ndim > 2:
        return None
    values = output.detach().float().cpu()
    if task == "regression" or (task is None and values.ndim == 2 and values.shape[1] == 1):
        return [{"value": float(v)} for v in values.reshape(-1)]
    if values.ndim == 1 or values.shape[1] == 1:  # binary: P(class 1)
        names = classes if classes is not None and len(classes) == 2 else ("0", "1")
        return [{"label": names[int(p >= 0.5)], "probability": float(max(p, 1 - p)), f"p_{names[1]}": float(p)}
                for p in values.reshape(-1).tolist()]  # fmt: skip
    names = list(classes) if classes is not None and len(classes) == values.shape[1] else None
    best, label = values.max(dim=1)
    return [
        {
            "label": names[k] if names else k,
            "probability": float(p),
            **{f"p_{names[c] if names else c}": float(q) for c, q in enumerate(row)},
        }
        for k, p, row in zip(label.tolist(), best.tolist(), values.tolist(), strict=True)
    ]


class PredictionWriter(BasePredictionWriter):
    """Write ``predict``'s outputs as ``<run dir>/<filename>.csv`` (scores) or ``.pt`` (anything else) and print
    the first ``max_printed`` rows.

    Args:
        filename: File name without suffix.
        max_printed: Rows printed to the terminal (the file has them all).
    """

    def __init__(self, filename: str = "predictions", max_printed: int = 20) -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.max_printed = max_printed
        self.path: Path | None = None

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any], batch_indices: Any
    ) -> None:
        # Lightning nests both per dataloader (predictions only when there are several): the first one's.
        if predictions and isinstance(predictions[0], list):
            predictions = predictions[0]
        if batch_indices and batch_indices[0] and isinstance(batch_indices[0][0], list):
            batch_indices = batch_indices[0]
        indexed = []
        offset = 0
        for number, output in enumerate(predictions):
            items = _batch_size(output)
            given = batch_indices[number] if batch_indices and number < len(batch_indices) else None
            indices = list(given) if given is not None and len(given) == items else list(range(offset, offset + items))
            offset += items
            indexed.append((indices, output))
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, [(i, _to_cpu(o)) for i, o in indexed])
            indexed = [pair for share in gathered for pair in share]
        if trainer.is_global_zero:
            self.path = self._write(trainer, pl_module, indexed)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, indexed: list[tuple[list, Any]]) -> Path:
        datamodule = getattr(trainer, "datamodule", None)
        classes = getattr(datamodule, "classes", None)
        classes = list(classes) if isinstance(classes, Sequence) and not isinstance(classes, str) else None
        ids = getattr(datamodule, "predict_ids", None)
        task = getattr(pl_module, "task", None)
        episodes = any(isinstance(output, Mapping) for _, output in indexed)
        by_index: dict[Any, dict[str, Any]] = {}
        items: dict[int, Tensor] = {}
        for indices, output in indexed:
            rows = _rows(output, task, classes)
            if rows is None:
                if isinstance(output, Tensor):
                    items.update({i: t for i, t in zip(indices, _to_cpu(output), strict=False)})
                continue
            if episodes:  # one batch is one episode: its rows are its queries
                indices = [f"{indices[0]}-{q}" for q in range(len(rows))]
            for i, row in zip(indices, rows, strict=False):
                by_index[i] = {"id": ids[i] if ids is not None and not episodes else i, **row}
        directory = run_dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        if not by_index:
            path = directory / f"{self.filename}.pt"
            stacked = torch.stack([items[i] for i in sorted(items)]) if items else torch.empty(0)
            torch.save(stacked, path)
            print(f"Predictions: {len(items)} outputs of shape {tuple(stacked.shape[1:])} written to {path}")
            return path
        rows = [by_index[i] for i in sorted(by_index, key=_order)]
        path = directory / f"{self.filename}.csv"
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        shown = [[str(row["id"]), *(_cell(row[k]) for k in ("label", "probability", "value") if k in row)]
                 for row in rows[: self.max_printed]]  # fmt: skip
        header = ["id", *(k for k in ("label", "probability", "value") if k in rows[0])]
        widths = [max(len(r[c]) for r in [header, *shown]) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *shown]]
        more = f"\n... {len(rows) - len(shown)} more" if len(rows) > len(shown) else ""
        print("\n".join(lines) + more + f"\nPredictions: {len(rows)} rows written to {path}")
        return path


def _order(index: Any) -> tuple:
    if isinstance(index, str):
        episode, query = index.split("-")
        return int(episode), int(query)
    return (int(index),)


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _batch_size(output: Any) -> int:
    if isinstance(output, Mapping):
        return 1  # an episode
    return len(output) if isinstance(output, Tensor) and output.ndim else 1


def _to_cpu(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output.detach().cpu()
    if isinstance(output, Mapping):
        return {k: _to_cpu(v) for k, v in output.items()}
    return output
