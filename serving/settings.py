"""Service settings from command-line flags with environment fallbacks, derived from a config dataclass.

Every field of the dataclass becomes a flag (--max-batch) and an environment variable
(PREFIX_MAX_BATCH); a flag wins over the variable, which wins over the field's default.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

Config = TypeVar("Config")


def _switch(text: str) -> bool:
    # A misspelt value ("ture") read as off silently; refused instead (the caller names the variable).
    word = text.strip().lower()
    if word not in SWITCH_WORDS:
        raise ValueError(word)
    return SWITCH_WORDS[word]


SWITCH_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                "off": False, "": False}
# gRPC takes a connection's age in milliseconds as a 32-bit integer: about 24 days.
MAX_CONNECTION_AGE_SECONDS = 2_000_000.0


def check_serving_settings(config: Any) -> None:
    """Refuses, in one line, the settings both servers hand to gRPC and the metrics server (serving/server.py)
    when out of the range those take: they failed deep inside them (an OverflowError traceback, a NaN that
    names nothing) or, with a negative RPC limit, every call was refused behind a healthy server."""
    for name in ("max_message_bytes", "grpc_workers"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if config.max_message_bytes >= 2**31:
        raise ValueError(f"max_message_bytes must be under 2 GiB (gRPC's limit), got {config.max_message_bytes}")
    if config.max_concurrent_rpcs < 0:
        raise ValueError(f"max_concurrent_rpcs must be 0 (unbounded) or more, got {config.max_concurrent_rpcs}")
    for name, upper in (("max_connection_age_seconds", MAX_CONNECTION_AGE_SECONDS), ("grace_seconds", 3_600.0)):
        if not 0 <= getattr(config, name) <= upper:  # NaN fails too
            raise ValueError(f"{name} must be 0 to {upper:g}, got {getattr(config, name)}")
    if not 0 <= config.metrics_port <= 65_535:
        raise ValueError(f"metrics_port must be 0 (none) to 65535, got {config.metrics_port}")
    for name in ("address", "health_address"):
        address = getattr(config, name)
        port = address.rpartition(":")[2]
        # gRPC takes a port past 65535 modulo 65536: --address :65537 listened on port 1.
        if (address or name == "address") and not address.startswith("unix:") and not (port.isdigit()
                                                                                         and int(port) <= 65_535):
            raise ValueError(f"{name} must be host:port with a port of 0 to 65535, got {address!r}")


def _converter(hint: Any) -> Callable[[str], Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    if hint is bool:
        return _switch
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
    values = vars(parser.parse_args(argv))
    for field in dataclasses.fields(cls):
        # No setting means "nan" or "inf": they passed range checks written as `x < 0` and failed far away.
        if hints[field.name] is float and not math.isfinite(values[field.name]):
            raise ValueError(f"{field.name} must be a finite number, got {values[field.name]}")
    return cls(**values)
