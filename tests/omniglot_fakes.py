"""Fake Omniglot trees in the real on-disk layout: ``<root>/<Alphabet>/character<NN>/<id>_<nn>.png``.

Like the real drawings, every PNG is a 1-bit image of black strokes on white. Each character is a few random
strokes; each of its drawings moves the strokes by a few pixels, so drawings of one character resemble each other
and differ from other characters' (a learnable few-shot problem), and no two drawings are identical.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def write_tree(
    root: Path,
    alphabets: dict[str, int],
    drawings: int = 20,
    size: int = 105,
    seed: int = 0,
) -> Path:
    """Write ``{alphabet: number of characters}`` as an extracted Omniglot tree under ``root``; returns ``root``."""
    for a, (alphabet, characters) in enumerate(sorted(alphabets.items())):
        for c in range(characters):
            rng = np.random.default_rng([seed, a, c])
            strokes = rng.uniform(0.15, 0.85, (3, 2, 2)) * size  # 3 strokes, 2 end points, (x, y)
            folder = root / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for d in range(drawings):
                image = Image.new("1", (size, size), 1)
                draw = ImageDraw.Draw(image)
                shift = rng.uniform(-0.04, 0.04, 2) * size
                for stroke in strokes:
                    points = stroke + shift + rng.normal(0, 0.02 * size, (2, 2))
                    draw.line([tuple(p) for p in points], fill=0, width=max(2, size // 15))
                image.save(folder / f"{a * 100 + c:04d}_{d + 1:02d}.png")
    return root


BACKGROUND = {"Alpha": 6, "Beta": 6, "Gamma": 6, "Delta": 6, "Epsilon": 6}  # 30 characters
EVALUATION = {"Zeta": 5, "Eta": 5}  # 10 characters


def write_torchvision_layout(data_dir: Path, size: int = 105, drawings: int = 20) -> Path:
    """``data_dir/omniglot-py/images_background`` and ``images_evaluation``, as torchvision extracts them."""
    base = data_dir / "omniglot-py"
    write_tree(base / "images_background", BACKGROUND, drawings=drawings, size=size, seed=1)
    write_tree(base / "images_evaluation", EVALUATION, drawings=drawings, size=size, seed=2)
    return data_dir


def zip_tree(tree: Path, archive: Path) -> Path:
    """Zip ``tree`` so that it extracts to ``<tree name>/<Alphabet>/...`` (the official zips' layout)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*.png")):
            zf.write(path, path.relative_to(tree.parent).as_posix())
    return archive
