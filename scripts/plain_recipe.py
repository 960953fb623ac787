"""A recipe's settings read from its config file, for the plain PyTorch loops (``scripts/plain_fast_*.py``), so that
a loop trains what the config says rather than values re-typed by hand."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml


def read_recipe(config: Path, module_class: type) -> dict:
    """The config's settings: ``model`` (the defaults of ``module_class`` and its base classes under the config's model
    arguments), ``optimizer`` and ``lr_scheduler`` (``class_path`` + ``init_args``), ``augment`` (the datamodule's
    augmentation arguments, or None), ``data`` (the datamodule's other arguments) and ``epochs``
    (``trainer.max_epochs``)."""
    settings = yaml.safe_load(config.read_text())
    model_args = dict(settings["model"]["init_args"])
    model = {}
    for cls in reversed(module_class.__mro__):  # a subclass's defaults over its base classes' (ProtoNet's **kwargs)
        if "__init__" in vars(cls):
            params = inspect.signature(cls.__init__).parameters
            model.update({name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty})
    model.update({k: v for k, v in model_args.items() if k not in ("optimizer", "lr_scheduler")})
    data = dict(settings["data"]["init_args"])
    augment = data.pop("augment", None)
    return {
        "model": model,
        "optimizer": model_args["optimizer"],
        "lr_scheduler": model_args["lr_scheduler"],
        "augment": augment["init_args"] if augment else None,
        "data": data,
        "epochs": settings["trainer"]["max_epochs"],
    }


def class_of(spec: dict) -> type:
    """The class a ``class_path`` names, e.g. ``torch.optim.AdamW``."""
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)
