"""Service settings from command-line flags with environment fallbacks, derived from a config dataclass.

Every field of the dataclass becomes a flag (--max-batch) and an environment variable
(PREFIX_MAX_BATCH); a flag wins over the variable, which wins over the field's default.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

Config = TypeVar("Config")


def _converter(hint: Any) -> Callable[[str], Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        return lambda text: text.strip().lower() in ("1", "true", "yes", "on")
    if typing.get_origin(hint) is tuple:
        return lambda text: tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if hint is Path:
        return Path
    return hint


def parse_config(cls: type[Config], argv: Sequence[str] | None, *, prog: str, description: str, env_prefix: str,
                 flags: dict[str, str] | None = None, helps: dict[str, str] | None = None) -> Config:
    """The dataclass `cls` from flags and environment. `flags` renames a field's flag (model_dir -> model)."""
    flags, helps = flags or {}, helps or {}
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for field in dataclasses.fields(cls):
        name = flags.get(field.name, field.name.replace("_", "-"))
        env = env_prefix + name.replace("-", "_").upper()
        convert = _converter(hints[field.name])
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        default = None if required else (field.default if field.default is not dataclasses.MISSING
                                          else field.default_factory())
        if env in os.environ:
            try:
                default, required = convert(os.environ[env]), False
            except ValueError:
                raise ValueError(f"environment variable {env}={os.environ[env]!r} is not a valid {name} "
                                 f"({getattr(hints[field.name], '__name__', hints[field.name])})") from None
        text = f"{helps.get(field.name, '')} (env {env}" + (")" if required else f"; default {default})")
        if hints[field.name] is bool:
            parser.add_argument("--" + name, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                                help=text)
        else:
            parser.add_argument("--" + name, dest=field.name, type=convert, default=default, required=required,
                                help=text)
    return cls(**vars(parser.parse_args(argv)))
