"""Command-line options made from a config dataclass: one ``--flag`` per field."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type,
                          only: Sequence[str] | None = None) -> None:
    """Adds ``--field-name`` for every field of ``cls`` (or those in ``only``): bool fields
    are switches, list fields take several values, others are typed by their default;
    fields without a default are required. Help comes from the field's metadata["help"]."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        help_text = f.metadata.get("help", f"{cls.__name__}.{f.name}")
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", default=default if has_default else False, help=help_text)
        elif f.type.startswith("list"):
            if has_default:
                parser.add_argument(flag, nargs="*", default=default, help=help_text)
            else:
                parser.add_argument(flag, nargs="+", required=True, help=help_text)
        elif has_default:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)
        else:
            parser.add_argument(flag, required=True, help=help_text)
