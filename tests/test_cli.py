"""csfm.cli: dataclass -> argparse, and defaults -> --config file -> flags with checked values."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import pytest

from csfm.cli import OptionError, add_dataclass_options, at_least, check_fields, in_range, parse_config, run_command


@dataclass
class _Options:
    name: str = field(metadata={"help": "a required name"})
    count: int = field(default=2, metadata={"help": "how many", "valid": at_least(1)})
    rate: float = field(default=0.5, metadata={"help": "a share", "valid": in_range(0, 1)})
    kind: str = field(default="a", metadata={"help": "which kind", "choices": ("a", "b")})
    items: list[str] = field(default_factory=list, metadata={"help": "some items"})
    loud: bool = field(default=False, metadata={"help": "say more"})


def _parse(argv: list[str]) -> _Options:
    return parse_config(_Options, argv, "prog")


def test_defaults_then_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ncount: 5\nrate: 1e-1\nitems: [p, q]\nloud: true\n")
    assert _parse(["--config", str(path)]) == _Options("x", 5, 0.1, "a", ["p", "q"], True)
    # a flag given with its default value still overrides the file
    got = _parse(["--config", str(path), "--count", "2", "--items", "--no-loud", "--kind", "b"])
    assert got == _Options("x", 2, 0.1, "b", [], False)
    (tmp_path / "run.json").write_text('{"name": "y", "rate": 1}')
    assert _parse(["--config", str(tmp_path / "run.json")]) == _Options("y", rate=1.0)


@pytest.mark.parametrize("text, match", [
    ("name: x\ncount: 2.5", r"run.yaml: count \(--count\) must be an integer, got 2.5"),
    ("name: x\ncount: true", r"count \(--count\) must be an integer, got True"),
    ("name: x\ncount: 0", r"count \(--count\) must be an integer >= 1, got 0"),
    ("name: x\nrate: abc", r"rate \(--rate\) must be a number, got 'abc'"),
    ("name: x\nrate: 3", r"rate \(--rate\) must be a number in \[0, 1\], got 3.0"),
    ("name: x\nitems: p", r"items \(--items\) must be a list of strings, got 'p'"),
    ("name: x\nitems: [1]", r"items \(--items\) must be a list of strings, got \[1\]"),
    ("name: x\nloud: yes please", r"loud \(--loud\) must be true or false"),
    ("name: x\nkind: c", r"kind \(--kind\) must be one of a, b; got 'c'"),
    ("name: 7", r"name \(--name\) must be a string, got 7"),
    ("nmae: x", r"unknown options \['nmae'\]"),
    ("- name", r"expected a mapping of option names to values, got list"),
    ("name: [", r"not valid YAML"),
])
def test_bad_file_values_name_the_option_and_file(tmp_path, text, match):
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(OptionError, match=match) as info:
        _parse(["--config", str(path)])
    assert str(path) in str(info.value)


def test_missing_config_file_and_required_option(tmp_path, capsys):
    with pytest.raises(OptionError, match=r"--config .*nowhere.yaml: cannot read"):
        _parse(["--config", str(tmp_path / "nowhere.yaml")])
    with pytest.raises(SystemExit):
        _parse([])
    assert "required (as flags or in --config): --name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--name", "x", "--kind", "c"])  # flags are checked by argparse


def test_every_option_needs_help():
    @dataclass
    class Bare:
        epochs: int = 20

    with pytest.raises(TypeError, match=r"Bare.epochs has no metadata\['help'\]"):
        add_dataclass_options(argparse.ArgumentParser(), Bare)


def test_help_states_the_range(capsys):
    with pytest.raises(SystemExit):
        _parse(["--help"])
    out = capsys.readouterr().out
    assert "how many; an integer >= 1 (default: 2)" in " ".join(out.split())


@dataclass
class _FileRows:
    rows: list[dict[str, Any]] = field(default_factory=list, metadata={"help": "row mappings", "file_only": True})
    limit: int | None = field(default=None, metadata={"help": "at most 50 % of them", "valid": at_least(1)})

    def __post_init__(self) -> None:
        check_fields(self)


def _run_rows(config: _FileRows) -> int:
    if not config.rows:
        raise OptionError("no rows")
    return len(config.rows) if config.limit is None else min(config.limit, len(config.rows))


def test_file_only_and_optional_options(tmp_path, capsys):
    path = tmp_path / "rows.yaml"
    path.write_text("rows: [{name: a}, {name: b}]\nlimit: null\n")
    assert parse_config(_FileRows, ["--config", str(path)]) == _FileRows([{"name": "a"}, {"name": "b"}], None)
    assert parse_config(_FileRows, ["--config", str(path), "--limit", "1"]).limit == 1
    with pytest.raises(SystemExit):  # rows has no flag
        parse_config(_FileRows, ["--rows", "a"])
    path.write_text("rows: [a, b]\n")
    with pytest.raises(OptionError, match=r"rows.yaml: rows \(--rows\) must be a list of mappings, got \['a', 'b'\]"):
        parse_config(_FileRows, ["--config", str(path)])
    with pytest.raises(SystemExit):
        parse_config(_FileRows, ["--help"])
    help_text = capsys.readouterr().out
    assert "at most 50 % of them; an integer >= 1" in help_text and "rows: row mappings" in help_text


def test_run_command_names_the_bad_option_and_exits_2(tmp_path, capsys):
    path = tmp_path / "rows.json"
    path.write_text('{"rows": [{"name": "a"}, {"name": "b"}]}')
    assert run_command(_run_rows, _FileRows, ["--config", str(path), "--limit", "1"], "python -m csfm.rows", None) == 1
    with pytest.raises(SystemExit) as exit_info:
        run_command(_run_rows, _FileRows, ["--limit", "0"], "python -m csfm.rows", None)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "csfm.rows: error: --limit must be an integer >= 1, got 0\n"
