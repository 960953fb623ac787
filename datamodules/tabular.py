"""Small tabular regression data: scikit-learn's bundled *diabetes* set (no download), the notes' k-fold example.

The notes' k-fold workflow comes from the book's Boston-housing regression (*Deep Learning with Python*, 3.7):
a few hundred samples, a dozen numeric features on different scales, an MLP regressor trained with MSE and
judged by MAE. The diabetes data (442 patients, 10 features: age, sex, BMI, blood pressure and six serum
measurements; target: disease progression after one year, 25..346) has the same shape of problem and ships
with scikit-learn. Its raw (unscaled) features are used, and standardised with the mean and std of the
*training* samples only, applied unchanged to validation and test (the notes' rule).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.base import EvalLoaders
from datamodules.loaders import slicing_loader
from datamodules.splits import check_fold, train_val_indices


class TensorRows(Dataset):
    """Feature rows ``(N, F)`` and targets ``(N,)``, batched by slicing (one indexing op per batch)."""

    def __init__(self, features: Tensor, targets: Tensor) -> None:
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} feature rows but {len(targets)} targets")
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.features[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        return self.features[index], self.targets[index]


class DiabetesDataModule(EvalLoaders, pl.LightningDataModule):
    """scikit-learn's diabetes regression data with a fixed test split and train-only standardisation.

    Args:
        test_size: Fraction held out as the test split (fixed seed 0, identical across runs and folds).
        val_size: Validation fraction or count carved from the rest with a seeded shuffle (0 for none). Unused
            when ``fold`` is set.
        batch_size: Per-device batch size.
        standardize: Standardise features with the training split's mean and std (the book does).
        seed: Seed of the train/val split (and of the folds).
        fold: Cross-validation: validate on fold ``fold`` (0-based) of the training pool (everything but the
            test split) cut into ``num_folds`` seeded folds (``KFold``: the targets are continuous), train on the
            others (see :mod:`datamodules.splits`). ``None``: the ``val_size`` hold-out.
        num_folds: Number of folds K when ``fold`` is set (at least 2).
    """

    num_classes = 1  # one regression output; lets configs pair it with ``num_classes: 1`` models
    dims = (10,)
    feature_names = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")

    def __init__(
        self,
        test_size: float = 0.2,
        val_size: int | float = 0.2,
        batch_size: int = 16,
        standardize: bool = True,
        seed: int = 42,
        fold: int | None = None,
        num_folds: int = 5,
    ) -> None:
        super().__init__()
        check_fold(fold, num_folds)
        self.save_hyperparameters()
        self.train_set: TensorRows | None = None
        self.val_set: TensorRows | None = None
        self.test_set: TensorRows | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self._pool, self._test = self._load()

    def _load(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        x, y = load_diabetes(return_X_y=True, scaled=False)  # bundled with scikit-learn: nothing to download
        pool_idx, test_idx = train_test_split(np.arange(len(y)), test_size=self.hparams.test_size, random_state=0)
        as_t = lambda idx: (torch.from_numpy(x[idx]).float(), torch.from_numpy(y[idx]).float())  # noqa: E731
        return as_t(pool_idx), as_t(test_idx)

    def fold_targets(self) -> np.ndarray:
        """Targets of the whole training pool (train + val: what ``val_size`` and the folds split)."""
        return self._pool[1].numpy()

    # ---- Lightning hooks -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        features, targets = self._pool
        hp = self.hparams
        train_idx, val_idx = train_val_indices(
            targets, hp.val_size, hp.seed, fold=hp.fold, num_folds=hp.num_folds, stratify=False
        )
        self.train_set = TensorRows(features[train_idx], targets[train_idx])
        self.val_set = TensorRows(features[val_idx], targets[val_idx])
        self.test_set = TensorRows(*self._test)
        if self.mean is None:  # statistics from the training rows only (restored ones win: see load_state_dict)
            if self.hparams.standardize:
                self.mean = self.train_set.features.mean(0)
                self.std = self.train_set.features.std(0).clamp_min(1e-6)
            else:
                self.mean, self.std = torch.zeros(self.dims), torch.ones(self.dims)

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run for this stage")
        return slicing_loader(dataset, self.hparams.batch_size, train=train, trainer=self.trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def standardize(self, features: Tensor) -> Tensor:
        """Raw feature rows -> standardised with the training statistics, on the rows' device."""
        if self.mean is None:
            raise RuntimeError("standardisation statistics are not set: call setup() first")
        return (features - self.mean.to(features.device)) / self.std.to(features.device)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, Tensor):  # features alone (Lightning's example input, a user's predict batch)
            return batch if self.mean is None else self.standardize(batch)
        features, targets = batch
        return self.standardize(features), targets

    def state_dict(self) -> dict:
        return {} if self.mean is None else {"mean": self.mean, "std": self.std}

    def load_state_dict(self, state_dict: dict) -> None:
        if "mean" in state_dict:
            self.mean, self.std = state_dict["mean"], state_dict["std"]
