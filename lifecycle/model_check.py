"""Does a checkpoint fit the command's model config? Checked before a run directory is created or a file touched.

:func:`check_model` refuses a checkpoint of another model class, and a resumed ``fit`` that asks for other model
hyperparameters; for ``validate``/``test``/``predict`` it rebuilds the model as the checkpoint was trained, except the
settings the class marks as evaluation-only (:func:`evaluation_hparams`, e.g. test-time augmentation).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_info

from lifecycle.run_lock import RunError
from lifecycle.runs import CHECKPOINTS

__all__ = ["check_model", "evaluation_hparams"]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def _config_of(path: Path) -> Path:
    """The config.yaml of the run a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` or ``<run>/x.ckpt``)."""
    run = Path(path).resolve().parent
    return (run.parent if run.name == CHECKPOINTS else run) / "config.yaml"


def evaluation_hparams(class_path: str | None) -> tuple[str, ...]:
    """The hyperparameters a model class lists in ``evaluation_hparams``: they change only how it evaluates (e.g.
    test-time augmentation), so a validate/test/predict may set them for a checkpoint trained with other values."""
    module, _, name = (class_path or "").rpartition(".")
    try:
        return tuple(getattr(getattr(importlib.import_module(module), name), "evaluation_hparams", ()))
    except (ImportError, AttributeError, ValueError):
        return ()


def check_model(
    path: Path, checkpoint: dict[str, Any], model: dict[str, Any], subcommand: str
) -> dict[str, Any] | None:
    """Compare a checkpoint's model with the config's ``model`` (``{class_path, init_args}`` as dumped).

    Raises :class:`RunError` when the classes differ, or when a resumed ``fit`` asks for other hyperparameters
    (its weights and optimiser state, restored as saved, would not match, and config.yaml would not tell what
    ran). For ``validate``/``test``/``predict`` returns the checkpoint's hyperparameters to build the model from
    when they differ (with a note), else None; the class's :func:`evaluation_hparams` keep the config's values.
    """
    saved = dict(checkpoint.get("hyper_parameters") or {})
    saved.pop("_instantiator", None)
    saved_class, config_class = saved.pop("_class_path", None), model.get("class_path")
    if saved_class and config_class and saved_class != config_class:
        raise RunError(
            f"Checkpoint {path} holds a {saved_class}, but this config builds a {config_class}. Pass the config "
            f"the checkpoint was trained with (its run directory's config.yaml: -c {_config_of(path)}), or a "
            "checkpoint trained with this config."
        )
    ours, theirs = _flat(model.get("init_args") or {}), _flat(saved)
    free = evaluation_hparams(saved_class or config_class) if subcommand != "fit" else ()
    differ = [key for key in ours if key in theirs and ours[key] != theirs[key] and key not in free]
    if not differ:
        return None
    listing = "; ".join(f"{key}: {theirs[key]!r} in the checkpoint, {ours[key]!r} here" for key in differ)
    if subcommand == "fit":
        raise RunError(
            f"Checkpoint {path} was trained with other model hyperparameters than this command gives ({listing}). "
            "A resumed fit restores the checkpoint's weights and optimiser state as they were, so these values "
            "would not apply (or would not fit), and config.yaml would not tell what ran. To continue the run, "
            f"drop these options (the run's own config: -c {_config_of(path)}); to train with the new values, start "
            "a new run without --ckpt_path."
        )
    rank_zero_info(f"The model is built with the checkpoint's hyperparameters ({listing}).")
    return {"class_path": saved_class or config_class, "dict_kwargs": saved | {k: ours[k] for k in free if k in ours}}
