"""Offline stand-ins for the paper's downstream suite, for the table runner's smoke mode.

On a cluster, ``megatron-qk table`` scores each run of a table with an ``eval_tasks`` file (Table
1, which gives Table 2) on the real lm-eval tasks with the GPT-2 tokenizer. The smoke model has a
vocabulary of :data:`SMOKE_VOCAB` ids and no network, so smoke mode scores it with

* a character-level Hugging Face ``tokenizer.json`` of exactly :data:`SMOKE_VOCAB` ids (id 0
  ``<|endoftext|>``, id 1 ``<unk>``, ids 2-127 the ASCII character of that code), and
* local lm-eval tasks (``--task-dir``) named and shaped like the suite's (:data:`PAPER_SUITE`):
  multiple choice with ``acc`` and ``acc_norm`` for PIQA, HellaSwag, ARC-Easy, ARC-Challenge and
  RACE; a cloze task with ``acc`` and ``perplexity`` for LAMBADA (named ``lambada_openai``, the
  harness task ``lambada`` resolves to); a group ``mmlu`` of two subtasks, ``acc`` weighted by
  size.

A few hand-written documents each, the same on every call. They test the plumbing (``eval`` ->
``eval.json`` -> ``compare``'s Table 2 rows, both metrics), not the tasks: the scores of a 20-step
model on them mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from megatron_qk.evaluation.suite import PAPER_SUITE, TASK_ALIASES
from megatron_qk.rundir.atomic import write_text_atomic

SMOKE_VOCAB = 128
"""The smoke model's ``model.vocab_size``: the character tokenizer has exactly these ids."""

EOD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
SMOKE_EVAL_DIR = ".smoke_eval"
"""Where, under the runs directory, the tokenizer, the task folder and its dataset cache go."""

# Multiple-choice questions: (question, choices). Choices differ in length so that the
# length-normalised accuracy can differ from the plain one.
MC_POOL = (
    ("2+2=", ["4", "five", "22"]),
    ("The sky is", ["blue", "green grass", "red"]),
    ("A cat says", ["meow", "woof woof", "moo"]),
    ("Ice is", ["cold", "hot", "warm water"]),
    ("After a b c", ["d", "e f g", "z"]),
    ("At noon the sun is", ["up", "down below", "away"]),
)
# Cloze documents like LAMBADA's: the target is the last word of the passage.
CLOZE_DOCS = (
    ("The cat sat on the", " mat"),
    ("One, two, three,", " four"),
    ("Bread and", " butter"),
    ("Salt and", " pepper"),
)
MC_METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
]
MC_CONFIG = {
    "output_type": "multiple_choice",
    "doc_to_text": "Q: {{question}}\nA:",
    "doc_to_target": "label",
    "doc_to_choice": "{{choices}}",
    "metric_list": MC_METRICS,
}
CLOZE_CONFIG = {  # LAMBADA's metrics: acc = the target is the greedy continuation
    "output_type": "loglikelihood",
    "doc_to_text": "{{context}}",
    "doc_to_target": "{{target}}",
    "metric_list": [
        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
        {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    ],
}
# The suite's kinds: what each stand-in is (the group's subtasks have MMLU's acc only).
KINDS = {
    "piqa": "mc",
    "hellaswag": "mc",
    "arc_easy": "mc",
    "arc_challenge": "mc",
    "race": "mc",
    "lambada": "cloze",
    "mmlu": "group",
}
MMLU_PARTS = {"mmlu_smoke_a": 3, "mmlu_smoke_b": 2}  # subtask -> documents (unequal: by size)


def write_char_tokenizer(path: Path) -> str:
    """Write the character-level ``tokenizer.json`` of :data:`SMOKE_VOCAB` ids.

    Returns:
        The ``--tokenizer`` spec (``FILE.json::<|endoftext|>``).
    """
    vocab = {EOD_TOKEN: 0, UNK_TOKEN: 1}
    vocab.update({chr(code): code for code in range(2, SMOKE_VOCAB)})
    special = [
        {
            "id": i,
            "content": text,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, text in enumerate((EOD_TOKEN, UNK_TOKEN))
    ]
    # A BPE model without merges splits the text into characters; no pre-tokenizer, so spaces
    # and newlines are characters too, and the Fuse decoder joins the characters back.
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK_TOKEN,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
    _write_if_changed(path, json.dumps(spec, indent=1, sort_keys=True) + "\n")
    return f"{path}::{EOD_TOKEN}"


def _mc_docs(offset: int, count: int) -> list[dict]:
    docs = []
    for j in range(count):
        question, choices = MC_POOL[(offset + j) % len(MC_POOL)]
        docs.append({"question": question, "choices": choices, "label": (offset + j) % 3})
    return docs


def _write_if_changed(path: Path, text: str) -> None:
    # The datasets cache keys on the data files: leave an unchanged file (and its mtime) alone.
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)


def _write_task(task_dir: Path, cache_dir: Path, name: str, docs: list[dict], config: dict) -> None:
    data = task_dir / f"{name}.jsonl"
    _write_if_changed(data, "".join(json.dumps(d, sort_keys=True) + "\n" for d in docs))
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        "metadata": {"version": 1.0},
        **config,
    }
    _write_if_changed(task_dir / f"{name}.yaml", yaml.safe_dump(spec, sort_keys=False))


def write_stand_in_tasks(task_dir: Path, cache_dir: Path) -> list[str]:
    """Write a local lm-eval task for every task of :data:`PAPER_SUITE` into ``task_dir``.

    Args:
        task_dir: the ``--task-dir`` folder (created).
        cache_dir: the ``datasets`` cache of the tasks' JSON files (kept out of ``task_dir``:
            the harness indexes every YAML under it).

    Returns:
        The suite's names, which ``megatron-qk eval --tasks`` resolves to these stand-ins.
    """
    assert set(KINDS) == set(PAPER_SUITE), "a stand-in for every task of the paper's suite"
    task_dir.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(PAPER_SUITE):
        kind = KINDS[name]
        if kind == "mc":
            _write_task(task_dir, cache_dir, name, _mc_docs(index, 4), MC_CONFIG)
        elif kind == "cloze":
            docs = [{"context": c, "target": t} for c, t in CLOZE_DOCS]
            _write_task(task_dir, cache_dir, TASK_ALIASES.get(name, name), docs, CLOZE_CONFIG)
        else:
            offset = index
            for part, count in MMLU_PARTS.items():
                config = {**MC_CONFIG, "metric_list": MC_METRICS[:1]}
                _write_task(task_dir, cache_dir, part, _mc_docs(offset, count), config)
                offset += count
            group = {
                "group": name,
                "task": list(MMLU_PARTS),
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                "metadata": {"version": 1},
            }
            _write_if_changed(task_dir / f"{name}.yaml", yaml.safe_dump(group, sort_keys=False))
    return list(PAPER_SUITE)


def prepare_smoke_eval(runs_dir: Path) -> list[str]:
    """Write the tokenizer and the stand-in tasks under ``runs_dir`` (unchanged files are kept).

    Returns:
        The ``megatron-qk eval`` options that use them (``--tokenizer``, ``--task-dir``).
    """
    root = Path(runs_dir) / SMOKE_EVAL_DIR
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = write_char_tokenizer(root / "tokenizer.json")
    write_stand_in_tasks(root / "tasks", root / "hf_cache")
    return ["--tokenizer", tokenizer, "--task-dir", str(root / "tasks")]
