"""Exporting a trained checkpoint in a format other tools read (``megatron-qk export``).

Example::

    megatron-qk export --checkpoint runs/tiny --format hf --out exported/tiny-hf
    megatron-qk export --checkpoint runs/tiny --step 40 --format megatron --out exported/tiny-mcore

``--format hf`` writes a transformers model directory (``config.json``, ``model.safetensors``,
``tokenizer.json``) that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline. ``--format megatron`` writes a stock Megatron-Core
``torch_dist`` checkpoint with the fused ``linear_qkv`` that a stock ``GPTModel`` loads.
A checkpoint written under any TP/PP layout is exported (it is loaded into one process first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_qk.config.extras import require
from megatron_qk.config.loader import load_resolved_config
from megatron_qk.data.tokenizer import load_tokenizer
from megatron_qk.evaluation.suite import check_tokenizer
from megatron_qk.export import hf_tokenizer
from megatron_qk.export.hf import ExportError, hf_architecture, write_hf_model
from megatron_qk.export.megatron import write_megatron_checkpoint
from megatron_qk.rundir.layout import (
    CONFIG_FILE,
    checkpoint_name,
    checkpoints_dir,
    is_checkpoint,
    resolve_checkpoint,
)
from megatron_qk.training.restore import load_checkpoint_for_analysis


def _checkpoint_path(checkpoint: str, step: int | None) -> Path:
    if step is None:
        return Path(checkpoint)
    _, run_dir = resolve_checkpoint(checkpoint)
    path = checkpoints_dir(run_dir) / checkpoint_name(step)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"no complete checkpoint for --step {step} ({path})")
    return path


def export_checkpoint(checkpoint: str, out: Path, fmt: str, step=None, tokenizer="gpt2") -> dict:
    """Export one checkpoint; returns a summary (also written as ``out/export.json``).

    Raises:
        FileNotFoundError: checkpoint or step missing.
        ExportError: the model has no exact equivalent in ``fmt``, or ``out`` is not empty.
    """
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty")
    path = _checkpoint_path(checkpoint, step)
    _, run_dir = resolve_checkpoint(path)
    tok = load_tokenizer(tokenizer)
    cfg = load_resolved_config(run_dir / CONFIG_FILE)
    check_tokenizer(cfg, tok, run_dir / CONFIG_FILE)
    # Written next to ``out`` and renamed at the end: an interrupted export leaves no half model.
    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    if fmt == "hf":
        hf_architecture(cfg.model)  # refuse before loading weights
        require("safetensors.torch", "export --format hf")
        loaded = load_checkpoint_for_analysis(path)
        state = {k: v.cpu() for k, v in loaded.model.state_dict().items() if v is not None}
        files = write_hf_model(work, loaded.cfg, state, tok.vocab_size, tok.eod_id)
        files += hf_tokenizer.write_hf_tokenizer(work, tok, cfg.model.seq_length)
    else:
        loaded = load_checkpoint_for_analysis(path)
        files = write_megatron_checkpoint(work, loaded)
    summary = {
        "format": fmt,
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "tokenizer": {"source": tok.source, "sha256": tok.ranks_sha256, "vocab": tok.vocab_size},
        "files": sorted(str(p.relative_to(work)) for p in files),
    }
    (work / "export.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        out.rmdir()  # checked empty above
    work.rename(out)
    return summary
