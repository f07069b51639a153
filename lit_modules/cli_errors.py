"""Bad command lines and bad input as one line: the nearest valid key, the cnnlab error behind a
wrapper's traceback. Used by scripts/train.py's CLI.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

REPO = Path(__file__).resolve().parents[1]


def _parser_keys(parser: Any) -> set[str]:
    """Every key `parser` and its subcommands accept (`trainer.max_epochs`, `model`, ...)."""
    keys = {a.dest for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help")}
    subcommands = getattr(parser, "_subcommands_action", None)
    for sub in subcommands._name_parser_map.values() if subcommands else ():
        keys |= _parser_keys(sub)
    return keys


def _init_args(class_path: str) -> list[str]:
    """The keyword arguments of `class_path`'s `__init__`: the keys its `init_args` accept."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []  # no suggestion rather than a second error
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in params if p.name != "self" and p.kind not in kinds]


def unknown_key_error(parser: Any, message: str) -> str | None:
    """One line for jsonargparse's "key not accepted" errors, with the nearest valid key.

    jsonargparse reports a typo in a class's arguments (`--model.lrr`) as a dozen lines about
    Union subtypes, after the full usage; the user needs the key and its likely spelling.
    """
    if m := re.search(
        r'Parser key "([\w.]+)".*?class_path \'([\w.]+)\':\s*Option \'(\w+)\'', message, re.S
    ):
        where, key = f"{m[1]} ({m[2]})", m[3]
        valid = _init_args(m[2])
    elif m := re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message):
        where, key = m[1], m[2]
        valid = [
            k.removeprefix(f"{m[1]}.") for k in _parser_keys(parser) if k.startswith(f"{m[1]}.")
        ]
    elif m := re.search(
        r"Option '([\w.]+)' is not accepted|unrecognized arguments: --([\w.]+)", message
    ):
        where, key, valid = "", m[1] or m[2], sorted(_parser_keys(parser))
    else:
        return None
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return f"unknown key '{key}'{f' for {where}' if where else ''}{hint}"


class SuggestingParser(LightningArgumentParser):
    """jsonargparse's parser; an unknown key is one line that names the nearest valid key."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # nested parsers (a class's init_args) raise to the top one, which exits
        line = None
        if self.exit_on_error and not os.environ.get("JSONARGPARSE_DEBUG"):
            line = unknown_key_error(self, message)
        if line is None:
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")  # "train.py fit" (a subcommand's parser)
        usage = prog if " " in prog else f"{prog} fit"
        sys.stderr.write(f"error: {line}  ({usage} --help lists the valid keys)\n")
        self.exit(2)


def user_error(err: BaseException) -> BaseException | None:
    """The error cnnlab's own code raised for bad input (a file, a value) behind `err`, if any.

    jsonargparse and Lightning wrap it in their own exceptions and tracebacks; the user needs
    its one line, which names the file or the setting and the problem.
    """
    seen: BaseException | None = err
    while seen is not None:
        frames = traceback.extract_tb(seen.__traceback__)
        origin = Path(frames[-1].filename).resolve() if frames else None
        if (
            isinstance(seen, ValueError | OSError | TypeError | FloatingPointError)
            and origin is not None
            and origin.is_relative_to(REPO)
            and not origin.is_relative_to(REPO / ".venv")
        ):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
