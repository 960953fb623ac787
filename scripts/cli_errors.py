"""Errors of the command-line scripts as one paragraph, no traceback: what went wrong and what to do.

:func:`run_command` runs a script's ``main`` and turns any exception into ``error: <paragraph>`` on stderr and a
non-zero exit code (2 for a bad command line or config, 1 otherwise, 130 for Ctrl+C). The template's own errors
(missing or damaged data, unusable checkpoints, a run in use, a diverged loss, ...) already say what to do; a full
disk is named as such wherever it happens. Set ``TEMPLATE_TRACEBACK=1`` to get Python's traceback instead.

:class:`TemplateParser` is LightningCLI's parser whose errors are one paragraph too; an unknown key names the
closest valid ones instead of printing the ~60-line usage.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from jsonargparse import ArgumentParser
from pytorch_lightning.cli import LightningArgumentParser

from callbacks.slurm import JobRequeued
from lifecycle.checkpoint_io import DiskFullError, exception_chain, is_disk_full

__all__ = ["TRACEBACK_ENV", "ConfigError", "TemplateParser", "describe", "run_command"]

TRACEBACK_ENV = "TEMPLATE_TRACEBACK"


class ConfigError(ValueError):
    """The command line or a config file has an unknown key or a value of the wrong type."""


def _options_of(class_path: str) -> list[str]:
    """The keys a class's ``init_args`` accept, as LightningCLI resolves them (``**kwargs`` of a base included)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    # LightningCLI passes an optimiser its parameters and a scheduler its optimiser: not keys of a config.
    given = {"params"} if issubclass(cls, torch.optim.Optimizer) else set()
    given |= {"optimizer"} if issubclass(cls, torch.optim.lr_scheduler.LRScheduler) else set()
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, fail_untyped=False)
        keys = [key.split(".")[0] for key in parser.get_defaults().keys()]  # noqa: SIM118 (a Namespace)
    except Exception:
        keys = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
    return [key for key in dict.fromkeys(keys) if key not in given]


def explain_parse_error(message: str, parser: ArgumentParser | None = None) -> str:
    """jsonargparse's (often multi-line) message as one paragraph; an unknown key gets the closest valid ones."""
    text = " ".join(message.split())
    unknown = re.findall(r"Option '([^']+)' is not accepted|does not accept option '([^']+)'", text)
    unknown += [(arg.lstrip("-"), "") for arg in re.findall(r"unrecognized arguments?: (\S+)", text, re.IGNORECASE)]
    if not unknown:
        return text
    name = next(part for part in unknown[0] if part)
    nested, owner = re.search(r"NestedArg\(key='([^']+)'", text), re.search(r'Parser key "([^"]+)"', text)
    full = f"{owner.group(1)}.init_args.{nested.group(1)}" if nested and owner else name
    classes = list(dict.fromkeys(re.findall(r"class_path[ =]'([\w.]+)'", text)))
    candidates: list[str] = []
    for class_path in reversed(classes):  # the innermost class (e.g. the optimiser) first
        candidates += _options_of(class_path)
    if parser is not None and not classes:
        with contextlib.suppress(Exception):  # suggestions are a courtesy
            candidates += list(parser.get_defaults().keys())
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    if classes:
        innermost = classes[-1]
        hint += f" {innermost} accepts: {', '.join(_options_of(innermost))}."
    return (
        f"Unknown key '{full}' (from the command line or a config file).{hint} "
        "`python scripts/train.py fit -c <config> --print_config` prints every key of an experiment."
    )


class TemplateParser(LightningArgumentParser):
    """LightningCLI's parser; a parse error raises :class:`ConfigError` with one paragraph instead of exiting."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse's internal attempts (union types, ...) expect its own error
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise ConfigError(explain_parse_error(message, parser)) from None


def describe(error: BaseException) -> str:
    """One paragraph for ``error``: its message with the whitespace folded; a full disk says so."""
    if is_disk_full(error):
        for cause in exception_chain(error):
            if isinstance(cause, DiskFullError):
                return " ".join(str(cause).split())
            filename = getattr(cause, "filename", None)
            if filename:
                return (
                    f"The disk is full: {filename} could not be written (No space left on device). Free some space "
                    f"(`df -h {os.path.dirname(filename) or '.'}`), or write the runs elsewhere (the loggers' "
                    "save_dir), then resume with --ckpt_path last."
                )
        return "The disk is full (No space left on device). Free some space, then resume with --ckpt_path last."
    text = " ".join(str(error).split())
    # The template's checks raise its own errors or ValueError/FileNotFoundError with a full sentence; anything
    # else (a KeyError, a TypeError) is more likely a bug, and its type helps.
    ours = type(error).__module__.split(".")[0] in ("callbacks", "datamodules", "lightning_modules", "cli_errors")
    if not text or not (ours or type(error) in (ValueError, FileNotFoundError, PermissionError)):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text


def run_command(main: Callable[[], Any]) -> int:
    """Run ``main``; return the exit code, printing one paragraph for any error (traceback with $TEMPLATE_TRACEBACK)."""
    try:
        main()
    except JobRequeued as requeued:
        print(requeued, file=sys.stderr)
        return 0
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl+C).", file=sys.stderr)
        return 130
    except BaseException as error:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            raise
        if isinstance(error, ConfigError):
            print(f"error: {describe(error)}", file=sys.stderr)
            return 2
        print(f"error: {describe(error)} ({TRACEBACK_ENV}=1 shows the traceback.)", file=sys.stderr)
        return 1
    return 0
