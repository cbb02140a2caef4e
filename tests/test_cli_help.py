"""``megatron-qk --help`` and every subcommand's ``--help`` print and exit 0.

argparse %-formats help strings, so a literal ``%`` in a subcommand's one-line help crashed
``megatron-qk --help`` with a ValueError (the readout help said "@3%/@20%").
"""

from __future__ import annotations

import pytest

from megatron_qk.cli import SUBCOMMANDS, main


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
