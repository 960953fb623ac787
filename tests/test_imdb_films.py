"""IMDB's ``val_by_film``: validation (and each fold) takes whole films, read from the archive's urls files."""

from pathlib import Path

import pytest
import torch

from datamodules import IMDBDataModule
from datamodules.base import CorruptDataError, DataNotFoundError
from datamodules.synthetic import write_imdb

N_TRAIN = 48  # 24 reviews a class, named 0_<rating>.txt .. 23_<rating>.txt


def write_urls(root: Path, per_film: int = 3) -> list[str]:
    """``urls_{neg,pos}.txt`` as the archive has them: line ``i`` is the film of review ``i``; reviews
    ``per_film`` apart share a film, and the same films have negative and positive reviews. Returns the film of
    every training review in ``files`` order (negatives first, sorted by name)."""
    train = root / "aclImdb" / "train"
    for name in ("neg", "pos"):
        lines = [f"http://www.imdb.com/title/tt{i // per_film:07d}/usercomments" for i in range(N_TRAIN // 2)]
        (train / f"urls_{name}.txt").write_text("\n".join(lines) + "\n")
    files = IMDBDataModule(data_dir=str(root), cache=False).files("train")
    return [f"tt{int(path.name.split('_')[0]) // per_film}" for path, _ in files]


def split(root: Path, **kwargs) -> IMDBDataModule:
    dm = IMDBDataModule(data_dir=str(root), num_words=40, val_size=8, batch_size=8, val_by_film=True, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def films_of(films: list[str], rows: torch.Tensor) -> set[str]:
    return {films[i] for i in rows.tolist()}


def test_the_hold_out_takes_whole_films(tmp_path):
    root = write_imdb(tmp_path / "data", n_train=N_TRAIN)
    films = write_urls(root)
    dm = split(root)
    assert sorted(dm.train_idx.tolist() + dm.val_idx.tolist()) == list(range(N_TRAIN))
    assert len(dm.val_idx) > 0 and not films_of(films, dm.val_idx) & films_of(films, dm.train_idx)
    assert len(dm.val_idx) % 6 == 0  # a film here is 3 negative and 3 positive reviews
    assert len(dm.val_dataloader().dataset) == len(dm.val_idx)
    again = split(root)  # seeded: every run (and DDP rank) draws the same films
    assert torch.equal(again.val_idx, dm.val_idx)
    assert not torch.equal(split(root, seed=7).val_idx, dm.val_idx)


def test_the_folds_partition_the_films(tmp_path):
    root = write_imdb(tmp_path / "data", n_train=N_TRAIN)
    films = write_urls(root)
    folds = [split(root, fold=k, num_folds=4, cache=False) for k in range(4)]
    assert sorted(torch.cat([dm.val_idx for dm in folds]).tolist()) == list(range(N_TRAIN))
    for dm in folds:
        assert not films_of(films, dm.val_idx) & films_of(films, dm.train_idx)
    with pytest.raises(ValueError, match="more folds than the 8 groups"):
        split(root, fold=0, num_folds=9, cache=False)


def test_missing_or_foreign_urls_files_are_named(tmp_path):
    root = write_imdb(tmp_path / "data", n_train=N_TRAIN)
    with pytest.raises(DataNotFoundError, match=r"urls_neg\.txt.*val_by_film false"):
        split(root)
    write_urls(root)
    short = root / "aclImdb" / "train" / "urls_pos.txt"
    short.write_text("\n".join(short.read_text().splitlines()[:5]))
    with pytest.raises(CorruptDataError, match=r"has no line in .*urls_pos\.txt \(5 lines"):
        split(root)
