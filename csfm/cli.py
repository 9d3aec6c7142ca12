"""Command lines made from a config dataclass: one ``--flag`` per field, and one way to
read options: the dataclass defaults, then a ``--config`` YAML/JSON file, then the flags
given on the command line, every value checked against the field's type.

A field needs ``metadata={"help": ...}`` (a missing help is an error when the parser is
built) and may give ``"choices": (...)`` and ``"valid": (check, description)`` (e.g.
``at_least(1)``, ``in_range(0, 1)``); its type (``str``, ``int``, ``float``, ``bool``, a
``list[...]`` of the first three, or ``X | None`` of a scalar, null in a file) types the flag
and checks the file's values. A field with ``"file_only": True`` has no flag and is read only
from ``--config`` (its type may also be ``list[dict[str, Any]]``, a list of mappings, e.g. the
rows of a benchmark), though ``--help`` still lists it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import yaml

T = TypeVar("T")

_UNSET = object()  # a flag not given on the command line (told apart from one given its default value)


class OptionError(ValueError):
    """A bad option value. The message names the option (``--batch-size``, or the key and
    file it came from) and what it must be; commands print it without a traceback."""


def at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    """``metadata["valid"]`` of an integer option >= ``low``."""
    return (lambda v: v >= low), f"an integer >= {low}"


def in_range(low: float, high: float, low_open: bool = False,
             high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    """``metadata["valid"]`` of a number in an interval (closed unless ``*_open``); NaN never passes."""
    def check(v: float) -> bool:
        return (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    return check, f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


POSITIVE = (lambda v: 0 < v < math.inf), "a finite number > 0"
NON_NEGATIVE = (lambda v: 0 <= v < math.inf), "a finite number >= 0"


def flag(name: str) -> str:
    """The command-line flag of a field: ``batch_size`` -> ``--batch-size``."""
    return f"--{name.replace('_', '-')}"


def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (annotations are strings under ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _optional_of(hint: Any) -> Any:
    """X of a hint ``X | None``, else None."""
    args = typing.get_args(hint)
    if len(args) == 2 and type(None) in args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in args if a is not type(None))
    return None


def _describe(hint: Any) -> str:
    """What a value of ``hint`` looks like, for error messages."""
    if _optional_of(hint) is not None:
        return _describe(_optional_of(hint)) + " or null"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if typing.get_origin(item) is dict:
            return "a list of mappings"
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}[item]
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (an int widens to float, a tuple becomes a list), or raises
    TypeError. bool is never taken for an int or a number."""
    if _optional_of(hint) is not None:
        return None if value is None else _convert(value, _optional_of(hint))
    if typing.get_origin(hint) is dict:
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise TypeError
        return dict(value)
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_convert(item, typing.get_args(hint)[0]) for item in value]
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if hint is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    raise TypeError


def checked_value(cls: type, name: str, value: Any, where: str = "") -> Any:
    """``value`` for field ``name`` of ``cls``, converted to the field's type and checked
    against its choices and ``valid`` range; an OptionError naming the option (and
    ``where``, e.g. the file it came from) otherwise."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = _field_types(cls)[name]
    source = f"{where}: {name} ({flag(name)})" if where else flag(name)
    try:
        value = _convert(value, hint)
    except TypeError:
        raise OptionError(f"{source} must be {_describe(hint)}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise OptionError(f"{source} must be one of {', '.join(map(str, choices))}; got {value!r}")
    check, expected = f.metadata.get("valid", (None, ""))
    if check is not None and value is not None and not check(value):  # None: an optional option not given
        raise OptionError(f"{source} must be {expected}, got {value!r}")
    return value


def check_fields(config: Any) -> None:
    """Converts every field of a dataclass instance in place with ``checked_value`` (for
    ``__post_init__``: a config built in Python is checked as one read from a command line)."""
    for f in dataclasses.fields(config):
        object.__setattr__(config, f.name, checked_value(type(config), f.name, getattr(config, f.name)))


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type,
                          only: Sequence[str] | None = None, required: bool = True) -> None:
    """Adds ``--field-name`` for every field of ``cls`` (or those in ``only``): bool fields
    are ``--x/--no-x`` switches, list fields take several values, others are typed by the
    field's type. With ``required``, fields without a default are required flags. Help comes
    from the field's metadata["help"] (a TypeError names a field without one). A
    ``file_only`` field gets no flag; its help is kept for the epilog of ``build_parser``."""
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        if not f.metadata.get("help"):
            raise TypeError(f"{cls.__name__}.{f.name} has no metadata['help']: every option needs a help text")
        if f.metadata.get("file_only"):
            continue
        hint = _optional_of(types[f.name]) or types[f.name]
        valid = f.metadata.get("valid")
        help_text = f.metadata["help"] + (f"; {valid[1]}" if valid else "")
        options: dict[str, Any] = {"help": help_text.replace("%", "%%")}  # argparse %-formats help
        if f.default is not dataclasses.MISSING:
            options["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            options["default"] = f.default_factory()
        else:
            options["required"] = required
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        if hint is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list and typing.get_args(hint)[0] in (int, float, str):
            options["type"] = typing.get_args(hint)[0]
            options["nargs"] = "+" if options.get("required") else "*"
        elif hint in (int, float, str):
            options["type"] = hint
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: options cannot have type {hint}")
        parser.add_argument(flag(f.name), **options)


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float, as YAML 1.2 and JSON do (YAML 1.1, which
    PyYAML follows, needs a dot: ``1.0e-3``, and reads ``1e-3`` as a string)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_config_file(cls: type, path: str | Path) -> dict[str, Any]:
    """The options in a YAML (``.yaml``/``.yml``) or JSON file, keyed by field name, each
    checked with ``checked_value``; an OptionError names the file and the bad key or value."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise OptionError(f"--config {path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        loaded = yaml.load(text, _Yaml12Loader) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise OptionError(f"--config {path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                          f"{exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise OptionError(f"--config {path}: expected a mapping of option names to values, "
                          f"got {type(loaded).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(key) for key in set(loaded) - known)
    if unknown:
        raise OptionError(f"{path}: unknown options {unknown}; known: {sorted(known)}")
    return {key: checked_value(cls, key, value, str(path)) for key, value in loaded.items()}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default, and the description and epilog with their line breaks."""


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """``--config`` and one flag per field of ``cls`` (none required: a file may give them);
    ``--help`` shows every default."""
    file_only = [textwrap.fill(f"{f.name}: {f.metadata['help']}", 78, initial_indent="  ", subsequent_indent="    ")
                 for f in dataclasses.fields(cls) if f.metadata.get("file_only")]
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=_HelpFormatter,
                                     epilog="options read only from --config:\n" + "\n".join(file_only) + "\n"
                                     if file_only else None)
    parser.add_argument("--config", default="",
                        help="YAML or JSON file of options named as the flags with _ for - "
                             "(batch_size: 16); flags given as well override it")
    add_dataclass_options(parser, cls, required=False)
    return parser


def parse_config(cls: type[T], argv: Sequence[str] | None = None, prog: str = "",
                 description: str | None = None) -> T:
    """An instance of ``cls`` from the defaults, then the ``--config`` file, then the flags
    given in ``argv`` (a flag given with its default value still overrides the file).
    Bad flags exit through argparse; bad file values raise OptionError; ``cls`` itself
    checks ranges (e.g. in ``__post_init__``)."""
    parser = build_parser(cls, prog or None, description)
    given = parser.parse_args(argv, namespace=argparse.Namespace(
        **{f.name: _UNSET for f in dataclasses.fields(cls)}))
    values = read_config_file(cls, given.config) if given.config else {}
    values.update({k: v for k, v in vars(given).items() if k != "config" and v is not _UNSET})
    missing = [flag(f.name) for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        parser.error(f"the following options are required (as flags or in --config): {', '.join(missing)}")
    return cls(**values)


def run_command(run: Callable[[T], Any], cls: type[T], argv: Sequence[str] | None, prog: str,
                description: str | None, failures: tuple[type[Exception], ...] = ()) -> Any:
    """``run(parse_config(cls, argv, prog, description))``, the ``main`` of every command. A
    bad option (OptionError: exit status 2) or one of ``failures`` (exit status 1) ends with
    ``<module>: error: message`` (the module named last in ``prog``) on stderr and no traceback; returns what ``run`` returns."""
    try:
        return run(parse_config(cls, argv, prog, description))
    except (OptionError, *failures) as error:
        print(f"{prog.split()[-1]}: error: {error}", file=sys.stderr)
        raise SystemExit(2 if isinstance(error, OptionError) else 1) from None
