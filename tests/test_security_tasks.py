"""``--task-dir`` folders that would run code are refused unless ``--trust-task-code`` is given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_qk.evaluation.suite import EvalError, load_tasks, resolve_tasks, set_offline_env
from megatron_qk.evaluation.task_trust import find_task_code


def _task(directory: Path, name: str, extra: str = "") -> Path:
    """A local multiple-choice task; ``extra`` is appended verbatim to its YAML."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text(json.dumps({"question": "Q?", "choices": ["a", "b"], "label": 0}) + "\n")
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(directory / "hf")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_target": "label",
        "doc_to_choice": "{{choices}}",
        "metadata": {"version": 1.0},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False) + extra)
    return path


def _plant_function(directory: Path, marker: Path) -> None:
    """``process_docs: !function utils.process_docs`` with a utils.py that touches ``marker``."""
    _task(directory, "evil_task", "process_docs: !function utils.process_docs\n")
    (directory / "utils.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef process_docs(dataset):\n    return dataset\n"
    )


def test_function_tag_with_python_file_is_refused_and_never_runs(tmp_path):
    set_offline_env()
    marker = tmp_path / "pwned"
    _plant_function(tmp_path / "tasks", marker)
    with pytest.raises(EvalError, match=r"(?s)utils\.py.*!function.*--trust-task-code"):
        manager, resolved = resolve_tasks(["evil_task"], [tmp_path / "tasks"])
        load_tasks(manager, resolved)  # today's code imports utils.py here
    assert not marker.exists()


def test_trust_task_code_lets_the_harness_run_it(tmp_path):
    set_offline_env()
    marker = tmp_path / "ran"
    _plant_function(tmp_path / "tasks", marker)
    manager, resolved = resolve_tasks(["evil_task"], [tmp_path / "tasks"], trust_task_code=True)
    load_tasks(manager, resolved)
    assert marker.exists()  # the opt-in really is what enables the code


def test_yaml_only_payloads_and_includes_are_found(tmp_path):
    tasks = tmp_path / "tasks"
    _task(tasks, "plain")
    _task(tasks, "verbatim", "doc_to_text: !<!function> os.getcwd\n")
    _task(tasks, "pyname", "doc_to_text: !!python/name:os.getcwd ''\n")
    outside = tmp_path / "outside" / "base.yaml"
    outside.parent.mkdir()
    outside.write_text("process_docs: !function builtins.print\n")
    _task(tasks, "includer", "include: ../outside/base.yaml\n")
    found = "\n".join(find_task_code([tasks]))
    assert "verbatim.yaml" in found and "pyname.yaml" in found and "base.yaml" in found
    assert "plain.yaml" not in found and "includer.yaml" not in found


def test_plain_task_folder_passes(tmp_path):
    _task(tmp_path / "tasks", "plain")
    assert find_task_code([tmp_path / "tasks"]) == []
