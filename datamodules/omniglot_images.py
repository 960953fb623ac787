"""Omniglot drawings decoded once into one ``uint8`` tensor per tree, and cached on disk.

A tree is ``<root>/<Alphabet>/<character>/*.png`` (torchvision's ``images_background`` / ``images_evaluation``, or
what the official zips extract to). Every PNG is decoded once, resized (28x28 by default) and kept in one tensor
(:class:`CharacterImages`); the tensor is also cached on disk (keyed by the file list and the options, written
atomically), so a later run loads it in well under a second.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from datamodules.base import CorruptDataError, DataNotFoundError, atomic_save

CACHE_VERSION = 2  # bump when decoding changes, so stale caches are never read
IMAGE_SUFFIXES = (".png",)


@dataclass
class CharacterImages:
    """Every drawing of a set of characters as one ``uint8`` tensor.

    ``images[offsets[i] : offsets[i] + counts[i]]`` are the drawings of ``characters[i]`` (``"Alphabet/character"``);
    ``drawers[j]`` is the person who drew ``images[j]``: the number after the last ``_`` of its file name (Omniglot
    names a drawing ``<character id>_<drawer>.png``, the same 20 drawers for every character of an alphabet).
    """

    images: Tensor  # uint8 (N, 1, S, S)
    characters: list[str]
    offsets: Tensor  # int64 (num_characters,)
    counts: Tensor  # int64 (num_characters,)
    drawers: Tensor | None = None  # int64 (N,)

    @property
    def alphabets(self) -> list[str]:
        return [name.split("/", 1)[0] for name in self.characters]

    def select(self, keep: Sequence[int]) -> CharacterImages:
        """The same image tensor (no copy) with only the characters at positions ``keep``."""
        keep_t = torch.as_tensor(list(keep), dtype=torch.long)
        return CharacterImages(
            self.images, [self.characters[i] for i in keep], self.offsets[keep_t], self.counts[keep_t], self.drawers
        )

    @staticmethod
    def concat(parts: Sequence[CharacterImages]) -> CharacterImages:
        """One table of several trees; a character present in several (same ``Alphabet/character``) is kept once."""
        images, characters, offsets, counts, base, seen = [], [], [], [], 0, set()
        drawers = [part.drawers for part in parts]
        for part in parts:
            keep = [i for i, name in enumerate(part.characters) if name not in seen]
            seen.update(part.characters)
            images.append(part.images)
            characters += [part.characters[i] for i in keep]
            offsets.append(part.offsets[keep] + base)
            counts.append(part.counts[keep])
            base += len(part.images)
        drawers_t = torch.cat(drawers) if all(d is not None for d in drawers) else None
        return CharacterImages(torch.cat(images), characters, torch.cat(offsets), torch.cat(counts), drawers_t)


def scan_tree(root: Path) -> list[tuple[str, list[Path]]]:
    """``[("Alphabet/character", [drawing paths])]`` of a tree ``root/<Alphabet>/<character>/*.png``, sorted."""
    if not root.is_dir():
        raise DataNotFoundError(
            f"Omniglot folder {root} does not exist. Point background_dir / evaluation_dir at an extracted tree "
            "<Alphabet>/<character>/*.png (what images_background.zip and images_evaluation.zip extract to), or "
            "leave them unset to use (and download) torchvision's <data_dir>/omniglot-py/."
        )
    characters = []
    for alphabet in sorted(p for p in root.iterdir() if p.is_dir()):
        for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            files = sorted(p for p in character.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                characters.append((f"{alphabet.name}/{character.name}", files))
    if not characters:
        deeper = next(root.glob("*/*/*/*.png"), None)
        hint = (
            f" The PNGs sit one level deeper (e.g. {deeper}): use {deeper.parents[2]} as the folder."
            if deeper is not None
            else ""
        )
        raise DataNotFoundError(
            f"{root} holds no Omniglot drawings: expected the layout <Alphabet>/<character>/*.png "
            f"(e.g. {root}/Latin/character01/0683_01.png).{hint}"
        )
    return characters


def fit_to_strokes(image: Image.Image, image_size: int, fraction: float, dark_ink: bool) -> Image.Image:
    """``image`` (mode ``L``) cropped to the bounding box of its strokes and resized, aspect ratio kept, so that the
    box's longer side spans ``fraction`` of an ``image_size`` square, centred on the paper colour.

    Drawers write the same character at different sizes and places on the page; fitting every drawing to its strokes
    (as MNIST's digits were) takes that variation out before the network sees it. A blank page is only resized.
    """
    ink = ImageOps.invert(image) if dark_ink else image
    box = ink.point(lambda v: 255 if v >= 128 else 0).getbbox()
    if box is None:
        return image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    strokes = image.crop(box)
    paper = 255 if dark_ink else 0
    side = max(strokes.size)
    square = Image.new("L", (side, side), paper)
    square.paste(strokes, ((side - strokes.width) // 2, (side - strokes.height) // 2))
    inner = max(1, round(image_size * fraction))
    offset = (image_size - inner) // 2
    fitted = Image.new("L", (image_size, image_size), paper)
    fitted.paste(square.resize((inner, inner), Image.Resampling.BILINEAR), (offset, offset))
    return fitted


def load_image(path: Path, image_size: int, invert: bool = True, fit_strokes: float | None = None) -> np.ndarray:
    """One drawing as a ``uint8`` ``(size, size)`` array: grayscale, resized with antialiasing, strokes bright.

    Omniglot strokes are black on white; ``invert`` makes them 255 on 0 (as MNIST, and as Snell et al.'s
    ``1 - x``), so zero padding and max pooling see the background as "nothing". With ``fit_strokes``, the strokes'
    bounding box fills that fraction of the frame (:func:`fit_to_strokes`) instead of the whole page being resized.
    """
    try:
        with Image.open(path) as image:
            image = image.convert("L")
            if fit_strokes is not None:
                image = fit_to_strokes(image, image_size, fit_strokes, dark_ink=invert)
            elif image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise CorruptDataError(
            f"Cannot decode {path} ({type(err).__name__}: {err}). The file is damaged or not an image; replace it "
            "with the original from the Omniglot zip (or delete it: a character needs only shot + query drawings)."
        ) from err
    return 255 - array if invert else array.copy()


def drawer_of(path: Path, position: int) -> int:
    """The drawer of ``<character id>_<drawer>.png`` (e.g. 5 for ``0394_05.png``); ``position + 1`` (the rank of
    the file in its character folder) for a name without that suffix."""
    suffix = path.stem.rsplit("_", 1)[-1]
    return int(suffix) if "_" in path.stem and suffix.isdigit() else position + 1


def decode_tree(
    characters: list[tuple[str, list[Path]]], image_size: int, invert: bool, fit_strokes: float | None = None
) -> CharacterImages:
    """Decode every drawing of a scanned tree into one :class:`CharacterImages`."""
    counts = [len(files) for _, files in characters]
    images = np.empty((sum(counts), 1, image_size, image_size), dtype=np.uint8)
    drawers = np.empty(sum(counts), dtype=np.int64)
    i = 0
    for _, files in characters:
        for position, path in enumerate(files):
            images[i, 0] = load_image(path, image_size, invert, fit_strokes)
            drawers[i] = drawer_of(path, position)
            i += 1
    counts_t = torch.tensor(counts, dtype=torch.long)
    offsets = torch.cumsum(counts_t, 0) - counts_t
    names = [name for name, _ in characters]
    return CharacterImages(torch.from_numpy(images), names, offsets, counts_t, torch.from_numpy(drawers))


def cache_key(
    characters: list[tuple[str, list[Path]]], image_size: int, invert: bool, fit_strokes: float | None = None
) -> str:
    """A digest of the options and of every file's relative path, size and modification time."""
    digest = hashlib.sha1(f"v{CACHE_VERSION}|{image_size}|{invert}|{fit_strokes}".encode())
    for name, files in characters:
        for path in files:
            stat = path.stat()
            digest.update(f"|{name}/{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _read_cache(path: Path) -> CharacterImages | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        keys = ("images", "characters", "offsets", "counts", "drawers")
        return CharacterImages(*(list(state[k]) if k == "characters" else state[k] for k in keys))
    except Exception as err:  # a damaged cache is only a cache: decode again
        rank_zero_warn(f"Ignoring the unreadable Omniglot cache {path} ({type(err).__name__}: {err}); decoding.")
        return None


def load_tree(
    root: Path,
    image_size: int = 28,
    invert: bool = True,
    cache_dir: Path | None = None,
    write_cache: bool = False,
    fit_strokes: float | None = None,
) -> CharacterImages:
    """The drawings of ``root`` from the cache in ``cache_dir`` when it matches, else decoded (and cached when
    ``write_cache``; only ``prepare_data`` writes, so one process per node does)."""
    characters = scan_tree(root)
    path = None
    if cache_dir is not None:
        key = cache_key(characters, image_size, invert, fit_strokes)
        path = cache_dir / f"omniglot_{root.name}_{image_size}px_{key}.pt"
        if path.is_file():
            cached = _read_cache(path)
            if cached is not None:
                return cached
    rank_zero_info(f"Decoding {sum(len(f) for _, f in characters)} Omniglot drawings in {root} ...")
    decoded = decode_tree(characters, image_size, invert, fit_strokes)
    if write_cache and path is not None:
        state = {
            "images": decoded.images,
            "characters": decoded.characters,
            "offsets": decoded.offsets,
            "counts": decoded.counts,
            "drawers": decoded.drawers,
        }
        try:
            atomic_save(state, path)
        except OSError as err:  # e.g. a read-only shared dataset folder: run without the cache
            rank_zero_warn(f"Cannot write the Omniglot cache {path} ({err}); set cache_dir to a writable folder.")
    return decoded
