"""Reading a checkpoint safely: ``weights_only`` loading and one clear paragraph for a damaged or unsafe file.

:func:`read_checkpoint` loads a Lightning checkpoint without executing pickled code (``weights_only=True``) and turns
a damaged, truncated or unsafe file into a :class:`CheckpointError` that names the file and the fix. The CLI, the
scripts and the callbacks that load a model (``ConditionalAccuracy``) all read checkpoints through it.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["UNSAFE_LOAD_OPT_IN", "CheckpointError", "read_checkpoint"]

# PyTorch's own switch for loading checkpoints with full pickle (it can run arbitrary code): set it to 1 only
# for a checkpoint from a source you trust.
UNSAFE_LOAD_OPT_IN = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file, the cause and the fix."""


def _unsafe_load_allowed() -> bool:
    return os.environ.get(UNSAFE_LOAD_OPT_IN, "0").lower() in ("1", "y", "yes", "true")


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU without running pickled code, or raise :class:`CheckpointError`.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain Python types; checkpoints written by this
    template contain nothing else. A file that needs more (arbitrary classes, which unpickling would execute) is
    refused unless ``$TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set to 1, PyTorch's own opt-in, which Lightning's
    loading honours too. A truncated or damaged file gets an error that names it and says what to do. ``mmap``
    maps the tensors instead of reading them (for a look at everything but the weights).
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not _unsafe_load_allowed(), mmap=mmap)
    except Exception as err:
        # Checkpoints are zip archives: bytes that are not one (random data, a truncated file whose central
        # directory is gone) fail in the fallback unpickler with a misleading "unsupported global" message.
        if "weights only load failed" in str(err).lower() and zipfile.is_zipfile(path):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            detail = f"the first one: {found.group(1)}" if found else str(err).splitlines()[0]
            raise CheckpointError(
                f"Checkpoint {path} contains pickled Python objects besides tensors and plain values ({detail}). "
                "Loading it would execute code from the file, so it was refused; checkpoints written by this "
                f"template never need that. If you trust where the file comes from, set {UNSAFE_LOAD_OPT_IN}=1 "
                "for this command to load it with full pickle."
            ) from None
        # Else the first sentence of the cause, e.g. "PytorchStreamReader failed reading file data/0: ...".
        if not zipfile.is_zipfile(path):
            detail = "not a complete PyTorch checkpoint archive"
        else:
            cause = str(err).strip().split(". ")[0].splitlines()[0] if str(err).strip() else "the file ends early"
            detail = f"{type(err).__name__}: {cause}"
        raise CheckpointError(
            f"Checkpoint {path} cannot be read: it is damaged or incomplete ({detail}); a crash, a full disk or "
            "an interrupted copy leaves files like this. Use an earlier checkpoint of the run instead: "
            f"`ls -lt {path.parent}` lists them, newest first; pass one with --ckpt_path {path.parent}/<file>.ckpt."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (it has no 'state_dict' entry): pass a .ckpt file written by "
            "`fit` (ModelCheckpoint or Trainer.save_checkpoint), not a bare model state_dict."
        )
    return checkpoint
