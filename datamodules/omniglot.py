"""Omniglot for few-shot learning: episodes of N-way K-shot support sets and Q queries per class.

The notes (*Meta Learning / Few-Shot Learning*): the model gets a *support set* of N classes ("N-way") with K
examples each ("K-shot") and labels *query* images by comparing them with the support set; more classes make the
task harder, more shots make it easier. Omniglot (Lake et al., 2015: 1,623 handwritten characters of 50
alphabets, 20 drawings each) is the standard benchmark.

Data layout: torchvision's (``<data_dir>/omniglot-py/images_background/`` and ``images_evaluation/``,
downloaded by :meth:`OmniglotDataModule.prepare_data`; the official small background sets
``images_background_small1/`` and ``small2/`` beside them with ``background_sets``), or any extracted tree
``<Alphabet>/<character>/*.png`` (what the official zips extract to) given as ``background_dir`` / ``evaluation_dir``.

Speed: every PNG is decoded once into one ``uint8`` tensor, cached on disk (:mod:`datamodules.omniglot_images`), so
an episode is one tensor index, not a hundred PNG decodes.

Episodes are a function of ``(seed, epoch, episode number)`` only: the same seed gives the same episodes,
every process of a DDP run draws its own share of them (no two ranks train on the same episode), and a run
resumed in mid-epoch continues with the episodes it had not seen (:mod:`datamodules.episodes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from datamodules.augment import BatchAugment
from datamodules.base import CorruptDataError, DataNotFoundError, EvalLoaders, default_data_dir
from datamodules.episodes import EpisodeDataset, EpisodeSampler, WithinAlphabetEpisodes, symmetry_ids
from datamodules.loaders import slicing_loader, trainer_shard, training_seed
from datamodules.omniglot_images import CharacterImages, load_image, load_tree  # noqa: F401  (load_image: re-exported)
from datamodules.splits import part_size

SplitName = Literal["alphabets", "characters"]
STREAMS = {"train": 0, "val": 1, "test": 2}  # independent random streams per split


# ---- the datamodule ----------------------------------------------------------------------------------------------


class OmniglotDataModule(EvalLoaders, pl.LightningDataModule):
    """Episodic Omniglot: N-way K-shot support sets with Q queries per class, from disjoint class pools.

    Splits (class pools never overlap):

    - ``split="alphabets"`` (default, Lake et al.): test episodes come from the evaluation alphabets; training and
      validation from the background alphabets, ``val_alphabets`` of them held out (seeded) for validation. When
      both trees hold an alphabet of the same name, it is left out of the test pool (with a warning), so no
      test character is a training one.
    - ``split="characters"`` (Vinyals et al.): the characters of both trees are pooled and split by a seeded
      shuffle into ``test_classes`` / ``val_classes`` / the rest for training (Snell et al. use 423 / 172 / 1028).

    With ``test_alphabets``, those background alphabets are the test pool instead of the evaluation tree (for a
    check on held-out alphabets when only background sets are at hand); they never reach training or validation.

    Training classes are augmented with rotations by 90, 180 and 270 degrees as new classes (``rotations``), and
    training images with ``augment``; validation and test classes never are.

    ``test_within_alphabet`` makes validation and test episodes Lake et al.'s (2015) one-shot runs: each takes its
    ``test_way`` characters from one alphabet, the support drawings from ``test_shot`` drawers and the queries
    from ``test_query`` other drawers (Lake et al.: 20-way, 1 shot, 1 query per character); alphabets with fewer
    than ``test_way`` characters are skipped, with a warning (:class:`~datamodules.episodes.WithinAlphabetEpisodes`).

    Args:
        data_dir: Root of torchvision's ``omniglot-py/`` (default ``$DATA_DIR`` or ``./data``); downloaded there
            by ``prepare_data`` when a tree below is not given and not present.
        background_dir: An extracted ``<Alphabet>/<character>/*.png`` tree for training/validation, or a list of
            trees to pool (default ``<data_dir>/omniglot-py/<name>`` for each name of ``background_sets``).
        background_sets: The official background sets pooled for training/validation when ``background_dir`` is
            unset: ``images_background`` (30 alphabets), or ``images_background_small1`` and/or ``small2`` (5
            alphabets each, Lake et al.'s small training sets); missing ones are downloaded. A character in several
            sets (small1 and small2 share Greek and Latin) counts once.
        evaluation_dir: The tree for testing (default ``<data_dir>/omniglot-py/images_evaluation``).
        split: ``alphabets`` or ``characters``, see above.
        test_alphabets: Background alphabets held out as the test pool (``alphabets`` split; the evaluation tree is
            then not used).
        val_alphabets: Background alphabets held out for validation (count or fraction; ``alphabets`` split).
        val_classes: Validation characters (count or fraction; ``characters`` split).
        test_classes: Test characters (count or fraction; ``characters`` split).
        image_size: Side of the square images (28 as Vinyals et al. and Snell et al.).
        invert: Strokes bright on a dark background (see :func:`~datamodules.omniglot_images.load_image`).
        fit_strokes: Crop every drawing to its strokes and scale it, aspect kept, so that they span this fraction
            of the frame (e.g. 0.86: 24 of 28 pixels), as MNIST's digits were; ``None`` resizes the whole page.
        rotations: Rotated training characters as new classes (x4 training classes); with
            ``train_within_alphabet``, a random quarter turn of each whole training episode instead.
        mirrors: Mirrored training characters as new classes too (x2 more); with ``train_within_alphabet``, half of
            the training episodes mirrored as a whole. A mirrored alphabet is as plausible an alphabet as a turned
            one; with both, a model can be tested on all 8 symmetries of a run (``ProtoNet(tta_symmetries=8)``).
        train_way, train_shot, train_query: N, K and queries per class of training episodes (Snell et al.
            train with more classes than they test: 60-way, 5 queries, shot as at test time).
        train_episodes: Training episodes per epoch (over all processes: each of W ranks draws 1/W of them).
        test_way, test_shot, test_query: N', K' and queries per class of validation and test episodes.
        val_episodes: Validation episodes (the same ones every epoch).
        test_episodes: Test episodes (Snell et al. average over 1,000), or within-alphabet runs.
        test_within_alphabet: Validation and test episodes are within-alphabet runs with disjoint support and
            query drawers (see above); their count is ``val_episodes`` / ``test_episodes``, drawn with ``seed``.
        train_within_alphabet: Training episodes are within-alphabet too (``train_way`` characters of one alphabet,
            support and query drawers disjoint): practice at telling apart the similar characters of one alphabet,
            which is what the test runs ask. With ``rotations`` each such episode is turned by a random quarter
            turn as a whole (rotated characters are then not new classes).
        augment: Batch-level augmentation of training images (e.g. ``datamodules.augment.BatchAugment`` with small
            rotations, shears, zooms and shifts, ``fill_mode: constant``), applied on the device to every support and
            query image of a training episode; never to validation or test episodes.
        channels_last: Hand episodes to the model in ``channels_last`` memory format (the CLI converts the model
            too; faster convolutions on CPUs and GPUs).
        cache: Keep the decoded images on disk (``cache_dir``) for the next run.
        cache_dir: Folder of the cache (default ``<data_dir>/omniglot_cache``).
        num_workers: DataLoader workers; 0 is fastest (an episode is a tensor index).
        pin_memory: Pin episodes for faster host-to-GPU copies (ignored without a GPU).
        seed: Seed of the class splits and of the validation/test episodes. Training episodes follow the run's
            seed (``seed_everything``) and the epoch.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        background_dir: str | list[str] | None = None,
        evaluation_dir: str | None = None,
        background_sets: list[str] | None = None,
        split: SplitName = "alphabets",
        test_alphabets: list[str] | None = None,
        val_alphabets: int | float = 0.2,
        val_classes: int | float = 172,
        test_classes: int | float = 423,
        image_size: int = 28,
        invert: bool = True,
        fit_strokes: float | None = None,
        rotations: bool = True,
        mirrors: bool = False,
        train_way: int = 60,
        train_shot: int = 1,
        train_query: int = 5,
        train_episodes: int = 100,
        test_way: int = 5,
        test_shot: int = 1,
        test_query: int = 15,
        val_episodes: int = 100,
        test_episodes: int = 1000,
        test_within_alphabet: bool = False,
        train_within_alphabet: bool = False,
        augment: BatchAugment | None = None,
        channels_last: bool = False,
        cache: bool = True,
        cache_dir: str | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        seed: int = 42,
    ) -> None:
        super().__init__()
        if split not in ("alphabets", "characters"):
            raise ValueError(f"split={split!r}: choose 'alphabets' (Lake et al.) or 'characters' (Vinyals et al.).")
        for name, value in (("train_way", train_way), ("test_way", test_way)):
            if value < 2:
                raise ValueError(f"{name}={value}: an episode needs at least 2 classes (N-way with N >= 2).")
        for name, value in (("train_shot", train_shot), ("test_shot", test_shot)):
            if value < 1:
                raise ValueError(f"{name}={value}: every class needs at least one support example (K >= 1).")
        for name, value in (("train_query", train_query), ("test_query", test_query)):
            if value < 1:
                raise ValueError(f"{name}={value}: every class needs at least one query per episode.")
        if image_size < 8:
            raise ValueError(f"image_size={image_size}: use at least 8 pixels (28 is the standard).")
        if fit_strokes is not None and not 0 < fit_strokes <= 1:
            raise ValueError(f"fit_strokes={fit_strokes}: give the fraction of the frame the strokes span, in (0, 1].")
        if test_alphabets and split != "alphabets":
            raise ValueError("test_alphabets holds out whole alphabets: use it with split='alphabets'.")
        self.save_hyperparameters(ignore=["augment"])
        self.augment = augment
        self.data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
        self.train_set: EpisodeDataset | None = None
        self.val_set: EpisodeDataset | None = None
        self.test_set: EpisodeDataset | None = None
        self.pools: dict[str, list[str]] = {}  # split -> its characters ("Alphabet/character"), for inspection

    # ---- shapes the model checks ----------------------------------------------------------------------------
    @property
    def dims(self) -> tuple[int, int, int]:
        return (1, self.hparams.image_size, self.hparams.image_size)

    @property
    def num_classes(self) -> int:
        """Classes per training episode (N of the N-way training task). Episodes carry their own labels
        ``0..N-1``; a few-shot model has no layer of this width, it only records the task it trained on."""
        return self.hparams.train_way

    # ---- files ------------------------------------------------------------------------------------------------
    @property
    def torchvision_root(self) -> Path:
        return self.data_dir / "omniglot-py"

    def tree(self, which: Literal["background", "evaluation"]) -> Path:
        if which == "background":
            return self.background_trees()[0]
        given = self.hparams.evaluation_dir
        return Path(given).expanduser() if given else self.torchvision_root / "images_evaluation"

    def background_trees(self) -> list[Path]:
        given = self.hparams.background_dir
        if given:
            return [Path(p).expanduser() for p in ([given] if isinstance(given, str) else given)]
        return [self.torchvision_root / name for name in self.hparams.background_sets or ["images_background"]]

    @property
    def uses_evaluation_tree(self) -> bool:
        return self.hparams.split == "characters" or not self.hparams.test_alphabets

    @property
    def cache_path(self) -> Path | None:
        if not self.hparams.cache:
            return None
        return Path(self.hparams.cache_dir).expanduser() if self.hparams.cache_dir else self.data_dir / "omniglot_cache"

    def prepare_data(self) -> None:
        """Download what is missing (torchvision layout only), then decode and cache the trees."""
        trees = self.background_trees() + ([self.tree("evaluation")] if self.uses_evaluation_tree else [])
        given = {"background": self.hparams.background_dir, "evaluation": self.hparams.evaluation_dir}
        for tree in trees:
            which = "evaluation" if tree.name == "images_evaluation" else "background"
            if given[which] is None and not tree.is_dir():
                self._download(which, tree.name)
        for tree in trees:
            self._load(tree, write_cache=True)

    def _load(self, tree: Path, write_cache: bool = False) -> CharacterImages:
        hp = self.hparams
        return load_tree(tree, hp.image_size, hp.invert, self.cache_path, write_cache, hp.fit_strokes)

    def _download(self, which: str, name: str) -> None:
        from torchvision.datasets import Omniglot
        from torchvision.datasets.utils import download_and_extract_archive

        rank_zero_info(f"Omniglot set {name} not found in {self.torchvision_root}; downloading it with torchvision")
        try:
            if name in ("images_background", "images_evaluation"):
                Omniglot(str(self.data_dir), background=which == "background", download=True)
            else:  # the small background sets sit beside the full ones in the official repository
                url = f"{Omniglot.download_url_prefix}/{name}.zip"
                download_and_extract_archive(url, str(self.torchvision_root))
        except Exception as err:  # URLError, OSError, RuntimeError depending on what failed
            raise DataNotFoundError(
                f"The Omniglot {which} set is not in {self.torchvision_root / name} and downloading {name}.zip from "
                f"{Omniglot.download_url_prefix} failed ({type(err).__name__}: {err}). Either run once with network "
                f"access (e.g. on a login node), or extract {name}.zip into {self.torchvision_root}, or set "
                f"--data.init_args.{which}_dir to an extracted <Alphabet>/<character>/*.png tree."
            ) from err

    def _table(self, which: Literal["background", "evaluation"]) -> CharacterImages:
        trees = self.background_trees() if which == "background" else [self.tree("evaluation")]
        tables = [self._load(tree) for tree in trees]
        return tables[0] if len(tables) == 1 else CharacterImages.concat(tables)

    # ---- class pools ------------------------------------------------------------------------------------------
    def split_tables(self, stages: Sequence[str]) -> dict[str, CharacterImages]:
        """The characters of each split (``train``/``val``/``test``) wanted by ``stages``; pools are disjoint."""
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.seed)
        if hp.split == "characters":
            table = CharacterImages.concat([self._table("background"), self._table("evaluation")])
            n = len(table.characters)
            n_test = part_size(hp.test_classes, n, "test_classes")
            n_val = part_size(hp.val_classes, n - n_test, "val_classes")
            order = torch.randperm(n, generator=generator).tolist()
            parts = {
                "test": sorted(order[:n_test]),
                "val": sorted(order[n_test : n_test + n_val]),
                "train": sorted(order[n_test + n_val :]),
            }
            return {name: table.select(keep) for name, keep in parts.items()}
        tables: dict[str, CharacterImages] = {}
        background_tree = self.tree("background")
        needed = "fit" in stages or not self.uses_evaluation_tree
        background = self._table("background") if needed or background_tree.is_dir() else None
        held_out = set(hp.test_alphabets or ())
        if held_out:
            unknown = sorted(held_out - set(background.alphabets))
            if unknown:
                raise ValueError(
                    f"test_alphabets {unknown} are not alphabets of the background set(s) "
                    f"{[str(t) for t in self.background_trees()]}; they hold {sorted(set(background.alphabets))}."
                )
            if "test" in stages:
                tables["test"] = background.select([i for i, a in enumerate(background.alphabets) if a in held_out])
            background = background.select([i for i, a in enumerate(background.alphabets) if a not in held_out])
        if "fit" in stages:
            alphabets = sorted(set(background.alphabets))
            n_val = part_size(hp.val_alphabets, len(alphabets), "val_alphabets") if hp.val_alphabets else 0
            held_out = {alphabets[i] for i in torch.randperm(len(alphabets), generator=generator)[:n_val].tolist()}
            in_val = [a in held_out for a in background.alphabets]
            tables["train"] = background.select([i for i, v in enumerate(in_val) if not v])
            tables["val"] = background.select([i for i, v in enumerate(in_val) if v])
        if "test" in stages and "test" not in tables:
            evaluation = self._table("evaluation")
            shared = sorted(set(evaluation.alphabets) & set(background.alphabets if background else ()))
            if shared:
                rank_zero_warn(
                    f"The background tree {background_tree} and the evaluation tree {self.tree('evaluation')} both "
                    f"hold the alphabets {shared}; they are left out of the test pool so that no test character "
                    "is a training or validation one."
                )
                evaluation = evaluation.select([i for i, a in enumerate(evaluation.alphabets) if a not in shared])
            tables["test"] = evaluation
        return tables

    def _episodes(self, table: CharacterImages, split: str) -> EpisodeDataset | None:
        hp = self.hparams
        train = split == "train"
        way, shot, query = (
            (hp.train_way, hp.train_shot, hp.train_query) if train else (hp.test_way, hp.test_shot, hp.test_query)
        )
        episodes = {"train": hp.train_episodes, "val": hp.val_episodes, "test": hp.test_episodes}[split]
        if split == "val" and (not table.characters or episodes == 0):
            return None
        n = len(table.characters)
        turns = symmetry_ids(hp.rotations, hp.mirrors) if train else (0,)
        classes = torch.tensor([(c, k) for k in turns for c in range(n)], dtype=torch.long).view(-1, 2)
        if len(classes) < way:
            raise ValueError(
                f"The {split} pool has {len(classes)} classes ({n} characters"
                f"{f' x {len(turns)} symmetries' if len(turns) > 1 else ''}) but {split} episodes are {way}-way. "
                f"Lower {'train' if train else 'test'}_way, or give this split more characters (val_alphabets / "
                "val_classes / test_classes, or a larger tree)."
            )
        few = [table.characters[i] for i in range(n) if int(table.counts[i]) < shot + query]
        if few:
            raise CorruptDataError(
                f"{len(few)} {split} character(s) (e.g. {few[0]}) have fewer drawings than an episode takes per "
                f"class (shot {shot} + query {query}); Omniglot has 20 per character. Lower the query count, or "
                "restore the missing PNGs."
            )
        self.pools[split] = list(table.characters)
        if hp.train_within_alphabet if train else hp.test_within_alphabet:
            rotations, mirrors = train and hp.rotations, train and hp.mirrors
            dataset = WithinAlphabetEpisodes(table, way, shot, query, episodes, STREAMS[split], rotations, mirrors)
            if dataset.skipped:
                rank_zero_warn(
                    f"{split} episodes are {way}-way within one alphabet: skipping the {split} alphabets "
                    f"{dataset.skipped}, which have fewer than {way} characters."
                )
            return dataset
        return EpisodeDataset(table, classes, way, shot, query, episodes, stream=STREAMS[split])

    # ---- Lightning hooks --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        stages = ["fit"] if stage in ("fit", "validate") else ["test"]
        if stage in ("fit", "validate") and self.train_set is not None:
            return
        if stage in ("test", "predict") and self.test_set is not None:
            return
        tables = self.split_tables(stages)
        if "train" in tables and self.train_set is None:
            self.train_set = self._episodes(tables["train"], "train")
            self.val_set = self._episodes(tables["val"], "val")
        if "test" in tables:
            self.test_set = self._episodes(tables["test"], "test")

    def _loader(self, dataset: EpisodeDataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run for this stage")
        num_replicas, rank = trainer_shard(self.trainer)
        seed = training_seed() if train else self.hparams.seed
        sampler = EpisodeSampler(dataset, vary_with_epoch=train, num_replicas=num_replicas, rank=rank, seed=seed)
        return slicing_loader(
            dataset,
            1,  # one key, one episode: __getitems__ returns the whole episode
            train=train,
            trainer=self.trainer,
            num_workers=self.hparams.num_workers,
            pin_memory=self.hparams.pin_memory,
            sampler=sampler,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``uint8`` pixels -> ``float32`` in [0, 1] on the device (Snell et al.'s scaling; no statistics), then the
        training augmentation (support and query images alike, each drawn independently)."""
        if not isinstance(batch, dict):
            return batch
        training = self.augment is not None and self.trainer is not None and self.trainer.training
        for key in ("support", "query"):
            if key not in batch:
                continue
            if batch[key].dtype == torch.uint8:
                batch[key] = batch[key].float().div_(255.0)
            if training:
                batch[key] = self.augment(batch[key])
            if self.hparams.channels_last:
                batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
        return batch
