"""The README's "Your own run, next" commands work as printed (issue 26, item 15).

The test reads the section's recipe and commands from README.md and runs them in a fresh
directory: ``preprocess`` on a small jsonl, the recipe as printed, the dry run of the 270M recipe
as printed (meta device), then both training commands with the model and batch shrunk by extra
``--set`` overrides and ``--nproc-per-node 8`` dropped (a CPU), and ``diagnose``, ``compare`` and
``export`` as printed.
"""

from __future__ import annotations

import json
import random
import re
import shlex
from pathlib import Path

from megatron_qk.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "### Your own run, next"
# The 270M recipe at CPU scale: the same keys for both arms, so compare still pairs them.
TINY = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=256",
    "model.seq_length=64",
    "training.global_batch_size=4",
    "training.micro_batch_size=2",
    "training.train_tokens=null",
    "training.train_steps=4",
    "training.eval_interval=2",
    "training.eval_iters=1",
    "training.save_interval=4",
    "training.save_at_fracs=[]",
    "training.precision=fp32",
    "parallel.use_distributed_optimizer=false",
    "parallel.overlap_grad_reduce=false",
    "diagnostics.num_sequences=2",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]
WORDS = (
    "the model reads text and learns which token comes next while attention in the upper "
    "layers sharpens early and the lower layers copy earlier tokens of the same sequence"
).split()


def _section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n### ", start + len(SECTION))
    return text[start:end]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _commands(section: str) -> list[list[str]]:
    commands = []
    for block in _blocks(section, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                assert argv[0] == "megatron-qk", line
                commands.append(argv[1:])
    return commands


def _corpus(path: Path, documents: int = 240) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(documents):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 90)))
            f.write(json.dumps({"text": text.capitalize() + "."}) + "\n")


def test_readme_own_run_commands_work_as_printed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    section = _section()
    (recipe,) = _blocks(section, "yaml")
    recipe_name = re.search(r"`([\w.-]+\.yaml)`", section).group(1)
    (tmp_path / recipe_name).write_text(recipe, encoding="utf-8")
    commands = _commands(section)
    assert [c[0] for c in commands] == [
        "preprocess",
        "train",
        "train",
        "train",
        "diagnose",
        "compare",
        "export",
    ]
    preprocess, dry_run, control, intervention, diagnose, compare, export = commands
    _corpus(tmp_path / preprocess[preprocess.index("--input") + 1])

    assert main([*preprocess, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(dry_run) == 0  # the 270M recipe on the meta device, its data checked
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["total"] == report["expected_parameters"]
    assert report["config"]["data"]["train_prefixes"] == ["data/my_corpus_text_document"]
    for argv in (control, intervention):
        i = argv.index("--nproc-per-node")
        assert main([*argv[:i], *argv[i + 2 :], "--set", *TINY]) == 0
    for argv in (diagnose, compare, export):
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert "intervention" in out and "control" in out  # the compare table
    exported = tmp_path / export[export.index("--out") + 1]
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
