"""Few-shot episodes: N-way K-shot support sets with Q queries per class, drawn as a function of the seed.

An episode is a function of ``(seed, epoch, episode number)`` only: the same seed gives the same episodes,
every process of a DDP run draws its own share of them (the sampler is a
:class:`~datamodules.loaders.ResumableSampler`, so no two ranks train on the same episode), and a run resumed
in mid-epoch continues with the episodes it had not seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.loaders import ResumableSampler
from datamodules.omniglot_images import CharacterImages

SYMMETRIES = 8  # of a square image: 4 quarter turns, each of the image or of its mirror image


def dihedral(images: Tensor, k: int) -> Tensor:
    """Symmetry ``k`` (0-7) of ``(..., H, W)`` square images: ``k % 4`` quarter turns (counter-clockwise), of the
    left-right mirror image when ``k >= 4``; 0 is the identity."""
    if not 0 <= k < SYMMETRIES:
        raise ValueError(f"symmetry {k}: choose 0-3 (quarter turns) or 4-7 (the same turns of the mirror image).")
    return torch.rot90(images.flip(-1) if k >= 4 else images, k % 4, dims=(-2, -1))


def symmetry_ids(rotations: bool, mirrors: bool) -> tuple[int, ...]:
    """The symmetries (:func:`dihedral` numbers) that ``rotations`` and ``mirrors`` allow; ``(0,)`` for neither."""
    return tuple(k for k in range(SYMMETRIES) if (rotations or k % 4 == 0) and (mirrors or k < 4))


class EpisodeDataset(Dataset):
    """Episodes drawn from a pool of classes; an episode is a function of ``(seed, epoch, index)``.

    A class is a ``(character, symmetry)`` pair (see :func:`dihedral`): with rotations, a character rotated by
    90/180/270 degrees (and, with mirrors, its mirror image turned likewise) is a new class, and all its drawings in
    the episode (support and query) are transformed alike.

    Keys come from :class:`EpisodeSampler`; ``__getitems__`` receives a one-key batch and returns one episode::

        support         uint8 (way * shot, C, H, W)   class-major: shot drawings of class 0, then of class 1, ...
        support_labels  int64 (way * shot,)           in [0, way)
        query           uint8 (way * query, C, H, W)
        query_labels    int64 (way * query,)
        classes         int64 (way, 2)                (character index, symmetry) of each episode class
        episode         int64 ()                      the episode number (tells padded DDP repeats apart)
    """

    def __init__(
        self,
        table: CharacterImages,
        classes: Tensor,
        way: int,
        shot: int,
        query: int,
        episodes: int,
        stream: int = 0,
    ) -> None:
        self.table, self.classes = table, classes
        self.way, self.shot, self.query, self.episodes, self.stream = way, shot, query, episodes, stream
        # The transformed copies are made once (x4 memory of this split with rotations, 60 MB for all of Omniglot's
        # background set; x8 with mirrors): an episode is then a single gather from (symmetries, N, C, H, W), with
        # no per-episode image work.
        turns = int(classes[:, 1].max()) + 1 if len(classes) else 1
        self.views = torch.stack([dihedral(table.images, k) for k in range(turns)])
        self.views = self.views.flatten(0, 1)  # row = symmetry * N + image

    def __len__(self) -> int:
        return self.episodes

    def episode(self, seed: int, epoch: int, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([seed, self.stream, epoch, index])
        picked = self.classes[torch.from_numpy(rng.choice(len(self.classes), self.way, replace=False))]
        per_class = self.shot + self.query
        characters, turns = picked[:, 0], picked[:, 1]
        counts = self.table.counts[characters].numpy()
        # shot + query distinct drawings per class: the first ones of a random order of its drawings.
        keys = rng.random((self.way, int(counts.max())))
        keys[np.arange(keys.shape[1]) >= counts[:, None]] = np.inf
        drawings = torch.from_numpy(np.argsort(keys, axis=1)[:, :per_class])
        rows = turns[:, None] * len(self.table.images) + self.table.offsets[characters][:, None] + drawings
        return episode_batch(self.views, rows, self.shot, self.query, picked, index)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Tensor]:
        return self.episode(*key)

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> dict[str, Tensor]:
        if len(keys) != 1:
            raise ValueError(f"an episode is a batch: load EpisodeDataset with batch_size=1 (got {len(keys)} keys)")
        return self.episode(*keys[0])


class WithinAlphabetEpisodes(EpisodeDataset):
    """Lake et al.'s (2015) one-shot classification runs: every episode's classes come from ONE alphabet, the
    support drawings from ``shot`` drawers and the queries from ``query`` other drawers (the same drawers for all
    the episode's characters). With ``rotations`` (training episodes) a whole episode is turned by a random multiple
    of 90 degrees, and with ``mirrors`` mirrored in half of the episodes (:func:`dihedral`); otherwise it is kept as
    drawn.

    Episode ``i`` uses alphabet ``eligible[i % len(eligible)]`` (so every eligible alphabet gets the same number of
    runs) and a seeded draw of ``way`` of its characters and of the drawers. Alphabets with fewer than ``way``
    characters are skipped (:attr:`skipped`); with one query per class an episode has ``way`` queries, one per
    character, as in Lake et al.'s 20-way runs. The output has :class:`EpisodeDataset`'s format.
    """

    def __init__(
        self,
        table: CharacterImages,
        way: int,
        shot: int,
        query: int,
        episodes: int,
        stream: int = 0,
        rotations: bool = False,
        mirrors: bool = False,
    ) -> None:
        n, self.symmetries = len(table.characters), torch.tensor(symmetry_ids(rotations, mirrors))
        count = len(self.symmetries)
        classes = torch.stack([torch.arange(n).repeat(count), self.symmetries.repeat_interleave(n)], 1)
        super().__init__(table, classes, way, shot, query, episodes, stream)
        if table.drawers is None:
            raise ValueError("within-alphabet episodes need the drawer of every drawing (CharacterImages.drawers)")
        # rows[c, d]: the image of character c by the d-th drawer of the pool (-1: c has no drawing by d).
        drawer_ids = table.drawers[torch.cat([table.offsets[c] + torch.arange(table.counts[c]) for c in range(n)])]
        self.drawer_ids = torch.unique(drawer_ids)
        self.rows = torch.full((n, len(self.drawer_ids)), -1, dtype=torch.long)
        for c in range(n):
            start = int(table.offsets[c])
            images = torch.arange(start, start + int(table.counts[c]))
            self.rows[c, torch.searchsorted(self.drawer_ids, table.drawers[images])] = images
        alphabets = table.alphabets
        names = sorted(set(alphabets))
        members = {a: [c for c in range(n) if alphabets[c] == a] for a in names}
        self.alphabets = [(a, torch.tensor(members[a])) for a in names if len(members[a]) >= way]
        self.skipped = [a for a in names if len(members[a]) < way]
        if not self.alphabets:
            raise ValueError(
                f"No alphabet of this pool has {way} characters for {way}-way within-alphabet episodes (sizes: "
                f"{ {a: len(members[a]) for a in names} }); lower the way (train_way / test_way)."
            )

    def episode(self, seed: int, epoch: int, index: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([seed, self.stream, epoch, index])
        _, members = self.alphabets[index % len(self.alphabets)]
        characters = members[torch.from_numpy(rng.choice(len(members), self.way, replace=False))]
        rows = self.rows[characters]  # (way, drawers)
        common = torch.nonzero((rows >= 0).all(0)).flatten()  # drawers who drew every chosen character
        per_class = self.shot + self.query
        if len(common) < per_class:
            raise ValueError(
                f"only {len(common)} drawers drew all {self.way} characters of episode {index}; an episode takes "
                f"{per_class} (shot + query). Lower the shot or query count (train_/test_shot, train_/test_query)."
            )
        drawers = common[torch.from_numpy(rng.choice(len(common), per_class, replace=False))]
        picked = rows[:, drawers]  # (way, shot + query): support drawers first, then query drawers
        # drawn last, so that the draws above never depend on it
        turn = int(self.symmetries[rng.integers(len(self.symmetries))]) if len(self.symmetries) > 1 else 0
        picked = picked + turn * len(self.table.images)
        classes = torch.stack([characters, torch.full_like(characters, turn)], 1)
        return episode_batch(self.views, picked, self.shot, self.query, classes, index)


class EpisodeSampler(ResumableSampler):
    """Yields ``(seed, epoch, episode number)`` keys; rank ``r`` of ``W`` takes episode numbers ``r, r + W, ...``.

    A :class:`ResumableSampler` over the episode numbers, so the keys are sharded, padded and resumed exactly as
    the image datasets' samples are. With ``vary_with_epoch=False`` (validation and test) every epoch has the same
    episodes, so validation scores are comparable from epoch to epoch.
    """

    def __init__(self, dataset: EpisodeDataset, vary_with_epoch: bool = True, **kwargs: Any) -> None:
        super().__init__(dataset, shuffle=False, **kwargs)
        self.vary_with_epoch = vary_with_epoch

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        epoch = self.epoch if self.vary_with_epoch else 0
        return ((self.seed, epoch, index) for index in super().__iter__())


def episode_batch(views: Tensor, rows: Tensor, shot: int, query: int, classes: Tensor, index: int) -> dict[str, Tensor]:
    """An episode as the few-shot modules take it: ``rows`` is (way, shot + query) image indices, support first."""
    labels = torch.arange(len(rows))
    return {
        "support": views[rows[:, :shot].reshape(-1)],
        "support_labels": labels.repeat_interleave(shot),
        "query": views[rows[:, shot:].reshape(-1)],
        "query_labels": labels.repeat_interleave(query),
        "classes": classes,
        "episode": torch.tensor(index),
    }
