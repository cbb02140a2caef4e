"""``megatron-qk export``: a trained checkpoint in a format other tools read.

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

import argparse
import json
import shutil
import sys
from pathlib import Path

from megatron_qk.rundir.cli_args import add_checkpoint_argument
from megatron_qk.rundir.layout import (
    CONFIG_FILE,
    checkpoint_name,
    checkpoints_dir,
    is_checkpoint,
    resolve_checkpoint,
)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the export options."""
    add_checkpoint_argument(parser)
    parser.add_argument(
        "--step", type=int, default=None, help="export the checkpoint taken after this step"
    )
    parser.add_argument("--format", choices=("hf", "megatron"), required=True)
    parser.add_argument(
        "--out", required=True, help="output directory (must not exist or be empty)"
    )
    parser.add_argument(
        "--tokenizer",
        default="gpt2",
        help="the run's tokenizer, as given to preprocess (default: gpt2); checked against the "
        "run's vocabulary and data summary",
    )


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
    from megatron_qk.data.tokenizer import load_tokenizer
    from megatron_qk.evaluation.suite import check_tokenizer
    from megatron_qk.export.hf import ExportError
    from megatron_qk.training.restore import load_checkpoint_for_analysis

    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty")
    path = _checkpoint_path(checkpoint, step)
    _, run_dir = resolve_checkpoint(path)
    tok = load_tokenizer(tokenizer)
    from megatron_qk.config.loader import load_resolved_config

    cfg = load_resolved_config(run_dir / CONFIG_FILE)
    check_tokenizer(cfg, tok, run_dir / CONFIG_FILE)
    # Written next to ``out`` and renamed at the end: an interrupted export leaves no half model.
    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    if fmt == "hf":
        from megatron_qk.export.hf import hf_architecture, write_hf_model
        from megatron_qk.export.hf_tokenizer import write_hf_tokenizer

        hf_architecture(cfg.model)  # refuse before loading weights
        loaded = load_checkpoint_for_analysis(path)
        state = {k: v.cpu() for k, v in loaded.model.state_dict().items() if v is not None}
        files = write_hf_model(work, loaded.cfg, state, tok.vocab_size, tok.eod_id)
        files += write_hf_tokenizer(work, tok, cfg.model.seq_length)
    else:
        from megatron_qk.export.megatron import write_megatron_checkpoint

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


def run(args: argparse.Namespace) -> int:
    """Run the export; 0 on success, 1 for a bad checkpoint, model or output directory."""
    from megatron_qk.data.tokenizer import TokenizerError
    from megatron_qk.evaluation.suite import EvalError
    from megatron_qk.export.hf import ExportError

    try:
        summary = export_checkpoint(
            args.checkpoint, Path(args.out), args.format, args.step, args.tokenizer
        )
    except (FileNotFoundError, ExportError, TokenizerError, EvalError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(f"export: wrote {args.format} step {summary['step']} to {args.out}")
    return 0
