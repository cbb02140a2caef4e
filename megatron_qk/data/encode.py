"""Workers: parse, validate, split and tokenize raw batches in parallel; results in input order.

Each task takes one :class:`~megatron_qk.data.readers.RawBatch` (about 0.5 MB of raw jsonl, or a
slice of a parquet record batch), parses and classifies its records
(:mod:`megatron_qk.data.records`) and encodes the kept documents. Parsing happens in the tasks,
not in the reading thread: a reading thread that parses JSON holds the GIL for whole switch
intervals while the encoders wait for it (measured: ~15% of throughput on 2 cores).

Backends (``auto`` picks ``process`` for more than one worker):

* ``process``: a spawned process pool. No GIL is shared at all; measured on the 2-core CI
  machine, it matches or beats raw tiktoken on two threads (benchmarks/preprocess.py), at
  ~0.3 s of extra start-up. Library callers that use it from a script need the usual
  ``if __name__ == "__main__":`` guard (spawn re-imports the main module).
* ``thread``: tiktoken releases the GIL during BPE, so threads scale too, with no start-up cost
  and no pickling, but they still share the GIL for the per-document Python work.

Both give the same bytes: results are consumed in submission order whatever finishes first, and
at most ``2 * workers + 2`` batches are in flight, which bounds memory.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from megatron_qk.data.readers import RawBatch
from megatron_qk.data.records import RecordConfig, SkipEvent, select_documents
from megatron_qk.rundir.parent_death import die_with_parent

if TYPE_CHECKING:
    import tiktoken

BACKENDS = ("auto", "thread", "process")


def resolve_backend(workers: int, backend: str) -> str:
    """The pool actually used: ``"inline"`` (one worker), ``"thread"`` or ``"process"``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if workers <= 1:
        return "inline"
    return "process" if backend == "auto" else backend


@dataclasses.dataclass
class EncodedChunk:
    """Token ids (with EOD after each document) of one batch, split into train and valid.

    Attributes:
        train_tokens: concatenated tokens of the batch's train documents, in order.
        train_lengths: int32 token count (incl. EOD) of each train document.
        valid_tokens: same for validation documents (empty without a split).
        valid_lengths: same for validation documents.
        valid: per document in input order, 1 if it went to the validation split.
        skips: skipped records and blank lines (see :class:`~megatron_qk.data.records.Selection`).
        id_fallbacks: documents split by text for lack of an id.
        error: strict mode's first bad record, if any.
    """

    train_tokens: np.ndarray
    train_lengths: np.ndarray
    valid_tokens: np.ndarray
    valid_lengths: np.ndarray
    valid: bytes | None = None
    skips: list[SkipEvent] = dataclasses.field(default_factory=list)
    id_fallbacks: int = 0
    error: SkipEvent | None = None

    @property
    def num_docs(self) -> int:
        """Documents in both splits."""
        return len(self.train_lengths) + len(self.valid_lengths)


def encode_documents(
    encoding: tiktoken.Encoding,
    texts: list[str],
    valid: bytes | bytearray | None,
    eod_id: int,
    dtype: str,
) -> EncodedChunk:
    """Encode documents as ``encode_ordinary(text) + [eod_id]`` each, grouped by split.

    Special-token strings such as ``"<|endoftext|>"`` inside a text are encoded as ordinary text
    (like ``encode_ordinary``), so a document can never inject an EOD.

    Args:
        encoding: the tiktoken encoding.
        texts: the documents.
        valid: per document, nonzero for the validation split; ``None`` puts all in train.
        eod_id: end-of-document id.
        dtype: numpy dtype name for storage (``uint16`` for GPT-2).

    Returns:
        The encoded documents (no skip information; see :func:`process_batch`).
    """
    eod = np.array([eod_id], dtype=np.uint32)
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    lengths: tuple[list[int], list[int]] = ([], [])
    encode = encoding.encode_to_numpy
    for i, text in enumerate(texts):
        # encode_to_numpy with no special tokens allowed or checked == encode_ordinary, but skips
        # building a Python list of ints.
        ids = encode(text, disallowed_special=())
        which = 1 if valid is not None and valid[i] else 0
        parts[which].append(ids)
        parts[which].append(eod)
        lengths[which].append(len(ids) + 1)

    def cat(arrays: list[np.ndarray]) -> np.ndarray:
        if not arrays:
            return np.empty(0, dtype=dtype)
        return np.concatenate(arrays).astype(dtype, copy=False)

    return EncodedChunk(
        cat(parts[0]),
        np.asarray(lengths[0], dtype=np.int32),
        cat(parts[1]),
        np.asarray(lengths[1], dtype=np.int32),
        valid=bytes(valid) if valid is not None else None,
    )


def process_batch(
    batch: RawBatch,
    config: RecordConfig,
    encoding: tiktoken.Encoding,
    eod_id: int,
    dtype: str,
) -> EncodedChunk:
    """The worker task: select the documents of a raw batch and encode them."""
    selection = select_documents(batch.kind, batch.payload, batch.first_record, config)
    out = encode_documents(encoding, selection.texts, selection.valid, eod_id, dtype)
    out.skips, out.id_fallbacks, out.error = (
        selection.skips,
        selection.id_fallbacks,
        selection.error,
    )
    return out


# Process backend: each worker process loads the tokenizer once.
_WORKER_STATE: dict[str, Any] = {}


def _init_process_worker(tokenizer_spec: str, config: RecordConfig, parent_pid: int) -> None:
    from megatron_qk.data.tokenizer import load_tokenizer

    # Ctrl-C reaches the whole process group: only the parent handles it (commit, shut down).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A killed parent (SIGKILL, OOM killer) runs no shutdown: the kernel ends the workers. Each
    # holds its own task queue's write end open, so it would otherwise wait for work forever.
    die_with_parent(parent_pid)

    info = load_tokenizer(tokenizer_spec)
    _WORKER_STATE.update(
        encoding=info.encoding, eod_id=info.eod_id, dtype=info.dtype_name, config=config
    )


def _worker_ready() -> None:
    """A no-op task: submitting one per worker makes the pool start them all now."""


def _start_workers_with_sigint_blocked(pool: ProcessPoolExecutor, workers: int) -> None:
    """Start every worker now, with SIGINT blocked while they are created.

    Ctrl-C reaches the whole process group. A worker that gets it before its initializer has
    set SIGINT to ignored dies with a KeyboardInterrupt traceback from ``spawn_main`` (seen under
    load). The signal mask is inherited through fork and exec, so a worker started while the
    parent blocks SIGINT holds it pending until its initializer ignores it (which discards it);
    the parent's own pending Ctrl-C is delivered when the mask is restored, nothing is lost.
    The executor starts workers lazily, one per submission while none is idle, so one no-op
    task per worker, submitted back to back, starts them all inside the blocked window (from the
    main thread, which the kernel's parent-death signal is tied to).
    """
    if not hasattr(signal, "pthread_sigmask"):
        return  # not POSIX: workers start lazily as before
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for _ in range(workers):
            pool.submit(_worker_ready)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _process_in_worker(batch: RawBatch) -> EncodedChunk:
    s = _WORKER_STATE
    return process_batch(batch, s["config"], s["encoding"], s["eod_id"], s["dtype"])


class _InlineExecutor(Executor):
    """Runs tasks at submission (``workers <= 1``): no threads, same code path."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # delivered through .result(), like a real executor
            future.set_exception(e)
        return future


class BatchProcessor:
    """Process raw batches on a pool of workers; yield results in input order.

    Args:
        config: record selection options.
        encoding: tiktoken encoding (thread and inline backends).
        tokenizer_spec: ``--tokenizer`` value, reloaded in each worker (process backend).
        eod_id: end-of-document id.
        dtype: storage dtype name.
        workers: number of workers; ``<= 1`` processes inline in the calling thread (the
            pipeline bounds it first, see :func:`~megatron_qk.data.workers.plan_workers`).
        backend: ``"auto"`` (process if ``workers > 1``), ``"thread"`` or ``"process"``.
    """

    def __init__(
        self,
        config: RecordConfig,
        encoding: tiktoken.Encoding,
        tokenizer_spec: str,
        eod_id: int,
        dtype: str,
        workers: int,
        backend: str = "auto",
    ) -> None:
        self.backend = resolve_backend(workers, backend)
        self.max_in_flight = 2 * max(workers, 1) + 2
        self._task: Callable[[RawBatch], EncodedChunk]
        if self.backend == "process":
            # spawn, not fork: the parent may already run threads (tqdm, user code).
            self._pool: Executor = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_process_worker,
                initargs=(tokenizer_spec, config, os.getpid()),
            )
            _start_workers_with_sigint_blocked(self._pool, workers)
            self._task = _process_in_worker
        else:
            if self.backend == "thread":
                self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mqk-encode")
            else:
                self._pool = _InlineExecutor()

            def task(batch: RawBatch) -> EncodedChunk:
                return process_batch(batch, config, encoding, eod_id, dtype)

            self._task = task

    def map_ordered(self, batches: Iterator[RawBatch]) -> Iterator[tuple[RawBatch, EncodedChunk]]:
        """Yield ``(batch, result)`` for each batch, in order (``batch.payload`` is released).

        Batches are pulled lazily, at most ``max_in_flight`` ahead. If pulling raises (a read
        error), the batches before it are still yielded, then the error is raised.
        """
        pending: deque[tuple[RawBatch, Future]] = deque()
        error: Exception | None = None
        iterator = iter(batches)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except Exception as e:
                error = e
                break
            pending.append((batch, self._pool.submit(self._task, batch)))
            while len(pending) >= self.max_in_flight or (pending and pending[0][1].done()):
                yield self._pop(pending)
        while pending:
            yield self._pop(pending)
        if error is not None:
            raise error

    @staticmethod
    def _pop(pending: deque[tuple[RawBatch, Future]]) -> tuple[RawBatch, EncodedChunk]:
        batch, future = pending.popleft()
        result = future.result()
        batch.payload = None  # the raw records are no longer needed
        return batch, result

    def close(self) -> None:
        """Shut the pool down, dropping queued work (waits only for batches being processed)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
