"""``megatron-qk --help`` and every subcommand's ``--help`` print and exit 0, fast and plainly.

argparse %-formats help strings, so a literal ``%`` in a subcommand's one-line help crashed
``megatron-qk --help`` with a ValueError (the readout help said "@3%/@20%"); escaped in the
description too, it printed "@3%%/@20%%" there. Issue 26: every ``--help`` imports neither torch
nor megatron-core, ``--version``, the presets in ``train --help``, the defaults in
``quickstart --help``, and no parser takes an unknown option for a known one by prefix.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from megatron_qk.cli import SUBCOMMANDS, build_parser, main
from megatron_qk.config.loader import list_presets, load_config

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"megatron-qk {name}" in capsys.readouterr().out


# -- issue 26 item 5: every --help is instant: it imports neither torch nor megatron-core -------
HELP_CHECK = (
    "import sys\n"
    "from megatron_qk.cli import SUBCOMMANDS, main\n"
    "heavy_by = {}\n"
    "for name in ['', *SUBCOMMANDS]:\n"
    "    try:\n"
    "        main([name, '--help'] if name else ['--help'])\n"
    "    except SystemExit:\n"
    "        pass\n"
    "    heavy = [m for m in sys.modules\n"
    "             if m == 'torch' or m.startswith(('torch.', 'megatron.'))]\n"
    "    if heavy and not heavy_by:\n"
    "        heavy_by[name] = sorted(heavy)[:5]\n"
    "assert not heavy_by, f'--help imported torch/megatron: {heavy_by}'\n"
)


def test_every_help_imports_nothing_heavy_and_prints_no_warning():
    proc = subprocess.run(
        [sys.executable, "-c", HELP_CHECK],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no Megatron-Core warning before the help
    for name in SUBCOMMANDS:
        assert f"megatron-qk {name}" in proc.stdout


# -- item 9 -------------------------------------------------------------------------------------
def test_readout_help_prints_single_percent_signs(capsys):
    for argv in (["--help"], ["readout", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "@3%/@20%" in " ".join(out.split())
        assert "%%" not in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"megatron-qk \S+ \(megatron-core \S+, torch \S+\)\n", out), out


def test_train_help_lists_every_preset_on_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for name in list_presets():
        hits = [line for line in lines if line.split()[:1] == [name]]
        assert len(hits) == 1, (name, hits)
        assert "layers" in hits[0]  # the description and the model's shape, on that line


def _help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_export_format_has_help(capsys):
    out = _help_of(["export"], capsys)
    assert re.search(r"--format \{hf,megatron\} hf: a transformers model", out), out


def _subparser(name: str) -> argparse.ArgumentParser:
    (sub,) = [
        a for a in build_parser(only=name)._actions if isinstance(a, argparse._SubParsersAction)
    ]
    return sub.choices[name]


def test_quickstart_help_shows_every_default(capsys):
    parser = _subparser("quickstart")
    formatter = parser._get_formatter()
    steps = load_config("quickstart").training.train_steps
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(options) == 7  # six of its own and the common --verbose
    for action in options:
        text = formatter._expand_help(action)  # the help as --help prints it
        shown = steps if action.default is None else action.default  # --steps: the preset's
        assert "default" in text and str(shown) in text, (action.option_strings, text)


# -- item 11: no prefix matching ----------------------------------------------------------------
def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_parser_refuses_abbreviations():
    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) > len(SUBCOMMANDS)  # the nested tokenizer / theory parsers too
    assert [p.prog for p in parsers if p.allow_abbrev] == []


def test_an_unknown_option_is_not_taken_for_a_known_one(capsys):
    base = ["preprocess", "--input", "x.jsonl", "--output-prefix", "o"]
    parser = build_parser(only="preprocess")
    default = parser.parse_args(base).shard_size
    try:  # the case (should preprocess ever get a --shard option, it must be that one)
        args = parser.parse_args([*base, "--shard", "0/3"])
    except SystemExit as exc:
        assert exc.code == 2
        assert "unrecognized arguments: --shard 0/3" in capsys.readouterr().err
    else:
        assert args.shard_size == default
    with pytest.raises(SystemExit) as exc:  # a prefix of --shard-size alone
        main([*base, "--shard-s", "7"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --shard-s 7" in capsys.readouterr().err


def test_python_m_train_refuses_abbreviations(monkeypatch, capsys):
    import megatron_qk.train as train_module

    monkeypatch.setattr(train_module, "run", lambda args: pytest.fail(f"ran with {args}"))
    with pytest.raises(SystemExit) as exc:
        train_module.main(["tiny", "--dry"])  # not --dry-run
    assert exc.value.code == 2
    assert "unrecognized arguments: --dry" in capsys.readouterr().err


def test_tools_preprocess_data_refuses_abbreviations():
    spec = importlib.util.spec_from_file_location("preprocess_data", TOOLS / "preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert [p.prog for p in _all_parsers(module.build_parser()) if p.allow_abbrev] == []
