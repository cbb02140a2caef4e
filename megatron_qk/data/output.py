"""The output side of a preprocess run: split writers, committed state, commits, publication.

:class:`OutputRun` appends processed batches to the train/valid :class:`TokenStreamWriter`,
applies ``--max-docs``/``--max-tokens`` document by document, reports skipped records (the first
:data:`MAX_EXAMPLES` with file:line), raises strict mode's error in input order, and commits:
fsync the data, then atomically replace the manifest with the new :class:`RunState`. State changes
only after a batch is fully appended, so a commit (including the one made after an error or
Ctrl-C) never records half a batch; bytes written after the last commit are truncated away on
resume. :meth:`OutputRun.finalize` writes the ``.idx`` files and summary inside the work
directory, records the renames in the manifest (``finalizing``), then publishes them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from megatron_qk.data.encode import EncodedChunk, resolve_backend
from megatron_qk.data.indexed import TokenStreamWriter
from megatron_qk.data.options import PreprocessConfig
from megatron_qk.data.readers import PreprocessError, RawBatch, Source
from megatron_qk.data.records import BLANK_LINE, SKIP_REASONS, SkipEvent
from megatron_qk.data.tokenizer import TokenizerInfo
from megatron_qk.data.workdir import OutputPaths, WorkDir, final_moves, publish
from megatron_qk.rundir.atomic import write_json_atomic

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid")
MAX_EXAMPLES = 10
"""Skipped records reported with file:line (logged, and kept in the summary)."""


@dataclasses.dataclass
class RunState:
    """Committed progress (stored in the manifest)."""

    position: list[int] = dataclasses.field(default_factory=lambda: [0, 0])
    documents: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    skipped: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0)
    )
    examples: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    blank_lines: int = 0
    id_fallbacks: int = 0
    limit_reached: bool = False
    seconds: float = 0.0

    @property
    def total_documents(self) -> int:
        """Documents in both splits."""
        return sum(self.documents.values())

    @property
    def total_tokens(self) -> int:
        """Tokens in both splits (EOD included)."""
        return sum(self.tokens.values())

    @property
    def records(self) -> int:
        """Input records and blank lines consumed."""
        return self.total_documents + sum(self.skipped.values()) + self.blank_lines


class OutputRun:
    """The output side of one invocation: split writers, committed state, commits, publication.

    Args:
        config: the options.
        sources: resolved inputs (for the summary).
        tok: the tokenizer.
        work: the locked work directory.
        state: committed state (fresh or from the manifest).
        identity: what the output depends on (stored in the manifest).
        key: fingerprint of ``identity``.
        on_event: commit hook (see :func:`~megatron_qk.data.pipeline.preprocess`).
        t0: ``time.perf_counter()`` at the start of the invocation.
    """

    def __init__(
        self,
        config: PreprocessConfig,
        sources: list[Source],
        tok: TokenizerInfo,
        work: WorkDir,
        state: RunState,
        identity: dict[str, Any],
        key: str,
        on_event: Callable[[str, dict[str, Any]], None] | None,
        t0: float,
    ) -> None:
        self.config, self.sources, self.tok, self.work = config, sources, tok, work
        self.paths = OutputPaths(config.output_prefix)
        self.state, self.identity, self.on_event = state, identity, on_event
        self.key = key
        self.splits = SPLITS if config.valid_fraction > 0 else ("train",)
        self.start_tokens = state.total_tokens
        self.seconds_before = state.seconds  # processing time of earlier, interrupted runs
        self.t0 = t0
        self.writers: dict[str, TokenStreamWriter] = {}
        self.workers = config.workers  # the pool actually started (the request may be lowered)

    def open_writers(self, resume: bool) -> None:
        for split in self.splits:
            self.writers[split] = TokenStreamWriter(
                self.work.file(f"{split}.bin"),
                self.work.file(f"{split}.lens"),
                self.tok.dtype_name,
                resume_bytes=self._committed_bytes(split) if resume else None,
                resume_sequences=self.state.documents[split],
            )

    def _committed_bytes(self, split: str) -> int:
        return self.state.tokens[split] * np.dtype(self.tok.dtype_name).itemsize

    def commit(self, phase: str = "running", extra: dict[str, Any] | None = None) -> None:
        for writer in self.writers.values():
            writer.commit()
        self.state.seconds = self.seconds_before + (time.perf_counter() - self.t0)
        manifest = {"fingerprint": self.key, "identity": self.identity, "phase": phase}
        manifest["state"] = dataclasses.asdict(self.state)
        self.work.write_manifest({**manifest, **(extra or {})})
        if self.on_event:
            self.on_event("commit" if phase == "running" else phase, manifest)

    def _cut(self, enc: EncodedChunk) -> int | None:
        """Documents of ``enc`` to keep when a limit is reached inside it, else ``None``."""
        cfg, state, n_docs = self.config, self.state, enc.num_docs
        cut = None
        if n_docs and cfg.max_docs is not None and cfg.max_docs - state.total_documents <= n_docs:
            cut = cfg.max_docs - state.total_documents
        if n_docs and cfg.max_tokens is not None:
            order = np.empty(n_docs, dtype=np.int64)  # document lengths in input order
            if enc.valid is None:
                order[:] = enc.train_lengths
            else:
                is_valid = np.frombuffer(enc.valid, np.uint8).astype(bool)
                order[~is_valid], order[is_valid] = enc.train_lengths, enc.valid_lengths
            remaining = cfg.max_tokens - state.total_tokens
            first = int(np.searchsorted(np.cumsum(order), remaining))  # cumsum[first] >= remaining
            if first < n_docs:
                cut = first + 1 if cut is None else min(cut, first + 1)
        return cut

    def _note_skip(self, batch: RawBatch, event: SkipEvent) -> None:
        state = self.state
        if event.reason == BLANK_LINE:
            state.blank_lines += 1
            return
        state.skipped[event.reason] += 1
        if len(state.examples) < MAX_EXAMPLES:
            source = self.sources[batch.source_index]
            example: dict[str, Any] = {"reason": event.reason, "file": str(source.path)}
            example[source.label] = event.index + 1
            if event.detail:
                example["detail"] = event.detail[:200]
            state.examples.append(example)
            logger.warning(
                "skipped %s:%d (%s) %s", source.path, event.index + 1, event.reason, event.detail
            )
            if len(state.examples) == MAX_EXAMPLES:
                logger.warning("further skipped records are counted in the summary, not logged")

    def write(self, batch: RawBatch, enc: EncodedChunk) -> bool:
        """Append one processed batch; returns True when ``--max-docs``/``--max-tokens`` is reached.

        Limits apply document by document: what follows the last kept document (documents, skipped
        records) is not counted, exactly as in a run that stopped there.

        Raises:
            PreprocessError: in strict mode, at the batch's bad record (naming file and line),
                after the documents before it were written.
        """
        state = self.state
        cut = self._cut(enc)
        stop = cut is not None
        keep = enc.num_docs if cut is None else cut
        n_valid = sum(enc.valid[:keep]) if enc.valid is not None else 0
        pieces = {
            "train": (enc.train_tokens, enc.train_lengths, keep - n_valid),
            "valid": (enc.valid_tokens, enc.valid_lengths, n_valid),
        }
        for split, writer in self.writers.items():
            tokens, lengths, n = pieces[split]
            if n < len(lengths):
                lengths = lengths[:n]
                tokens = tokens[: int(lengths.sum())]
            writer.append(tokens, lengths)
        # State changes only after every append: a commit never records half a batch.
        for split in self.splits:
            _, lengths, n = pieces[split]
            state.documents[split] += n
            state.tokens[split] += int(lengths[:n].sum())
        for event in enc.skips:
            if stop and event.docs_before >= keep:
                break  # after the last kept document: a run that stopped there never read it
            self._note_skip(batch, event)
        state.id_fallbacks += enc.id_fallbacks
        error = enc.error if not stop else None
        if error is not None:
            state.position = [batch.source_index, error.index]
        elif batch.end_of_source:
            state.position = [batch.source_index + 1, 0]
        else:
            state.position = [batch.source_index, batch.end_record]
        state.limit_reached = state.limit_reached or stop
        if error is not None:
            source = self.sources[batch.source_index]
            line = error.index + 1
            raise PreprocessError(
                f"{source.path}:{line}: bad record ({source.label} {line}): {error.reason}"
                + (f": {error.detail}" if error.detail else "")
            )
        return stop

    def split_info(self, split: str) -> dict[str, Any] | None:
        if split not in self.splits or self.state.documents[split] == 0:
            return None
        prefix = self.paths.split_prefix(split)
        return {
            "documents": self.state.documents[split],
            "tokens": self.state.tokens[split],
            "prefix": prefix,
            "bin": prefix + ".bin",
            "idx": prefix + ".idx",
        }

    def summary(self, resumed_from: dict[str, int] | None) -> dict[str, Any]:
        cfg, state, tok = self.config, self.state, self.tok
        seconds = time.perf_counter() - self.t0
        new_tokens = state.total_tokens - self.start_tokens
        return {
            "documents": state.total_documents,
            "tokens": state.total_tokens,
            "skipped": dict(state.skipped),
            "skipped_total": sum(state.skipped.values()),
            "skipped_examples": state.examples,
            "blank_lines": state.blank_lines,
            "seconds": round(seconds, 3),
            "tokens_per_second": round(new_tokens / seconds, 1) if seconds > 0 else None,
            "train": self.split_info("train"),
            "valid": self.split_info("valid"),
            "valid_fraction": cfg.valid_fraction,
            "split_by": cfg.split_by,
            "split_seed": cfg.split_seed,
            "split_by_text_fallbacks": state.id_fallbacks,
            "min_int_score": cfg.min_int_score,
            "max_docs": cfg.max_docs,
            "max_tokens": cfg.max_tokens,
            "limit_reached": state.limit_reached,
            "inputs": [s.fingerprint() for s in self.sources],
            "tokenizer": {
                "source": tok.source,
                "sha256": tok.ranks_sha256,
                "is_gpt2": tok.is_gpt2,
                "eod_id": tok.eod_id,
                "vocab_size": tok.vocab_size,
                "dtype": tok.dtype_name,
            },
            "workers": self.workers,
            "workers_requested": cfg.workers,
            "backend": resolve_backend(self.workers, cfg.backend),
            "resumed": resumed_from is not None,
            "resumed_from": resumed_from,
            "processing_seconds_all_runs": round(self.seconds_before + seconds, 3),
            "fingerprint": self.key,
            "shard": self.identity.get("shard"),
        }

    def finalize(self, resumed_from: dict[str, int] | None) -> dict[str, Any]:
        for split in SPLITS:
            writer = self.writers.get(split)
            if writer is not None and self.state.documents[split] > 0:
                writer.finalize(self.work.file(f"{split}.idx"))
            elif writer is not None:
                writer.close()
        summary = self.summary(resumed_from)
        write_json_atomic(self.work.file("summary.json"), summary, mode=0o600)
        renames, removals = final_moves(self.paths, self.work, self.state.documents)
        self.commit("finalizing", {"renames": renames, "removals": removals})
        publish(renames, removals)
        return summary
