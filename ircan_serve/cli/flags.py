"""Flags generated from the typed settings, so ``--help`` is the settings' documentation."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import IrcanError


def _flag_kwargs(field: Any) -> tuple[Any, tuple[Any, ...]]:
    ann = field.annotation
    args = typing.get_args(ann)
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        ann = next(a for a in args if a is not type(None))
        args = typing.get_args(ann)
    return ann, args


def config_flags(config: type[BaseModel], exclude: tuple[str, ...] = ()) -> dict[str, bool]:
    """``--flag`` -> whether it takes a value, for every field of ``config`` (booleans take none
    and have a ``--no-`` form)."""
    out: dict[str, bool] = {}
    for name, field in config.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        takes_value = _flag_kwargs(field)[0] is not bool
        out[flag] = takes_value
        if not takes_value:
            out["--no-" + name.replace("_", "-")] = False
    return out


def add_config_flags(parser: argparse.ArgumentParser, config: type[BaseModel],
                     exclude: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``config``, typed, with its description and default."""
    group = parser.add_argument_group(config.__name__, (config.__doc__ or "").strip())
    for name, field in config.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        ann, args = _flag_kwargs(field)
        kwargs: dict[str, Any] = {"dest": f"{config.__name__}.{name}", "default": None,
                                  "help": f"{field.description or ''} (default: {field.default})",
                                  "metavar": name.upper()}
        if typing.get_origin(ann) is typing.Literal:
            group.add_argument(flag, choices=list(args), **{**kwargs, "metavar": None})
        elif typing.get_origin(ann) is list and typing.get_origin(args[0]) is typing.Literal:
            group.add_argument(flag, nargs="+", choices=list(typing.get_args(args[0])), **{**kwargs, "metavar": None})
        elif typing.get_origin(ann) is list:
            group.add_argument(flag, nargs="+", type=args[0], **kwargs)
        elif ann is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **{**kwargs, "metavar": None})
        else:
            group.add_argument(flag, type=ann, **kwargs)


def config_from_flags(ns: argparse.Namespace, config: type[BaseModel], base: BaseModel | None = None) -> Any:
    """Build ``config`` from the flags that were given, on top of ``base`` (or the defaults)."""
    prefix = config.__name__ + "."
    given = {k[len(prefix):]: v for k, v in vars(ns).items() if k.startswith(prefix) and v is not None}
    start = dict(base) if base is not None else {}  # every field, those left out of dumps too
    try:
        return config.model_validate({**start, **given})
    except ValidationError as e:  # pydantic's message names the field and the rule
        raise IrcanError(f"invalid {config.__name__} flags:\n{e}") from e


def print_summary(title: str, rows: dict[str, Any]) -> None:
    """A two-column table of what a command did."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, str(value))
    Console().print(table)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype`` and ``--device``, as every command that loads a model takes them."""
    parser.add_argument("--model", default="smollm2", help="folder, hub id, .gguf file, 'smollm2' or 'gemma3-270m'")
    from ..models import DTYPES

    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights dtype: auto = the checkpoint's on a GPU, float32 on CPU; scores are "
                             "float32 whatever this is")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (device_map='auto')")
