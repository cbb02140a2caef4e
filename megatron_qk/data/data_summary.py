"""The tokenizer recorded in ``P_summary.json`` by ``megatron-qk preprocess``, checked against a
recipe: a model must be trained on data tokenised for its vocabulary, and a blend must not mix
tokenizers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from megatron_qk.config.errors import ConfigError
from megatron_qk.config.schema import ExperimentConfig


def data_summary_paths(cfg: ExperimentConfig) -> list[Path]:
    """``P_summary.json`` files of the run's ``P_text_document`` / ``P_valid_text_document``
    prefixes (whether or not they exist)."""
    if cfg.data.kind != "indexed":
        return []
    paths = []
    for prefix in [*cfg.data.train_prefixes, *cfg.data.valid_prefixes]:
        base = re.sub(r"(_valid)?_text_document$", "", str(prefix))
        if base != str(prefix):
            paths.append(Path(f"{base}_summary.json"))
    return paths


def recorded_tokenizers(cfg: ExperimentConfig) -> dict[Path, dict]:
    """``{summary path: its "tokenizer" record}`` for the summaries that exist.

    Raises:
        ConfigError: a summary exists but cannot be read.
    """
    out = {}
    for path in data_summary_paths(cfg):
        if not path.exists():
            continue
        try:
            out[path] = json.loads(path.read_text(encoding="utf-8")).get("tokenizer") or {}
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError("data", f"cannot read the data summary {path}: {e}") from e
    return out


def check_data_tokenizer(cfg: ExperimentConfig) -> int | None:
    """Refuse data tokenised for another vocabulary, or a blend of different tokenizers.

    Returns:
        The end-of-document id the data was written with (None when no summary records it).

    Raises:
        ConfigError: at ``model.vocab_size`` or ``data.train_prefixes``, naming the summary.
    """
    records = recorded_tokenizers(cfg)
    first: tuple[Path, dict] | None = None
    for path, tok in records.items():
        vocab = tok.get("vocab_size")
        if vocab is not None and vocab != cfg.model.vocab_size:
            raise ConfigError(
                "model.vocab_size",
                f"{cfg.model.vocab_size}, but {path} records data tokenised by "
                f"{tok.get('source')} with {vocab} ids; set model.vocab_size: {vocab} or use "
                "data tokenised for this model",
            )
        if first is None:
            first = (path, tok)
        elif tok.get("sha256") != first[1].get("sha256"):
            raise ConfigError(
                "data.train_prefixes",
                f"{path} was tokenised by {tok.get('source')}, {first[0]} by "
                f"{first[1].get('source')}: one run's data must share one tokenizer",
            )
    return None if first is None else first[1].get("eod_id")
